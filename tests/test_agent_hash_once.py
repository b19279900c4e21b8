"""The install path reads each byte of a fetched model through sha256 once (while it is
downloaded or rebuilt from a delta, against the signed target), and bytes other than the
signed ones are still refused, by a full download and by a delta alike.

An in-process agent on the real signed-release source (``ReleaseSource``: the real trust
client, the real chunk window) over the repository simulator; real onnxruntime sessions,
no broker (the MQTT path is test_agent_e2e.py's and test_delta_e2e.py's).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent
from device_agent._source import ReleaseSource
from edge_sdk import Artifact
from tests import _agent_local
from tests._agent_local import LocalSource, config, deployment, events
from tests._delta_env import DeltaEnv, sign_delta_that_rebuilds_other_bytes, two_versions

arts = _agent_local.arts  # artifacts v1, v2, v3, nan (fails its smoke test), batch1
make_agent = _agent_local.make_agent  # in-process agents, stopped after the test


@pytest.fixture
def d(tmp_path: Path) -> DeltaEnv:
    return two_versions(tmp_path)


class HashedBytes:
    """Counts the bytes every ``hashlib.sha256`` object of this process is fed."""

    def __init__(self) -> None:
        self.total = 0
        real = hashlib.sha256
        counter = self

        class Counting:
            name, digest_size, block_size = "sha256", 32, 64

            def __init__(self, data: bytes = b"", **kw: Any) -> None:
                self._h = real(**kw)
                self.update(data)

            def update(self, data: Any) -> None:
                counter.total += memoryview(data).nbytes
                self._h.update(data)

            def digest(self) -> bytes:
                return self._h.digest()

            def hexdigest(self) -> str:
                return self._h.hexdigest()

        self.sha256 = Counting


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> HashedBytes:
    counter = HashedBytes()
    monkeypatch.setattr(hashlib, "sha256", counter.sha256)
    return counter


def release_agent(d: DeltaEnv, tmp_path: Path, make_agent: Any) -> Agent:
    cfg = config(tmp_path / "state", device_id="d1",
                 trust={"root": str(d.repo.meta / "1.root.json"),
                        "deployment_key": str(d.repo.deployment_key_path)})
    return make_agent(cfg, ReleaseSource(cfg, None, fetcher=d.sim))


def deploy(agent: Agent, d: DeltaEnv, version: str) -> None:
    d.deploy(version=version)
    agent.installer.apply(d.desired_payload())


def last(agent: Agent, kind: str) -> dict[str, Any]:
    return [e for e in events(agent) if e["event"] == kind][-1]


def served(agent: Agent) -> str | None:
    cur = agent.slots.current
    return None if cur is None else cur.version


@pytest.mark.parametrize("way", ["full", "delta"])
def test_fetched_model_is_hashed_once_from_download_to_serving(
        d: DeltaEnv, tmp_path: Path, make_agent: Any, hashed: HashedBytes, way: str) -> None:
    agent = release_agent(d, tmp_path, make_agent)
    if way == "delta":
        deploy(agent, d, "1")
        assert served(agent) == "1"
    hashed.total = 0
    version = "2" if way == "delta" else "1"
    deploy(agent, d, version)
    assert served(agent) == version and last(agent, "committed")
    assert last(agent, "downloaded")["download"]["kind"] == way
    size = d.arts[version].manifest.size_bytes
    # Once while written; the rest is metadata, the deployment and (a delta) the delta.
    assert size <= hashed.total < size * 1.25, f"{hashed.total / size:.2f}x the model hashed"


def tamper_full_target(d: DeltaEnv, version: str) -> None:
    rt = d.repo.find("m", version)
    path = d.remote(rt.path, d.arts[version].manifest.sha256)
    data = bytearray(d.sim.files[path])
    data[len(data) // 2] ^= 0xFF
    d.sim.files[path] = bytes(data)


def test_full_download_of_other_bytes_than_the_signed_ones_is_refused(
        d: DeltaEnv, tmp_path: Path, make_agent: Any) -> None:
    agent = release_agent(d, tmp_path, make_agent)
    tamper_full_target(d, "1")
    deploy(agent, d, "1")
    failed = last(agent, "failed")
    assert failed["stage"] == "fetch" and failed["deployment"]["artifact_version"] == "1"
    assert "do not match the signed length and sha256" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert served(agent) is None and agent.installer.state.current is None
    assert list(agent.store.models.iterdir()) == []


def test_delta_that_rebuilds_other_bytes_is_refused_and_v1_keeps_serving(
        d: DeltaEnv, tmp_path: Path, make_agent: Any) -> None:
    agent = release_agent(d, tmp_path, make_agent)
    deploy(agent, d, "1")
    assert served(agent) == "1"
    sign_delta_that_rebuilds_other_bytes(d, "2")
    tamper_full_target(d, "2")  # what the failed delta falls back to
    deploy(agent, d, "2")
    assert any(d.delta_path("2").rpartition("/")[2] in p for p in d.sim.fetched)
    failed = last(agent, "failed")
    assert failed["stage"] == "fetch" and failed["deployment"]["artifact_version"] == "2"
    assert "do not match the signed length and sha256" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert served(agent) == "1" and agent.installer.state.current.version == "1"
    assert not any(p.name.startswith("m-2-") for p in agent.store.models.iterdir())


def test_model_bytes_other_than_the_ones_the_source_verified_are_refused(
        make_agent: Any, arts: dict[str, Artifact], tmp_path: Path) -> None:
    agent = make_agent(source=LocalSource(tell_sha256=True))
    agent.installer.apply(deployment(arts["v1"], 1))
    assert served(agent) == "v1"
    # v2's manifest with v3's model bytes: same length, so only the hash tells them apart.
    swapped = tmp_path / "swapped"
    shutil.copytree(arts["v2"].path, swapped)
    other = arts["v3"].model_path.read_bytes()
    assert len(other) == arts["v2"].manifest.size_bytes
    (swapped / arts["v2"].manifest.model).write_bytes(other)
    agent.installer.apply(deployment(Artifact(swapped, arts["v2"].manifest), 2))
    failed = last(agent, "failed")
    assert failed["deployment"]["artifact_version"] == "v2"
    assert "was verified as sha256" in failed["reason"] and "manifest names" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert served(agent) == "v1" and agent.installer.state.current.version == "v1"
