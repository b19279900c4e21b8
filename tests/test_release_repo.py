"""Host-side repository and deployment rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.serialization.json import JSONSerializer

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.errors import UsageError
from edge_sdk.release import Repository, create_deployment
from edge_sdk.trust import ExpiredError
from tests._broker import Mosquitto
from tests._trust_env import FLEET, env, make_artifact


def test_rereleasing_identical_artifact_is_a_noop_and_a_changed_one_is_refused(
        tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    art = make_artifact(tmp_path / "a", "m", "1.0")
    first = repo.add_artifact(art.path)
    v = repo.versions()
    assert repo.add_artifact(art.path) == first
    assert repo.versions() == v
    other = make_artifact(tmp_path / "b", "m", "1.0", seed=7)
    with pytest.raises(UsageError, match="bump the version"):
        repo.add_artifact(other.path)
    assert [t.version for t in repo.targets()] == ["1.0"]
    # Served file names are content-addressed (consistent snapshots).
    served = repo.targets_dir / "m" / "1.0" / f"{first.sha256}.model.onnx"
    assert served.read_bytes() == art.model_path.read_bytes()


def test_host_refuses_a_downgrade_without_rollback_flag(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    with env(tmp_path, broker) as e:
        e.release(version="1.0")
        e.release(version="1.10", seed=1)
        assert e.deploy().version == "1.10"  # newest by version order, not by string
        mqtt = ["--broker", broker.url, "--fleet", FLEET]
        base = ["deploy", "--repo", str(e.repo.path), "--device", "d1", "--model", "m",
                "--version", "1.0", *mqtt]
        assert main(base) == 2
        assert "needs --rollback" in capsys.readouterr().err
        assert main([*base, "--rollback"]) == 0
        dep = e.receive_desired()
        assert dep.rollback and dep.version == "1.0"


def test_group_deployment_goes_to_the_group_topic(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        signed = create_deployment(e.repo, model="m", fleet=FLEET, groups=["lobby"])
        assert signed.topics(e.topics) == ["edge/lab/grp/lobby/desired"]
        assert signed.deployment.applies_to("any-device", ["lobby"])
        assert json.loads(signed.document)["signed"]["counter"] == 1


def test_refresh_revives_a_frozen_repository(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        dep = e.deploy()
        ts = e.repo.load("timestamp")
        ts.signed.version += 1
        ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
        ts.signatures.clear()
        for s in e.repo.keys.signers("timestamp"):
            ts.sign(s, append=True)
        (e.repo.meta / "timestamp.json").write_bytes(ts.to_bytes(JSONSerializer()))
        with pytest.raises(ExpiredError):
            e.client().fetch(dep, tmp_path / "frozen")
        assert e.repo.refresh() == ["snapshot", "timestamp"]
        assert e.client().fetch(dep, tmp_path / "fresh").is_dir()
        assert not (tmp_path / "frozen").exists()


def test_manifest_with_measured_floats_is_released_and_reaches_the_device_intact(
        tmp_path: Path, broker: Mosquitto) -> None:
    # A converted artifact's manifest carries float figures; TUF's canonical JSON has
    # no floats, so releasing must not depend on the manifest being float-free.
    with env(tmp_path, broker) as e:
        src = make_artifact(tmp_path / "src", "m", "2.0")
        art = edge_sdk.build_artifact(
            src.model_path, tmp_path / "converted", name="m", version="2.0",
            quantization="int8-static", source={"format": "onnx", "sha256": "0" * 64},
            extra={"accuracy": {"metric": "cosine", "score": 0.99931, "verified": True},
                   "latency_ms": 0.0123, "note": "ünïcode\nnewline"})
        released = e.repo.add_artifact(art.path)
        assert released.manifest == art.manifest.to_json()
        path = e.client().fetch(e.deploy(version="2.0"), tmp_path / "device-copy")
        got = edge_sdk.Artifact.from_dir(path).manifest
        assert got == art.manifest
        assert got.extra["accuracy"]["score"] == 0.99931
