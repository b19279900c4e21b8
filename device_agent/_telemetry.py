"""Reports to the fleet over MQTT, offline-first.

- ``state`` (retained): online flag, models, last update result; republished on
  every change, every reconnect (after a random delay up to ``reconnect_jitter_s``), every
  refused or unacknowledged publish, and whenever a
  deployment already handled is delivered again (the controller re-sends one it has no
  answer to: the answer may be what was lost). The last will replaces it with an
  offline document (``"will": true``, the connection's ``link``, the facts as of the
  connect) when the link dies.
- ``events``: install started / verified / swapped / committed / rolled back /
  failed / refused, with the reason. Every event is first written to the
  on-disk outbox (bounded: the oldest are dropped first and the drop is
  counted), then sent with QoS 1 and deleted once the broker acknowledged it,
  so events survive both a missing broker and an agent restart. When the disk is
  full the oldest queued files are dropped to make room; when it cannot be written
  at all (read-only), reports wait in memory, under the same bound.
- heartbeats (QoS 0, on ``events``, never queued: a stale heartbeat is noise), sent
  by the telemetry thread, so that they keep coming while an install works for minutes.
  Each carries ``last_seq``, the number of the newest event the broker acknowledged, so
  that the registry can count events it never received even when no later one follows.
- ``progress`` events while a download runs (bytes, total, rate, time left; QoS 0, not
  queued either), every ``progress_s``, and the same in the retained state, so that an
  operator watching a slow link sees more than silence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edge_sdk._internal import atomic_write_text
from edge_sdk.errors import EdgeError

log = logging.getLogger("device_agent.telemetry")


class Outbox:
    """A bounded FIFO of JSON reports, one file each, safe against ``kill -9``.

    At most ``limit`` reports are kept, the oldest dropped first (:attr:`dropped` counts
    them). A write that finds the disk full drops the oldest queued file and tries again;
    a report that still cannot be written waits in memory (lost on a restart, but sent
    in order while the agent runs)."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.dropped = 0
        self._lock = threading.Lock()
        #: Reports that could not be written, by file name (sorted with those on disk).
        self._memory: dict[str, dict[str, Any]] = {}
        #: Sent (or dropped) reports whose file a read-only disk would not let go.
        self._gone: set[str] = set()
        with contextlib.suppress(OSError):
            root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        #: The report files on disk. Only this outbox writes the directory, so it is read
        #: once here and kept up to date: listing it on every report and every look for
        #: work cost more than the reports themselves (measured with 1000 agents).
        self._files: set[str] = set()
        with contextlib.suppress(OSError):
            self._files = {p.name for p in root.glob("[0-9]*.json")}
        names = self._names()
        self._seq = int(names[-1].split(".")[0]) if names else 0

    def _disk(self) -> list[str]:
        return sorted(self._files - self._gone)

    def _names(self) -> list[str]:
        return sorted({*self._disk(), *self._memory} - self._gone)

    def _drop(self, name: str) -> None:
        if self._memory.pop(name, None) is None:
            self._unlink(name)
        self.dropped += 1

    def _unlink(self, name: str) -> None:
        try:
            (self.root / name).unlink(missing_ok=True)
            self._files.discard(name)
        except OSError:
            self._gone.add(name)  # a read-only disk: forgotten here, deleted after a restart

    def put(self, report: dict[str, Any]) -> int:
        with self._lock:
            self._seq += 1
            seq = self._seq
            report = {**report, "seq": seq}
            name = f"{seq:012d}.json"
            text = json.dumps(report)
            while True:
                try:
                    atomic_write_text(self.root / name, text)
                    self._files.add(name)
                    break
                except OSError as err:
                    disk = self._disk()
                    if err.errno not in (errno.ENOSPC, errno.EDQUOT) or not disk:
                        log.warning("report %d kept in memory: cannot write it to %s: %s",
                                    seq, self.root, err.strerror or err)
                        self._memory[name] = report
                        break
                    self._drop(disk[0])  # make room on a full disk
            names = self._names()
            for old in names[: max(0, len(names) - self.limit)]:
                self._drop(old)
            return seq

    def peek(self) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            for name in self._names():
                if name in self._memory:
                    return name, self._memory[name]
                try:
                    return name, json.loads((self.root / name).read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    self._unlink(name)
            return None

    def remove(self, name: str) -> None:
        """Forget a sent report (a file that cannot be deleted now is sent again later)."""
        with self._lock:
            if self._memory.pop(name, None) is None:
                self._unlink(name)

    def __len__(self) -> int:
        return len(self._names())


class Link(Protocol):
    """What the telemetry needs from an MQTT connection (``edge_sdk.transport.MqttConnection``)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> object: ...

    def publish_wait(self, topic: str, payload: bytes | str, *, qos: int = 1,
                     retain: bool = False, timeout: float = 10.0) -> None: ...


class Telemetry:
    """Collects events and state and sends them when a broker link is up."""

    def __init__(self, *, device: str, fleet: str, outbox: Outbox,
                 state_topic: str, events_topic: str,
                 snapshot: Callable[[], dict[str, Any]],
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 heartbeat_fields: Callable[[], dict[str, Any]] | None = None,
                 heartbeat_s: float = 30.0,
                 progress_fields: Callable[[], dict[str, Any] | None] | None = None,
                 progress_s: float = 10.0, reconnect_jitter_s: float = 0.0) -> None:
        """``heartbeat_fields`` gives the fields of each heartbeat, sent every ``heartbeat_s``
        seconds while the link is up (none without it); ``progress_fields`` those of a
        ``progress`` event (None: no download running), looked at every ``progress_s``.
        After each reconnect (not the first connection) the state is sent again within a
        random 0 to ``reconnect_jitter_s`` seconds."""
        self.device = device
        self.fleet = fleet
        self.outbox = outbox
        self.state_topic = state_topic
        self.events_topic = events_topic
        self._snapshot = snapshot
        self._on_event = on_event
        self._beat = heartbeat_fields
        self._beat_s = heartbeat_s
        self._next_beat = 0.0
        self._progress = progress_fields
        self._progress_s = progress_s
        self._next_progress = 0.0
        self._reporting = False
        #: The ``seq`` of the newest event the broker acknowledged (heartbeats carry it).
        self._sent_seq: int | None = None
        self._link: Link | None = None
        self._wake = threading.Event()
        self._state_dirty = True
        self._jitter_s = reconnect_jitter_s
        self._ups = 0
        #: Monotonic time the state is due again after a reconnect (None: nothing due).
        self._state_due: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    @property
    def alive(self) -> bool:
        """False once the sender thread has ended without :meth:`stop` (True before start)."""
        t = self._thread
        return t is None or t.is_alive() or self._stop.is_set()

    def attach(self, link: Link) -> None:
        self._link = link
        self._wake.set()

    def link_changed(self, up: bool) -> None:
        if not up:
            return
        self._ups += 1
        # Every reconnect, even when nothing changed: the registry may have missed the
        # state (a broker that lost its retained copy, a dropped report), and a will
        # published for the dead link may have replaced it.
        delay = random.uniform(0.0, self._jitter_s) if self._ups > 1 else 0.0
        self._state_due = time.monotonic() + delay
        self._wake.set()

    def _state_if_due(self) -> float:
        """Mark the state for sending once its reconnect delay has passed; return the
        seconds until then."""
        due = self._state_due
        if due is None:
            return 1.0
        left = due - time.monotonic()
        if left <= 0:
            self._state_due = None
            self._state_dirty = True
        return max(0.0, left)

    # -- Reporter interface for the installer ------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        report = {"device": self.device, "fleet": self.fleet, "event": kind, "ts": time.time(),
                  **fields}
        try:
            self.outbox.put(report)
        except OSError as err:
            log.error("cannot queue the %s event: %s", kind, err)
        log.info("event %s %s", kind, json.dumps(fields, default=str))
        if self._on_event is not None:
            self._on_event(kind, fields)
        self._wake.set()

    def state_changed(self) -> None:
        self._state_dirty = True
        self._wake.set()

    def heartbeat(self, extra: dict[str, Any], *, kind: str = "heartbeat") -> None:
        """Send an event that is only worth it now (QoS 0, never queued)."""
        link = self._link
        if link is None or not link.connected:
            return
        payload = {"device": self.device, "fleet": self.fleet, "event": kind,
                   "ts": time.time(), **extra}
        if self._sent_seq is not None:
            payload["last_seq"] = self._sent_seq
        try:
            link.publish(self.events_topic, json.dumps(payload), qos=0)
        except EdgeError as err:
            log.debug("heartbeat not sent: %s", err)

    def publish_offline(self) -> None:
        """On a clean shutdown the broker sends no last will: say it ourselves."""
        link = self._link
        if link is None or not link.connected:
            return
        state = {"device": self.device, "fleet": self.fleet, "online": False,
                 "ts": time.time(), **self._snapshot()}
        try:
            link.publish_wait(self.state_topic, json.dumps(state), qos=1, retain=True,
                              timeout=2.0)
        except EdgeError as err:
            log.info("offline state not sent: %s", err)

    # -- sender ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-telemetry", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout: float = 2.0) -> None:
        deadline = time.monotonic() + flush_timeout
        while len(self.outbox) and time.monotonic() < deadline and self._link is not None \
                and self._link.connected:
            self._wake.set()
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _beat_if_due(self) -> float:
        """Send the heartbeat if it is due; return the seconds until the next one."""
        if self._beat is None:
            return 1.0
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self._beat_s
            try:
                self.heartbeat(self._beat())
            except Exception:
                # A heartbeat is not worth the thread that sends every report.
                log.exception("heartbeat failed")
        return self._next_beat - time.monotonic()

    def _progress_if_due(self) -> float:
        """Report a running download if due; return the seconds until the next look."""
        if self._progress is None:
            return 1.0
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + self._progress_s
            try:
                fields = self._progress()
            except Exception:
                log.exception("progress report failed")
                fields = None
            if fields is not None:
                self._reporting = True
                self.heartbeat(fields, kind="progress")
                self._state_dirty = True  # the state carries the transfer too
            elif self._reporting:
                self._reporting = False
                self._state_dirty = True  # and no longer does
        return self._next_progress - time.monotonic()

    def _run(self) -> None:
        self._next_beat = self._next_progress = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(1.0, self._beat_if_due(), self._progress_if_due(),
                                         self._state_if_due())))
            self._wake.clear()
            self._state_if_due()
            link = self._link
            if link is None or not link.connected:
                continue
            try:
                if self._state_dirty:
                    self._state_dirty = False
                    state = {"device": self.device, "fleet": self.fleet, "online": True,
                             "ts": time.time(), **self._snapshot()}
                    link.publish_wait(self.state_topic, json.dumps(state), qos=1, retain=True)
                while not self._stop.is_set() and (item := self.outbox.peek()) is not None:
                    self._beat_if_due()
                    name, report = item
                    link.publish_wait(self.events_topic, json.dumps(report), qos=1)
                    self.outbox.remove(name)
                    self.sent += 1
                    if isinstance(report.get("seq"), int):
                        self._sent_seq = report["seq"]
            except EdgeError as err:
                log.info("reports wait for the broker: %s", err)
                self._state_dirty = True
                time.sleep(0.2)
