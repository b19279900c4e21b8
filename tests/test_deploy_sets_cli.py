"""``edge-sdk deploy`` with several models, removals and a per-model rollback: what the
device receives is one signed document (real broker, real keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.cli import main
from tests._broker import Mosquitto
from tests._trust_env import FLEET, Env, env


def _deploy(e: Env, broker: Mosquitto, *args: str) -> int:
    return main(["deploy", "--repo", str(e.repo.path), "--device", "d1", *args,
                 "--broker", broker.url, "--fleet", FLEET])


def test_a_set_of_models_and_a_removal_are_signed_as_one_document(
        tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release("det", "1.0")
        e.release("det", "1.1", seed=1)
        e.release("rec", "2.0", seed=2)
        assert _deploy(e, broker, "--model", "det=1.0", "--model", "rec",
                       "--remove", "old") == 0
        dep = e.receive_desired()
        signed = json.loads(e.desired_payload())["signed"]
        assert signed["spec"] == 2 and signed["remove"] == ["old"]
        assert [(m["model"], m["version"]) for m in signed["models"]] \
            == [("det", "1.0"), ("rec", "2.0")]
        assert dep.target_for("rec").sha256 == e.repo.find("rec", "2.0").sha256
        assert not dep.rollback


def test_a_removal_alone_is_a_signed_deployment(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release("det", "1.0")
        assert _deploy(e, broker, "--model", "det") == 0
        assert _deploy(e, broker, "--remove", "det") == 0
        dep = e.receive_desired()
        assert dep.models == () and dep.remove == ("det",) and dep.counter == 2


def test_one_model_with_version_is_still_signed_as_before(
        tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release("det", "1.0")
        e.release("det", "1.1", seed=1)
        assert _deploy(e, broker, "--model", "det", "--version", "1.0") == 0
        signed = json.loads(e.desired_payload())["signed"]
        assert (signed["spec"], signed["model"], signed["version"]) == (1, "det", "1.0")


def test_rollback_sends_each_named_model_back_to_the_version_deployed_before_it(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    with env(tmp_path, broker) as e:
        for name, v, seed in (("det", "1.0", 0), ("det", "1.1", 1), ("det", "1.2", 2),
                              ("rec", "2.0", 3), ("rec", "2.1", 4), ("ocr", "1", 5)):
            e.release(name, v, seed=seed)
        assert _deploy(e, broker, "--model", "det=1.0", "--model", "rec=2.0") == 0
        assert _deploy(e, broker, "--model", "det=1.1") == 0
        assert _deploy(e, broker, "--model", "det=1.2", "--model", "rec=2.1",
                       "--model", "ocr") == 0
        assert _deploy(e, broker, "--remove", "ocr") == 0
        # Each model goes back one step of its own: det 1.2 -> 1.1, rec 2.1 -> 2.0; a
        # removed model comes back at the version removed.
        assert _deploy(e, broker, "--rollback", "--model", "det", "--model", "rec",
                       "--model", "ocr") == 0
        dep = e.receive_desired()
        assert dep.rollback
        assert {m.model: m.version for m in dep.models} \
            == {"det": "1.1", "rec": "2.0", "ocr": "1"}
        # A second rollback goes further back, not forward again.
        assert _deploy(e, broker, "--rollback", "--model", "det") == 0
        assert e.receive_desired().only.version == "1.0"
        capsys.readouterr()
        assert _deploy(e, broker, "--rollback", "--model", "det") == 2
        assert "no earlier version of det" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "says"), [
    (("--model", "det=1.0", "--model", "det=1.1"), "named more than once"),
    (("--model", "det", "--remove", "det"), "named more than once"),
    (("--model", "det=", ), "NAME or NAME=VERSION"),
    (("--model", "det", "--model", "rec", "--version", "1.0"), "--version goes with one"),
    ((), "name a --model to deploy or a --remove"),
])
def test_a_malformed_set_is_one_line_and_publishes_nothing(
        tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...], says: str) -> None:
    with env(tmp_path, broker) as e:
        e.release("det", "1.0")
        e.release("det", "1.1", seed=1)
        e.release("rec", "1.0", seed=2)
        capsys.readouterr()
        assert _deploy(e, broker, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (e.repo.path / "deployments" / "counter").exists()
