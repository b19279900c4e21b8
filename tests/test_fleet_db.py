"""The fleet database on SQLite and PostgreSQL: migrations (and their lock), refusals, the
read API, the controller lease."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import (
    SCHEMA_VERSION,
    AssignmentChange,
    FleetDB,
    FleetError,
    FleetUsageError,
    LeaseHeld,
    LeaseLost,
    assign_devices,
)
from tests import _fleetdb

db_url = _fleetdb.db_url  # the fixture: one empty database per engine
ROOT = str(Path(__file__).resolve().parents[1])


def test_open_creates_the_schema_once_and_reopens(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        assert db.devices() == [] and db.rollouts() == [] and db.audit() == []
    with FleetDB.open(db_url) as db, db.begin() as c:
        versions = c.execute(sa.text("SELECT version FROM schema_version")).scalars().all()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_a_newer_schema_is_refused_and_left_unchanged(db_url: str) -> None:
    with FleetDB.open(db_url) as db, db.begin() as c:
        c.execute(sa.text("INSERT INTO schema_version (version, applied) VALUES (99, 0)"))
    with pytest.raises(FleetError, match="schema version 99, newer than"):
        FleetDB.open(db_url)
    with _raw(db_url) as c:
        assert sorted(c.execute(sa.text("SELECT version FROM schema_version")).scalars()) \
            == [*range(1, SCHEMA_VERSION + 1), 99]


class _raw:
    def __init__(self, url: str) -> None:
        from edge_sdk.fleet._store._db import engine_url

        self.engine = sa.create_engine(engine_url(url))

    def __enter__(self) -> sa.Connection:
        self.conn = self.engine.connect()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        self.engine.dispose()


def test_an_unreachable_database_is_one_line(tmp_path) -> None:
    with pytest.raises(FleetError, match="cannot reach database") as err:
        FleetDB.open("postgresql://postgres@127.0.0.1:1/nope")
    assert "\n" not in str(err.value)
    with pytest.raises(FleetError, match="does not exist"):
        FleetDB.open(f"sqlite:///{tmp_path / 'no' / 'such' / 'fleet.db'}")
    with pytest.raises(FleetUsageError, match="must start with"):
        FleetDB.open("mysql://x")


def test_audit_rows_keep_actor_action_and_parameters_in_order(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        db.record_audit("alice", "release.add", {"model": "m", "version": "1"})
        db.record_audit("bob", "rollout.pause", {"rollout": 3})
        rows = db.audit()
    assert [(r["actor"], r["action"], r["params"]) for r in rows] == [
        ("alice", "release.add", {"model": "m", "version": "1"}),
        ("bob", "rollout.pause", {"rollout": 3})]
    json.dumps(rows)


def test_unknown_rollout_is_a_usage_error(db_url: str) -> None:
    with FleetDB.open(db_url) as db, pytest.raises(FleetUsageError, match="no rollout 7"):
        db.rollout(7)


def test_a_second_controller_is_refused_the_lease_until_it_expires_or_is_released(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        db.acquire_lease("lab", "host-a pid 1", 15, now=100)
        with pytest.raises(LeaseHeld) as err:
            db.acquire_lease("lab", "host-b pid 2", 15, now=104)
        assert str(err.value) == (
            f"fleet 'lab' in {db_url} is run by another controller (host-a pid 1, lease "
            "renewed 4 s ago, expires in 11 s)")
        db.acquire_lease("other", "host-b pid 2", 15, now=104)  # one lease per fleet
        db.renew_lease("lab", "host-a pid 1", 15, now=110)
        with pytest.raises(LeaseHeld):
            db.acquire_lease("lab", "host-b pid 2", 15, now=124)  # renewed until 125
        db.acquire_lease("lab", "host-b pid 2", 15, now=126)  # expired: taken over
        with pytest.raises(LeaseLost, match="went to another controller"):
            db.renew_lease("lab", "host-a pid 1", 15, now=127)
        with pytest.raises(LeaseHeld, match="host-b pid 2"):
            db.acquire_lease("lab", "host-a pid 1", 15, now=127)
        db.release_lease("lab", "host-b pid 2")
        assert db.lease("lab") is None
        db.acquire_lease("lab", "host-a pid 1", 15, now=128)  # at once, no expiry to wait
        lease = db.lease("lab")
    assert lease is not None and (lease["holder"], lease["expires"]) == ("host-a pid 1", 143)


def test_a_controller_without_the_lease_commits_nothing(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        db.acquire_lease("lab", "b", 15)
        with pytest.raises(LeaseLost), db.begin() as c:
            db.record_audit("a", "rollout.start", {"rollout": 1}, conn=c)
            db.renew_lease("lab", "a", 15, conn=c)
        assert db.audit() == []


def test_controllers_racing_for_a_free_lease_get_it_once(db_url: str) -> None:
    with FleetDB.open(db_url):
        pass
    barrier = threading.Barrier(6)
    won: list[str] = []
    refused: list[str] = []

    def contend(name: str) -> None:
        with FleetDB.open(db_url) as db:
            barrier.wait()
            try:
                db.acquire_lease("lab", name, 30)
                won.append(name)
            except LeaseHeld as err:
                refused.append(str(err))

    threads = [threading.Thread(target=contend, args=(f"c{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 5, (won, refused)


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(db_url: str) -> None:
    """Without the migration lock PostgreSQL fails this with duplicate tables or a
    duplicate schema_version row, SQLite with 'table already exists'."""
    code = ("import sys; from edge_sdk.fleet import FleetDB; "
            "FleetDB.open(sys.argv[1]).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], cwd=ROOT,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
             for _ in range(6)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    with _raw(db_url) as c:
        assert sorted(c.execute(sa.text("SELECT version FROM schema_version")).scalars()) \
            == list(range(1, SCHEMA_VERSION + 1))


def test_an_older_schema_is_migrated_forward_in_place(db_url: str) -> None:
    with FleetDB.open(db_url) as db, db.begin() as c:
        db.record_audit("alice", "release.add", {"version": "1"}, conn=c)
        c.execute(sa.text("DROP TABLE device_desired"))
        c.execute(sa.text("DROP TABLE controller_lease"))
        c.execute(sa.text("DROP TABLE registry_stats"))
        c.execute(sa.text("DROP TABLE device_assignments"))
        c.execute(sa.text("DELETE FROM schema_version WHERE version > 1"))
    with FleetDB.open(db_url) as db:
        assign_devices(db, fleet="lab", changes={"cam-1": AssignmentChange(("lobby",))},
                       actor="alice")
        assert db.device("cam-1", fleet="lab")["groups"] == ["lobby"]  # type: ignore[index]
        db.acquire_lease("lab", "a", 15)
        db.add_registry_stats("lab", {"malformed": 2})
        assert db.registry_stats()[0]["malformed"] == 2
        assert [r["actor"] for r in db.audit()] == ["alice", "alice"]
        with db.read() as c:
            assert c.execute(sa.text("SELECT count(*) FROM device_desired")).scalar() == 0


def test_processes_opening_a_new_sqlite_database_at_once_all_get_it(tmp_path: Path) -> None:
    # serve and a CLI command opening a database that does not exist yet: the switch to
    # WAL does not wait on busy_timeout, and "database is locked" failed the second one.
    from edge_sdk.fleet._store._db import FleetDB as _DB

    for i in range(12):
        url = f"sqlite:///{tmp_path / f'race-{i}.db'}"
        errors: list[str] = []
        start = threading.Barrier(8)

        def open_it(url: str = url, errors: list[str] = errors,
                    start: threading.Barrier = start) -> None:
            start.wait()
            try:
                with _DB.open(url) as db:
                    db.devices()
            except Exception as err:  # the test reports any failure
                errors.append(str(err))

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], errors
