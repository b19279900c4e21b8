"""The fleet controller under faults, end to end on SQLite and PostgreSQL: real agents as
subprocesses, a real Mosquitto, `edge-sdk serve` as a subprocess that is killed with
SIGKILL; hostile device reports while a rollout runs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_sdk.fleet import FleetDB
from edge_sdk.release import deployment_state
from tests import test_agent_e2e, test_fleet_e2e
from tests._broker import Mosquitto
from tests.test_agent_e2e import Fleet, wait_for
from tests.test_fleet_e2e import (
    Serve,
    deployments_seen,
    grp,
    rollout,
    start,
    start_fleet,
    wait_status,
)
from tests.test_fleet_registry import HOSTILE_EVENTS, HOSTILE_STATES

agents = test_agent_e2e.agents
db_url = test_fleet_e2e.db_url
serve = test_fleet_e2e.serve


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-durable")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3", "4", "5"):
            f.release(v)
        yield f
        f.close()


@pytest.mark.slow
def test_hostile_reports_during_a_rollout_are_counted_and_ingestion_goes_on(
        fleet, tmp_path, agents, db_url, serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("junk", db_url), 3, db_url)
    hostile = [*HOSTILE_STATES.values(), *HOSTILE_EVENTS.values()]
    t = fleet.topics
    sent = [0]
    done = threading.Event()

    def flood() -> None:  # on the devices' own topics, and on made-up ones
        while not done.is_set():
            for p in procs:
                for i, (payload, _) in enumerate(hostile):
                    leaf = t.state if i < len(HOSTILE_STATES) else t.events
                    fleet.host.publish_wait(leaf(p.device if i % 2 else f"{g}-junk{i}"),
                                            payload, qos=1)
                    sent[0] += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        rid = start(db_url, "--version", "2", "--group", g, "--waves", "1,100%",
                    "--rate", "60")
        r = wait_status(db_url, rid, "completed", 60)
    finally:
        done.set()
        flooder.join(30)
    with FleetDB.open(db_url) as db:
        assert [p["by_status"] for p in r["progress"]] == [{"committed": 1},
                                                           {"committed": 2}]
        for p in procs:  # their later state still landed
            d = db.device(p.device)
            assert d is not None and d["version"] == "2" and d["last_result"] == "committed"
        # Each one is refused as malformed, or dropped before parsing (over the size cap,
        # or over the budget of the device whose topic it came on), and counted.
        stats = wait_for(lambda: (s := db.registry_stats(fleet=test_agent_e2e.FLEET))
                         and s[0]["malformed"] + s[0]["dropped"] >= sent[0] and s[0], 20,
                         lambda: f"sent {sent[0]}: {db.registry_stats()}")
        assert stats["db_errors"] == 0
        flooded = {p.device for p in procs} | {f"{g}-junk{i}" for i in range(len(hostile))}
        assert {d["device"] for d in db.ingest_stats(limit=1000)} <= flooded
        assert {d["id"] for d in db.devices(group=g)} == {p.device for p in procs}


def _finish(db_url: str, rid: int, timeout: float = 90) -> dict[str, Any]:
    """Approve each wave as the rollout asks, until it completes."""
    deadline = time.monotonic() + timeout
    with FleetDB.open(db_url) as db:
        while time.monotonic() < deadline:
            r = db.rollout(rid)
            if r["status"] == "completed":
                return r
            assert r["status"] in ("pending", "running", "paused"), r
            if r["status"] == "paused":
                rollout(db_url, "resume", str(rid))  # 2 when one is already queued
            time.sleep(0.2)
        raise AssertionError(f"rollout {rid} never completed: {db.rollout(rid)}")


def _when(db_url: str, rid: int, cond: Callable[[dict[str, Any]], bool]) -> None:
    """Wait until ``cond`` holds, approving each wave on the way unless it holds then."""
    deadline = time.monotonic() + 60
    with FleetDB.open(db_url) as db:
        while time.monotonic() < deadline:
            r = db.rollout(rid)
            if cond(r):
                return
            if r["status"] == "paused":
                rollout(db_url, "resume", str(rid))
            time.sleep(0.05)
        raise AssertionError(f"never reached: {db.rollout(rid)}")


#: Where the controller dies: a crash point it reaches by itself (SIGKILL), or a moment
#: the test sees in the database and kills it from outside with SIGKILL.
KILLS: list[tuple[str, str | None, Callable[[dict[str, Any]], bool] | None]] = [
    # The first signature is made (its counter used) but never saved nor published.
    ("right after start", "signing", None),
    # Wave 1's document is saved and reached one of its two devices.
    ("mid wave 1", "published", None),
    # Held for approval after wave 1; the operator resumes while the controller is down.
    ("awaiting approval", None, lambda r: r["status"] == "paused" and r["wave"] == 1),
    # Wave 2 was sent and has not answered yet.
    ("mid wave 2", None, lambda r: any(d["wave"] == 2 and d["status"] == "sent"
                                       for d in r["devices"])),
]


@pytest.mark.slow
def test_kill_9_of_the_controller_at_each_moment_then_a_restart_finishes_the_rollout(
        fleet, tmp_path, agents, db_url, serve: Serve, capsys) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("k9", db_url), 5, db_url)
    serve.stop()
    took = []
    for version, (moment, crash_at, cond) in zip(("2", "3", "4", "5"), KILLS, strict=True):
        since = int(deployment_state(fleet.repo)["counter"])  # type: ignore[call-overload]
        t0 = time.monotonic()
        serve.start(crash_at)
        rid = start(db_url, "--version", version, "--group", g, "--waves", "2,4,100%",
                    "--wave-timeout", "60", "--pause-after-wave")
        if cond is None:
            serve.wait_crashed()
        else:
            _when(db_url, rid, cond)
            serve.kill()
            if moment == "awaiting approval":
                assert rollout(db_url, "resume", str(rid)) == 0
        serve.start()
        r = _finish(db_url, rid)
        took.append(f"{moment} {time.monotonic() - t0:.1f} s")
        serve.stop()
        assert [p["by_status"] for p in r["progress"]] == [{"committed": 2}, {"committed": 2},
                                                           {"committed": 1}], (moment, r)
        for p in procs:
            assert p.infer() == (version, float(version) + 1), moment
            # One rollout, one deployment per device: never a second, different one.
            got = deployments_seen(fleet, p.device, since)
            d = next(x for x in r["devices"] if x["device"] == p.device)
            assert got == {d["counter"]}, (moment, p.device, got, d)
    with capsys.disabled():
        print(f"\nkill -9 then restart, 5 devices, 3 waves: {'; '.join(took)}",
              file=sys.stderr)


@pytest.mark.slow
def test_a_second_serve_on_the_database_waits_then_takes_over_from_a_killed_one(
        fleet, tmp_path, agents, db_url, serve: Serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("ha", db_url), 2, db_url)
    standby = Serve(fleet, db_url, tmp_path / "standby").start()
    try:
        wait_for(lambda: "waiting" in standby.log.read_text(), 30,
                 lambda: standby.log.read_text())
        lines = [ln for ln in standby.log.read_text().splitlines() if "waiting" in ln]
        assert len(lines) == 1 and lines[0].startswith(
            "edge-sdk serve: waiting: fleet 'lab' in ") and "is run by another controller (" \
            in lines[0] and f"pid {serve.proc.pid} " in lines[0], lines
        with FleetDB.open(db_url) as db:
            assert f"pid {serve.proc.pid} " in db.lease(test_agent_e2e.FLEET)["holder"]
        rid = start(db_url, "--version", "2", "--group", g, "--waves", "1,100%")
        wait_status(db_url, rid, "completed", 60)
        time.sleep(1)  # the standby stays a standby while the first one runs
        assert standby.proc.poll() is None and "serving" not in standby.log.read_text()
        serve.kill()
        t0 = time.monotonic()
        rid = start(db_url, "--version", "3", "--group", g, "--waves", "1,100%")
        wait_status(db_url, rid, "completed", 60)
        took = time.monotonic() - t0
        with FleetDB.open(db_url) as db:
            assert f"pid {standby.proc.pid} " in db.lease(test_agent_e2e.FLEET)["holder"]
        assert "serving" in standby.log.read_text()
        assert took < test_fleet_e2e.LEASE_TTL + 10, took
        for p in procs:
            assert p.infer() == ("3", 4.0)
        standby.stop()
        assert standby.proc.returncode == 0, standby.log.read_text()[-2000:]
        with FleetDB.open(db_url) as db:
            assert db.lease(test_agent_e2e.FLEET) is None  # a clean stop gives it up
    finally:
        standby.kill()
