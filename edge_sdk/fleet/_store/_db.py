"""The fleet database: :class:`FleetDB` — connections, the read API, leases, the audit
log and the registry's counters — over SQLAlchemy Core (tables and migrations:
:mod:`._schema`).

One code path for SQLite (``sqlite:///path``, WAL mode, the embedded default) and
PostgreSQL (``postgresql://...``, driven by psycopg 3). Every row the read API returns
is a plain JSON-serialisable dict. :meth:`FleetDB.open` migrates in one transaction
holding the database's migration lock (a PostgreSQL advisory lock; SQLite's write lock,
``BEGIN IMMEDIATE``).

One controller runs a fleet at a time: it holds the fleet's row in ``controller_lease``
(:meth:`FleetDB.acquire_lease`), renews it with every state it saves, and a second one
is refused (:class:`LeaseHeld`) until the lease is released or expires.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from ..._redact import add_secret, redact, redact_url
from ...errors import EdgeError
from ...quality import Gate
from .._errors import FleetError, FleetUsageError, LeaseHeld, LeaseLost
from .._outcome import (
    device_note,
    device_outcome,
    download_text,
    shadow_figures,
    shadow_stage,
    shadow_summary,
    update_text,
    wave_summary,
)
from .._select import hardware_matches, mismatch, split_tags, tag_matches
from . import _schema
from ._enrolments import (
    claim_dict,
    count_states,
    enrolment_dict,
    list_claims,
    list_enrolments,
)
from ._schema import (
    audit_log,
    controller_lease,
    device_assignments,
    device_events,
    device_ingest,
    devices,
    enrolments,
    model_list,
    registry_stats,
    rollout_devices,
    rollouts,
    valid_id,
)
from ._schema import json_text as _dumps
from ._schema import json_value as _loads

_COUNTS = ("states", "events", "malformed", "dropped", "db_errors", "lost")
_PROGRESS = ("caught_up", "backlog_reports", "backlog_bytes", "listening_since",
             "silent_after_s")
#: The agent's events about one deployment that :meth:`FleetDB.device_updates` reads.
_UPDATE_EVENTS = ("downloaded", "verified", "committed", "rolled_back", "failed", "refused")


def default_url(repo: str | Path) -> str:
    """The embedded database of a release repository: ``sqlite:///REPO/fleet.db``."""
    return f"sqlite:///{Path(repo).resolve() / 'fleet.db'}"


def engine_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (``postgresql+psycopg://``); SQLite as given."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite:///", "postgresql+psycopg://")):
        return url
    raise FleetUsageError(f"database URL {redact_url(url)!r} must start with sqlite:/// or "
                          "postgresql://")


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite would BEGIN only before DML, leaving DDL and reads outside any transaction;
    # _on_sqlite_begin starts every transaction itself instead (SQLAlchemy's recipe).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL: the CLI reads and writes while `serve` ingests; busy_timeout waits for the lock.
    cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
    # WAL is kept in the file: only the first opener switches, and that switch does not
    # wait on busy_timeout (two processes opening a new database at once, e.g. serve and
    # the CLI, saw "database is locked"), so it is retried within the same bound.
    deadline = time.monotonic() + _SQLITE_BUSY_MS / 1000
    while str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # a file that cannot (":memory:") keeps its
            break                                  # own mode, as before
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


_SQLITE_BUSY_MS = 10_000


def _on_sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads, then writes after another writer committed fails
    # at once with SQLITE_BUSY (busy_timeout does not apply): every transaction that may
    # write takes the write lock up front. Only the read API's snapshots are deferred.
    read = conn.get_execution_options().get("edge_read")
    conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    return int.from_bytes(hashlib.sha256(f"edge-sdk:{name}".encode()).digest()[:8], "big",
                          signed=True)


class FleetDB:
    """The registry, rollouts and audit log of one database. Open with :meth:`open`."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> FleetDB:
        """Connect, refuse a newer schema, run pending migrations. Raises :class:`FleetError`
        (one line) when the database cannot be reached."""
        add_secret(url)  # its password is never printed (edge_sdk._redact)
        eurl = engine_url(url)
        kw: dict[str, Any] = {}
        if eurl.startswith("sqlite:///"):
            path = Path(eurl[len("sqlite:///"):])
            if not path.parent.is_dir():
                raise FleetError(f"database {redact_url(url)}: directory {path.parent} does "
                                 "not exist")
            kw["connect_args"] = {"timeout": 10}
        else:
            kw["connect_args"] = {"connect_timeout": 5}
            kw["pool_pre_ping"] = True
        try:
            engine = sa.create_engine(eurl, **kw)
        except (sa.exc.ArgumentError, ValueError) as err:  # a port that is no number, ...
            why = redact(str(err).strip().splitlines()[0]) if str(err).strip() else repr(err)
            raise FleetUsageError(f"database URL {redact_url(url)!r} is not valid: {why}") \
                from err
        if eurl.startswith("sqlite:///"):
            sa.event.listen(engine, "connect", _on_sqlite_connect)
            sa.event.listen(engine, "begin", _on_sqlite_begin)
        db = cls(engine, url)
        try:
            with db._exclusive("migrate") as c:
                _schema.migrate(c, url, write=migrate)
        except sa.exc.OperationalError as err:
            engine.dispose()
            first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            raise FleetError(f"cannot reach database {redact_url(url)}: {first}") from err
        except FleetError:
            engine.dispose()
            raise
        return db

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FleetDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction that may write (on SQLite it holds the write lock throughout)."""
        try:
            with self.engine.begin() as c:
                yield c
        except sa.exc.OperationalError as err:
            first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            raise FleetError(f"database {redact_url(self.url)}: {first}") from err

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a snapshot; it waits for no writer on SQLite's WAL)."""
        try:
            with self.engine.connect() as c:
                c.execution_options(edge_read=True)
                with c.begin():
                    yield c
        except sa.exc.OperationalError as err:
            first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            raise FleetError(f"database {redact_url(self.url)}: {first}") from err

    @contextmanager
    def exclusive(self, name: str) -> Iterator[Connection]:
        """A transaction holding the database-wide lock ``name`` until it ends (others
        asking for it wait): an advisory lock on PostgreSQL, the write lock on SQLite."""
        try:
            with self._exclusive(name) as c:
                yield c
        except sa.exc.OperationalError as err:
            first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
            raise FleetError(f"database {redact_url(self.url)}: {first}") from err

    @contextmanager
    def _exclusive(self, name: str) -> Iterator[Connection]:
        with self.engine.begin() as c:
            if c.dialect.name == "postgresql":
                c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})
            yield c

    # -- read API (the web page and the CLI) ---------------------------------------------

    def devices(self, *, fleet: str | None = None, group: str | None = None,
                tag: str | None = None, model: str | None = None,
                online: bool | None = None,
                drifting: bool | None = None) -> list[dict[str, Any]]:
        """Devices sorted by fleet and id: every registered device, and every device the
        operator assigned that has not reported yet (``registered`` False). ``group`` and
        ``tag`` (``KEY`` or ``KEY=VALUE``) filter by the operator's assignment;
        ``hw.KEY[=VALUE]`` by a reported hardware fact. ``model`` is a name or
        ``NAME VERSION`` / ``NAME@VERSION``: the devices serving it, among their models.
        ``online`` is what the device said unless it has gone silent (see
        :func:`_silence`); ``drifting``: whether an input is flagged as drifting. Each
        device's ``models``: every model it serves, ``{"name", "version", "sha256",
        "phase"}`` sorted by name; ``model`` and
        ``version``: the one it swapped in last."""
        a = device_assignments
        q = _registered().order_by(devices.c.fleet, devices.c.id)
        waiting = _waiting().where(~sa.exists().where(
            (devices.c.fleet == a.c.fleet) & (devices.c.id == a.c.id)))
        if fleet is not None:
            q = q.where(devices.c.fleet == fleet)
            waiting = waiting.where(a.c.fleet == fleet)
        name = version = ""
        if model is not None:
            name, _, version = model.replace("@", " ").partition(" ")
            version = version.strip()
            # Narrowed in SQL by the name as the registry stores it (json_text), then
            # matched exactly below.
            q = q.where(devices.c.models.contains(f'"name":{_dumps(name)}', autoescape=True))
        with self.read() as c:
            cut = _silence(c, fleet)
            rows = [_device(r, cut) for r in c.execute(q).mappings()]
            if model is None and online is not True:
                rows += [_unregistered(r) for r in c.execute(waiting).mappings()]
                rows.sort(key=lambda r: (r["fleet"], r["id"]))
        if model is not None:
            rows = [r for r in rows if any(
                m["name"] == name and (not version or m["version"] == version)
                for m in r["models"])]
        if online is not None:
            rows = [r for r in rows if r["online"] == online]
        if drifting is not None:
            rows = [r for r in rows if r["drifting"] == drifting]
        if group is not None:
            rows = [r for r in rows if group in r["groups"]]
        if tag is not None:
            own, hw = split_tags([tag])
            rows = [r for r in rows if (tag_matches(own[0], r["tags"]) if own
                                        else hardware_matches(hw, r["hardware"]))]
        return rows

    def device(self, device_id: str, *, fleet: str | None = None) -> dict[str, Any] | None:
        """One device (registered, or assigned and not reported yet), or None."""
        a = device_assignments
        q = _registered().where(devices.c.id == device_id)
        waiting = _waiting().where(a.c.id == device_id)
        if fleet is not None:
            q = q.where(devices.c.fleet == fleet)
            waiting = waiting.where(a.c.fleet == fleet)
        with self.read() as c:
            row = c.execute(q.order_by(devices.c.fleet)).mappings().first()
            if row is not None:
                return _device(row, _silence(c, fleet))
            row = c.execute(waiting.order_by(a.c.fleet)).mappings().first()
        return None if row is None else _unregistered(row)

    def device_history(self, device_id: str, limit: int = 100, *,
                       fleet: str | None = None) -> list[dict[str, Any]]:
        """The device's events and status changes, newest first."""
        q = sa.select(device_events).where(device_events.c.device == device_id)
        if fleet is not None:
            q = q.where(device_events.c.fleet == fleet)
        q = q.order_by(device_events.c.seq.desc()).limit(limit)
        with self.read() as c:
            return [_event(r) for r in c.execute(q).mappings()]

    def fleets(self) -> dict[str, int]:
        """Each fleet that has a device (registered or assigned) with how many, by name."""
        a = device_assignments
        both = sa.union(sa.select(devices.c.fleet, devices.c.id),
                        sa.select(a.c.fleet, a.c.id)).subquery()
        q = sa.select(both.c.fleet, sa.func.count()).group_by(both.c.fleet) \
            .order_by(both.c.fleet)
        with self.read() as c:
            return {str(f): int(n) for f, n in c.execute(q)}

    def device_updates(self, device_id: str, limit: int = 20, *, fleet: str | None = None,
                       scan: int = 2000) -> list[dict[str, Any]]:
        """The device's updates, newest deployment first, from its newest ``scan`` update
        events and the rollouts that sent it something: per deployment ``download`` (how
        the agent got the model: ``kind`` delta / full / local, ``bytes``, ``full_bytes``,
        ``from``, ``fallback``), ``result`` (the agent's last word: committed, rolled_back,
        failed, refused; None while under way), ``rolled_back`` (by the device itself or
        by a rollout's abort, with ``to`` and ``reason``), ``rollback_of`` (this
        deployment was a rollout's signed rollback), and ``download_text`` /
        ``outcome_text`` saying it in words."""
        ev = device_events
        kinds = [*_UPDATE_EVENTS, *(k + ":retry" for k in _UPDATE_EVENTS)]
        q = sa.select(ev).where((ev.c.device == device_id) & ev.c.kind.in_(kinds))
        rd, ro = rollout_devices, rollouts
        rq = sa.select(rd.c.rollout, rd.c.counter, rd.c.before_version, rd.c.rollback_counter,
                       rd.c.rollback_status, ro.c.reason, ro.c.version) \
            .select_from(rd.join(ro, ro.c.id == rd.c.rollout)).where(rd.c.device == device_id)
        if fleet is not None:
            q = q.where(ev.c.fleet == fleet)
            rq = rq.where(ro.c.fleet == fleet)
        with self.read() as c:
            rows = list(c.execute(q.order_by(ev.c.seq.desc()).limit(scan)).mappings())
            sent = list(c.execute(rq).mappings())
        ups: dict[int, dict[str, Any]] = {}
        for r in reversed(rows):
            if r["deployment"] is None:
                continue
            u = ups.setdefault(r["deployment"], {
                "deployment": r["deployment"], "model": None, "version": None,
                "started": r["ts"], "ts": r["ts"], "download": None, "result": None,
                "reason": None, "rollout": None, "rolled_back": None, "rollback_of": None})
            kind, detail = r["kind"].removesuffix(":retry"), _loads(r["detail"], {})
            detail = detail if isinstance(detail, dict) else {}
            u["ts"] = r["ts"]
            if u["model"] is None and r["model"] is not None:
                u["model"], u["version"] = r["model"], r["version"]
            if kind == "downloaded" and isinstance(detail.get("download"), dict):
                u["download"] = detail["download"]
            elif kind == "verified" and detail.get("source") == "local copy":
                u["download"] = u["download"] or {"kind": "local"}
            elif kind in ("committed", "rolled_back", "failed", "refused"):
                u["result"], u["reason"] = kind, r["reason"]
                restored = detail.get("restored")
                if kind == "rolled_back":
                    u["rolled_back"] = {"by": "device", "reason": r["reason"], "to": (
                        restored.get("version") if isinstance(restored, dict) else None)}
        for s in sent:
            if s["counter"] in ups:
                ups[s["counter"]]["rollout"] = s["rollout"]
                if s["rollback_status"] == "committed":
                    ups[s["counter"]]["rolled_back"] = {
                        "by": "rollout", "rollout": s["rollout"], "to": s["before_version"],
                        "reason": s["reason"], "deployment": s["rollback_counter"]}
            if s["rollback_counter"] in ups:
                ups[s["rollback_counter"]]["rollback_of"] = {"rollout": s["rollout"],
                                                             "version": s["version"]}
        out = sorted(ups.values(), key=lambda u: -u["deployment"])[:limit]
        for u in out:
            u["download_text"] = download_text(u["download"])
            u["outcome_text"] = update_text(u)
        return out

    def rollouts(self, *, fleet: str | None = None) -> list[dict[str, Any]]:
        """Every rollout, newest first, with its per-wave progress."""
        q = sa.select(rollouts).order_by(rollouts.c.id.desc())
        if fleet is not None:
            q = q.where(rollouts.c.fleet == fleet)
        with self.read() as c:
            heads = list(c.execute(q).mappings())
            return [_rollout(h, _rollout_rows(c, int(h["id"]))) for h in heads]

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        """One rollout with ``waves`` (per-wave counts by status), ``devices`` (each
        device's wave, status, reason, counter) and ``failures`` (reasons). Raises
        :class:`FleetUsageError` for an unknown id."""
        with self.read() as c:
            head = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings() \
                .first() if valid_id(rollout_id) else None
            if head is None:
                raise FleetUsageError(f"no rollout {rollout_id} in {redact_url(self.url)}")
            out = _rollout(head, _rollout_rows(c, rollout_id))
        return out

    def models(self, *, fleet: str | None = None) -> list[dict[str, Any]]:
        """How many devices serve each model version (``online`` among them: online as
        :meth:`devices` says it, a silent device is not); a device serving several models
        counts for each, one serving none under model None."""
        q = sa.select(devices.c.fleet, devices.c.models, devices.c.online,
                      devices.c.last_seen)
        if fleet is not None:
            q = q.where(devices.c.fleet == fleet)
        counts: dict[tuple[str | None, str | None], list[int]] = {}
        with self.read() as c:
            cut = _silence(c, fleet)
            for r in c.execute(q):
                on = bool(r.online) and not _is_silent(r.fleet, True, r.last_seen, cut)
                keys: list[tuple[str | None, str | None]] = [
                    (m["name"], m["version"]) for m in model_list(r.models)]
                for key in keys or [(None, None)]:
                    n = counts.setdefault(key, [0, 0])
                    n[0] += 1
                    n[1] += on
        rows = [{"model": k[0], "version": k[1], "devices": n, "online": on}
                for k, (n, on) in counts.items()]
        return sorted(rows, key=lambda r: (r["model"] or "", r["version"] or ""))

    def enrolments(self, fleet: str | None = None, state: str | None = None, *,
                   limit: int | None = None) -> list[dict[str, Any]]:
        """Devices that asked to enrol (``state``: pending, accepted, rejected, revoked),
        sorted by fleet and id, the first ``limit``: the key they hold (``fingerprint``,
        ``public_key``), what they said (``facts``), ``requests`` and ``conflicts``
        (requests with another key), the operator's decision, and what the broker holds
        (``broker``, ``want``, ``applied_at``, ``issued``, ``expires_at``)."""
        with self.read() as c:
            return [enrolment_dict(r) for r in list_enrolments(c, fleet, state, limit)]

    def enrolment_counts(self, fleet: str | None = None) -> dict[str, int]:
        """How many enrolments are in each state."""
        with self.read() as c:
            return count_states(c, fleet)

    def claims(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """The claim accounts, sorted by fleet and batch, without their passwords, with
        the controller's counts (``requests``, ``dropped``, ``refused``)."""
        with self.read() as c:
            return [claim_dict(r) for r in list_claims(c, fleet)]

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` operator actions, oldest first."""
        q = sa.select(audit_log).order_by(audit_log.c.seq.desc()).limit(limit)
        with self.read() as c:
            rows = [{"seq": r.seq, "ts": r.ts, "actor": r.actor, "action": r.action,
                     "params": _loads(r.params, {})} for r in c.execute(q)]
        return rows[::-1]

    def registry_stats(self, *, fleet: str | None = None) -> list[dict[str, Any]]:
        """Per fleet: reports the registry wrote (``states``, ``events``) and those it did
        not (``malformed``, ``dropped``, ``db_errors``, ``lost`` before it), with the newest
        malformed one; and its progress: ``caught_up`` (every report received before it
        is written), ``backlog_reports`` / ``backlog_bytes`` still queued, ``updated``."""
        q = sa.select(registry_stats).order_by(registry_stats.c.fleet)
        if fleet is not None:
            q = q.where(registry_stats.c.fleet == fleet)
        with self.read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def ingest_stats(self, *, fleet: str | None = None,
                     limit: int = 100) -> list[dict[str, Any]]:
        """Devices whose reports the registry did not write, the most first: ``dropped``
        (and ``dropped_bytes``; ``reason`` is the config key the newest was over) and
        ``lost`` (never reached the registry)."""
        q = sa.select(device_ingest).order_by(
            (device_ingest.c.dropped + device_ingest.c.lost).desc(), device_ingest.c.device
        ).limit(limit)
        if fleet is not None:
            q = q.where(device_ingest.c.fleet == fleet)
        with self.read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # -- writes ----------------------------------------------------------------------------

    def acquire_lease(self, fleet: str, holder: str, ttl: float, *,
                      now: float | None = None) -> None:
        """Take (or keep) the controller lease of ``fleet`` for ``ttl`` seconds. Raises
        :class:`LeaseHeld` while another holder's lease has not expired."""
        t = time.time() if now is None else now
        with self.begin() as c:
            row = c.execute(sa.select(controller_lease).where(
                controller_lease.c.fleet == fleet)).mappings().first()
            if row is None:
                try:
                    with c.begin_nested():
                        c.execute(controller_lease.insert().values(
                            fleet=fleet, holder=holder, acquired=t, renewed=t,
                            expires=t + ttl))
                    return
                except sa.exc.IntegrityError:  # another one took it just now
                    row = c.execute(sa.select(controller_lease).where(
                        controller_lease.c.fleet == fleet)).mappings().one()
            if row["holder"] != holder and row["expires"] > t:
                raise LeaseHeld(
                    f"fleet {fleet!r} in {redact_url(self.url)} is run by another controller "
                    f"({row['holder']}, lease renewed {max(0.0, t - row['renewed']):.0f} s "
                    f"ago, expires in {row['expires'] - t:.0f} s)")
            # Compare and swap: if the holder renewed meanwhile, this takes nothing.
            done = c.execute(controller_lease.update().where(
                (controller_lease.c.fleet == fleet)
                & (controller_lease.c.holder == row["holder"])
                & (controller_lease.c.expires == row["expires"])).values(
                holder=holder, renewed=t, expires=t + ttl,
                acquired=row["acquired"] if row["holder"] == holder else t))
            if done.rowcount != 1:
                raise LeaseHeld(f"fleet {fleet!r} in {redact_url(self.url)}: another "
                                "controller renewed its lease just now")

    def renew_lease(self, fleet: str, holder: str, ttl: float, *, now: float | None = None,
                    conn: Connection | None = None) -> None:
        """Extend ``holder``'s lease; with ``conn``, inside that transaction, so what it
        writes is only committed while the lease is held. Raises :class:`LeaseLost`."""
        t = time.time() if now is None else now
        q = controller_lease.update().where(
            (controller_lease.c.fleet == fleet) & (controller_lease.c.holder == holder)
        ).values(renewed=t, expires=t + ttl)
        if conn is not None:
            done = conn.execute(q)
        else:
            with self.begin() as c:
                done = c.execute(q)
        if done.rowcount != 1:
            raise LeaseLost(f"the controller lease of fleet {fleet!r} in "
                            f"{redact_url(self.url)} went to another controller (it had "
                            "expired); this one stops")

    def release_lease(self, fleet: str, holder: str) -> None:
        """Give the lease up (a clean stop), so that the next controller starts at once."""
        with self.begin() as c:
            c.execute(controller_lease.delete().where(
                (controller_lease.c.fleet == fleet) & (controller_lease.c.holder == holder)))

    def lease(self, fleet: str) -> dict[str, Any] | None:
        """Who holds the fleet's controller lease, and until when."""
        with self.read() as c:
            row = c.execute(sa.select(controller_lease).where(
                controller_lease.c.fleet == fleet)).mappings().first()
        return None if row is None else dict(row)

    def add_registry_stats(self, fleet: str, delta: Mapping[str, int], *,
                           last_malformed: str | None = None,
                           progress: Mapping[str, Any] | None = None) -> None:
        """Add ``delta`` (counts by name) to the fleet's registry totals; ``progress``
        replaces the registry's progress columns (``caught_up`` ...)."""
        now = time.time()
        values: dict[str, Any] = {"updated": now}
        if last_malformed is not None:
            values.update(last_malformed=last_malformed, last_malformed_at=now)
        values.update({k: v for k, v in (progress or {}).items() if k in _PROGRESS})
        with self.begin() as c:
            key = registry_stats.c.fleet == fleet
            done = c.execute(registry_stats.update().where(key).values(
                **values, **{k: registry_stats.c[k] + int(delta.get(k, 0)) for k in _COUNTS}))
            if done.rowcount == 0:
                c.execute(registry_stats.insert().values(
                    fleet=fleet, **values, **{k: int(delta.get(k, 0)) for k in _COUNTS}))

    def add_device_ingest(self, fleet: str, counts: Mapping[str, Mapping[str, Any]]) -> None:
        """Add per-device counts (``dropped``, ``dropped_bytes``, ``lost``; ``reason`` and
        ``at`` of the newest) to the registry's table of reports not written."""
        with self.begin() as c:
            for device, n in counts.items():
                key = (device_ingest.c.fleet == fleet) & (device_ingest.c.device == device)
                values = {"reason": (n.get("reason") or "")[:64] or None, "at": n.get("at")}
                done = c.execute(device_ingest.update().where(key).values(
                    **values, **{k: device_ingest.c[k] + int(n.get(k, 0))
                                 for k in ("dropped", "dropped_bytes", "lost")}))
                if done.rowcount == 0:
                    c.execute(device_ingest.insert().values(
                        fleet=fleet, device=device, **values,
                        **{k: int(n.get(k, 0)) for k in ("dropped", "dropped_bytes", "lost")}))

    def prune_events(self, fleet: str, over: Iterable[str], *, keep: int,
                     older_than: float | None = None, chunk: int = 5000) -> int:
        """Delete ``device_events`` rows: all but the newest ``keep`` of each device in
        ``over``, and (with ``older_than``) every row of the fleet older than that, in
        transactions of at most ``chunk`` rows. Returns the rows deleted."""
        ev = device_events
        gone = 0
        for device in over:
            mine = (ev.c.fleet == fleet) & (ev.c.device == device)
            cut = sa.select(ev.c.seq).where(mine).order_by(ev.c.seq.desc()).limit(1) \
                .offset(keep).scalar_subquery()
            with self.begin() as c:
                gone += c.execute(ev.delete().where(mine & (ev.c.seq <= cut))).rowcount
        while older_than is not None:
            old = sa.select(ev.c.seq).where((ev.c.ts < older_than) & (ev.c.fleet == fleet)) \
                .limit(chunk)
            with self.begin() as c:
                n = c.execute(ev.delete().where(ev.c.seq.in_(old))).rowcount
            gone += n
            if n < chunk:
                break
        return gone

    def record_audit(self, actor: str, action: str, params: Mapping[str, Any], *,
                     conn: Connection | None = None) -> None:
        row = {"ts": time.time(), "actor": actor, "action": action,
               "params": _dumps(dict(params))}
        if conn is not None:
            conn.execute(audit_log.insert().values(**row))
            return
        with self.begin() as c:
            c.execute(audit_log.insert().values(**row))


def _registered() -> sa.Select[Any]:
    """Registered devices with their assignment (if any) beside what they report, and the
    counts of their reports the registry did not write."""
    a = device_assignments
    i = device_ingest
    return sa.select(devices, a.c.groups.label("a_groups"), a.c.tags.label("a_tags"),
                     a.c.updated.label("a_updated"), a.c.updated_by.label("a_by"),
                     i.c.dropped.label("reports_dropped"), i.c.lost.label("reports_lost")) \
        .select_from(devices.outerjoin(a, (a.c.fleet == devices.c.fleet)
                                       & (a.c.id == devices.c.id))
                     .outerjoin(i, (i.c.fleet == devices.c.fleet)
                                & (i.c.device == devices.c.id)))


def _waiting() -> sa.Select[Any]:
    """Assigned devices (not necessarily unregistered: the caller says) with their
    revocation, if their enrolment is revoked (they have no registry row to hold it)."""
    a, e = device_assignments, enrolments
    return sa.select(a, e.c.decided_at.label("e_revoked_at"),
                     e.c.decided_by.label("e_revoked_by"),
                     e.c.reason.label("e_revoked_reason")) \
        .select_from(a.outerjoin(e, (e.c.fleet == a.c.fleet) & (e.c.device_id == a.c.id)
                                 & (e.c.state == "revoked")))


def _assignment(m: RowMapping) -> dict[str, Any]:
    if m["a_updated"] is None:
        return {"groups": [], "tags": {}, "assigned": None}
    return {"groups": _loads(m["a_groups"], []), "tags": _loads(m["a_tags"], {}),
            "assigned": {"by": m["a_by"], "at": m["a_updated"]}}


def _silence(c: Connection, fleet: str | None) -> dict[str, float]:
    """Per fleet: a device that said it is online but was last heard before this time is
    silent. The registry decides how long (``silent_after_s``); the time counts from its
    progress (``caught_up``: a backlog, or a registry that is not running, makes nobody
    silent) and from when it started listening."""
    q = sa.select(registry_stats.c.fleet, registry_stats.c.caught_up,
                  registry_stats.c.listening_since, registry_stats.c.silent_after_s)
    if fleet is not None:
        q = q.where(registry_stats.c.fleet == fleet)
    out = {}
    for r in c.execute(q):
        if r.caught_up is None or r.listening_since is None or r.silent_after_s is None:
            continue
        cutoff = r.caught_up - r.silent_after_s
        if r.listening_since < cutoff:
            out[r.fleet] = cutoff
    return out


def _is_silent(fleet: str, said_online: bool, last_seen: float,
               silence: Mapping[str, float]) -> bool:
    """A device said it is online but has not been heard since its fleet's cutoff."""
    cutoff = silence.get(fleet)
    return said_online and cutoff is not None and last_seen < cutoff


def _device(m: RowMapping, silence: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A registered device: ``groups`` and ``tags`` are the operator's assignment (what
    selects it); ``reported_groups``, ``reported_tags`` and ``hardware`` are the device's
    own report, and ``mismatch`` says where report and assignment differ."""
    own = _assignment(m)
    said = bool(m["online"])
    silent = _is_silent(m["fleet"], said, m["last_seen"], silence or {})
    rgroups, rtags = _loads(m["groups"], []), _loads(m["tags"], {})
    rgroups = rgroups if isinstance(rgroups, list) else []
    rtags = rtags if isinstance(rtags, dict) else {}
    state = _loads(m["state"], {})
    state = state if isinstance(state, dict) else {}
    since = state.get("offline_since")
    if silent:  # it said nothing since: offline since it was last heard
        since = m["last_seen"]
    elif said or not isinstance(since, (int, float)):
        since = None
    return {
        "fleet": m["fleet"], "id": m["id"], "registered": True, **own,
        "reported_groups": rgroups, "reported_tags": rtags,
        "mismatch": mismatch(own["groups"], own["tags"], rgroups, rtags),
        "hardware": _loads(m["hardware"], {}),
        # What the device said, unless it has been silent: no heartbeat for the
        # registry's silent_after_missed periods (a device without a last will).
        "online": said and not silent, "silent": silent, "reported_online": said,
        # When it went offline (its last will or its own goodbye arrived), or was last
        # heard when silent; None while online.
        "offline_since": since,
        "reports_dropped": int(m.get("reports_dropped") or 0),
        "reports_lost": int(m.get("reports_lost") or 0),
        "first_seen": m["first_seen"],
        "last_seen": m["last_seen"], "models": model_list(m["models"]),
        "results": _loads(m["results"], []),
        "model": m["model"], "version": m["version"],
        "previous_model": m["previous_model"], "previous_version": m["previous_version"],
        "phase": m["phase"], "deployment": m["deployment"], "last_result": m["last_result"],
        "last_reason": m["last_reason"], "last_deployment": m["last_deployment"],
        "state": state,
        # Input drift as the registry judged it (edge_sdk.fleet._drift), and its flag.
        "drift": _loads(m["drift"], None), "drifting": bool(m["drifting"]),
        # Its last reported shadow run (schema 11), with the figures read for showing.
        "shadow": _device_shadow(m.get("shadow")),
        # Revoked by an operator (edge-sdk device revoke): rollouts leave it out.
        "revoked": None if m["revoked_at"] is None else {
            "at": m["revoked_at"], "by": m["revoked_by"], "reason": m["revoked_reason"]},
    }


def _unregistered(m: RowMapping) -> dict[str, Any]:
    """An assigned device that has not reported yet: the same keys, nothing reported."""
    own = {"groups": _loads(m["groups"], []), "tags": _loads(m["tags"], {}),
           "assigned": {"by": m["updated_by"], "at": m["updated"]}}
    return {
        "fleet": m["fleet"], "id": m["id"], "registered": False, **own,
        "reported_groups": [], "reported_tags": {}, "mismatch": [], "hardware": {},
        "online": False, "silent": False, "reported_online": False, "offline_since": None,
        "reports_dropped": 0,
        "reports_lost": 0, "first_seen": None, "last_seen": None, "models": [], "results": [],
        "model": None,
        "version": None, "previous_model": None, "previous_version": None, "phase": None,
        "deployment": 0, "last_result": None, "last_reason": None, "last_deployment": None,
        "state": {}, "drift": None, "drifting": False, "shadow": None,
        "revoked": None if m.get("e_revoked_at") is None else {
            "at": m["e_revoked_at"], "by": m["e_revoked_by"],
            "reason": m["e_revoked_reason"]},
    }


def _event(m: RowMapping) -> dict[str, Any]:
    return {"seq": m["seq"], "fleet": m["fleet"], "device": m["device"], "ts": m["ts"],
            "kind": m["kind"], "deployment": m["deployment"], "model": m["model"],
            "version": m["version"], "reason": m["reason"],
            "detail": _loads(m["detail"], {})}


def _rollout_rows(c: Connection, rollout_id: int) -> list[RowMapping]:
    q = sa.select(rollout_devices).where(rollout_devices.c.rollout == rollout_id) \
        .order_by(rollout_devices.c.wave, rollout_devices.c.device)
    return list(c.execute(q).mappings())


def _rollout(h: RowMapping, rows: Sequence[RowMapping]) -> dict[str, Any]:
    config = _loads(h["config"], {})
    waves: dict[int, dict[str, int]] = {}
    outcomes: dict[int, list[str]] = {}
    stages: dict[int, list[str | None]] = {}
    devs = []
    for r in rows:
        w = waves.setdefault(int(r["wave"]), {})
        w[r["status"]] = w.get(r["status"], 0) + 1
        outcome = device_outcome(r["status"], r["rollback_status"])
        outcomes.setdefault(int(r["wave"]), []).append(outcome)
        stage = shadow_stage(r["status"], r.get("shadow_verdict"))
        stages.setdefault(int(r["wave"]), []).append(stage)
        devs.append({"device": r["device"], "wave": r["wave"], "status": r["status"],
                     "outcome": outcome, "note": device_note(r["reason"], r["rollback_status"],
                                         r["before_version"], h["reason"], r["status"]),
                     # A gated rollout's shadow run on the device (None: it had none).
                     "shadow": _shadow_row(r, stage),
                     "reason": r["reason"], "counter": r["counter"], "sent_at": r["sent_at"],
                     "finished_at": r["finished_at"],
                     "before": r["before_version"], "rollback_counter": r["rollback_counter"],
                     "rollback_status": r["rollback_status"]})
    return {
        "id": h["id"], "fleet": h["fleet"], "model": h["model"], "version": h["version"],
        # Every (model, version) of a set rollout; the one of any other.
        "models": _loads(h["machine"], {}).get("models") or [[h["model"], h["version"]]],
        "selector": _loads(h["selector"], {}), "config": config,
        # A rollback rollout (started with --rollback): every wave a signed downgrade.
        "rollback": bool(isinstance(config, dict) and config.get("signed_rollback")),
        "status": h["status"], "wave": h["wave"], "waves": h["waves"],
        "reason": h["reason"], "created": h["created"], "updated": h["updated"],
        "created_by": h["created_by"],
        # Paused by the controller after a wave: 'resume' approves the next one.
        "awaiting_approval": h["status"] == "paused"
        and bool(_loads(h["machine"], {}).get("held", False)),
        # by_status: the controller's record; by_outcome and outcome: what happened to
        # the devices (a committed device sent back by an abort counts as rolled back).
        "progress": [{**wave_summary(i, outcomes[i]), "by_status": waves[i],
                      "shadow": shadow_summary(stages[i])} for i in sorted(waves)],
        # The gate of a gated rollout, as the operator wrote it, and its no-traffic rule.
        "gate": _gate_text(config),
        "devices": devs,
        "failures": [{"device": d["device"], "status": d["status"], "outcome": d["outcome"],
                      "reason": d["note"]} for d in devs if d["outcome"] in _BAD_OUTCOMES],
    }


def _shadow_row(r: RowMapping, stage: str | None) -> dict[str, Any] | None:
    """A device's shadow run in a rollout: its document's counter, where it is, the
    gate's verdict, the reported figures (and one line of them), or None without one."""
    if r.get("shadow_counter") is None and r.get("shadow_verdict") is None:
        return None
    figures = _loads(r.get("shadow_figures"), None)
    figures = figures if isinstance(figures, dict) else None
    return {"counter": r.get("shadow_counter"), "stage": stage,
            "verdict": r.get("shadow_verdict"), "figures": figures,
            "compared": None, "agreement": None, "worst": None, "worst_detail": None,
            "latency_ratio": None, "errors": None, "text": None,
            **shadow_figures(figures)}


def _device_shadow(text: str | None) -> dict[str, Any] | None:
    """``devices.shadow`` as the API gives it: the block the registry kept, with its
    figures read (:func:`shadow_figures`: ``compared``, ``agreement``, ..., ``text``)."""
    block = _loads(text, None)
    if not isinstance(block, dict):
        return None
    return {**block, **shadow_figures(block.get("figures"))}


def _gate_text(config: Any) -> dict[str, Any] | None:
    """A gated rollout's gate: ``text`` as ``rollout start --gate`` takes it, ``gate``
    (its JSON), ``no_traffic`` (``--gate-no-traffic``); None for an ungated rollout."""
    if not isinstance(config, dict) or config.get("gate") is None:
        return None
    try:
        text = Gate.from_json(config["gate"]).text
    except EdgeError:
        text = "(unreadable)"
    return {"text": text, "gate": config["gate"],
            "no_traffic": config.get("gate_no_traffic", "skip")}


#: Outcomes listed as a rollout's failures (with their reasons).
_BAD_OUTCOMES = ("failed", "gate_failed", "rolled_back", "silent", "rolling_back",
                 "no_traffic")
