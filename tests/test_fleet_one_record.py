"""One fleet, one record, through the CLI (``main([...])``): a command asked about a fleet
the database has no device in names the fleets it does hold; every command given the
release repository uses its ``fleet.db`` unless ``--db`` / ``EDGE_DB`` names another, so
what ``release add`` records is what ``audit`` and serve's page show; a command that
needs a database and is given none says so in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._registry import write_state
from tests import _fleetdb
from tests._broker import Mosquitto, free_port
from tests._process import ROOT, wait_for
from tests._trust_env import make_artifact

db_url = _fleetdb.db_url


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the operator's shell may export must not choose for these tests."""
    for name in ("EDGE_DB", "EDGE_FLEET", "EDGE_BROKER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def lab(db_url: str) -> Iterator[str]:
    """A database holding fleet 'lab': two devices that reported, one only assigned."""
    with FleetDB.open(db_url) as db, db.begin() as c:
        for d in ("cam-1", "cam-2"):
            write_state(c, "lab", d, json.dumps({
                "online": True, "model": {"name": "m", "version": "1.0"}}).encode())
    _fleetdb.assign(db_url, "lab", ["cam-1", "cam-3"], "lobby")
    yield db_url


def test_status_of_an_empty_fleet_names_the_fleet_the_database_holds(
        lab: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["status", "--db", lab]) == 0
    out = capsys.readouterr().out
    assert "no device has reported in fleet 'default'" in out
    assert "the database holds fleet 'lab' (3 devices): pass --fleet lab or set " \
           "EDGE_FLEET=lab" in out
    assert len(out.splitlines()) == 1
    assert main(["status", "--db", lab, "--device", "cam-1"]) == 2
    assert "EDGE_FLEET=lab" in capsys.readouterr().err

    monkeypatch.setenv("EDGE_FLEET", "lab")  # what the README tells an operator to export
    assert main(["status", "--db", lab]) == 0
    out = capsys.readouterr().out
    assert "cam-1" in out and "cam-2" in out and "database holds" not in out


def test_fleet_commands_that_find_nothing_name_the_fleet_the_database_holds(
        lab: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", lab]
    capsys.readouterr()
    assert main(["rollout", "start", *db, "--model", "m", "--version", "2.0",
                 "--group", "lobby"]) == 2
    err = capsys.readouterr().err
    assert "matches no device registered in fleet 'default'" in err
    assert "the database holds fleet 'lab' (3 devices)" in err and len(err.splitlines()) == 1

    assert main(["device", "remove", "cam-1", *db]) == 2
    err = capsys.readouterr().err
    assert "no device cam-1 in fleet 'default'" in err and "--fleet lab" in err

    repo = tmp_path / "repo"
    assert main(["release", "init", str(repo), "--keys", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    assert main(["rollout", "run", "--repo", str(repo), *db, "--group", "lobby", "--model",
                 "m", "--broker", "mqtt://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no device is assigned to group(s) lobby in fleet 'default'" in err
    assert "EDGE_FLEET=lab" in err

    # A first device in a new fleet is allowed, with a warning naming the others.
    assert main(["device", "set", "gw-1", "--group", "gw", *db, "--fleet", "plant"]) == 0
    err = capsys.readouterr().err
    assert "fleet 'plant' had no device before; the database holds fleet 'lab'" in err

    # A fleet that has devices is not the mistake: no other fleet is named.
    assert main(["rollout", "start", *db, "--fleet", "lab", "--model", "m", "--version",
                 "2.0", "--group", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "matches no device registered in fleet 'lab'" in err and "holds" not in err
    assert main(["device", "set", "cam-4", "--group", "lobby", *db, "--fleet", "lab"]) == 0
    assert "holds" not in capsys.readouterr().err


def test_a_command_that_needs_a_database_and_is_given_none_says_so_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["rollout", "list"], ["audit"], ["rollout", "status", "1"],
                 ["device", "set", "cam-1", "--group", "g"], ["device", "remove", "cam-1"],
                 ["rollout", "start", "--model", "m", "--version", "1", "--group", "g"]):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("edge-sdk: error: name the fleet database with --db URL (or "
                              "EDGE_DB), or --repo REPO"), (args, err)
        assert len(err.splitlines()) == 1, (args, err)


def _serve(repo: Path, broker: Mosquitto, log: Path, *extra: str) -> Iterator[str]:
    """``edge-sdk serve --repo REPO --http`` (nothing else about the database) until the
    generator is closed; yields the page's address."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(repo), "--broker",
             broker.url, "--fleet", "lab", "--http", f"127.0.0.1:{port}", *extra],
            cwd=ROOT, stdout=out, stderr=out, env={**env, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: "fleet page on" in log.read_text() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _audit_api(base: str) -> list[tuple[str, str]]:
    with urllib.request.urlopen(f"{base}/api/audit", timeout=10) as resp:
        return [(r["actor"], r["action"]) for r in json.load(resp)]


def test_release_add_is_in_audit_and_the_page_of_serve_without_db_anywhere(
        tmp_path: Path, shared_broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert main(["release", "init", str(repo), "--keys", str(keys)]) == 0
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    assert main(["release", "add", str(repo), str(art.path), "--operator", "dora"]) == 0
    assert main(["device", "set", "cam-1", "--group", "lobby", "--fleet", "lab", "--repo",
                 str(repo), "--operator", "dora"]) == 0
    capsys.readouterr()
    assert main(["audit", "--repo", str(repo), "--json"]) == 0
    want = [("dora", "release.add"), ("dora", "device.set")]
    assert [(r["actor"], r["action"]) for r in json.loads(capsys.readouterr().out)] == want

    log = tmp_path / "serve.log"
    for base in _serve(repo, shared_broker, log):
        assert _audit_api(base) == want
    assert "exists too" not in log.read_text()

    # serve given another database says where the repository's commands still record.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for base in _serve(repo, shared_broker, log, "--db", other):
        assert _audit_api(base) == []
    text = log.read_text()
    assert f"{repo / 'fleet.db'} exists too: commands given {repo} without --db" in text
