"""The fleet controller under faults, end to end on SQLite and PostgreSQL: real agents as
subprocesses, a real Mosquitto, `edge-sdk serve` as a subprocess that is killed with
SIGKILL; hostile device reports while a rollout runs."""

from __future__ import annotations

import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._store._schema import device_desired
from edge_sdk.release import deployment_state
from edge_sdk.transport import MqttConfig, MqttConnection
from tests import _fleet_host
from tests._broker import Mosquitto
from tests._e2e import FLEET, Fleet, new_agent
from tests._fleet_host import Serve, deployments_seen, grp, rollout, start, start_fleet, wait_status
from tests._hostile import HOSTILE_EVENTS, HOSTILE_STATES
from tests._process import wait_for

db_url = _fleet_host.db_url
serve = _fleet_host.serve


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
            # Within each device's report budget (20/s): a device flooding its own topics
            # past it has its own reports dropped by design (tests/test_fleet_flood.py).
            done.wait(1.0)

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
        stats = wait_for(lambda: (s := db.registry_stats(fleet=FLEET))
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
            assert f"pid {serve.proc.pid} " in db.lease(FLEET)["holder"]
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
            assert f"pid {standby.proc.pid} " in db.lease(FLEET)["holder"]
        assert "serving" in standby.log.read_text()
        assert took < _fleet_host.LEASE_TTL + 10, took
        for p in procs:
            assert p.infer() == ("3", 4.0)
        standby.stop()
        assert standby.proc.returncode == 0, standby.log.read_text()[-2000:]
        with FleetDB.open(db_url) as db:
            assert db.lease(FLEET) is None  # a clean stop gives it up
    finally:
        standby.kill()


# -- the retained desired topics follow the record -----------------------------------------

def retained(fleet: Fleet, device: str) -> bytes:
    """What the broker retains on ``device``'s desired topic (b"": nothing). Mosquitto sends
    a subscription's retained messages before it handles anything sent after it, so the
    round trip of a probe message on the same connection marks their end."""
    got: list[bytes] = []
    seen = threading.Event()
    probe = fleet.topics.share_probe(secrets.token_hex(4))
    with MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                        name="retained") as c:
        c.subscribe(fleet.topics.desired(device), lambda t, p: got.append(p))
        c.subscribe(probe, lambda t, p: seen.set())
        c.publish_wait(probe, b"end", qos=1)
        assert seen.wait(10)
    return got[-1] if got else b""


def recorded(db_url: str, devices: list[str]) -> dict[str, bytes]:
    """What the record says each device's desired topic must hold (b"": nothing)."""
    with FleetDB.open(db_url) as db, db.read() as c:
        rows = c.execute(sa.select(device_desired.c.device, device_desired.c.document).where(
            device_desired.c.device.in_(devices))).all()
    return {d: (doc or "").encode() for d, doc in rows}


class DesiredWatch:
    """Every message on any device's desired topic, in the order the broker sent them."""

    def __init__(self, fleet: Fleet) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._probe = fleet.topics.share_probe(secrets.token_hex(4))
        self._seen = threading.Event()
        self.conn = MqttConnection(MqttConfig(url=fleet.broker.url,
                                              fleet=FLEET), name="watch")
        self.conn.connect()
        self.conn.subscribe(fleet.topics.every_device("desired"), self._on)
        self.conn.subscribe(self._probe, lambda t, p: self._seen.set())

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append((topic.split("/")[3], payload))

    def flush(self) -> int:
        """Wait until everything the broker sent before now has arrived; return the count."""
        self._seen.clear()
        self.conn.publish_wait(self._probe, b"flush", qos=1)
        assert self._seen.wait(10)
        with self._lock:
            return len(self.got)

    def close(self) -> None:
        self.conn.close()


def _summary(device: str, payload: bytes) -> str:
    if not payload:
        return f"{device}: cleared"
    signed = json.loads(payload)["signed"]
    return f"{device}: #{signed['counter']} {signed['version']} rollback={signed['rollback']}"


def _stat(serve: Serve) -> str:
    assert serve.proc is not None
    assert serve.proc.poll() is None, serve.log.read_text()[-3000:]
    return Path(f"/proc/{serve.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_kill_after_abort_clears_retained_deployment_on_restart(
        fleet, tmp_path, agents, db_url, serve: Serve) -> None:
    """A device that never served the model is sent version 2 while it is offline, so the
    document waits retained for it. The operator aborts: the document is withdrawn (its
    topic to be cleared), and serve is killed with SIGKILL right after saving the abort,
    before the clear. The restarted serve clears the topic; the device, back online, does
    not install the aborted release."""
    g = grp("wd", db_url)
    dev = new_agent(fleet, tmp_path, agents, f"{g}-0").start()
    serve.start("aborted")
    with FleetDB.open(db_url) as db:
        wait_for(lambda: (d := db.device(dev.device)) is not None and d["online"], 30)
    dev.stop()
    since = int(deployment_state(fleet.repo)["counter"])  # type: ignore[call-overload]
    rid = start(db_url, "--version", "2", "--device", dev.device, "--waves", "100%",
                "--wave-timeout", "60")
    sent = wait_for(lambda: retained(fleet, dev.device), 60)
    assert json.loads(sent)["signed"]["version"] == "2"
    assert rollout(db_url, "abort", str(rid)) == 0
    serve.wait_crashed()
    with FleetDB.open(db_url) as db:
        r = db.rollout(rid)
    assert (r["status"], r["devices"][0]["rollback_status"]) == ("aborting", "withdrawn"), r
    assert retained(fleet, dev.device) == sent  # the crash came before the clear
    assert recorded(db_url, [dev.device]) == {dev.device: b""}
    serve.start()
    wait_status(db_url, rid, "aborted", 60)
    wait_for(lambda: retained(fleet, dev.device) == b"", 30,
             lambda: f"still retained: {retained(fleet, dev.device)[:200]!r}")
    dev.start()
    # Back online with nothing retained for it: the next deployment is the only one it
    # ever sees, never the aborted release.
    later = fleet.deploy(dev.device, "3")
    dev.wait_version("3")
    assert dev.infer() == ("3", 4.0)
    assert deployments_seen(fleet, dev.device, since) == {later}


def _stale_controller(fleet: Fleet, tmp_path: Path, agents: list[Any], db_url: str,
                      serve: Serve, point: str
                      ) -> tuple[list[Any], DesiredWatch, int, Serve]:
    """Serve A stops itself (SIGSTOP) at ``point`` before the second device's publish of a
    rollout to three devices; the standby B takes the lease over, publishes, and the
    operator's abort sends everyone back to version 1. Returns the agents, a watch of
    the desired topics, where the watch stood when A was resumed (SIGCONT) and B; A has
    exited by then."""
    serve.start(pause_at=f"{point}:2")
    procs = start_fleet(fleet, tmp_path, agents, g := grp(point[:3], db_url), 3, db_url)
    devs = [p.device for p in procs]
    standby = Serve(fleet, db_url, tmp_path / "standby").start()
    wait_for(lambda: "waiting" in standby.log.read_text(), 30,
             lambda: standby.log.read_text())
    rid = start(db_url, "--version", "2", *[x for d in devs for x in ("--device", d)],
                "--waves", "100%", "--wave-timeout", "60")
    wait_for(lambda: _stat(serve) == "T", 60, lambda: serve.log.read_text()[-3000:])
    with FleetDB.open(db_url) as db:
        wait_for(lambda: f"pid {standby.proc.pid} " in str(
            (db.lease(FLEET) or {}).get("holder")), 60)
    assert rollout(db_url, "abort", str(rid)) == 0
    r = wait_status(db_url, rid, "aborted", 120)
    assert [d["rollback_status"] for d in r["devices"]] == ["committed"] * 3, r
    for p in procs:
        assert p.infer() == ("1", 2.0)
    watch = DesiredWatch(fleet)
    mark = watch.flush()
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGCONT)
    assert serve.proc.wait(60) != 0  # it stops: the lease went to another controller
    assert "went to another controller" in serve.log.read_text(), g
    return procs, watch, mark, standby


@pytest.mark.slow
def test_controller_that_lost_its_lease_does_not_publish(
        fleet, tmp_path, agents, db_url, serve: Serve) -> None:
    """A controller paused (SIGSTOP) in the middle of publishing a wave, for longer than
    its lease: the standby takes over and publishes the operator's rollbacks. Resumed,
    the old one checks its lease before its next publish and publishes nothing; every
    retained desired message stays equal to the record."""
    procs, watch, mark, standby = _stale_controller(fleet, tmp_path, agents, db_url, serve,
                                                    "publishing")
    try:
        devs = [p.device for p in procs]
        rec = recorded(db_url, devs)
        end = watch.flush()
        assert watch.got[mark:end] == [], [_summary(d, p) for d, p in watch.got[mark:end]]
        for d in devs:
            assert json.loads(rec[d])["signed"]["rollback"] is True
            assert retained(fleet, d) == rec[d], d
        for p in procs:
            assert p.infer() == ("1", 2.0)
    finally:
        watch.close()
        standby.kill()


@pytest.mark.slow
def test_a_stale_publish_landing_after_the_lease_is_put_right_by_the_new_holder(
        fleet, tmp_path, agents, db_url, serve: Serve) -> None:
    """The old controller is paused after its lease check, right before its publish: once
    resumed it lands one stale document (nothing can stop a paused process there). The new
    holder sees it land on the retained topic and puts the record back; the device, which
    already took the newer rollback, refuses the older counter and keeps version 1."""
    procs, watch, mark, standby = _stale_controller(fleet, tmp_path, agents, db_url, serve,
                                                    "fenced")
    try:
        devs = [p.device for p in procs]
        rec = recorded(db_url, devs)
        late = [(d, p) for d, p in watch.got[mark:watch.flush()] if p != rec[d]]
        assert len(late) == 1, late  # one publish, then its next lease check stopped it
        for d in devs:
            wait_for(lambda d=d: retained(fleet, d) == rec[d], 30,
                     lambda d=d: f"{d}: {retained(fleet, d)[:200]!r}")
        for p in procs:
            assert p.infer() == ("1", 2.0)
    finally:
        watch.close()
        standby.kill()


@pytest.mark.slow
def test_a_forged_desired_message_is_replaced_by_the_record_and_a_newer_deploy_is_kept(
        fleet, tmp_path, agents, db_url, serve: Serve) -> None:
    """Someone with write access to a device's desired topic replaces the retained rollout
    document with a forged one claiming a far higher counter: the controller puts the
    record back (the agent never takes the forgery). An operator's own later
    'edge-sdk deploy' from the repository is newer than the record: it is left alone."""
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("forge", db_url), 1, db_url)
    d = procs[0].device
    rid = start(db_url, "--version", "2", "--device", d, "--waves", "100%")
    wait_status(db_url, rid, "completed", 60)
    rec = recorded(db_url, [d])[d]
    assert retained(fleet, d) == rec
    forged = json.loads(rec)
    forged["signed"]["counter"] = 10**9
    forged["signed"]["version"] = "3"
    fleet.publish_raw(d, json.dumps(forged).encode())
    wait_for(lambda: retained(fleet, d) == rec, 30, lambda: f"{g}: not put back")
    assert procs[0].infer() == ("2", 3.0)
    later = fleet.deploy(d, "3")
    procs[0].wait_version("3")
    assert json.loads(retained(fleet, d))["signed"]["counter"] == later
    assert recorded(db_url, [d])[d] == rec
