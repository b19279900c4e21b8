"""The fleet controller end to end, on SQLite and PostgreSQL: real agents as
subprocesses, a real Mosquitto, the controller as a real `edge-sdk serve` subprocess,
rollouts steered with the CLI through the database."""

from __future__ import annotations

import http.client
import json
import sys
import time

import pytest
import sqlalchemy as sa

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._store._schema import device_desired, devices, rollout_devices
from edge_sdk.release import create_deployment
from tests import _fleet_host, _fleetdb
from tests._e2e import FLEET, AgentProc, new_agent
from tests._fleet_host import (
    deployments_seen,
    grp,
    polled_since,
    rollout,
    start,
    start_fleet,
    wait_status,
)
from tests._process import wait_for

fleet = _fleet_host.fleet  # Mosquitto, a responder and releases 1, 2, 3, 8 and 9
db_url = _fleet_host.db_url  # SQLite and PostgreSQL
serve = _fleet_host.serve  # `edge-sdk serve` on this module's fleet


@pytest.mark.slow
def test_three_wave_rollout_completes_and_pause_after_wave_holds_until_resume(
        fleet, tmp_path, agents, db_url, serve, capsys) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("w3", db_url), 5, db_url)
    t0 = time.monotonic()
    rid = start(db_url, "--version", "2", "--group", g, "--waves", "1,3,100%",
                "--wave-timeout", "60", "--pause-after-wave")
    r = wait_status(db_url, rid, "paused")
    assert "waiting for approval after wave 1 of 3" in r["reason"]
    polled_since(db_url, 2)  # held: nobody beyond wave 1 gets it
    r = wait_status(db_url, rid, "paused")
    assert [d["status"] for d in r["devices"] if d["wave"] > 1] == ["pending"] * 4
    assert rollout(db_url, "resume", str(rid)) == 0
    with FleetDB.open(db_url) as db:
        wait_for(lambda: "after wave 2 of 3" in (db.rollout(rid)["reason"] or ""), 60)
    assert rollout(db_url, "resume", str(rid)) == 0
    r = wait_status(db_url, rid, "completed")
    elapsed = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n3-wave rollout to 5 devices (2 approvals): {elapsed:.1f} s", file=sys.stderr)
    assert [p["by_status"] for p in r["progress"]] == [{"committed": 1}, {"committed": 2},
                                                       {"committed": 2}]
    for p in procs:
        assert p.infer() == ("2", 3.0)
    # Pausing a finished rollout is refused in one line, nothing changed.
    capsys.readouterr()
    assert rollout(db_url, "pause", str(rid)) == 2
    assert "cannot pause rollout" in capsys.readouterr().err
    assert rollout(db_url, "status", "999") == 2
    with FleetDB.open(db_url) as db:
        actions = [a["action"] for a in db.audit()]
    assert actions.count("rollout.resume") == 2 and "rollout.start" in actions


@pytest.mark.slow
def test_controller_killed_mid_wave_finishes_without_a_second_deployment(
        fleet, tmp_path, agents, db_url, serve) -> None:
    from edge_sdk.release import deployment_state

    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("k9", db_url), 5, db_url)
    since = int(deployment_state(fleet.repo)["counter"])  # type: ignore[call-overload]
    rid = start(db_url, "--version", "3", "--group", g, "--waves", "1,3,100%",
                "--wave-timeout", "60", "--rate", "60")
    with FleetDB.open(db_url) as db:
        wait_for(lambda: any(d["status"] == "sent" for d in db.rollout(rid)["devices"]
                             if d["wave"] >= 2), 60)
    serve.kill()
    # A device joins the group while the controller is down: it gets the current wave.
    late = new_agent(fleet, tmp_path, agents, f"{g}-late", groups=(g,)).start()
    _fleetdb.assign(db_url, FLEET, [late.device], g)
    late_since = fleet.deploy(late.device, "1")
    late.wait_version("1")
    serve.start()
    r = wait_status(db_url, rid, "completed", 120)
    assert {d["device"] for d in r["devices"]} == {p.device for p in procs} | {late.device}
    for p in [*procs, late]:
        assert p.infer() == ("3", 4.0)
        # One rollout, one deployment per device: never two different ones.
        got = deployments_seen(fleet, p.device, late_since if p is late else since)
        assert len(got) == 1, (p.device, got)


@pytest.mark.slow
def test_abort_on_a_model_failing_its_smoke_test_leaves_every_device_on_v1(
        fleet, tmp_path, agents, db_url, serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("nan", db_url), 5, db_url)
    rid = start(db_url, "--version", "9", "--group", g, "--waves", "2,100%",
                "--wave-timeout", "60")
    r = wait_status(db_url, rid, "aborted", 120)
    assert "failed" in r["reason"] and r["failures"], r
    for p in procs:
        assert p.infer() == ("1", 2.0)


def _batch_of_two(agent: AgentProc) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                   "data": [0.0] * 8}]})
    try:
        conn.request("POST", "/v2/models/adder/infer", body=body)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.slow
def test_abort_sends_devices_that_committed_the_new_model_back_by_a_signed_rollback(
        fleet, tmp_path, agents, db_url, serve) -> None:
    """Wave 1 commits version 8 (its smoke test and short health window pass); wave 2's
    device fails its health window on a batch of two, which aborts the rollout: the
    committed wave 1 must be sent back to version 1."""
    serve.start()
    g = grp("back", db_url)
    first = start_fleet(fleet, tmp_path, agents, g, 3, db_url)
    last = new_agent(fleet, tmp_path, agents, f"{g}-9", groups=(g,)).start()
    _fleetdb.assign(db_url, FLEET, [last.device], g)
    fleet.deploy(last.device, "1")
    fleet.wait_event(last.device, "committed", "1")
    last.stop()
    last.write_config(window_s=60.0)  # a long health window for version 8
    last.start()
    with FleetDB.open(db_url) as db:
        wait_for(lambda: (d := db.device(last.device)) and d["version"] == "1"
                 and d["online"], 30)
    rid = start(db_url, "--version", "8", "--group", g, "--waves", "3,100%",
                "--wave-timeout", "90")
    last.wait_version("8", 90)  # wave 2 started: wave 1 committed version 8
    with FleetDB.open(db_url) as db:
        r = db.rollout(rid)
    assert [d["status"] for d in r["devices"] if d["wave"] == 1] == ["committed"] * 3
    for p in first:
        assert p.infer() == ("8", 1.0)
    assert _batch_of_two(last) == 500  # inside its health window: it rolls back
    r = wait_status(db_url, rid, "aborted", 90)
    assert r["reason"].startswith("wave 2 of 2: 1 of 4 finished device(s) failed"), r
    assert "inferences failed" in r["reason"]
    with FleetDB.open(db_url) as db, db.begin() as c:
        docs = dict(c.execute(sa.select(rollout_devices.c.device,
                                        rollout_devices.c.rollback_document).where(
            rollout_devices.c.rollout == rid)).all())
    for p in first:
        d = next(x for x in r["devices"] if x["device"] == p.device)
        assert (d["status"], d["rollback_status"]) == ("committed", "committed"), d
        signed = json.loads(docs[p.device])["signed"]
        assert (signed["rollback"], signed["version"], signed["counter"]) == (
            True, "1", d["rollback_counter"])
        assert p.infer() == ("1", 2.0)
        back = [e for e in fleet.events[p.device] if e["event"] == "committed"
                and (e.get("deployment") or {}).get("counter") == d["rollback_counter"]]
        assert back and back[-1]["model"]["version"] == "1", fleet.events[p.device]
    d = next(x for x in r["devices"] if x["device"] == last.device)
    assert (d["status"], d["rollback_status"]) == ("rolled_back", None)  # went back itself
    assert last.infer() == ("1", 2.0)


@pytest.mark.slow
def test_a_tag_selector_rolls_out_to_the_tagged_devices_only(
        fleet, tmp_path, agents, db_url, serve) -> None:
    serve.start()
    g = grp("tag", db_url)
    sites = {f"{g}-{i}": site for i, site in enumerate(("berlin", "paris", "berlin",
                                                         "paris"))}
    procs = [new_agent(fleet, tmp_path, agents, d, tags={"site": s, "line": "3"}).start()
             for d, s in sites.items()]
    for site in ("berlin", "paris"):  # the operator tags them as the agents report
        _fleetdb.assign(db_url, FLEET, [d for d, s in sites.items() if s == site],
                        tags=[f"site={site}", "line=3"])
    for p in procs:
        fleet.deploy(p.device, "1")
    for p in procs:
        p.wait_version("1")
    berlin = {d for d, s in sites.items() if s == "berlin"}
    with FleetDB.open(db_url) as db:
        wait_for(lambda: {d["id"] for d in db.devices(tag="site=berlin")
                          if d["version"] == "1" and d["id"].startswith(g)} == berlin, 30)
        assert db.device(f"{g}-1")["tags"] == {"site": "paris", "line": "3"}  # type: ignore[index]
    rid = start(db_url, "--version", "2", "--tag", "site=berlin", "--waves", "1,100%")
    r = wait_status(db_url, rid, "completed", 60)
    assert {d["device"] for d in r["devices"]} == berlin
    for p in procs:
        assert p.infer() == (("2", 3.0) if p.device in berlin else ("1", 2.0))


def test_a_selector_matching_no_device_is_refused_and_nothing_is_written(
        db_url, capsys) -> None:
    assert main(["rollout", "start", "--db", db_url, "--fleet", FLEET, "--model", "adder",
                 "--version", "2", "--group", "nobody"]) == 2
    assert "matches no device" in capsys.readouterr().err
    with FleetDB.open(db_url) as db:
        assert db.rollouts() == [] and db.audit() == []


@pytest.mark.slow
def test_a_downgrade_rollout_start_is_refused_at_start_not_run_as_a_failed_wave(
        fleet, tmp_path, agents, db_url, serve, capsys) -> None:
    """Version 1 for devices of which one runs version 2: refused in one line at start, no
    rollout recorded, instead of a first wave that fails to sign."""
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("down", db_url), 2, db_url)
    fleet.deploy(procs[1].device, "2")
    procs[1].wait_version("2")
    with FleetDB.open(db_url) as db:
        wait_for(lambda: (d := db.device(procs[1].device)) is not None
                 and d["version"] == "2", 30)
    capsys.readouterr()
    args = ["rollout", "start", "--db", db_url, "--fleet", FLEET, "--model", "adder",
            "--group", g, "--device", procs[0].device, "--device", procs[1].device]
    assert main([*args, "--version", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edge-sdk: error: adder 1 for 1 selected device(s) ({procs[1].device} has "
                   "2) is a downgrade: start it with --rollback for a signed rollback "
                   "rollout"], err
    with FleetDB.open(db_url) as db:
        assert db.rollouts() == []
    assert main([*args, "--version", "2"]) == 0  # the same or newer is a rollout
    for p in procs:
        assert p.infer() == ("1" if p is procs[0] else "2", 2.0 if p is procs[0] else 3.0)


@pytest.mark.slow
def test_a_rollback_rollout_sends_devices_on_v2_back_to_v1_in_waves_by_signed_rollbacks(
        fleet, tmp_path, agents, db_url, serve, capsys) -> None:
    """`rollout run --rollback` sends one device back; `rollout start --rollback` the
    group, in two waves: every device ends on version 1 by signed rollback deployments."""
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("rb", db_url), 3, db_url)
    for p in procs:
        fleet.deploy(p.device, "2")
    for p in procs:
        p.wait_version("2")
    with FleetDB.open(db_url) as db:
        wait_for(lambda: [d["version"] for d in db.devices(group=g)] == ["2"] * 3, 30)
    run = ["rollout", "run", "--repo", str(fleet.repo.path), "--model", "adder", "--version",
           "1", "--device", procs[0].device, "--broker", fleet.broker.url, "--fleet", FLEET,
           "--wave-timeout", "60"]
    capsys.readouterr()
    assert main(run) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"edge-sdk: error: adder 1 is a downgrade for 1 device(s) ({procs[0].device} runs "
        "2): run it with --rollback for a signed rollback rollout"]
    assert main([*run, "--rollback"]) == 0
    assert procs[0].infer() == ("1", 2.0)
    rid = start(db_url, "--version", "1", "--group", g, "--waves", "1,100%",
                "--wave-timeout", "60", "--rollback")
    r = wait_status(db_url, rid, "completed", 90)
    assert r["rollback"] is True
    assert [p["by_status"] for p in r["progress"]] == [{"committed": 1}, {"committed": 2}]
    with FleetDB.open(db_url) as db, db.begin() as c:
        docs = dict(c.execute(sa.select(rollout_devices.c.device,
                                        rollout_devices.c.document).where(
            rollout_devices.c.rollout == rid)).all())
    for p in procs:
        signed = json.loads(docs[p.device])["signed"]
        assert (signed["rollback"], signed["version"]) == (True, "1"), signed
        assert p.infer() == ("1", 2.0)
    capsys.readouterr()
    assert main(["rollout", "status", str(rid), "--db", db_url]) == 0
    assert capsys.readouterr().out.startswith(f"rollback rollout {rid}: adder 1 completed")


def test_a_rollout_start_older_than_what_was_last_sent_is_refused(
        fleet, db_url, capsys) -> None:
    """What a device was last sent counts as well as what it reports: by a rollout (the
    controller's record of its desired topic) or signed in the repository (with --repo)."""
    with FleetDB.open(db_url) as db, db.begin() as c:
        for d in ("rec-a", "rec-b", "repo-a"):
            c.execute(devices.insert().values(fleet=FLEET, id=d, first_seen=0, last_seen=0,
                                              model="adder", version="1", online=True))
        c.execute(device_desired.insert().values(
            fleet=FLEET, device="rec-a", document="{}", counter=7, model="adder",
            version="3", seq=1, changed=0))
        c.execute(device_desired.insert().values(  # a cleared topic names no version
            fleet=FLEET, device="rec-b", document=None, counter=8, seq=1, changed=0))
    create_deployment(fleet.repo, model="adder", fleet=FLEET, version="3",
                      devices=["repo-a"])
    base = ["rollout", "start", "--db", db_url, "--fleet", FLEET, "--model", "adder",
            "--version", "2"]
    capsys.readouterr()
    assert main([*base, "--device", "rec-a", "--device", "rec-b"]) == 2
    assert "adder 2 for 1 selected device(s) (rec-a has 3) is a downgrade: start it with " \
           "--rollback" in capsys.readouterr().err
    assert main([*base, "--device", "repo-a", "--repo", str(fleet.repo.path)]) == 2
    assert "(repo-a has 3) is a downgrade" in capsys.readouterr().err
    with FleetDB.open(db_url) as db:
        assert db.rollouts() == []
    assert main([*base, "--device", "rec-b"]) == 0
