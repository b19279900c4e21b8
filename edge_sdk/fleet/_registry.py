"""Device registry: every device's retained ``state`` and its ``events``, written to the DB.

The MQTT callbacks only check and queue; one writer thread owns the database writes, so a
slow database never stalls the network thread. What a device may send is bounded before
anything is parsed (:class:`RegistryConfig`, :mod:`._ingest`): a size cap per report and
two token buckets per device, and a queue bounded in bytes that is fair between devices —
a device over its budget gets its own reports dropped and counted, never another
device's. Gaps in the sequence numbers agents put in their events are counted as lost
(the broker dropped them before the registry could read them), and after any drop or
loss every device's retained state is read again, so that no state stays missed; and a
device heard from (an event, a heartbeat) whose state this registry has not taken in
since it started — a clustered broker can miss a retained state published while the
subscription was being set up — gets its retained state read again (:mod:`._reread`);
every retained state is read again after ``reread_quiet_s`` without a state report; and
agents send their state again after every reconnect: no device depends on one retained
message arriving. A
malformed report (not bounded JSON, or a value no column can hold: an over-long name, a
counter out of range, a NUL or a lone surrogate) is logged and counted, never raised.
The counts are kept in the database, in all (:meth:`FleetDB.registry_stats`) and per
device (:meth:`FleetDB.ingest_stats`), with the registry's progress: every report
received before ``caught_up`` is written, which the controller's timeouts wait for.
``device_events`` is pruned per device and by age.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..quality import ShadowFigures
from ..release._watch import MAX_RESULTS, DeviceStatus
from ..transport import MqttConnection, Topics
from ..transport._access import PROBE_DEVICE
from ._drift import DriftJudge
from ._ingest import DeviceCounts, Intake, RegistryConfig
from ._reread import RetainedReread
from ._store import (
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    MAX_ID,
    Connection,
    DatabaseError,
    FleetDB,
    FleetError,
    device_drift,
    insert_device,
    insert_event,
    json_text,
    model_versions,
    reported_device,
    update_device,
    write_drift,
    write_events,
)

log = logging.getLogger("edge_sdk.fleet.registry")


@dataclass
class RegistryStats:
    """Reports handled since the registry started; the database keeps the running totals.
    ``dropped``: not taken in (over a device's budget or size cap, or pushed out of a full
    queue); ``lost``: never reached the registry (gaps in a device's event numbers)."""

    states: int = 0
    events: int = 0
    malformed: int = 0
    dropped: int = 0
    db_errors: int = 0
    lost: int = 0
    #: ``device: reason`` of the newest malformed report.
    last_malformed: str | None = None


_COUNTED = ("states", "events", "malformed", "dropped", "db_errors", "lost")


class MalformedReport(ValueError):
    """A device report the registry will not write; the message says why."""


#: What each column of the tables the registry writes can hold on every engine
#: (PostgreSQL refuses a longer VARCHAR, a NUL, a lone surrogate, an INTEGER over 2**31-1).
_DEVICE_COLS, _EVENT_COLS = DEVICE_COLUMNS, EVENT_COLUMNS
_ID_MAX = _DEVICE_COLS["id"][1] or 128
_NAME_MAX = _DEVICE_COLS["model"][1] or 256
_VERSION_MAX = _DEVICE_COLS["version"][1] or 128
_WORD_MAX = _DEVICE_COLS["phase"][1] or 64
_KIND_MAX = _EVENT_COLS["kind"][1] or 64
_RETRY = ":retry"
#: Characters of each stored update result's reason (the controller reads them every poll).
_RESULT_REASON = 500
#: Characters of a device's stored drift document at most (edge_sdk.fleet._drift).
_DRIFT_MAX = 64 * 1024
#: Drift judged without references (a registry not given a repository): figures kept,
#: nothing flagged.
_NO_REFERENCES = DriftJudge()


def _fit(cols: dict[str, tuple[str, int | None]], row: dict[str, Any]) -> None:
    """Raise :class:`MalformedReport` unless every value of ``row`` fits its column: the
    last check before a write, so that no device input can fail a batch of others'."""
    for name, value in row.items():
        kind, limit = cols.get(name, ("", None))
        if value is None or not kind:
            continue
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= (limit or MAX_ID):
                raise MalformedReport(f"{name} {value!r} does not fit its column")
        elif not isinstance(value, str):
            raise MalformedReport(f"{name} is not text")
        else:
            _text(value, name, limit if kind == "str" else None)


def _device_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) != 5 or not 0 < len(parts[3]) <= _ID_MAX:
        return None
    dev = parts[3]
    # A device id is stored, logged and shown: no NUL (PostgreSQL refuses it), no lone
    # surrogate, no control character.
    if not dev.isprintable():
        return None
    try:
        dev.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return dev


def _shown(text: str, limit: int = 200) -> str:
    """Untrusted text as one printable line (for logs and the stored diagnosis)."""
    t = text[:limit]
    return t if t.isprintable() else "".join(
        ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in t)


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
    if value is not None and not 0 <= value <= MAX_ID:
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
                 now: float | None = None, *, drift: DriftJudge | None = None) -> bool:
    """Write one device event (heartbeats only refresh ``last_seen``, and the device's
    input drift when they carry it: ``drift`` judges it); False when malformed."""
    try:
        write_event(c, fleet, device, payload, now, drift=drift)
    except MalformedReport:
        return False
    return True


#: What a device is, as opposed to how it is doing: kept from the last report that said
#: it when a later one (a last will, any partial state) leaves it out.
FACTS = ("model", "models", "previous", "groups", "tags", "hardware", "phase", "deployment",
         "last_update", "results")
#: Facts that newer agents report beside an older one: a report that gives the older one
#: without them (an agent downgraded in place) has none, and the stored ones are stale.
_BESIDE = {"models": "model", "results": "last_update"}
#: Keys of a stored state that the registry writes, never the device.
_OWN = ("offline_since",)


def _link(doc: dict[str, Any]) -> tuple[int, int] | None:
    """The connection a report names (``[process start ms, connection number]``)."""
    v = doc.get("link")
    if isinstance(v, list) and len(v) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v[0], v[1]
    return None


def _merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The state to keep: ``new``, with the :data:`FACTS` it leaves out taken from ``old``.
    A last will (``"will": true``) only says the link died: the facts it carries are as
    of its connect, older than any state that link sent, so the stored ones win."""
    new = {k: v for k, v in new.items() if k not in _OWN}
    if old is None:
        return new
    if new.get("will") is True:
        new = {k: v for k, v in new.items() if k not in FACTS}
    kept = [k for k in FACTS if k in old and _BESIDE.get(k) not in new]
    return {**{k: old[k] for k in kept}, **new}


def write_state(c: Connection, fleet: str, device: str, payload: bytes,
                now: float | None = None) -> None:
    """:func:`ingest_state` that raises :class:`MalformedReport` with the reason.

    A report that leaves facts out (a last will, a partial state) keeps the stored ones
    (:data:`FACTS`); an offline one records since when (``offline_since`` in the stored
    state). A last will older than the connection the stored online state came from is
    ignored: it was published late for a link the device has already replaced."""
    if not payload:
        return
    sent = _parse(payload)
    if not isinstance(sent, dict):
        raise MalformedReport("a state report must be a JSON object")
    ts = time.time() if now is None else now
    old = reported_device(c, fleet, device)
    before = _loads_state(old.state) if old is not None else None
    going = sent.get("online") is not True
    if going and old is not None and old.online and before is not None:
        mine, theirs = _link(sent), _link(before)
        if mine is not None and theirs is not None and mine < theirs:
            log.info("registry: ignored an offline report (a late last will) of %s for "
                     "connection %s: it has reported from connection %s since", device,
                     list(mine), list(theirs))
            return
    doc = _merge(before, sent)
    if going:  # since the first offline report after it was online (or first heard)
        kept = before.get("offline_since") if before is not None and old is not None \
            and not old.online else None
        doc["offline_since"] = kept if isinstance(kept, (int, float)) else ts
    st = DeviceStatus.parse(device, json_text(doc).encode())
    if st is None:  # pragma: no cover - parsed above
        raise MalformedReport("unreadable state report")
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
    models = json_text([m.to_json() for m in st.served])
    figures = _result_figures(doc.get("results"))
    results = json_text([{"deployment": r.deployment, "result": r.result,
                          "reason": None if r.reason is None else r.reason[:_RESULT_REASON],
                          "models": list(r.models),
                          **({"shadow": figures[r.deployment]}
                             if r.deployment in figures else {})}
                         for r in st.results if r.deployment <= MAX_ID])
    values: dict[str, Any] = {
        "models": models, "results": results,
        "groups": json_text(list(st.groups)), "tags": json_text(tags),
        "hardware": json_text(hw), "online": st.online, "last_seen": ts,
        "model": model, "version": version, "previous_model": prev[0],
        "previous_version": prev[1], "phase": st.phase, "deployment": st.deployment,
        "last_result": st.last_result, "last_reason": st.last_reason,
        "last_deployment": st.last_deployment, "state": json_text(doc),
        "shadow": _shadow_block(doc.get("shadow"), st, figures),
    }
    if old is not None and sent.get("will") is True:
        values["last_seen"] = old.last_seen  # the broker spoke, not the device
    _fit(_DEVICE_COLS, {"fleet": fleet, "id": device, **values})
    if old is None:
        insert_device(c, fleet, device, ts, values)
        changes = ["registered"]
    else:
        update_device(c, fleet, device, values)
        changes = []
        if bool(old.online) != st.online:
            changes.append("online" if st.online else "offline")
        if (old.model, old.version) != (model, version) \
                or model_versions(old.models) != st.models:
            changes.append("model")
        if old.phase != st.phase:
            changes.append("phase")
        if (old.last_deployment, old.last_result) != (st.last_deployment, st.last_result):
            changes.append("result")
    if changes:
        row = {"fleet": fleet, "device": device, "ts": ts,
               "kind": "state:" + ",".join(changes), "deployment": st.last_deployment,
               "model": model, "version": version,
               "reason": st.last_reason if "result" in changes else None,
               "detail": json_text({"online": st.online, "phase": st.phase,
                                    "result": st.last_result, "models": st.models})}
        _fit(_EVENT_COLS, row)
        insert_event(c, row)


def _result_figures(results: object) -> dict[int, dict[str, Any]]:
    """Deployment counter -> the shadow figures of each of a state's newest ``results``
    that carries them (read as :meth:`ShadowFigures.from_json` reads hostile input)."""
    out: dict[int, dict[str, Any]] = {}
    for r in results[-MAX_RESULTS:] if isinstance(results, list) else ():
        if isinstance(r, dict) and isinstance(r.get("shadow"), dict):
            n = _number(r.get("deployment"))
            if n is not None and n <= MAX_ID:
                out[n] = ShadowFigures.from_json(r["shadow"]).to_json()
    return out


_SHADOW_WORD = 64


def _shadow_block(sent: object, st: DeviceStatus,
                  figures: dict[int, dict[str, Any]]) -> str | None:
    """What ``devices.shadow`` keeps (JSON): the device's running shadow run as its state
    says it (``deployment``, ``model``, ``version``, ``started``, ``status``,
    ``figures``), else the newest update result with shadow figures (``result`` and
    ``reason`` instead of ``status``), else None. Every value is bounded here."""
    def word(v: object, limit: int = _SHADOW_WORD) -> str | None:
        return v[:limit] if isinstance(v, str) and v.isprintable() else None

    if isinstance(sent, dict):
        started = sent.get("started")
        return json_text({
            "deployment": _number(sent.get("deployment")),
            "model": word(sent.get("model"), _NAME_MAX),
            "version": word(sent.get("version"), _VERSION_MAX),
            "started": started if isinstance(started, int | float)
            and not isinstance(started, bool) and math.isfinite(started) else None,
            "status": word(sent.get("status")),
            "figures": ShadowFigures.from_json(sent.get("figures")).to_json()})
    for r in reversed(st.results):
        if r.deployment in figures:
            return json_text({
                "deployment": r.deployment, "model": r.models[0] if r.models else None,
                "result": r.result, "reason": None if r.reason is None
                else r.reason[:_RESULT_REASON], "figures": figures[r.deployment]})
    return None


def _loads_state(text: str | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def write_event(c: Connection, fleet: str, device: str, payload: bytes,
                now: float | None = None, *, drift: DriftJudge | None = None) -> None:
    """:func:`ingest_event` that raises :class:`MalformedReport` with the reason."""
    EventBatch(c, drift=drift).add(fleet, device, payload, now).flush()


class EventBatch:
    """Event reports checked one by one and written together: one multi-row insert and
    one executemany of ``last_seen`` updates per :meth:`flush`, instead of two round trips
    per report (on PostgreSQL under load the registry fell seconds behind a rollout of 500
    devices). Rows are written in the order added."""

    def __init__(self, c: Connection, *, drift: DriftJudge | None = None) -> None:
        self.c = c
        self.events: list[dict[str, Any]] = []
        self.touches: list[dict[str, Any]] = []
        #: Heartbeats' drift blocks, judged and stored at :meth:`flush` (after the
        #: touches: a device that is not registered yet has no row to hold them).
        self.drift = drift if drift is not None else _NO_REFERENCES
        self.drifts: list[tuple[str, str, Any, Any, float]] = []
        #: The sequence number of the event added last (agents number their events), if
        #: it had one; and the newest number a heartbeat says its device has sent.
        self.seq: int | None = None
        self.last_seq: int | None = None

    def add(self, fleet: str, device: str, payload: bytes,
            now: float | None = None) -> EventBatch:
        """Check one event report (raises :class:`MalformedReport`, nothing added)."""
        doc = _parse(payload)
        if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
            raise MalformedReport("an event must be a JSON object with a string 'event'")
        ts = time.time() if now is None else now
        # Room for the ":retry" suffix: a name at the column's length plus it overflowed
        # VARCHAR(64) on PostgreSQL and failed every batch it was in.
        kind = _text(doc["event"][:_KIND_MAX - len(_RETRY)], "event") or ""
        touch = {"k_fleet": fleet, "k_id": device, "k_ts": ts}
        self.seq = self.last_seq = None
        if kind in ("heartbeat", "progress"):
            self.last_seq = _number(doc.get("last_seq"))
        if kind == "heartbeat":
            self.touches.append(touch)
            if "drift" in doc:
                self.drifts.append((fleet, device, doc["drift"], doc.get("models"), ts))
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
            kind = f"{kind}{_RETRY}"
        seq = doc.get("seq")
        row = {
            "fleet": fleet, "device": device, "ts": ts, "kind": kind,
            "deployment": _counter(counter, "deployment.counter"),
            "model": _text(ref[0], "model.name", _NAME_MAX),
            "version": _text(ref[1], "model.version", _VERSION_MAX),
            "reason": _text(reason[:2000], "reason") if isinstance(reason, str) else None,
            "detail": json_text(doc)}
        _fit(_EVENT_COLS, row)
        self.events.append(row)
        self.touches.append(touch)
        self.seq = _number(seq)
        return self

    def flush(self) -> None:
        write_events(self.c, self.events, self.touches)
        self.events, self.touches = [], []
        drifts, self.drifts = self.drifts, []
        for fleet, device, block, served, ts in drifts:
            old = _loads_state(device_drift(self.c, fleet, device))
            judged = self.drift.judge(block, served, old, ts)
            if judged is None:
                continue
            doc, drifting = judged
            text = json_text(doc)
            if len(text) > _DRIFT_MAX:  # many models and inputs: the per-channel PSI go
                for m in doc["models"].values():
                    for d in m["inputs"].values():
                        d.pop("psi", None)
                text = json_text(doc)
            if len(text) > _DRIFT_MAX:
                text = json_text({k: doc[k] for k in ("at", "flagged", "warn", "refused")})
            write_drift(self.c, fleet, device, text, drifting)


def _number(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _ref(m: object) -> tuple[str | None, str | None]:
    if isinstance(m, dict) and isinstance(m.get("name"), str) and m.get("version") is not None:
        return m["name"], str(m["version"])
    return None, None


class Registry:
    """Subscribe to every device's state and events in the connection's fleet and keep the
    database up to date until :meth:`stop` (limits and retention: :class:`RegistryConfig`).

    ``qos``: of the subscriptions. 0 (the default) costs the network thread no
    acknowledgement per report, which lets it keep up with more; a report the broker
    could not deliver is lost either way (counted from the gaps it leaves)."""

    #: Reports written in one transaction.
    BATCH = 200

    def __init__(self, connection: MqttConnection, db: FleetDB, *,
                 topics: Topics | None = None, config: RegistryConfig | None = None,
                 qos: int = 0, drift: DriftJudge | None = None) -> None:
        self._conn = connection
        self.db = db
        #: Judges the input drift heartbeats carry (thresholds, the artifacts' references).
        self.drift = drift
        self.topics = topics or Topics.for_config(connection.config)
        self.config = config or RegistryConfig()
        self.qos = qos
        self.stats = RegistryStats()
        self.intake = Intake(self.config)
        self._saved = RegistryStats()  # what the database's totals already include
        self._lock = threading.Lock()
        self._pending: dict[str, DeviceCounts] = {}  # per-device counts not yet saved
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-registry", daemon=True)
        self._subs: list[Any] = []
        self._state_sub: Any = None
        #: When the subscriptions were acknowledged (silence counts from then).
        self.listening_since: float | None = None
        #: Per device: a hash of the last state written (the same retained state sent
        #: again, after a resync or a reconnect, is not written again).
        self._states: dict[str, int] = {}
        self._loss = False  # reports dropped or lost since the last resync
        self._resynced = time.monotonic()
        self._news = self._resynced  # when a state report was last taken in
        self._pruned = 0.0
        self._rows: dict[str, int] = {}  # events written per device since its last prune
        self._logged: dict[str, float] = {}  # device -> when its last malformed was logged
        #: Devices whose state report was queued since start (see the module docstring).
        self._stated: set[str] = set()
        self.reread = RetainedReread(connection)

    def start(self) -> Registry:
        self._thread.start()
        self._state_sub = self._subscribe("state")
        self._subs = [self._subscribe("events")]
        self.listening_since = time.time()
        return self

    def _subscribe(self, leaf: str, *, wait: bool = True) -> Any:
        return self._conn.subscribe(self.topics.every_device(leaf), self._on(leaf),
                                    qos=self.qos, wait=wait)

    def stop(self) -> None:
        for s in [*self._subs, self._state_sub]:
            if s is not None:
                s.cancel()
        self._stop.set()
        self.intake.ready.set()
        self._thread.join(10)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on(self, leaf: str) -> Callable[[str, bytes], None]:
        offer = self.intake.offer

        def handler(topic: str, payload: bytes) -> None:
            # The network thread: only what decides whether to queue, nothing parsed.
            device = _device_of(topic)
            if device is None:
                self._count("malformed", f"{_shown(topic)}: not a device topic")
                return
            if device == PROBE_DEVICE:  # a serve's start-up access check, not a device
                return
            if leaf != "state" and device not in self._stated:
                self.reread.request(self.topics.state(device))
            if offer(leaf, device, payload, time.time()) and leaf == "state":
                self._stated.add(device)
                self._news = time.monotonic()
        return handler

    def _count(self, what: str, why: str | None = None, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)
            if why is not None:
                self.stats.last_malformed = why[:500]

    def caught_up(self) -> float:
        """Every report received before this time is written, dropped or counted."""
        return self.intake.caught_up(time.time())

    def _run(self) -> None:
        flushed = time.monotonic()
        while True:
            if time.monotonic() - flushed >= self.config.flush_s:
                self._flush()
                self._housekeeping()
                flushed = time.monotonic()
            if self._stop.is_set():
                work = self.intake.take(self.BATCH)
                if not work:
                    self._flush()
                    return
            else:
                self.intake.ready.wait(self.config.flush_s)
                work = self.intake.take(self.BATCH)
            if work:
                try:
                    self._write(work)
                finally:
                    self.intake.done()

    def _write(self, work: list[tuple[str, str, bytes, float]]) -> None:
        try:
            with self.db.begin() as c:
                counts = self._batch(c, work)
        except Exception as err:  # the writer thread must outlive any report
            # One bad row must not lose the batch: write the reports one by one.
            log.warning("registry batch failed (%s); retrying one by one",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            for item in work:  # rolled back: none of its states counts as written
                self._states.pop(item[1], None)
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
            if what:
                self._count(what, why)

    def _batch(self, c: Connection,
               work: list[tuple[str, str, bytes, float]]) -> list[tuple[str, str | None]]:
        """Write a batch in order: runs of events together, each state on its own (a state
        reads the row the events before it touched)."""
        events = EventBatch(c, drift=self.drift)
        counts: list[tuple[str, str | None]] = []
        for leaf, device, payload, ts in work:
            if leaf == "state":
                events.flush()
                counts.append(self._one(c, leaf, device, payload, ts))
                continue
            try:
                before = len(events.events)
                events.add(self.topics.fleet, device, payload, ts)
            except MalformedReport as err:
                counts.append(self._malformed(leaf, device, payload, err))
                continue
            counts.append(("events", None))
            if len(events.events) > before:
                self._rows[device] = self._rows.get(device, 0) + 1
            if events.seq is not None:
                self.intake.sequence(device, events.seq, ts)
            if events.last_seq is not None:
                self.intake.sequence(device, events.last_seq, ts, sent=True)
        events.flush()
        return counts

    def _malformed(self, leaf: str, device: str, payload: bytes,
                   err: MalformedReport) -> tuple[str, str | None]:
        now = time.monotonic()
        # One line per device per minute: the counts carry the rest of a flood.
        if now - self._logged.get(device, -60.0) >= 60.0:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[device] = now
            log.warning("ignored a malformed %s report from %s (%d bytes): %s", leaf,
                        device, len(payload), err)
        return "malformed", f"{device}: {leaf}: {_shown(str(err), 400)}"

    def _one(self, c: Connection, leaf: str, device: str, payload: bytes,
             ts: float) -> tuple[str, str | None]:
        fleet = self.topics.fleet
        try:
            if leaf == "state":
                seen = hash(payload)
                if self._states.get(device) == seen:
                    return "", None  # the same retained state again: nothing new
                write_state(c, fleet, device, payload, ts)
                if len(self._states) >= self.config.max_devices:
                    self._states.clear()
                self._states[device] = seen
            else:
                write_event(c, fleet, device, payload, ts, drift=self.drift)
        except MalformedReport as err:
            return self._malformed(leaf, device, payload, err)
        return ("states" if leaf == "state" else "events"), None

    def _flush(self) -> None:
        """Add what changed since the last flush to the database's totals, and say how far
        the registry has got."""
        dropped, lost, per = self.intake.counts()
        if dropped or lost:
            self._loss = True
            self._count("dropped", n=dropped)
            self._count("lost", n=lost)
        for device, c in per.items():
            had = self._pending.get(device)
            if had is None:
                self._pending[device] = c
            else:
                had.dropped += c.dropped
                had.dropped_bytes += c.dropped_bytes
                had.lost += c.lost
                had.reason, had.at = c.reason, c.at
        with self._lock:
            now = RegistryStats(**vars(self.stats))
        delta = {k: getattr(now, k) - getattr(self._saved, k) for k in _COUNTED}
        reports, queued = self.intake.backlog()
        progress = {"caught_up": self.caught_up(), "backlog_reports": reports,
                    "backlog_bytes": queued, "listening_since": self.listening_since,
                    "silent_after_s": self.config.silent_after_s}
        try:
            self.db.add_registry_stats(self.topics.fleet, delta,
                                       last_malformed=now.last_malformed
                                       if delta["malformed"] else None, progress=progress)
            if self._pending:
                self.db.add_device_ingest(self.topics.fleet, {
                    d: {"dropped": c.dropped, "dropped_bytes": c.dropped_bytes,
                        "lost": c.lost, "reason": c.reason, "at": c.at}
                    for d, c in self._pending.items()})
                self._pending = {}
        except (FleetError, DatabaseError) as err:
            log.warning("registry: counts not saved: %s", str(err).splitlines()[0])
            return
        self._saved = now

    def _housekeeping(self) -> None:
        """Read every retained state again after a loss or a quiet while; prune
        ``device_events``."""
        cfg = self.config
        mono = time.monotonic()
        if self._loss and cfg.resync_s and mono - self._resynced >= cfg.resync_s \
                and not self._stop.is_set():
            self._loss, self._resynced = False, mono
            self._resync("reports were dropped or lost")
        elif cfg.reread_quiet_s and mono - max(self._news, self._resynced) \
                >= cfg.reread_quiet_s and not self._stop.is_set():
            self._resynced = mono
            self._resync(f"no state report for {cfg.reread_quiet_s:g} s")
        if mono - self._pruned >= cfg.prune_s:
            self._pruned = mono
            over = [d for d, n in self._rows.items() if n > cfg.events_per_device // 10]
            for d in over:
                self._rows.pop(d, None)
            try:
                self.db.prune_events(self.topics.fleet, over, keep=cfg.events_per_device,
                                     older_than=time.time() - cfg.events_max_age_s
                                     if cfg.events_max_age_s else None)
            except (FleetError, DatabaseError) as err:
                log.warning("registry: device_events not pruned: %s",
                            str(err).splitlines()[0])

    def _resync(self, why: str) -> None:
        """Subscribe to the states again: the broker sends every retained one anew (an
        unchanged one costs a hash), so a state it dropped while the registry was behind
        is not missed until that device changes again."""
        old = self._state_sub
        try:
            self._state_sub = self._subscribe("state", wait=False)
        except Exception as err:  # a closed connection: the next reconnect re-subscribes
            log.info("registry: states not read again: %s", err)
            return
        if old is not None:
            old.cancel()  # the same filter is still subscribed: no UNSUBSCRIBE goes out
        log.info("registry: %s; reading every device's retained state again", why)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued report is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.time()
            if self.intake.caught_up(now) == now:
                return
            time.sleep(0.02)
