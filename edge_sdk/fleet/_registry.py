"""Device registry: every device's retained ``state`` and its ``events``, written to the DB.

The MQTT callbacks only parse and queue; one writer thread owns the database writes, so a
slow database never stalls the network thread (the queue is bounded; when it is full a
report is dropped and counted — the next retained state carries the same facts). A device
heard from (an event, a heartbeat) whose state this registry has not taken in since it
started — dropped here, or never delivered: a clustered broker can miss a retained state
published while the subscription was being set up — gets its retained state read again
(:mod:`._reread`): no device depends on one retained message arriving. A
malformed report (not bounded JSON, or a value no column can hold: an over-long name, a
counter out of range, a NUL or a lone surrogate) is logged and counted, never raised;
the counts are kept in the database (:meth:`FleetDB.registry_stats`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..release._watch import DeviceStatus
from ..transport import MqttConnection, Topics
from ._db import FleetDB, FleetError, device_events, devices, json_text
from ._reread import RetainedReread

log = logging.getLogger("edge_sdk.fleet.registry")


@dataclass
class RegistryStats:
    """Reports handled since the registry started; the database keeps the running totals."""

    states: int = 0
    events: int = 0
    malformed: int = 0
    dropped: int = 0
    db_errors: int = 0
    #: ``device: reason`` of the newest malformed report.
    last_malformed: str | None = None


class MalformedReport(ValueError):
    """A device report the registry will not write; the message says why."""


#: Column limits (see ``_db``): a value over them would fail the whole write.
_ID_MAX, _NAME_MAX, _VERSION_MAX, _WORD_MAX = 128, 256, 128, 64
_INT_MAX = 2**31 - 1  # PostgreSQL INTEGER


def _device_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) != 5 or not 0 < len(parts[3]) <= _ID_MAX:
        return None
    return parts[3]


def _text(value: str | None, what: str, limit: int | None = None) -> str | None:
    if value is None:
        return None
    if limit is not None and len(value) > limit:
        raise MalformedReport(f"{what} is {len(value)} characters, over {limit}")
    if "\x00" in value:
        raise MalformedReport(f"{what} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedReport(f"{what} is not valid Unicode (a lone surrogate)") from None
    return value


def _counter(value: int | None, what: str) -> int | None:
    if value is not None and not 0 <= value <= _INT_MAX:
        raise MalformedReport(f"{what} {value} is out of range")
    return value


def _parse(payload: bytes) -> Any:
    try:
        return loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=MESSAGE_MAX_DEPTH)
    except ValueError as err:
        raise MalformedReport(str(err)) from None


def ingest_state(c: Connection, fleet: str, device: str, payload: bytes,
                 now: float | None = None) -> bool:
    """Write one retained state report; False (nothing written) when it is malformed.

    An empty payload (a cleared retained message) changes nothing."""
    try:
        write_state(c, fleet, device, payload, now)
    except MalformedReport:
        return False
    return True


def ingest_event(c: Connection, fleet: str, device: str, payload: bytes,
                 now: float | None = None) -> bool:
    """Write one device event (heartbeats only refresh ``last_seen``); False when malformed."""
    try:
        write_event(c, fleet, device, payload, now)
    except MalformedReport:
        return False
    return True


def write_state(c: Connection, fleet: str, device: str, payload: bytes,
                now: float | None = None) -> None:
    """:func:`ingest_state` that raises :class:`MalformedReport` with the reason."""
    if not payload:
        return
    if not isinstance(_parse(payload), dict):
        raise MalformedReport("a state report must be a JSON object")
    st = DeviceStatus.parse(device, payload)
    if st is None:  # pragma: no cover - parsed above
        raise MalformedReport("unreadable state report")
    ts = time.time() if now is None else now
    doc = st.raw
    tags = doc.get("tags") if isinstance(doc.get("tags"), dict) else {}
    hw = doc.get("hardware") if isinstance(doc.get("hardware"), dict) else {}
    model, version = st.model_ref or (None, None)
    prev = _ref(doc.get("previous"))
    _text(model, "model.name", _NAME_MAX)
    _text(version, "model.version", _VERSION_MAX)
    _text(prev[0], "previous.name", _NAME_MAX)
    _text(prev[1], "previous.version", _VERSION_MAX)
    _text(st.phase, "phase", _WORD_MAX)
    _text(st.last_result, "last_update.result", _WORD_MAX)
    _text(st.last_reason, "last_update.reason")
    _counter(st.deployment, "deployment")
    _counter(st.last_deployment, "last_update.deployment")
    values: dict[str, Any] = {
        "groups": json_text(list(st.groups)), "tags": json_text(tags),
        "hardware": json_text(hw), "online": st.online, "last_seen": ts,
        "model": model, "version": version, "previous_model": prev[0],
        "previous_version": prev[1], "phase": st.phase, "deployment": st.deployment,
        "last_result": st.last_result, "last_reason": st.last_reason,
        "last_deployment": st.last_deployment, "state": json_text(doc),
    }
    key = (devices.c.fleet == fleet) & (devices.c.id == device)
    old = c.execute(sa.select(devices.c.online, devices.c.phase, devices.c.model,
                              devices.c.version, devices.c.last_deployment,
                              devices.c.last_result).where(key)).first()
    if old is None:
        c.execute(devices.insert().values(fleet=fleet, id=device, first_seen=ts, **values))
        changes = ["registered"]
    else:
        c.execute(devices.update().where(key).values(**values))
        changes = []
        if bool(old.online) != st.online:
            changes.append("online" if st.online else "offline")
        if (old.model, old.version) != (model, version):
            changes.append("model")
        if old.phase != st.phase:
            changes.append("phase")
        if (old.last_deployment, old.last_result) != (st.last_deployment, st.last_result):
            changes.append("result")
    if changes:
        c.execute(device_events.insert().values(
            fleet=fleet, device=device, ts=ts, kind="state:" + ",".join(changes),
            deployment=st.last_deployment, model=model, version=version,
            reason=st.last_reason if "result" in changes else None,
            detail=json_text({"online": st.online, "phase": st.phase,
                              "result": st.last_result})))


# Built once: constructing a statement per report (``.values(...)``, its cache key) cost
# more than executing it, at the thousands of reports a minute a large rollout brings.
_TOUCH = devices.update().where(
    (devices.c.fleet == sa.bindparam("k_fleet")) & (devices.c.id == sa.bindparam("k_id"))
).values(last_seen=sa.bindparam("k_ts"))
_EVENT = device_events.insert()


def write_event(c: Connection, fleet: str, device: str, payload: bytes,
                now: float | None = None) -> None:
    """:func:`ingest_event` that raises :class:`MalformedReport` with the reason."""
    EventBatch(c).add(fleet, device, payload, now).flush()


class EventBatch:
    """Event reports checked one by one and written together: one multi-row insert and
    one executemany of ``last_seen`` updates per :meth:`flush`, instead of two round trips
    per report (on PostgreSQL under load the registry fell seconds behind a rollout of 500
    devices). Rows are written in the order added."""

    def __init__(self, c: Connection) -> None:
        self.c = c
        self.events: list[dict[str, Any]] = []
        self.touches: list[dict[str, Any]] = []

    def add(self, fleet: str, device: str, payload: bytes,
            now: float | None = None) -> EventBatch:
        """Check one event report (raises :class:`MalformedReport`, nothing added)."""
        doc = _parse(payload)
        if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
            raise MalformedReport("an event must be a JSON object with a string 'event'")
        ts = time.time() if now is None else now
        kind = _text(doc["event"][:64], "event")
        touch = {"k_fleet": fleet, "k_id": device, "k_ts": ts}
        if kind == "heartbeat":
            self.touches.append(touch)
            return self
        raw_dep = doc.get("deployment")
        dep: dict[str, Any] = raw_dep if isinstance(raw_dep, dict) else {}
        counter = dep.get("counter", dep.get("version"))
        counter = counter if isinstance(counter, int) and not isinstance(counter, bool) \
            else None
        ref = _ref(doc.get("model"))
        if ref == (None, None) and isinstance(dep.get("name"), str):
            ref = (dep["name"], str(dep.get("artifact_version")))
        reason = doc.get("reason")
        if doc.get("retry"):
            kind = f"{kind}:retry"
        self.events.append({
            "fleet": fleet, "device": device, "ts": ts, "kind": kind,
            "deployment": _counter(counter, "deployment.counter"),
            "model": _text(ref[0], "model.name", _NAME_MAX),
            "version": _text(ref[1], "model.version", _VERSION_MAX),
            "reason": _text(reason[:2000], "reason") if isinstance(reason, str) else None,
            "detail": json_text(doc)})
        self.touches.append(touch)
        return self

    def flush(self) -> None:
        if self.events:
            self.c.execute(_EVENT, self.events)
        if self.touches:
            self.c.execute(_TOUCH, self.touches)
        self.events, self.touches = [], []


def _ref(m: object) -> tuple[str | None, str | None]:
    if isinstance(m, dict) and isinstance(m.get("name"), str) and m.get("version") is not None:
        return m["name"], str(m["version"])
    return None, None


class Registry:
    """Subscribe to every device's state and events in the connection's fleet and keep the
    database up to date until :meth:`stop`."""

    def __init__(self, connection: MqttConnection, db: FleetDB, *,
                 topics: Topics | None = None, max_queue: int = 10000,
                 flush_s: float = 1.0) -> None:
        self._conn = connection
        self.db = db
        self.topics = topics or Topics.for_config(connection.config)
        self.stats = RegistryStats()
        self._saved = RegistryStats()  # what the database's totals already include
        self._lock = threading.Lock()
        self._flush_s = flush_s
        self._q: queue.Queue[tuple[str, str, bytes, float] | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="fleet-registry", daemon=True)
        self._subs: list[Any] = []
        #: Devices whose state report was queued since start (see the module docstring).
        self._stated: set[str] = set()
        self.reread = RetainedReread(connection)

    def start(self) -> Registry:
        self._thread.start()
        self._subs = [
            self._conn.subscribe(self.topics.every_device("state"), self._on("state")),
            self._conn.subscribe(self.topics.every_device("events"), self._on("events")),
        ]
        return self

    def stop(self) -> None:
        for s in self._subs:
            s.cancel()
        self._q.put(None)
        self._thread.join(10)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on(self, leaf: str) -> Any:
        def handler(topic: str, payload: bytes) -> None:
            device = _device_of(topic)
            if device is None:
                self._count("malformed", f"{topic[:200]}: not a device topic")
                return
            if leaf != "state" and device not in self._stated:
                self.reread.request(self.topics.state(device))
            try:
                self._q.put_nowait((leaf, device, payload, time.time()))
            except queue.Full:
                self._count("dropped")
                return
            if leaf == "state":
                self._stated.add(device)
        return handler

    def _count(self, what: str, why: str | None = None) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)
            if why is not None:
                self.stats.last_malformed = why[:500]

    def _run(self) -> None:
        flushed = time.monotonic()
        while True:
            if time.monotonic() - flushed >= self._flush_s:
                self._flush()
                flushed = time.monotonic()
            try:
                item = self._q.get(timeout=self._flush_s)
            except queue.Empty:
                continue
            batch = [item]
            while item is not None and len(batch) < 200:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            stop = batch[-1] is None
            work = [b for b in batch if b is not None]
            if work:
                self._write(work)
            if stop:
                self._flush()
                return

    def _write(self, work: list[tuple[str, str, bytes, float]]) -> None:
        try:
            with self.db.begin() as c:
                counts = self._batch(c, work)
        except Exception as err:  # the writer thread must outlive any report
            # One bad row must not lose the batch: write the reports one by one.
            log.warning("registry batch failed (%s); retrying one by one",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            counts = []
            for item in work:
                try:
                    with self.db.begin() as c:
                        counts.append(self._one(c, *item))
                except Exception as err2:
                    self._count("db_errors")
                    log.warning("registry: %s report of %s not written: %s", item[0],
                                item[1], str(err2).splitlines()[0] if str(err2) else
                                type(err2).__name__)
        for what, why in counts:
            self._count(what, why)

    def _batch(self, c: Connection,
               work: list[tuple[str, str, bytes, float]]) -> list[tuple[str, str | None]]:
        """Write a batch in order: runs of events together, each state on its own (a state
        reads the row the events before it touched)."""
        events = EventBatch(c)
        counts: list[tuple[str, str | None]] = []
        for leaf, device, payload, ts in work:
            if leaf == "state":
                events.flush()
                counts.append(self._one(c, leaf, device, payload, ts))
                continue
            try:
                events.add(self.topics.fleet, device, payload, ts)
            except MalformedReport as err:
                counts.append(self._malformed(leaf, device, payload, err))
            else:
                counts.append(("events", None))
        events.flush()
        return counts

    def _malformed(self, leaf: str, device: str, payload: bytes,
                   err: MalformedReport) -> tuple[str, str | None]:
        log.warning("ignored a malformed %s report from %s (%d bytes): %s", leaf, device,
                    len(payload), err)
        return "malformed", f"{device}: {leaf}: {err}"

    def _one(self, c: Connection, leaf: str, device: str, payload: bytes,
             ts: float) -> tuple[str, str | None]:
        fleet = self.topics.fleet
        try:
            if leaf == "state":
                write_state(c, fleet, device, payload, ts)
            else:
                write_event(c, fleet, device, payload, ts)
        except MalformedReport as err:
            return self._malformed(leaf, device, payload, err)
        return ("states" if leaf == "state" else "events"), None

    def _flush(self) -> None:
        """Add what changed since the last flush to the database's totals."""
        with self._lock:
            now = RegistryStats(**vars(self.stats))
        delta = {k: getattr(now, k) - getattr(self._saved, k)
                 for k in ("states", "events", "malformed", "dropped", "db_errors")}
        if not any(delta.values()):
            return
        try:
            self.db.add_registry_stats(self.topics.fleet, delta,
                                       last_malformed=now.last_malformed
                                       if delta["malformed"] else None)
        except (FleetError, sa.exc.SQLAlchemyError) as err:
            log.warning("registry: counts not saved: %s", str(err).splitlines()[0])
            return
        self._saved = now

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued report is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
