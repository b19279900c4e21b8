"""The attacks of test_trust_attacks.py, against the in-memory repository simulator.

Same attacks, same refusals, no broker: the trust client downloads through
``tests._repository_simulator`` (the real ``RepositoryFetcher`` interface, the
real chunk window on a virtual clock), so the whole file runs in well under a
second of transfer time. The real-Mosquitto versions stay in test_trust_attacks.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

import edge_sdk
from edge_sdk.errors import TransportError, VerificationError
from edge_sdk.release import Repository, create_deployment
from edge_sdk.transport import EndlessDataError, FetchConfig, SlowRetrievalError
from edge_sdk.trust import (
    Deployment,
    DeploymentExpiredError,
    DeploymentSignatureError,
    DowngradeError,
    ExpiredError,
    MixAndMatchError,
    NotForThisDeviceError,
    ReplayError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
    UpdateClient,
    load_public_key,
    sign_deployment,
    verify_deployment,
)
from tests._repository_simulator import EvilRepository, RepositorySimulator
from tests._trust_env import FLEET, make_artifact

FAST = FetchConfig(chunk_size=4096, window=4, chunk_timeout=0.5, stall_timeout=1.5)


class SimEnv:
    """A real repository on disk, served to the device from memory by a simulator."""

    def __init__(self, tmp: Path, *, thresholds: dict[str, int] | None = None) -> None:
        self.tmp = tmp
        self.repo = Repository.init(tmp / "repo", tmp / "keys", thresholds=thresholds)
        self.sim: RepositorySimulator = RepositorySimulator(self.repo)
        self.state = tmp / "device"
        self.key = load_public_key(self.repo.deployment_key_path)
        self.last: bytes | None = None

    def serve(self, sim: RepositorySimulator) -> RepositorySimulator:
        self.sim = sim
        return sim

    def release(self, name: str = "m", version: str = "1.0", n: int = 16,
                seed: int = 0) -> edge_sdk.Artifact:
        art = make_artifact(self.tmp / "arts", name, version, n, seed)
        self.repo.add_artifact(art.path)
        self.sim.publish()
        return art

    def deploy(self, model: str = "m", version: str | None = None, **kw: object) -> Deployment:
        sd = create_deployment(self.repo, model=model, fleet=FLEET, version=version,
                               devices=["d1"], **kw)  # type: ignore[arg-type]
        self.last = sd.document
        return self.receive_desired()

    def receive_desired(self, last_counter: int | None = None) -> Deployment:
        assert self.last is not None
        return verify_deployment(self.last, self.key, device_id="d1", fleet=FLEET,
                                 last_counter=last_counter)

    def client(self, config: FetchConfig | None = None) -> UpdateClient:
        self.sim.config = config or FetchConfig()
        return UpdateClient(
            trusted_root=(self.repo.meta / "1.root.json").read_bytes(),
            metadata_dir=self.state / "tuf", partial_dir=self.state / "partial",
            fetcher=self.sim)

    def put(self, md: Metadata, signers: list) -> bytes:  # type: ignore[type-arg]
        """Sign ``md`` with ``signers`` and serve it in place of the repository's own."""
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        role = md.signed.type
        if role != "timestamp":
            self.sim.files[f"metadata/{md.signed.version}.{role}.json"] = data
        self.sim.files[f"metadata/{role}.json"] = data
        return data

    def put_snapshot_and_timestamp(self, targets: Metadata) -> None:  # type: ignore[type-arg]
        """What a compromise of the online keys allows: re-sign snapshot and timestamp
        over ``targets`` (already served with :meth:`put`)."""
        v = targets.signed.version
        snap = self.repo.load("snapshot")
        snap.signed.version += 1
        snap.signed.meta["targets.json"] = MetaFile.from_data(
            v, self.sim.files[f"metadata/{v}.targets.json"], ["sha256"])
        sdata = self.put(snap, self.repo.keys.signers("snapshot"))
        ts = self.repo.load("timestamp")
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, sdata, ["sha256"])
        self.put(ts, self.repo.keys.signers("timestamp"))


@pytest.fixture
def e(tmp_path: Path) -> SimEnv:
    return SimEnv(tmp_path)


def _assert_refused(err: pytest.ExceptionInfo[BaseException], dest: Path) -> None:
    assert isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value)
    assert not dest.exists()


def _assert_transient(err: pytest.ExceptionInfo[BaseException], dest: Path) -> None:
    """Weather, not an attack: retried later, never refused for good; nothing installed."""
    assert isinstance(err.value, TransportError)
    assert not isinstance(err.value, VerificationError)
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


def test_tampered_chunk_is_refused_and_nothing_installed(e: SimEnv, tmp_path: Path) -> None:
    e.serve(EvilRepository(e.repo, "tamper"))
    e.release(n=4000)
    dep = e.deploy()
    client = e.client(FAST)
    dest = tmp_path / "installed"
    with pytest.raises(TargetHashError) as err:
        client.fetch(dep, dest)
    _assert_refused(err, dest)
    assert list(client.partial_dir.iterdir()) == []  # the bad partial is not resumed


def test_endless_data_is_refused(e: SimEnv, tmp_path: Path) -> None:
    e.serve(EvilRepository(e.repo, "endless"))
    e.release(n=4000)
    dep = e.deploy()
    dest = tmp_path / "installed"
    with pytest.raises(EndlessDataError) as err:
        e.client(FAST).fetch(dep, dest)
    _assert_refused(err, dest)


def test_endless_metadata_is_refused_before_it_is_downloaded(e: SimEnv, tmp_path: Path) -> None:
    e.serve(EvilRepository(e.repo, "endless-metadata"))
    e.release()
    dep = e.deploy()
    client = e.client(FAST)
    dest = tmp_path / "installed"
    with pytest.raises(EndlessDataError, match=r"timestamp\.json") as err:
        client.fetch(dep, dest)
    _assert_refused(err, dest)
    assert client.stats.bytes_received < 64 * 1024


def test_slow_retrieval_fails_once_nothing_arrives_for_the_stall_timeout(
        e: SimEnv, tmp_path: Path) -> None:
    e.serve(EvilRepository(e.repo, "silent"))
    e.release(n=4000)
    dep = e.deploy()
    dest = tmp_path / "installed"
    client = e.client(FAST)
    with pytest.raises(SlowRetrievalError) as err:
        client.fetch(dep, dest)
    _assert_transient(err, dest)
    assert client.stats.timeouts >= 1 and client.stats.chunks_resent >= 1
    # The stall timeout on the virtual clock (plus one look at the timers), no more.
    assert FAST.stall_timeout <= e.sim.now < FAST.stall_timeout + 0.6


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


def test_targets_signed_by_wrong_key_are_refused(e: SimEnv, tmp_path: Path) -> None:
    e.release()
    dep = e.deploy()
    md = e.repo.load("targets")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"malware")
    md.signed.targets["m/1.0/model.onnx"] = TargetFile.from_file("m/1.0/model.onnx", str(evil))
    md.signed.version += 1
    e.put(md, [CryptoSigner.generate_ed25519()])
    e.put_snapshot_and_timestamp(md)  # online keys compromised too
    dest = tmp_path / "installed"
    with pytest.raises(SignatureError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def test_targets_below_signature_threshold_are_refused(tmp_path: Path) -> None:
    e = SimEnv(tmp_path, thresholds={"targets": 2})
    e.release()
    dep = e.deploy()
    assert e.client().fetch(dep, tmp_path / "ok").is_dir()  # 2 of 2 keys: accepted
    md = e.repo.load("targets")
    md.signed.version += 1
    e.put(md, e.repo.keys.signers("targets")[:1])
    e.put_snapshot_and_timestamp(md)
    dest = tmp_path / "installed"
    with pytest.raises(SignatureError, match="1/2") as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def test_rollback_to_older_metadata_is_refused(e: SimEnv, tmp_path: Path) -> None:
    e.release(version="1.0")
    old_timestamp = e.sim.files["metadata/timestamp.json"]
    e.release(version="2.0", seed=1)
    dep = e.deploy(version="2.0")
    e.client().fetch(dep, tmp_path / "v2")
    e.sim.files["metadata/timestamp.json"] = old_timestamp
    dest = tmp_path / "installed"
    with pytest.raises(RollbackError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


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


def test_expired_metadata_freeze_is_refused(e: SimEnv, tmp_path: Path) -> None:
    e.release()
    dep = e.deploy()
    ts = e.repo.load("timestamp")
    ts.signed.version += 1
    ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    e.put(ts, e.repo.keys.signers("timestamp"))
    dest = tmp_path / "installed"
    with pytest.raises(ExpiredError, match="expired") as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def test_mix_and_match_of_snapshot_and_targets_is_refused(e: SimEnv, tmp_path: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    dep = e.deploy(version="2.0")
    v = e.repo.load("targets").signed.version
    # Serve the older, validly signed targets under the name the snapshot names.
    e.sim.files[f"metadata/{v}.targets.json"] = e.sim.files[f"metadata/{v - 1}.targets.json"]
    dest = tmp_path / "installed"
    with pytest.raises(MixAndMatchError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def test_deployment_naming_a_hash_the_repository_did_not_sign_is_refused(
        e: SimEnv, tmp_path: Path) -> None:
    e.release()
    dep = e.deploy()
    signer = e.repo.keys.signers("deployment")[0]
    forged = json.loads(sign_deployment(dep, [signer]))["signed"]
    forged["sha256"] = "0" * 64
    doc = sign_deployment(Deployment.from_signed(forged), [signer])
    bad = verify_deployment(doc, e.key, device_id="d1")
    dest = tmp_path / "installed"
    with pytest.raises(TargetMismatchError) as err:
        e.client().fetch(bad, dest)
    _assert_refused(err, dest)
    assert not any(p.startswith("targets/") for p in e.sim.fetched)  # no byte of it asked for


def test_self_signed_deployment_is_refused(e: SimEnv) -> None:
    e.release()
    dep = e.deploy()
    doc = sign_deployment(replace(dep, counter=dep.counter + 1),
                          [CryptoSigner.generate_ed25519()])
    with pytest.raises(DeploymentSignatureError):
        verify_deployment(doc, e.key, device_id="d1")


def test_replayed_deployment_with_old_counter_is_refused(e: SimEnv) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    e.deploy(version="1.0")
    assert e.last is not None
    first = e.last
    second = e.deploy(version="2.0")
    with pytest.raises(ReplayError, match="not newer"):
        verify_deployment(first, e.key, device_id="d1", last_counter=second.counter)
    with pytest.raises(ReplayError):
        e.receive_desired(last_counter=second.counter)


def test_unsigned_downgrade_is_refused_and_signed_rollback_accepted(
        e: SimEnv, tmp_path: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    v2 = e.deploy(version="2.0")
    signer = e.repo.keys.signers("deployment")[0]
    rel1 = e.repo.find("m", "1.0")
    down = replace(v2, version="1.0", target=rel1.path, sha256=rel1.sha256,
                   length=rel1.length, counter=v2.counter + 1)
    doc = sign_deployment(down, [signer])
    with pytest.raises(DowngradeError, match="--rollback"):
        verify_deployment(doc, e.key, device_id="d1", installed=("m", "2.0"),
                          last_counter=v2.counter)
    # Flipping the rollback flag without the key breaks the signature.
    tampered = json.loads(doc)
    tampered["signed"]["rollback"] = True
    with pytest.raises(DeploymentSignatureError):
        verify_deployment(json.dumps(tampered).encode(), e.key, device_id="d1",
                          installed=("m", "2.0"))
    signed_rb = sign_deployment(replace(down, rollback=True), [signer])
    ok = verify_deployment(signed_rb, e.key, device_id="d1", installed=("m", "2.0"),
                           last_counter=v2.counter)
    assert ok.rollback and ok.version == "1.0"
    assert e.client().fetch(ok, tmp_path / "rolled-back").is_dir()


def test_deployment_for_another_device_or_expired_is_refused(e: SimEnv) -> None:
    e.release()
    dep = e.deploy()
    signer = e.repo.keys.signers("deployment")[0]
    doc = sign_deployment(dep, [signer])
    with pytest.raises(NotForThisDeviceError):
        verify_deployment(doc, e.key, device_id="d2", groups=["other"])
    with pytest.raises(NotForThisDeviceError):
        verify_deployment(doc, e.key, device_id="d1", fleet="prod")
    with pytest.raises(DeploymentExpiredError):
        verify_deployment(doc, e.key, device_id="d1", now=dep.expires + timedelta(seconds=1))
    assert dep.fleet == FLEET
