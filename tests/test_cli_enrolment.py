"""``edge-sdk device pending|accept|reject|revoke|allow`` and ``edge-sdk claim
create|revoke|list`` against a real database (SQLite and PostgreSQL). ``device revoke``
waits for the controller's ``applied_at``: here a thread does what the controller does
(:func:`edge_sdk.fleet._enrol.revoked_applied`) once the row asks for it."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet import _enrol as enrol
from tests import _fleetdb
from tests._enrolreq import request

db_url = _fleetdb.db_url
FLEET = "lab"


@pytest.fixture
def db(db_url: str) -> Iterator[FleetDB]:
    with FleetDB.open(db_url) as d:
        yield d


def _cli(db_url: str, *args: str) -> int:
    who = [] if args[1] in ("pending", "list") else ["--operator", "alice"]
    return main([*args, "--db", db_url, "--fleet", FLEET, *who])


def _ask(db: FleetDB, *ids: str, batch: str = "b1") -> None:
    for d in ids:
        enrol.record_request(db, FLEET, request(d, batch=batch), now=time.time(),
                             max_pending=100)


def test_pending_lists_each_request_with_its_key_and_facts(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(db_url, "device", "pending") == 0
    assert "no pending enrolments" in capsys.readouterr().out
    _ask(db, "cam-1", "cam-2", batch="line-3")
    assert _cli(db_url, "device", "pending") == 0
    out = capsys.readouterr().out.splitlines()
    fp = db.enrolments(FLEET)[0]["fingerprint"]
    assert out[0].split()[:3] == ["DEVICE", "BATCH", "FINGERPRINT"]
    assert out[1].split()[:4] == ["cam-1", "line-3", fp[:16], "1"]
    assert out[1].endswith("arch=aarch64") and out[2].startswith("cam-2")
    assert _cli(db_url, "device", "pending", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["device_id"] for r in rows] == ["cam-1", "cam-2"]


def test_accept_and_reject_change_the_record_as_the_operator(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _ask(db, "cam-1", "cam-2", "cam-3")
    assert _cli(db_url, "device", "accept", "cam-1", "cam-2", "--group", "lobby",
                "--tag", "floor=2") == 0
    assert "accepted 2 device(s)" in capsys.readouterr().out
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and (dev["groups"], dev["tags"]) == (["lobby"], {"floor": "2"})
    assert _cli(db_url, "device", "reject", "cam-3", "--reason", "not ours") == 0
    assert "rejected 1 device(s)" in capsys.readouterr().out
    states = {r["device_id"]: r["state"] for r in db.enrolments(FLEET)}
    assert states == {"cam-1": "accepted", "cam-2": "accepted", "cam-3": "rejected"}
    assert [(a["actor"], a["action"]) for a in db.audit()] == [
        ("alice", "device.accept"), ("alice", "device.reject")]


def test_bad_requests_are_one_line_errors(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _ask(db, "cam-1")
    assert _cli(db_url, "device", "accept", "ghost") == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-sdk: error: no enrolment request from ghost")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _cli(db_url, "device", "accept", "cam-1", "--tag", "novalue") == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert _cli(db_url, "device", "revoke", "cam-1") == 2  # --reason is required
    assert "--reason" in capsys.readouterr().err
    assert _cli(db_url, "device", "revoke", "cam-1", "--reason", "x") == 2
    assert "cam-1 is pending" in capsys.readouterr().err
    assert _cli(db_url, "claim", "create", "a/b") == 2
    assert "claim batch" in capsys.readouterr().err
    assert db.enrolments(FLEET)[0]["state"] == "pending"


def test_revoke_waits_for_the_controller_to_apply_it(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _ask(db, "cam-1")
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.issued(db, FLEET, "cam-1", issued=1, expires_at=time.time() + 60)
    stop = threading.Event()

    def controller() -> None:  # what the Enroller's poll loop does with a revoke row
        while not stop.is_set():
            if any(w.get("want") == "revoke" for w in enrol.wanted(db, FLEET)):
                enrol.revoked_applied(db, FLEET, "cam-1")
                return
            stop.wait(0.05)

    t = threading.Thread(target=controller, daemon=True)
    t.start()
    try:
        assert _cli(db_url, "device", "revoke", "cam-1", "--reason", "stolen",
                    "--wait", "60") == 0
    finally:
        stop.set()
        t.join(10)
    out = capsys.readouterr().out
    assert out.startswith("revoked cam-1: the broker closed its connection (")
    row = enrol.enrolment(db, FLEET, "cam-1")
    assert row is not None and (row["state"], row["broker"]) == ("revoked", "deleted")


def test_revoke_says_so_when_no_controller_applies_it(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _ask(db, "cam-1")
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    assert _cli(db_url, "device", "revoke", "cam-1", "--reason", "stolen",
                "--wait", "0.2") == 0
    assert capsys.readouterr().out.strip() == (
        "revoked cam-1 in the record; no controller applied it yet (is serve running?)")
    row = enrol.enrolment(db, FLEET, "cam-1")
    assert row is not None and (row["state"], row["want"]) == ("revoked", "revoke")


def test_allow_takes_a_file_of_devices_with_their_groups(
        db: FleetDB, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _ask(db, "cam-9")
    f = tmp_path / "allow.txt"
    f.write_text("cam-1:lobby site=a\n# a comment\ncam-2\ncam-9:door\n")
    assert _cli(db_url, "device", "allow", "--file", str(f), "--tag", "batch=7") == 0
    out = capsys.readouterr().out
    assert "allowed 2 device(s)" in out and "accepted now: cam-9" in out
    got = enrol.record_request(db, FLEET, request("cam-1"), now=time.time(), max_pending=9)
    assert got.state == "accepted"
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and (dev["groups"], dev["tags"]) == (
        ["lobby"], {"batch": "7", "site": "a"})
    assert _cli(db_url, "device", "allow") == 2
    assert "at least one device" in capsys.readouterr().err


def test_a_claims_password_is_written_0600_or_shown_once(
        db: FleetDB, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "claim.txt"
    assert _cli(db_url, "claim", "create", "line-3", "--out", str(out)) == 0
    said = capsys.readouterr().out
    pw = out.read_text().strip()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert pw not in said and "user _claim-line-3" in said
    assert [w["secret"] for w in enrol.wanted(db, FLEET)] == [pw]
    assert _cli(db_url, "claim", "create", "line-4") == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[-1] == [w["secret"] for w in enrol.wanted(db, FLEET)][1]
    assert _cli(db_url, "claim", "create", "line-5", "--out",
                str(tmp_path / "nodir" / "x")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert enrol.enrolment(db, FLEET, "x") is None and len(db.claims(FLEET)) == 2
    enrol.count_claim(db, FLEET, "line-3", requests=4, dropped=1)
    assert _cli(db_url, "claim", "list") == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["BATCH", "STATE", "SESSIONS"]
    assert rows[1].split() == ["line-3", "applying", "16", "4", "1", "0", "alice"]
    _ask(db, "p1", batch="line-3")
    assert _cli(db_url, "claim", "revoke", "line-3") == 0
    assert "1 pending request(s) dropped" in capsys.readouterr().out
    assert _cli(db_url, "claim", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["batch"], c["revoked_at"] is not None) for c in listed] == [
        ("line-3", True), ("line-4", False)]
    assert pw not in json.dumps(listed)


def test_a_claim_is_created_with_the_sessions_asked_for_within_1_to_256(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(db_url, "claim", "create", "one", "--sessions", "1") == 0
    said = capsys.readouterr().out
    assert "user _claim-one," in said and "more session" not in said
    assert _cli(db_url, "claim", "create", "many", "--sessions", "256") == 0
    assert "user _claim-many and 255 more session account(s)" in capsys.readouterr().out
    for bad in ("0", "257", "-3"):
        assert _cli(db_url, "claim", "create", f"bad{bad}", "--sessions", bad) == 2
        err = capsys.readouterr().err
        assert "--sessions" in err and "1 to 256" in err and "Traceback" not in err
    assert _cli(db_url, "claim", "create", "x", "--sessions", "many") == 2
    assert {w["batch"]: w["sessions"] for w in enrol.wanted(db, FLEET)} == {
        "one": 1, "many": 256}
    assert _cli(db_url, "claim", "list", "--json") == 0
    assert {c["batch"]: c["sessions"] for c in json.loads(capsys.readouterr().out)} == {
        "one": 1, "many": 256}
