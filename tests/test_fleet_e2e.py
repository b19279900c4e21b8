"""The fleet controller end to end, on SQLite and PostgreSQL: real agents as
subprocesses, a real Mosquitto, the controller as a real `edge-sdk serve` subprocess,
rollouts steered with the CLI through the database."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._controller import CRASH_ENV, PAUSE_ENV
from edge_sdk.fleet._db import device_desired, devices, rollout_devices
from edge_sdk.release import create_deployment
from tests import _fleetdb, _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, Fleet, group_on_v1, new_agent
from tests._process import ROOT, ManagedProcess, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3"):
            f.release(v)
        f.release("9", offset=float("nan"))  # fails every agent's smoke test
        f.release("8", builder=_models.batch1_only_model)  # fails batches > 1 in a window
        yield f
        f.close()


@pytest.fixture(params=_fleetdb.ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _fleetdb.make_db(request.param, tmp_path)


#: Short, so that a restart after kill -9 takes the dead controller's lease over soon.
LEASE_TTL = 3.0


class Serve(ManagedProcess):
    """`edge-sdk serve` as a subprocess (kill -9 and start again at will)."""

    def __init__(self, fleet: Fleet, db_url: str, tmp: Path) -> None:
        self.cmd = [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(fleet.repo.path),
                    "--broker", fleet.broker.url, "--fleet", FLEET, "--db", db_url,
                    "--poll", "0.2", "--lease-ttl", str(LEASE_TTL)]
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = tmp / "serve.log"
        self.proc = None

    def start(self, crash_at: str | None = None, *, pause_at: str | None = None) -> Serve:
        """Start `serve`; with ``crash_at``, it kills itself at that crash point; with
        ``pause_at``, it stops itself there (SIGSTOP) until sent SIGCONT."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop(CRASH_ENV, None)
        env.pop(PAUSE_ENV, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        if pause_at:
            env[PAUSE_ENV] = pause_at
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=log, env=env)
        return self

    def wait_crashed(self, timeout: float = 60) -> None:
        """Wait for the SIGKILL a crash point sends."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve never crashed: {self.log.read_text()[-3000:]}") \
                from None
        assert code == -signal.SIGKILL, (code, self.log.read_text()[-3000:])


def polled_since(db_url: str, polls: int) -> None:
    """Wait until the controller has looked at every active rollout ``polls`` more times
    (each look starts with a lease renewal, and at most one more renewal comes with the
    state it saves): what it would have done by now, it has done."""
    with FleetDB.open(db_url) as db:
        seen: list[float] = []

        def renewed() -> bool:
            lease = db.lease(FLEET)
            if lease is not None and (not seen or lease["renewed"] != seen[-1]):
                seen.append(lease["renewed"])
            return len(seen) > 2 * polls + 1

        wait_for(renewed, 30, lambda: f"the controller renewed its lease {seen}")


@pytest.fixture()
def serve(fleet: Fleet, db_url: str, tmp_path: Path) -> Iterator[Serve]:
    s = Serve(fleet, db_url, tmp_path)
    yield s
    s.kill()


def start_fleet(fleet: Fleet, tmp: Path, agents: list[AgentProc], group: str, n: int,
                db_url: str) -> list[AgentProc]:
    procs = group_on_v1(fleet, tmp, agents, group, n, db_url)
    with FleetDB.open(db_url) as db:
        wait_for(lambda: len([d for d in db.devices(group=group)
                              if d["version"] == "1" and d["online"]]) == n, 30,
                 lambda: f"registry has {db.devices(group=group)}")
    return procs


def grp(name: str, db_url: str) -> str:
    """Device and group names per engine: the module's agents share one broker."""
    return f"{name}-{db_url.split(':')[0].split('+')[0][:2]}"


def rollout(db_url: str, *args: str) -> int:
    return main(["rollout", *args, "--db", db_url, "--operator", "tester"])


def start(db_url: str, *args: str) -> int:
    code = main(["rollout", "start", "--db", db_url, "--operator", "tester", "--fleet",
                 FLEET, "--model", "adder", *args])
    assert code == 0
    with FleetDB.open(db_url) as db:
        return int(db.rollouts()[0]["id"])


def wait_status(db_url: str, rid: int, status: str, timeout: float = 90) -> dict[str, Any]:
    with FleetDB.open(db_url) as db:
        return wait_for(lambda: (r := db.rollout(rid))["status"] == status and r, timeout,
                        lambda: f"rollout {rid}: {db.rollout(rid)}")


def deployments_seen(fleet: Fleet, device: str, since: int) -> set[int]:
    """Every deployment counter above ``since`` that the device reported about."""
    out = set()
    for e in list(fleet.events[device]):
        dep = e.get("deployment")
        if isinstance(dep, dict) and isinstance(dep.get("counter"), int) \
                and dep["counter"] > since:
            out.add(dep["counter"])
    return out


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
