"""Hostile device reports against the registry, on SQLite and PostgreSQL: each is refused
with a reason, nothing of it is written, and the registry's writer thread (fed by a real
Mosquitto) keeps writing the reports that follow and counts the refusals in the database."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import FleetDB, Registry, RegistryConfig
from edge_sdk.fleet._registry import (
    EventBatch,
    MalformedReport,
    ingest_state,
    write_event,
    write_state,
)
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _fleetdb
from tests._broker import Mosquitto
from tests._hostile import HOSTILE_EVENTS, HOSTILE_STATES, state_report
from tests._process import wait_for

db_url = _fleetdb.db_url
FLEET = "lab"


@pytest.mark.parametrize("name", HOSTILE_STATES)
def test_a_hostile_state_report_is_refused_with_its_reason_and_writes_nothing(
        db_url: str, name: str) -> None:
    payload, why = HOSTILE_STATES[name]
    with FleetDB.open(db_url) as db:
        with pytest.raises(MalformedReport, match=why), db.begin() as c:
            write_state(c, FLEET, "cam-1", payload)
        with db.begin() as c:
            assert ingest_state(c, FLEET, "cam-1", payload) is False
        assert db.devices() == [] and db.device_history("cam-1") == []


@pytest.mark.parametrize("name", HOSTILE_EVENTS)
def test_a_hostile_event_is_refused_with_its_reason_and_writes_nothing(
        db_url: str, name: str) -> None:
    payload, why = HOSTILE_EVENTS[name]
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            write_state(c, FLEET, "cam-1", state_report())
        before = db.device_history("cam-1")
        with pytest.raises(MalformedReport, match=why), db.begin() as c:
            write_event(c, FLEET, "cam-1", payload)
        assert db.device_history("cam-1") == before


def test_wrong_types_that_name_nothing_are_read_as_absent(db_url: str) -> None:
    payload = json.dumps({"online": "yes", "groups": "cams", "tags": [1], "model": 5,
                          "hardware": "x86", "phase": 7, "deployment": True}).encode()
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            write_state(c, FLEET, "odd", payload)
        d = db.device("odd")
    assert d is not None
    assert (d["online"], d["reported_groups"], d["reported_tags"], d["hardware"], d["model"],
            d["phase"], d["deployment"]) == (False, [], {}, {}, None, None, 0)
    assert (d["groups"], d["tags"], d["mismatch"]) == ([], {}, [])


@pytest.fixture()
def conn(shared_broker: Mosquitto) -> Iterator[MqttConnection]:
    c = MqttConnection(MqttConfig(url=shared_broker.url, fleet=FLEET))
    c.connect()
    yield c
    c.close()


def test_hostile_reports_never_stop_the_registry_and_are_counted_in_the_database(
        db_url: str, conn: MqttConnection, capsys: pytest.CaptureFixture[str]) -> None:
    topics = Topics(FLEET)
    with FleetDB.open(db_url) as db:
        registry = Registry(conn, db, config=RegistryConfig(flush_s=0.1)).start()
        try:
            for i, (payload, _) in enumerate(HOSTILE_STATES.values()):
                conn.publish_wait(topics.state(f"junk-{i}"), payload, qos=1)
            for payload, _ in HOSTILE_EVENTS.values():
                conn.publish_wait(topics.events("junk-ev"), payload, qos=1)
            conn.publish_wait(f"{topics.base}/dev/{'x' * 200}/state", state_report(), qos=1)
            # A real device's report after all that still lands.
            conn.publish_wait(topics.state("cam-1"), state_report("2"), qos=1)
            wait_for(lambda: (d := db.device("cam-1")) and d["version"] == "2", 20)
            # The one over the size cap is dropped before it is parsed, counted against
            # its device; the others are malformed.
            bad = len(HOSTILE_STATES) + len(HOSTILE_EVENTS)
            stats = wait_for(lambda: (s := db.registry_stats(fleet=FLEET))
                             and s[0]["malformed"] == bad and s[0]["dropped"] == 1 and s[0],
                             20, lambda: f"counts: {db.registry_stats()}")
        finally:
            registry.stop()
        assert registry.stats.malformed == bad and registry.stats.db_errors == 0
        big = list(HOSTILE_STATES).index("huge")
        assert [(d["device"], d["dropped"], d["reason"]) for d in db.ingest_stats()] == [
            (f"junk-{big}", 1, "max_report_bytes")]
        assert stats["states"] >= 1 and stats["last_malformed"]
        assert [d["id"] for d in db.devices()] == ["cam-1"]
    from edge_sdk.cli import main

    capsys.readouterr()
    assert main(["status", "--db", db_url, "--fleet", FLEET]) == 0
    out = capsys.readouterr()
    assert "cam-1" in out.out
    assert f"registry: {bad} malformed report(s) ignored (newest: " in out.err


def _event(name: str, **extra: object) -> bytes:
    return json.dumps({"event": name, **extra}).encode()


#: Device input at every column's bound, in characters that take more than one byte:
#: PostgreSQL counts characters, and refuses anything longer (SQLite does not check).
AT_THE_BOUNDS = [
    _event("e" * 64, retry=True),  # 64 + ":retry" overflowed kind VARCHAR(64)
    _event("é" * 64, retry=True, reason="ü" * 2000),
    _event("failed", model={"name": "ñ" * 256, "version": "ß" * 128},
           deployment={"counter": 2**31 - 1}),
    _event("failed", deployment={"name": "ø" * 256, "artifact_version": "ç" * 128,
                                 "counter": 0}),
    _event("x" * 500),
]


def test_event_names_at_the_column_limit_with_retry_are_written_in_one_batch(
        db_url: str, conn: MqttConnection, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23 item 7: a 64-character event name plus "retry": true failed every batch on
    PostgreSQL, which was then rewritten row by row (4,000 events: 21 s, 200 db errors)."""
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            batch = EventBatch(c)
            for payload in AT_THE_BOUNDS:
                batch.add(FLEET, "d" * 128, payload)
            batch.flush()
            write_state(c, FLEET, "ü" * 128, state_report(
                model={"name": "ñ" * 256, "version": "ß" * 128}, phase="p" * 64,
                previous={"name": "ñ" * 256, "version": "ß" * 128},
                last_update={"deployment": 2**31 - 1, "result": "r" * 64,
                             "reason": "ü" * 10000}))
        kinds = [e["kind"] for e in db.device_history("d" * 128)]
        assert sorted(kinds) == sorted(["e" * 58 + ":retry", "é" * 58 + ":retry", "failed",
                                        "failed", "x" * 58])
        assert db.device("ü" * 128)["version"] == "ß" * 128  # type: ignore[index]
    caplog.clear()
    with FleetDB.open(db_url) as db:
        registry = Registry(conn, db, config=RegistryConfig(flush_s=0.1)).start()
        try:
            for n in range(400):
                conn.publish(Topics(FLEET).events(f"dev-{n % 4}"),
                             AT_THE_BOUNDS[n % len(AT_THE_BOUNDS)], qos=1)
            wait_for(lambda: registry.stats.events + registry.stats.malformed >= 400, 30,
                     lambda: f"{registry.stats}")
        finally:
            registry.stop()
    assert (registry.stats.events, registry.stats.malformed, registry.stats.db_errors) \
        == (400, 0, 0)
    assert "batch failed" not in caplog.text


def test_device_events_keep_at_most_events_per_device_rows_and_none_too_old(
        db_url: str, conn: MqttConnection) -> None:
    topics = Topics(FLEET)
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            for n in range(5):
                write_event(c, FLEET, "gone", _event("failed", seq=n), now=time.time() - 7200)
        cfg = RegistryConfig(flush_s=0.1, prune_s=0.2, events_per_device=20,
                             events_max_age_s=3600)
        registry = Registry(conn, db, config=cfg).start()
        try:
            for n in range(1, 101):
                conn.publish(topics.events("chatty"), _event("step", seq=n), qos=1)
            for n in range(1, 6):
                conn.publish_wait(topics.events("quiet"), _event("step", seq=n), qos=1)

            def rows(d: str) -> list[int]:
                return sorted(e["detail"]["seq"] for e in db.device_history(d, 1000))

            wait_for(lambda: rows("chatty") == list(range(81, 101)) and not rows("gone"), 30,
                     lambda: f"chatty {rows('chatty')}, gone {rows('gone')}")
            assert rows("quiet") == [1, 2, 3, 4, 5]
        finally:
            registry.stop()


def test_a_registry_behind_the_database_says_how_far_it_has_got(
        db_url: str, conn: MqttConnection) -> None:
    """While the database does not take writes the registry's progress stays at the
    report it could not write; the controller's timeouts count against that."""
    topics = Topics(FLEET)
    with FleetDB.open(db_url) as db:
        registry = Registry(conn, db, config=RegistryConfig(flush_s=0.1)).start()
        try:
            conn.publish_wait(topics.state("cam-1"), state_report("1"), qos=1)
            wait_for(lambda: db.device("cam-1") is not None, 20)
            blocker = db.engine.connect()
            tx = blocker.begin()
            if blocker.dialect.name == "postgresql":
                blocker.execute(sa.text("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE"))
            else:
                blocker.execute(sa.text("UPDATE devices SET phase = phase"))  # write lock
            try:
                sent = time.time()
                conn.publish_wait(topics.state("cam-1"), state_report("2"), qos=1)
                # The report is in (queued, or being written) and cannot be written.
                wait_for(lambda: registry.intake.caught_up(math.inf) < math.inf, 20)
                held = registry.caught_up()
                assert sent <= held < time.time()
                assert registry.caught_up() == held  # it stays at that report's arrival
            finally:
                tx.rollback()
                blocker.close()
            wait_for(lambda: (d := db.device("cam-1")) and d["version"] == "2", 30)
            got = wait_for(lambda: (s := db.registry_stats(fleet=FLEET)) and
                           (s[0]["caught_up"] or 0) > held and s[0], 20)
            assert got["backlog_reports"] == 0
        finally:
            registry.stop()


def test_a_retained_state_dropped_in_a_flood_is_read_again_afterwards(
        db_url: str, conn: MqttConnection) -> None:
    """A device's last state (its commit, say) dropped while reports were being dropped
    must not stay missed until it changes again: the registry reads the retained states
    again after any drop."""
    topics = Topics(FLEET)
    cfg = RegistryConfig(flush_s=0.1, resync_s=0.5, reports_per_s=1, burst_reports=5)
    with FleetDB.open(db_url) as db:
        registry = Registry(conn, db, config=cfg).start()
        try:
            for n in range(10):  # over its budget: half of them dropped
                conn.publish(topics.events("burst"), _event("step", seq=n + 1), qos=1)
            conn.publish_wait(topics.state("burst"), state_report("2"), qos=1, retain=True)
            wait_for(lambda: registry.stats.dropped >= 6, 20, lambda: f"{registry.stats}")
            assert db.device("burst") is None  # its state was dropped with the rest
            wait_for(lambda: (d := db.device("burst")) and d["version"] == "2", 30,
                     lambda: f"{db.device('burst')}, {registry.stats}")
        finally:
            registry.stop()
            conn.publish_wait(topics.state("burst"), b"", qos=1, retain=True)
