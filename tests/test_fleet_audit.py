"""The audit log through the CLI (``main([...])``), on SQLite and PostgreSQL: every operator
action — release add, deploy, rollout start/pause/resume/abort/run, key rotation — with its
actor (``--operator``, else ``EDGE_OPERATOR``, else the OS user) and its parameters; a
refused command leaves no entry."""

from __future__ import annotations

import getpass
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._registry import write_state
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _fleetdb
from tests._broker import Mosquitto
from tests._trust_env import make_artifact

db_url = _fleetdb.db_url
FLEET = "lab"


def test_every_operator_action_is_in_the_audit_log_with_actor_and_parameters(
        tmp_path: Path, db_url: str, shared_broker: Mosquitto,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    db = ["--db", db_url]
    assert main(["release", "init", str(repo), "--keys", str(keys)]) == 0
    monkeypatch.delenv("EDGE_OPERATOR", raising=False)
    for v in ("1.0", "2.0"):
        art = make_artifact(tmp_path / "arts", "m", v)
        assert main(["release", "add", str(repo), str(art.path), *db,
                     "--operator", "alice"]) == 0
    with FleetDB.open(db_url) as fdb, fdb.begin() as c:
        write_state(c, FLEET, "cam-1", json.dumps({
            "online": True, "groups": ["cams"], "model": {"name": "m", "version": "1.0"},
        }).encode())

    monkeypatch.setenv("EDGE_OPERATOR", "bob")  # the environment names the actor...
    assert main(["device", "set", "cam-1", "--group", "cams", "--fleet", FLEET, *db]) == 0
    assert main(["deploy", "--repo", str(repo), "--broker", shared_broker.url, "--fleet",
                 FLEET, "--device", "cam-1", "--model", "m", "--version", "1.0", *db]) == 0
    assert main(["rollout", "start", *db, "--fleet", FLEET, "--model", "m", "--version",
                 "2.0", "--group", "cams", "--waves", "1,100%", "--rate", "30"]) == 0
    rid = "1"
    assert main(["rollout", "pause", rid, *db]) == 0
    # ...unless --operator does.
    assert main(["rollout", "resume", rid, *db, "--operator", "carol"]) == 0
    capsys.readouterr()
    assert main(["rollout", "resume", rid, *db]) == 2  # refused: not paused any more
    assert "cannot resume rollout 1: it is running, not paused" in capsys.readouterr().err
    assert main(["rollout", "abort", rid, *db]) == 0
    monkeypatch.delenv("EDGE_OPERATOR")  # ...and without either, the OS user
    assert main(["release", "rotate-key", str(repo), "targets", *db]) == 0
    assert main(["device", "remove", "cam-1", "--fleet", FLEET, *db]) == 0

    capsys.readouterr()
    assert main(["audit", "--json", *db]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = [(r["actor"], r["action"]) for r in rows]
    assert got == [
        ("alice", "release.add"), ("alice", "release.add"), ("bob", "device.set"),
        ("bob", "deploy"), ("bob", "rollout.start"), ("bob", "rollout.pause"),
        ("carol", "rollout.resume"), ("bob", "rollout.abort"),
        (getpass.getuser(), "release.rotate-key"), (getpass.getuser(), "device.remove"),
    ]
    params = [r["params"] for r in rows]
    assert params[2]["devices"] == {"cam-1": {"groups": ["cams"], "tags": {}}}
    assert params.pop(2)["change"] == {"add_groups": ["cams"]}
    assert params.pop()["devices"] == ["cam-1"]
    assert params[1]["model"] == "m" and params[1]["version"] == "2.0"
    assert len(params[1]["sha256"]) == 64 and params[1]["repo"] == str(repo.resolve())
    assert params[2] == {"fleet": FLEET, "model": "m", "version": "1.0", "counter": 1,
                         "devices": ["cam-1"], "groups": [], "rollback": False}
    start = params[3]
    assert (start["rollout"], start["model"], start["version"], start["selector"],
            start["waves"], start["rate"]) == (1, "m", "2.0", {"groups": ["cams"]},
                                               ["1", "100%"], 30.0)
    assert params[4] == params[5] == params[6] == {"rollout": 1}
    assert params[7]["role"] == "targets" and len(params[7]["keyids"]) == 1
    assert all(rows[i]["ts"] <= rows[i + 1]["ts"] for i in range(len(rows) - 1))

    assert main(["audit", *db, "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "rollout.abort" in lines[0] and '"rollout": 1' in lines[0]
    assert "release.rotate-key" in lines[1] and "device.remove" in lines[2]


def test_release_add_without_a_database_goes_to_the_repository_fleet_db(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert main(["release", "init", str(repo), "--keys", str(keys)]) == 0
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    assert main(["release", "add", str(repo), str(art.path), "--operator", "dora"]) == 0
    capsys.readouterr()
    assert main(["audit", "--repo", str(repo), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["actor"], r["action"], r["params"]["version"]) for r in rows] == [
        ("dora", "release.add", "1.0")]


def _rollout_run(repo: Path, broker: Mosquitto, device: str, *args: str) -> list[str]:
    return ["rollout", "run", "--repo", str(repo), "--broker", broker.url, "--fleet", FLEET,
            "--model", "m", "--device", device, "--waves", "1,100%", *args]


def _repo_with_two_releases(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    assert main(["release", "init", str(repo), "--keys", str(tmp_path / "keys")]) == 0
    for v in ("1.0", "2.0"):
        art = make_artifact(tmp_path / "arts", "m", v)
        assert main(["release", "add", str(repo), str(art.path), "--operator", "alice"]) == 0
    return repo


def _last_entry(repo: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["audit", "--repo", str(repo), "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out)[-1])


def test_a_one_shot_rollout_run_is_audited_in_the_repository_fleet_db_with_its_outcome(
        tmp_path: Path, shared_broker: Mosquitto,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A device that never answers: wave 1 fails, the rollout aborts (exit 3); the operator
    # action is recorded all the same, with the version the default picked.
    repo = _repo_with_two_releases(tmp_path)
    capsys.readouterr()
    assert main(_rollout_run(repo, shared_broker, "audit-run-1", "--version", "9.9")) == 2
    assert _last_entry(repo, capsys)["action"] == "release.add"  # refused: no entry
    assert main(_rollout_run(repo, shared_broker, "audit-run-1", "--wave-timeout", "1",
                             "--operator", "erin")) == 3
    entry = _last_entry(repo, capsys)
    assert (entry["actor"], entry["action"]) == ("erin", "rollout.run")
    params = entry["params"]
    aborted = params.pop("aborted")
    assert aborted.startswith("wave 1 of 1: 1 of 1 device(s) did not commit"), aborted
    assert params == {"fleet": FLEET, "model": "m", "version": "2.0",
                      "devices": ["audit-run-1"], "groups": [], "waves": ["1", "100%"],
                      "max_failures": 0.0, "wave_timeout": 1.0, "rollback": True,
                      "signed_rollback": False, "deployments": [1], "rollbacks": []}


def test_a_rollout_run_interrupted_after_its_first_wave_went_out_is_audited(
        tmp_path: Path, shared_broker: Mosquitto,
        capsys: pytest.CaptureFixture[str]) -> None:
    repo = _repo_with_two_releases(tmp_path)
    device = "audit-run-2"
    sent = threading.Event()
    watcher = MqttConnection(MqttConfig(url=shared_broker.url, fleet=FLEET))
    with watcher:
        watcher.subscribe(Topics.for_config(watcher.config).desired(device),
                          lambda _t, payload: sent.set() if payload else None)

        def interrupt() -> None:  # Ctrl-C once the wave's document is on the broker
            if sent.wait(60):
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

        # A run started in the background by a non-interactive shell (nohup, `cmd &`: how
        # CI runs) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
        # Ctrl-C's handler, for this test only.
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            t = threading.Thread(target=interrupt, daemon=True)
            t.start()
            code = main(_rollout_run(repo, shared_broker, device, "--version", "1.0",
                                     "--wave-timeout", "120", "--operator", "finn"))
            t.join(10)
        finally:
            signal.signal(signal.SIGINT, old)
    assert code == 130 and sent.is_set()
    entry = _last_entry(repo, capsys)
    assert (entry["actor"], entry["action"]) == ("finn", "rollout.run")
    assert (entry["params"]["version"], entry["params"]["deployments"],
            entry["params"]["aborted"]) == ("1.0", [1], "interrupted: KeyboardInterrupt")
