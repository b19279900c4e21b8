"""Device registry: every device's retained ``state`` and its ``events``, written to the DB.

The MQTT callbacks only parse and queue; one writer thread owns the database writes, so a
slow database never stalls the network thread (the queue is bounded; when it is full a
report is dropped and counted — the next retained state carries the same facts). A
malformed report is logged and counted, never raised.
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

log = logging.getLogger("edge_sdk.fleet.registry")


@dataclass
class RegistryStats:
    states: int = 0
    events: int = 0
    malformed: int = 0
    dropped: int = 0
    db_errors: int = 0


def _device_of(topic: str) -> str | None:
    parts = topic.split("/")
    return parts[3] if len(parts) == 5 else None


def ingest_state(c: Connection, fleet: str, device: str, payload: bytes,
                 now: float | None = None) -> bool:
    """Write one retained state report; False (nothing written) when it is malformed.

    An empty payload (a cleared retained message) changes nothing."""
    if not payload:
        return True
    st = DeviceStatus.parse(device, payload)
    if st is None:
        return False
    ts = time.time() if now is None else now
    doc = st.raw
    tags = doc.get("tags") if isinstance(doc.get("tags"), dict) else {}
    hw = doc.get("hardware") if isinstance(doc.get("hardware"), dict) else {}
    model, version = st.model_ref or (None, None)
    prev = _ref(doc.get("previous"))
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
    return True


def ingest_event(c: Connection, fleet: str, device: str, payload: bytes,
                 now: float | None = None) -> bool:
    """Write one device event (heartbeats only refresh ``last_seen``); False when malformed."""
    try:
        doc = loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=MESSAGE_MAX_DEPTH)
    except ValueError:
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        return False
    ts = time.time() if now is None else now
    kind = doc["event"][:64]
    key = (devices.c.fleet == fleet) & (devices.c.id == device)
    if kind == "heartbeat":
        c.execute(devices.update().where(key).values(last_seen=ts))
        return True
    raw_dep = doc.get("deployment")
    dep: dict[str, Any] = raw_dep if isinstance(raw_dep, dict) else {}
    counter = dep.get("counter", dep.get("version"))
    counter = counter if isinstance(counter, int) and not isinstance(counter, bool) else None
    ref = _ref(doc.get("model"))
    if ref == (None, None) and isinstance(dep.get("name"), str):
        ref = (dep["name"], str(dep.get("artifact_version")))
    reason = doc.get("reason")
    if doc.get("retry"):
        kind = f"{kind}:retry"
    c.execute(device_events.insert().values(
        fleet=fleet, device=device, ts=ts, kind=kind, deployment=counter, model=ref[0],
        version=ref[1], reason=reason[:2000] if isinstance(reason, str) else None,
        detail=json_text(doc)))
    c.execute(devices.update().where(key).values(last_seen=ts))
    return True


def _ref(m: object) -> tuple[str | None, str | None]:
    if isinstance(m, dict) and isinstance(m.get("name"), str) and m.get("version") is not None:
        return m["name"], str(m["version"])
    return None, None


class Registry:
    """Subscribe to every device's state and events in the connection's fleet and keep the
    database up to date until :meth:`stop`."""

    def __init__(self, connection: MqttConnection, db: FleetDB, *,
                 topics: Topics | None = None, max_queue: int = 10000) -> None:
        self._conn = connection
        self.db = db
        self.topics = topics or Topics.for_config(connection.config)
        self.stats = RegistryStats()
        self._q: queue.Queue[tuple[str, str, bytes, float] | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="fleet-registry", daemon=True)
        self._subs: list[Any] = []
        self._idle = threading.Event()

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
                self.stats.malformed += 1
                return
            try:
                self._q.put_nowait((leaf, device, payload, time.time()))
            except queue.Full:
                self.stats.dropped += 1
        return handler

    def _run(self) -> None:
        while True:
            item = self._q.get()
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
                return

    def _write(self, work: list[tuple[str, str, bytes, float]]) -> None:
        try:
            with self.db.begin() as c:
                for leaf, device, payload, ts in work:
                    self._one(c, leaf, device, payload, ts)
        except (FleetError, sa.exc.SQLAlchemyError) as err:
            # One bad row must not lose the batch: write the reports one by one.
            log.warning("registry batch failed (%s); retrying one by one", err)
            for leaf, device, payload, ts in work:
                try:
                    with self.db.begin() as c:
                        self._one(c, leaf, device, payload, ts)
                except (FleetError, sa.exc.SQLAlchemyError) as err2:
                    self.stats.db_errors += 1
                    log.warning("registry: %s report of %s not written: %s", leaf, device,
                                err2)

    def _one(self, c: Connection, leaf: str, device: str, payload: bytes, ts: float) -> None:
        fleet = self.topics.fleet
        ok = (ingest_state(c, fleet, device, payload, ts) if leaf == "state"
              else ingest_event(c, fleet, device, payload, ts))
        if not ok:
            self.stats.malformed += 1
            log.warning("ignored a malformed %s report from %s (%d bytes)", leaf, device,
                        len(payload))
        elif leaf == "state":
            self.stats.states += 1
        else:
            self.stats.events += 1

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued report is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
