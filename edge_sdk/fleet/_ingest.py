"""What the registry takes in from each device, decided before anything is parsed.

:class:`Intake` sits between the MQTT callback and the registry's writer thread. Every
report is checked against a size cap and the sending device's two token buckets (reports
per second, bytes per second) in the callback, before it is queued; a report over any of
them is dropped and counted against **that** device. The queue is bounded in bytes and is
fair: the writer takes the devices' reports in turns, and when the queue is full the
oldest report of the device holding the most of it goes, never another device's arrival.

Pure (no I/O; the caller gives the time); thread-safe, since the network thread offers
and the writer thread takes. It also keeps what the registry learns about loss: reports
dropped here, and reports lost before they reached the registry (gaps in the sequence
numbers an agent puts in its events).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from threading import Event, Lock

from .._settings import numeric_settings
from ..transport._responder import _TokenBucket
from ._store import FleetUsageError

KiB, MiB = 1024, 1024 * 1024
#: What a queued report costs besides its payload (the tuple, the topic's device id).
_OVERHEAD = 256


@dataclass(frozen=True)
class RegistryConfig:
    """Limits and tunables of the device registry (``edge-sdk serve --registry KEY=N``).

    Per device, checked before a report is queued: ``max_report_bytes`` (the largest
    state or event an agent sends is a few KiB: its state with hardware facts, groups,
    tags and a failure reason), and two token buckets: ``reports_per_s`` (bucket
    ``burst_reports``: an agent back from a long time offline sends its whole outbox of
    up to 1000 events at once) and ``bytes_per_s`` (bucket ``burst_bytes``). The queue
    between the network thread and the database holds at most ``max_queue_bytes``.
    ``max_devices`` bounds the table of budgets (least recently heard forgotten).

    ``device_events`` keeps at most ``events_per_device`` rows per device and none
    older than ``events_max_age_s`` (0: no limit), pruned every ``prune_s``. A device
    that reported itself online is shown silent once nothing came from it for
    ``silent_after_missed`` heartbeat periods of ``heartbeat_s`` (the agents'
    ``telemetry.heartbeat_s``) while the registry was listening. After reports were
    dropped or lost, every device's retained state is read again (at most every
    ``resync_s``; 0: never), so that a state lost in a flood is not missed for good;
    and when no state report has come for ``reread_quiet_s`` (0: never), so that a state
    lost without trace (a broker that did not send it) is not either.
    Counts and the registry's progress are saved every ``flush_s``.
    """

    max_report_bytes: int = 16 * KiB
    reports_per_s: float = 20.0
    burst_reports: int = 1200
    bytes_per_s: int = 64 * KiB
    burst_bytes: int = 4 * MiB
    max_queue_bytes: int = 64 * MiB
    max_devices: int = 100_000
    events_per_device: int = 1000
    events_max_age_s: float = 30 * 86400.0
    prune_s: float = 10.0
    heartbeat_s: float = 30.0
    silent_after_missed: int = 3
    resync_s: float = 30.0
    reread_quiet_s: float = 600.0
    flush_s: float = 1.0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> FleetUsageError:
            return FleetUsageError(f"registry {key}: {getattr(self, key)!r} {why}")

        for key in ("max_report_bytes", "burst_reports", "burst_bytes", "max_queue_bytes",
                    "max_devices", "events_per_device", "silent_after_missed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be a whole number >= 1")
        for key in ("reports_per_s", "bytes_per_s", "heartbeat_s", "flush_s", "prune_s"):
            if not float(getattr(self, key)) > 0:
                raise bad(key, "must be > 0")
        for key in ("events_max_age_s", "resync_s", "reread_quiet_s"):
            if not float(getattr(self, key)) >= 0:
                raise bad(key, "must be >= 0 (0: off)")
        if self.burst_bytes < self.max_report_bytes:
            raise bad("burst_bytes", f"must be at least max_report_bytes "
                                     f"({self.max_report_bytes}), or no report would pass")
        if self.max_queue_bytes < self.max_report_bytes + _OVERHEAD:
            raise bad("max_queue_bytes", "must hold at least one report of "
                                         "max_report_bytes")

    @property
    def silent_after_s(self) -> float:
        return self.heartbeat_s * self.silent_after_missed

    @classmethod
    def parse(cls, settings: list[str] | tuple[str, ...]) -> RegistryConfig:
        """From ``KEY=N`` strings (raises :class:`FleetUsageError` naming the key)."""
        try:
            changes = numeric_settings(cls, settings, "--registry")
        except ValueError as err:
            raise FleetUsageError(str(err)) from None
        return cls(**changes)  # type: ignore[arg-type]


#: A queued report: (leaf, device, payload, time received).
Item = tuple[str, str, bytes, float]


@dataclass
class DeviceCounts:
    """Reports of one device that were not written, since the last :meth:`Intake.counts`."""

    dropped: int = 0
    dropped_bytes: int = 0
    lost: int = 0
    #: The config key the newest drop was over (``max_report_bytes``, ``reports_per_s``,
    #: ``bytes_per_s``, ``max_queue_bytes``), or ``lost`` for a gap in its numbers.
    reason: str | None = None
    at: float = 0.0


class _Device:
    __slots__ = ("bytes", "excused", "queue", "queued", "reports", "seq")

    def __init__(self, config: RegistryConfig, now: float) -> None:
        self.reports = _TokenBucket(config.reports_per_s, config.burst_reports, now)
        self.bytes = _TokenBucket(config.bytes_per_s, config.burst_bytes, now)
        self.queue: deque[Item] = deque()
        self.queued = 0  # bytes
        #: The newest sequence number seen in its events, and the events dropped here
        #: since (a gap they explain is not a loss).
        self.seq: int | None = None
        self.excused = 0


@dataclass
class _Totals:
    dropped: int = 0
    lost: int = 0
    per_device: dict[str, DeviceCounts] = field(default_factory=dict)


class Intake:
    """Per-device budgets and the fair, byte-bounded queue (see the module docstring)."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self._lock = Lock()
        #: Set while something is queued (the writer waits on it).
        self.ready = Event()
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._turns: deque[str] = deque()  # devices with queued reports, in turn
        self._bytes = 0
        self._reports = 0
        self._heavy: _Device | None = None
        self._heavy_mark = 0
        self._taken_oldest: float | None = None  # of the batch being written
        self._totals = _Totals()

    # -- the network thread -------------------------------------------------------------

    def offer(self, leaf: str, device: str, payload: bytes, now: float) -> bool:
        """Queue one report, or drop and count it; True when queued."""
        size = len(payload)
        cfg = self.config
        with self._lock:
            dev = self._device(device, now)
            if size > cfg.max_report_bytes:
                self._drop(device, dev, leaf, size, "max_report_bytes", now)
                return False
            if dev.reports.wait(1, now) > 0:
                self._drop(device, dev, leaf, size, "reports_per_s", now)
                return False
            if dev.bytes.wait(size, now) > 0:
                self._drop(device, dev, leaf, size, "bytes_per_s", now)
                return False
            dev.reports.take(1, now)
            dev.bytes.take(size, now)
            cost = size + _OVERHEAD
            while self._bytes + cost > cfg.max_queue_bytes and self._bytes:
                self._evict(now)
            if not dev.queue:
                self._turns.append(device)
            dev.queue.append((leaf, device, payload, now))
            dev.queued += cost
            self._bytes += cost
            self._reports += 1
            heavy = self._heavy
            if heavy is None or dev.queued > heavy.queued:
                self._heavy, self._heavy_mark = dev, dev.queued
        self.ready.set()
        return True

    def _device(self, device: str, now: float) -> _Device:
        dev = self._devices.get(device)
        if dev is None:
            dev = self._devices[device] = _Device(self.config, now)
            while len(self._devices) > self.config.max_devices:
                old, gone = next(iter(self._devices.items()))
                if gone.queue:  # still has reports queued: keep it (the queue is bounded)
                    self._devices.move_to_end(old)
                    break
                del self._devices[old]
        else:
            self._devices.move_to_end(device)
        return dev

    def _evict(self, now: float) -> None:
        """Drop the oldest queued report of the device holding the most of the queue."""
        heavy = self._heavy
        if heavy is None or not heavy.queue or heavy.queued * 2 < self._heavy_mark:
            heavy = max((self._devices[d] for d in self._turns), key=lambda d: d.queued)
            self._heavy, self._heavy_mark = heavy, heavy.queued
        leaf, device, payload, _ = heavy.queue.popleft()
        cost = len(payload) + _OVERHEAD
        heavy.queued -= cost
        self._bytes -= cost
        self._reports -= 1
        if not heavy.queue:
            self._turns.remove(device)
        self._drop(device, heavy, leaf, len(payload), "max_queue_bytes", now)

    def _drop(self, device: str, dev: _Device, leaf: str, size: int, why: str,
              now: float) -> None:
        c = self._totals.per_device.get(device)
        if c is None:
            c = self._totals.per_device[device] = DeviceCounts()
        c.dropped += 1
        c.dropped_bytes += size
        c.reason, c.at = why, now
        self._totals.dropped += 1
        if leaf == "events":
            dev.excused += 1

    # -- the writer thread --------------------------------------------------------------

    def take(self, n: int) -> list[Item]:
        """Up to ``n`` queued reports, one device after another in turn (each device's in
        the order they came). Call :meth:`done` once they are written."""
        out: list[Item] = []
        with self._lock:
            turns = self._turns
            while turns and len(out) < n:
                device = turns.popleft()
                dev = self._devices[device]
                item = dev.queue.popleft()
                cost = len(item[2]) + _OVERHEAD
                dev.queued -= cost
                self._bytes -= cost
                self._reports -= 1
                out.append(item)
                if dev.queue:
                    turns.append(device)
            if not turns:
                self.ready.clear()
            if out:
                self._taken_oldest = min(i[3] for i in out)
        return out

    def done(self) -> None:
        with self._lock:
            self._taken_oldest = None

    def sequence(self, device: str, seq: int, now: float, *, sent: bool = False) -> int:
        """Note the sequence number of an event written for ``device`` (``sent``: the
        newest number its heartbeat says it sent); return how many of its events before
        that never reached the registry (a gap the events dropped here do not explain).
        Holds while the registry reads heartbeats and events in the order they were sent
        (one topic, QoS 0 subscriptions)."""
        with self._lock:
            dev = self._device(device, now)
            last = dev.seq
            if sent and last is not None and seq == last:
                return 0  # nothing sent since (keeps what drops excuse for later)
            dev.seq = seq
            excused, dev.excused = dev.excused, 0
            if last is None or seq <= last:  # the first seen, a repeat, or a reset agent
                return 0
            lost = max(0, seq - last - (0 if sent else 1) - excused)
            if lost:
                c = self._totals.per_device.get(device)
                if c is None:
                    c = self._totals.per_device[device] = DeviceCounts()
                c.lost += lost
                c.reason, c.at = "lost", now
                self._totals.lost += lost
            return lost

    def counts(self) -> tuple[int, int, dict[str, DeviceCounts]]:
        """Reports dropped and lost since the last call, in all and per device (reset)."""
        with self._lock:
            t, self._totals = self._totals, _Totals()
        return t.dropped, t.lost, t.per_device

    def backlog(self) -> tuple[int, int]:
        """(reports, bytes) queued."""
        with self._lock:
            return self._reports, self._bytes

    def caught_up(self, now: float) -> float:
        """Every report received before this time is written (or was dropped): the time
        the oldest one still queued or being written came in, else ``now``."""
        with self._lock:
            oldest = now if self._taken_oldest is None else min(now, self._taken_oldest)
            for d in self._turns:
                oldest = min(oldest, self._devices[d].queue[0][3])
        return oldest
