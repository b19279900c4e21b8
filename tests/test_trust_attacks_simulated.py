"""Trust tests on the in-memory repository simulator alone, no broker: the trust client
downloads through ``tests._repository_simulator`` (the real ``RepositoryFetcher``
interface, the real chunk window on a virtual clock). The attacks staged over both
transports (this simulator and a real Mosquitto) are one table in test_trust_attacks.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import MetaFile

import edge_sdk
from edge_sdk.errors import VerificationError
from edge_sdk.transport import SlowRetrievalError
from edge_sdk.trust import (
    DeploymentSignatureError,
    RollbackError,
    sign_deployment,
    verify_deployment,
)
from tests._repository_simulator import EvilRepository
from tests._trust_env import FAST, SimEnv


@pytest.fixture
def e(tmp_path: Path) -> SimEnv:
    return SimEnv(tmp_path)


def _assert_refused(err: pytest.ExceptionInfo[BaseException], dest: Path) -> None:
    assert isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value)
    assert not dest.exists()


def test_honest_repository_installs_the_deployed_artifact(e: SimEnv, tmp_path: Path) -> None:
    e.release(n=40_000)
    dep = e.deploy()
    t0 = time.perf_counter()
    dest = e.client().fetch(dep, tmp_path / "installed")
    assert time.perf_counter() - t0 < 5
    assert edge_sdk.Artifact.from_dir(dest).manifest.version == "1.0"
    assert e.sim.target_path("m", "1.0") in e.sim.fetched
    assert e.sim.fetched[0] == "metadata/2.root.json"  # ngclient looks for a newer root first


def test_cut_transfer_resumes_from_the_kept_prefix(e: SimEnv, tmp_path: Path) -> None:
    evil = e.serve(EvilRepository(e.repo, "cut", cut_at=5 * FAST.chunk_size))
    e.release(n=10_000)
    dep = e.deploy()
    with pytest.raises(SlowRetrievalError):
        e.client(FAST).fetch(dep, tmp_path / "installed")
    evil.mode = "honest"
    before = len(evil.requests)
    assert e.client(FAST).fetch(dep, tmp_path / "installed").is_dir()
    target = e.sim.target_path("m", "1.0")
    resumed = [r for r in evil.requests[before:] if r.path == target]
    assert min(r.offset for r in resumed) == 5 * FAST.chunk_size


def test_rollback_of_snapshot_behind_a_fresh_timestamp_is_refused(e: SimEnv,
                                                                  tmp_path: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    dep = e.deploy(version="2.0")
    e.client().fetch(dep, tmp_path / "v2")
    # A new timestamp (online key) pointing at an older, validly signed snapshot.
    ts = e.repo.load("timestamp")
    old = ts.signed.snapshot_meta.version - 1
    ts.signed.snapshot_meta = MetaFile.from_data(
        old, e.sim.files[f"metadata/{old}.snapshot.json"], ["sha256"])
    ts.signed.version += 1
    e.put(ts, e.repo.keys.signers("timestamp"))
    dest = tmp_path / "installed"
    with pytest.raises(RollbackError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def test_self_signed_deployment_is_refused(e: SimEnv) -> None:
    e.release()
    dep = e.deploy()
    doc = sign_deployment(replace(dep, counter=dep.counter + 1),
                          [CryptoSigner.generate_ed25519()])
    with pytest.raises(DeploymentSignatureError):
        verify_deployment(doc, e.key, device_id="d1")
