"""The repository responder: answers chunk requests from a repository directory.

It serves only ``REPO/metadata/*`` and ``REPO/targets/**`` and keeps no
transfer state per device (every request names path, offset and length), so
several responders can run side by side: by default they join one MQTT shared
subscription and split the requests. After each change of the repository's
timestamp it publishes ``{"timestamp_version": N, ...}`` retained on the
announce topic, which is how devices learn that a release happened.

Who asks is the request topic, never the payload: a device publishes on
``edge/{fleet}/dev/{device}/repo/req`` (the example ACL lets only that
device's credentials write there) and the answer goes to that same device's
``repo/res`` topic. A device can therefore make the responder send bytes to
itself only, and :class:`DeviceLimits` bounds how many.

What a device gets: alone, everything the responder can send up to its hard ceiling
(``DeviceLimits.bytes_per_s``, above 1 Gbit/s by default); with other devices
downloading, a fair share of the responder (max-min: a device asking for less leaves
the rest to the others). The share is of the one queue the responder feeds, its
responses on their way to the broker: waiting in this process and in the socket
(written, not yet acknowledged by the broker's end; on a fast uplink the kernel takes
megabytes before this process queues anything). Both are first in, first out, so a
device's part of that queue is its part of what goes out. A device counts as asking
while it sent a request within ``DeviceLimits.active_ms``; one that would hold more
than the other devices with bytes on the way hold on average, plus the slack, is told
to slow down (see :class:`_FairShare`). Devices the responder knows but that are not
asking take nothing from anyone. The queue is what the responder can share: when the
bottleneck is past the broker (the devices' own links or CPUs), that queue drains at
once and each device gets what its own path gives it.

A device's requests are served in the order they arrive (one at a time, on the
connection's network thread), and a request for a chunk this responder sent the
same device less than the device's retransmit timeout ago (the request's
``rto``) is dropped for that chunk: the first answer is still on its way, so a
burst of premature retries cannot multiply the bytes on a slow link.

Responses go out at QoS 0. A QoS 1 response would wait for the broker's
acknowledgement in the connection's one window of unacknowledged messages, shared by
every device, and a broker that is flooded with one device's requests for this
responder drops acknowledgements: Mosquitto (2.0.16 on, and Debian's patched 2.0.11)
discards any packet, PUBACK included, for a client whose outgoing queue holds
``max_queued_messages`` packets, and MQTT 3.1.1 resends an unacknowledged message only
after a reconnect. Sixty-four lost acknowledgements then stopped every device's
answers for good. A lost response costs a device one retransmit timeout instead
(the fetcher asks again). What is bounded now is what waits in this process to be
written to the broker: per device (``DeviceLimits.max_inflight_bytes``) and in all
(``ResponderConfig.max_queued_bytes``); past either the device is told to slow down.

A watchdog keeps one small QoS 1 probe in flight (on ``{prefix}/{fleet}/probe/...``):
when the broker has not acknowledged it within ``ResponderConfig.stall_timeout`` while
the link looks up (acknowledgements dropped, a request backlog at the broker, a broker
or network that stopped moving), the responder says so in one log line, counts it in
:attr:`ResponderStats.stalls` and reconnects, which also makes the broker discard the
backlog it queued for the old session; devices ask again for what was lost.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EdgeError, TransportError
from . import _chunks as proto
from ._connection import MqttConnection, PublishHandle, Subscription
from ._topics import RESPONDER_SHARE_GROUP, Topics

log = logging.getLogger("edge_sdk.transport")

MiB = 1024 * 1024


@dataclass(frozen=True)
class DeviceLimits:
    """What one responder gives one device: by default a device alone gets up to the
    hard ceiling ``bytes_per_s`` (above 1 Gbit/s), several devices asking at once get a
    fair share of the responder each, and no device can flood the broker.

    Three budgets. The **ceiling**: token buckets ``requests_per_s`` (bucket
    ``burst_requests``) and ``bytes_per_s`` (bucket ``burst_bytes``) of chunk payload,
    whatever else is going on. The **queue**: at most ``max_inflight_bytes`` of one
    device's responses wait to be written to the broker. The **fair share**: while other
    devices ask too (a request within ``active_ms``), a device may hold at most what the
    other devices hold on average of the responses on their way to the broker (in this
    process and in the socket), plus ``share_slack_bytes`` or a fifth of that average,
    whichever is more; they are written in order, so the share of that queue is the
    share of what the responder sends while it is busy. A device over its share
    waits about as long as the queue takes to write its excess, at most
    ``share_wait_ms``. Alone a device is never held to a share, and a device the
    responder knows but that is not asking takes nothing from others.

    A request over the request rate is **dropped unanswered**: a device that keeps
    asking after a slow-down is flooding, and answering each of its requests would
    itself be a flood (the fetcher's chunk timeout and backoff cover a lost request);
    the drops are counted per device and logged at most every ``DROP_LOG_INTERVAL``
    seconds per device. A request within the request rate but over the byte ceiling,
    the queue or the fair share gets the chunks that fit and then one short
    ``SLOW_DOWN`` answer naming how long to wait (at least ``slow_down_ms``, except
    for the fair share);
    :class:`~edge_sdk.transport.ChunkClient` waits that long and asks again. Budgets
    are per responder process: N responders sharing the requests give a device up to
    N times these rates. The table of devices holds at most ``max_devices`` entries
    (least recently seen forgotten). Values from older configurations keep their
    meaning: each is an upper bound, and the fair share only ever lowers what a device
    gets while others are asking.
    """

    bytes_per_s: int = 256 * MiB
    burst_bytes: int = 64 * MiB
    requests_per_s: float = 1000.0
    burst_requests: int = 2000
    max_inflight_bytes: int = 8 * MiB
    share_slack_bytes: int = 32 * 1024
    share_wait_ms: int = 20
    active_ms: int = 1000
    slow_down_ms: int = 100
    max_devices: int = 100_000
    resend_hold_ms: int = 1000
    max_resend_hold_ms: int = 30_000
    max_recent_chunks: int = 512

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.requests_per_s <= 0:
            raise ConfigError("device limits: bytes_per_s and requests_per_s must be > 0")
        for name in ("burst_bytes", "max_inflight_bytes"):
            if getattr(self, name) < proto.MAX_CHUNK:
                raise ConfigError(
                    f"device limits: {name} must be at least one chunk ({proto.MAX_CHUNK} "
                    "bytes), or no chunk could ever be sent")
        if self.burst_requests < 1 or self.max_devices < 1 or not 1 <= self.slow_down_ms <= 60_000:
            raise ConfigError("device limits: burst_requests and max_devices must be >= 1, "
                              "slow_down_ms 1..60000")
        if not 0 <= self.resend_hold_ms <= self.max_resend_hold_ms or self.max_recent_chunks < 0:
            raise ConfigError("device limits: resend_hold_ms must be 0..max_resend_hold_ms and "
                              "max_recent_chunks >= 0")
        if self.share_slack_bytes < 0:
            raise ConfigError("device limits: share_slack_bytes must be >= 0")
        if not 1 <= self.active_ms <= 60_000 or not 1 <= self.share_wait_ms <= 60_000:
            raise ConfigError("device limits: active_ms and share_wait_ms must be 1..60000")


@dataclass(frozen=True)
class ResponderConfig:
    """``shared`` joins the ``$share/{share_group}/...`` subscription so responders split
    the load; ``announce_interval`` is how often (s) the repository is checked for a
    new timestamp to announce; ``limits`` is each device's budget.

    ``partition`` = (k, n) answers only the devices whose :func:`partition_of` is ``k``
    among ``n``: n responders with plain subscriptions (brokers without MQTT 5 shared
    subscriptions, such as NATS) then split the devices between them. Every responder
    still receives every request (requests are small); each device is answered by one.

    ``max_queued_bytes`` bounds the responses of all devices together that wait in this
    process to be written to the broker (past it every device is told to slow down);
    while several devices ask, each holds about an equal part of what waits (see
    :class:`DeviceLimits`), which is how they share the responder's capacity.
    The watchdog sends a probe every ``probe_interval`` seconds and reconnects when one
    is not acknowledged within ``stall_timeout`` (0 turns it off); keep ``stall_timeout``
    above the time the uplink to the broker takes for ``max_queued_bytes``.
    """

    shared: bool = True
    share_group: str = RESPONDER_SHARE_GROUP
    announce_interval: float = 1.0
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    partition: tuple[int, int] | None = None
    max_queued_bytes: int = 64 * MiB
    stall_timeout: float = 15.0
    probe_interval: float = 2.0

    def __post_init__(self) -> None:
        if self.max_queued_bytes < proto.MAX_CHUNK:
            raise ConfigError(f"responder max_queued_bytes must be at least one chunk "
                              f"({proto.MAX_CHUNK} bytes)")
        if not 0 < self.probe_interval <= 60 or not (
                self.stall_timeout == 0 or self.probe_interval < self.stall_timeout <= 3600):
            raise ConfigError("responder probe_interval must be 0..60 s and stall_timeout 0 "
                              "(off) or above probe_interval, up to 3600 s")
        if self.partition is not None:
            k, n = self.partition
            if not 0 <= k < n:
                raise ConfigError(f"responder partition {k}/{n}: need 0 <= k < n")
            if self.shared:
                # The broker would hand it requests of other partitions, which it drops.
                raise ConfigError("a partitioned responder needs a plain subscription "
                                  "(shared=False, serve --no-shared)")


def partition_of(device: str, n: int) -> int:
    """Which of ``n`` partitioned responders answers ``device`` (stable across processes
    and hosts: CRC-32 of the id, not Python's salted ``hash``)."""
    return zlib.crc32(device.encode()) % n


@dataclass
class ResponderStats:
    """Counters since start. ``dropped``: over a device's request rate, unanswered;
    ``slowed``: answered ``SLOW_DOWN``; ``refused``: bad or not-found requests;
    ``resends_dropped``: chunks not sent again because they were sent within the
    device's retransmit timeout; ``stalls``: times the watchdog found the outgoing path
    stalled and reconnected."""

    requests: int = 0
    chunks: int = 0
    bytes_sent: int = 0
    refused: int = 0
    dropped: int = 0
    slowed: int = 0
    resends_dropped: int = 0
    stalls: int = 0


#: Seconds between two log lines about one device's dropped requests.
DROP_LOG_INTERVAL = 10.0


class _TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; pure (the caller gives ``now``)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float, now: float) -> bool:
        self._refill(now)
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there."""
        self._refill(now)
        return max(0.0, (n - self.tokens) / self.rate)


class _Queued:
    """Responses handed to the connection and not yet written to the broker, oldest first.

    The connection writes QoS 0 messages in the order they were published, so the
    ones done (written, or lost with the link) are always at the front. The lock lets
    the watchdog and metrics read the responder-wide one from their threads."""

    __slots__ = ("items", "lock", "nbytes", "written")

    def __init__(self) -> None:
        self.items: deque[tuple[PublishHandle, int]] = deque()
        self.nbytes = 0
        #: Bytes done since the start (what the queue drained: its output so far).
        self.written = 0
        self.lock = threading.Lock()

    def add(self, handle: PublishHandle, n: int) -> None:
        with self.lock:
            self.items.append((handle, n))
            self.nbytes += n

    def size(self) -> int:
        """Bytes still waiting (forgets the ones done)."""
        with self.lock:
            items = self.items
            while items and not items[0][0].pending:
                n = items.popleft()[1]
                self.nbytes -= n
                self.written += n
            return self.nbytes


class _Pipe:
    """Responses on their way to the broker, by device: handed to the connection and not
    yet through (waiting in this process, in the socket, on the link). Each is kept as
    its end on the count of bytes handed over; once that many have left (see
    :meth:`RepoResponder._gone`) it is through. No I/O, no lock (the network thread's)."""

    __slots__ = ("entries", "handed", "held", "nbytes")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, str, int]] = deque()
        #: Bytes handed over since the start; device → its bytes on the way (no zeros).
        self.handed = 0
        self.held: dict[str, int] = {}
        self.nbytes = 0

    def add(self, device: str, n: int) -> None:
        self.handed += n
        self.entries.append((self.handed, device, n))
        self.held[device] = self.held.get(device, 0) + n
        self.nbytes += n

    def advance(self, gone: int) -> None:
        """The first ``gone`` bytes handed over have left."""
        entries, held = self.entries, self.held
        while entries and entries[0][0] <= gone:
            _, device, n = entries.popleft()
            self.nbytes -= n
            left = held[device] - n
            if left:
                held[device] = left
            else:
                del held[device]


class _FairShare:
    """Which devices are asking now, whether one would hold more than its share of the
    responses on their way to the broker, and how long it should wait then. Pure: the
    caller gives ``now`` and the byte counts.

    The responses on their way are written first in, first out, so over any stretch in
    which the queue is busy a device receives its part of the queue's bytes: equal parts
    are equal throughput. A device asking for less than its part holds less and lowers
    the others' average only while it holds some, which leaves the rest to the devices
    that want more; a lone device is never held.
    A device over its share waits about as long as the queue takes to write its excess
    (the rate the queue drains at is measured): a fixed pause longer than that would
    leave the queue empty while the devices that want the most are all waiting.
    """

    __slots__ = ("_mark", "active_s", "limit", "rate", "seen", "slack")

    #: Seconds over which the drain rate is measured (then averaged with the last one).
    RATE_PERIOD = 0.05
    #: The slack is at least the others' average over this: a device asking for more than
    #: the others gets at most about 1.2 times what they get.
    SLACK_DIVISOR = 5
    #: A device may always hold its part (among the devices holding some) of this many
    #: seconds of the queue, at the rate it was written lately: nobody waits much longer
    #: than that behind anyone. On a fast queue (ten devices on loopback: a millisecond
    #: or two all told) equal devices differ by more than a fifth all the time, and
    #: slowing them down for it, 2,000 times a second for chunks that would have left at
    #: once, cost up to half the throughput; 5 ms let a flooder through a test bench
    #: that 3 ms holds (tests/test_responder_abuse.py).
    BUSY_S = 0.003

    def __init__(self, active_s: float, slack: int, limit: int) -> None:
        self.active_s, self.slack, self.limit = active_s, slack, limit
        #: Device → when it last asked, oldest first.
        self.seen: OrderedDict[str, float] = OrderedDict()
        #: Bytes per second the queue was written at lately (0: not measured yet).
        self.rate = 0.0
        self._mark: tuple[float, int] | None = None

    def asked(self, device: str, now: float) -> None:
        seen = self.seen
        seen.pop(device, None)
        seen[device] = now
        if len(seen) > self.limit:
            seen.popitem(last=False)

    def active(self, now: float) -> int:
        """Devices that asked within ``active_s`` (forgets the others)."""
        seen = self.seen
        while seen:
            first = next(iter(seen))
            if now - seen[first] < self.active_s:
                break
            del seen[first]
        return len(seen)

    def written(self, total: int, now: float) -> None:
        """The queue has written ``total`` bytes since the start (for its drain rate)."""
        mark = self._mark
        if mark is None or total < mark[1]:
            self._mark = (now, total)
            return
        if now - mark[0] >= self.RATE_PERIOD:
            rate = (total - mark[1]) / (now - mark[0])
            self.rate = rate if self.rate == 0 else (self.rate + rate) / 2
            self._mark = (now, total)

    def over(self, mine: int, total: int, n: int, holders: int, now: float) -> int:
        """By how many bytes a device holding ``mine`` of the ``total`` bytes on their way
        (``holders`` devices, it included, holding some) would be over its share with
        an ``n``-byte chunk more (0: it is not).

        Its share is what the other holders hold on average plus the slack (``slack``
        bytes or a fifth of that average, whichever is more), and never less than its
        part of ``BUSY_S`` of the queue (a part for each holder). Devices asking
        but holding nothing do not lower the average: on a fast queue most hold nothing
        at any moment, and counting them held everyone to a chunk or two (a third of
        the throughput of ten devices on loopback). A chunk counts from its middle: a
        device is let in while that is within its share, so that what it holds on
        average is the share whatever its chunk size (counting the whole chunk let a
        device with chunks twice the others' size hold a chunk's worth more on a queue
        a few chunks deep: about twice their bytes). A device holding nothing is never
        over: it may always have one chunk on its way."""
        active = self.active(now)
        if mine == 0 or active <= 1:
            return 0
        others = (total - mine) // (holders - 1) if holders > 1 else 0
        share = max(others + max(self.slack, others // self.SLACK_DIVISOR),
                    int(self.rate * self.BUSY_S) // max(1, holders))
        return max(0, mine + n // 2 - share)

    def wait_s(self, excess: int, longest: float) -> float:
        """How long a device ``excess`` bytes over its share should wait: as long as the
        queue takes to write that much, at least 1 ms and at most ``longest``."""
        if self.rate <= 0:
            return longest
        return min(longest, max(0.001, excess / self.rate))


class _Budget:
    """One device's buckets, its responses not yet written and its dropped requests."""

    def __init__(self, limits: DeviceLimits, now: float) -> None:
        self.requests = _TokenBucket(limits.requests_per_s, limits.burst_requests, now)
        self.bytes = _TokenBucket(limits.bytes_per_s, limits.burst_bytes, now)
        self.queued = _Queued()
        self.dropped = 0
        self.dropped_logged_at: float | None = None
        #: (path, offset, length) of chunks sent lately → when.
        self.recent: OrderedDict[tuple[str, int, int], float] = OrderedDict()

    def premature(self, key: tuple[str, int, int], hold: float, now: float,
                  forget_after: float) -> bool:
        """Whether ``key`` was sent less than ``hold`` seconds ago (the asking device's
        RTO): asking again is then a premature retry."""
        recent = self.recent
        while recent:
            first = next(iter(recent))
            if now - recent[first] < forget_after:
                break
            del recent[first]
        at = recent.get(key)
        return at is not None and now - at < hold

    def sent(self, key: tuple[str, int, int], now: float, limit: int) -> None:
        self.recent.pop(key, None)
        self.recent[key] = now
        while len(self.recent) > limit:
            self.recent.popitem(last=False)


class _StallWatch:
    """When the watchdog sends its probe and when the outgoing path counts as stalled.

    Pure (the caller gives ``now`` and does the I/O): one probe at a time, the next one
    ``interval`` seconds after the last was acknowledged; stalled when the probe in
    flight is older than ``timeout``.
    """

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval, self.timeout = interval, timeout
        self.sent_at: float | None = None
        self.ok_at = now

    def due(self, now: float) -> bool:
        return self.sent_at is None and now - self.ok_at >= self.interval

    def sent(self, now: float) -> None:
        self.sent_at = now

    def acknowledged(self, now: float) -> None:
        self.sent_at, self.ok_at = None, now

    def stalled(self, now: float) -> bool:
        return self.sent_at is not None and now - self.sent_at > self.timeout

    restart = acknowledged


class RepoResponder:
    """Serve ``repo_dir`` over ``connection``. :meth:`start` returns; work runs on threads."""

    def __init__(self, connection: MqttConnection, repo_dir: str | os.PathLike[str], *,
                 topics: Topics | None = None, config: ResponderConfig | None = None) -> None:
        self.connection = connection
        self.repo = Path(repo_dir).resolve()
        self.topics = topics or Topics.for_config(connection.config)
        self.config = config or ResponderConfig()
        self.stats = ResponderStats()
        self._roots = (self.repo / "metadata", self.repo / "targets")
        self._sub: Subscription | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._announced: int | None = None
        self._resolved: dict[str, Path] = {}
        self._budgets: OrderedDict[str, _Budget] = OrderedDict()
        limits = self.config.limits
        self._share = _FairShare(limits.active_ms / 1000, limits.share_slack_bytes,
                                 limits.max_devices)
        self._queued = _Queued()
        self._pipe = _Pipe()
        self._probe_topic = self.topics.share_probe(secrets.token_hex(8))
        self._probe: PublishHandle | None = None
        self._watch_state = _StallWatch(self.config.probe_interval, self.config.stall_timeout,
                                        time.monotonic())
        if not (self.repo / "metadata").is_dir():
            raise TransportError(f"{self.repo}: not a release repository (no metadata/ directory)")

    def start(self) -> None:
        topic = self.topics.every_repo_request
        if self.config.shared:
            works = self.connection.shared_subscriptions_work(
                self.topics.share_probe(secrets.token_hex(8)), self.config.share_group)
            if works is False:
                # NATS 2.9: MQTT 3.1.1 only, no $share. Each responder then answers every
                # request; a device drops the duplicate answers (its window counts them).
                log.warning("broker %s does not honour $share subscriptions: subscribing "
                            "to every chunk request (each responder answers all of them)",
                            self.connection.url)
            else:
                topic = self.topics.shared_repo_request(self.config.share_group)
        self._sub = self.connection.subscribe(topic, self._on_request, qos=1)
        self.announce()
        self._watcher = threading.Thread(target=self._watch, name="edge-responder-announce",
                                         daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None
        if self._watcher is not None:
            self._watcher.join(5)

    def __enter__(self) -> RepoResponder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def announcement(self) -> dict[str, Any] | None:
        """What the announce topic should say now (None if the repository has no timestamp)."""
        try:
            data = json.loads((self.repo / "metadata" / "timestamp.json").read_bytes())
            signed = data["signed"]
            return {"timestamp_version": int(signed["version"]),
                    "snapshot_version": int(signed["meta"]["snapshot.json"]["version"]),
                    "expires": signed["expires"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def announce(self, *, force: bool = False) -> None:
        """Publish the current timestamp version retained, if it changed since the last time."""
        info = self.announcement()
        if info is None:
            return
        if not force and info["timestamp_version"] == self._announced:
            return
        self.connection.publish(self.topics.announce, json.dumps(info).encode(), qos=1,
                                retain=True)
        self._announced = info["timestamp_version"]
        log.info("announced timestamp v%s", info["timestamp_version"])

    @property
    def queued_bytes(self) -> int:
        """Bytes of responses waiting in this process to be written to the broker."""
        return self._queued.size()

    def _watch(self) -> None:
        cfg = self.config
        tick = min(cfg.announce_interval, cfg.probe_interval / 2, 1.0)
        next_announce = time.monotonic() + cfg.announce_interval
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now >= next_announce:
                next_announce = now + cfg.announce_interval
                try:
                    self.announce()
                except EdgeError as err:
                    log.warning("announce failed: %s", err)
            if cfg.stall_timeout > 0:
                self._check_outgoing(now)

    def _check_outgoing(self, now: float) -> None:
        """The watchdog: probe the path to the broker; reconnect when it stopped moving."""
        watch, conn = self._watch_state, self.connection
        if not conn.connected:
            # A link that is down is the reconnect's business; start over once it is back.
            watch.restart(now)
            self._probe = None
            return
        probe = self._probe
        if probe is not None and not probe.pending:
            watch.acknowledged(now)
            self._probe = None
        if watch.stalled(now):
            self.stats.stalls += 1
            log.warning(
                "responder: broker %s did not acknowledge the watchdog's probe for %.0f s "
                "although the link is up (stall_timeout; %d bytes of responses waiting to "
                "be sent): reconnecting (stall %d)", conn.url, now - (watch.sent_at or now),
                self._queued.size(), self.stats.stalls)
            conn.reset()
            watch.restart(now)
            self._probe = None
        elif watch.due(now):
            try:
                self._probe = conn.publish(self._probe_topic, b"probe", qos=1)
            except EdgeError as err:
                log.debug("watchdog probe not sent: %s", err)
                return
            watch.sent(now)

    def _resolve(self, path: str) -> Path | None:
        # Resolving walks every path component with a syscall; a transfer asks for the
        # same few paths thousands of times, so remember the answers for safe paths.
        hit = self._resolved.get(path)
        if hit is not None:
            return hit
        p = (self.repo / path).resolve()
        if not any(p.is_relative_to(root) for root in self._roots) or not p.is_file():
            return None
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[path] = p
        return p

    def _budget(self, device: str, now: float) -> _Budget:
        budget = self._budgets.get(device)
        if budget is None:
            budget = self._budgets[device] = _Budget(self.config.limits, now)
            if len(self._budgets) > self.config.limits.max_devices:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(device)
        return budget

    def _send(self, reply_to: str, resp: proto.ChunkResponse, budget: _Budget) -> None:
        data = resp.encode()
        # QoS 0: see the module doc (no acknowledgement to wait for, shared by all devices).
        handle = self.connection.publish(reply_to, data, qos=0)
        budget.queued.add(handle, len(data))
        self._queued.add(handle, len(data))
        self._pipe.add(reply_to, len(data))
        if resp.status == proto.OK:
            self.stats.chunks += 1
            self.stats.bytes_sent += len(resp.payload)

    def _gone(self) -> int:
        """Of the bytes handed to the connection, how many have left: written to the
        socket and acknowledged by the broker's end. The socket's part is the one that
        matters on a fast uplink: the kernel takes megabytes before this process queues
        anything, and they are written first in, first out as well."""
        self._queued.size()  # forgets the written ones
        return max(0, self._queued.written - self.connection.unacknowledged_bytes())

    def _drop(self, device: str, budget: _Budget, now: float) -> None:
        """Count a request over ``device``'s request rate; say so now and then."""
        self.stats.dropped += 1
        budget.dropped += 1
        last = budget.dropped_logged_at
        if last is None or now - last >= DROP_LOG_INTERVAL:
            budget.dropped_logged_at = now
            log.warning("device %s is over %g chunk requests/s (requests_per_s): dropping "
                        "(%d so far)", device, self.config.limits.requests_per_s,
                        budget.dropped)

    def _on_request(self, topic: str, payload: bytes) -> None:
        # Runs on the connection's network thread, one message at a time: the budgets
        # need no lock, and what we publish here is written only after we return.
        device = self.topics.requester(topic)
        part = self.config.partition
        if device is not None and part is not None and partition_of(device, part[1]) != part[0]:
            return  # another responder's device
        self.stats.requests += 1
        if device is None:
            self.stats.refused += 1
            log.warning("dropping a chunk request on an unexpected topic %s", topic)
            return
        now = time.monotonic()
        budget = self._budget(device, now)
        if not budget.requests.take(1, now):
            self._drop(device, budget, now)  # before any work: nothing parsed, nothing queued
            return
        self._share.asked(device, now)
        reply_to = self.topics.repo_response(device)
        try:
            req = proto.ChunkRequest.decode(payload)
        except TransportError as err:
            self.stats.refused += 1
            log.warning("refusing a bad chunk request from %s: %s", device, err)
            corr = err.corr if isinstance(err, proto.ChunkRequestError) else bytes(16)
            self._send(reply_to, proto.ChunkResponse(proto.BAD_REQUEST, corr, 0, 0,
                                                     str(err)[:300].encode()), budget)
            return
        limits = self.config.limits
        hold = min(limits.max_resend_hold_ms,
                   limits.resend_hold_ms if req.rto_ms is None else req.rto_ms) / 1000
        path = sys.intern(req.path)
        share = self._share
        gone = self._gone()
        share.written(gone, now)
        pipe = self._pipe
        pipe.advance(gone)
        for i in range(req.count):
            # decode bounds offset, length and count: this sum cannot overflow a u64.
            one = req if req.count == 1 else proto.ChunkRequest(
                req.corr, req.path, req.offset + i * req.length, req.length)
            key = (path, one.offset, one.length)
            if hold and budget.premature(key, hold, now, limits.max_resend_hold_ms / 1000):
                self.stats.resends_dropped += 1
                continue
            resp = self.answer(one)
            n = len(resp.payload) if resp.status == proto.OK else 0
            # How long to wait (ms), and why; None: send.
            ms: int | None = None
            why = "its budget"
            mine, total = budget.queued.size(), self._queued.size()
            # The share is of everything on its way: this process's queue and the socket's.
            held = pipe.held.get(reply_to, 0)
            if budget.bytes.wait(n, now) > 0:
                # Long enough for the rest of this request, so that it comes back once.
                rest = min(limits.burst_bytes, (req.count - i) * req.length)
                ms = max(limits.slow_down_ms, int(budget.bytes.wait(rest, now) * 1000) + 1)
            elif (mine + n > limits.max_inflight_bytes
                  or total + n > self.config.max_queued_bytes):
                ms = limits.slow_down_ms
            elif n and (excess := share.over(held, pipe.nbytes, n, len(pipe.held), now)):
                wait = share.wait_s(excess, limits.share_wait_ms / 1000)
                ms, why = max(1, round(wait * 1000)), "its share of this responder"
            if ms is not None:
                self.stats.slowed += 1
                self._send(reply_to, proto.ChunkResponse(
                    proto.SLOW_DOWN, req.corr, one.offset, ms,
                    f"slow down: {device} is over {why}, retry in {ms} ms".encode()),
                    budget)
                return
            budget.bytes.take(n, now)
            self._send(reply_to, resp, budget)
            if resp.status == proto.OK and limits.max_recent_chunks:
                budget.sent(key, now, limits.max_recent_chunks)
            if resp.status != proto.OK or one.offset + len(resp.payload) >= resp.total:
                break

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        """The response to one chunk of ``req`` (test responders override it).

        The offset is checked against the file's size (for a target, its signed
        length) before it is used: past the end is ``BAD_REQUEST``, exactly at the
        end an empty ``OK`` (a resumed transfer that was already complete).
        """
        if not 0 <= req.offset <= proto.MAX_OFFSET or not 0 < req.length <= proto.MAX_CHUNK:
            self.stats.refused += 1
            return proto.ChunkResponse(
                proto.BAD_REQUEST, req.corr, 0, 0,
                f"{req.path}: offset must be 0..{proto.MAX_OFFSET} and length "
                f"1..{proto.MAX_CHUNK}".encode())
        path = self._resolve(req.path)
        if path is None:
            self.stats.refused += 1
            return proto.ChunkResponse(proto.NOT_FOUND, req.corr, req.offset, 0,
                                       f"{req.path} not found".encode())
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                if req.offset > total:
                    self.stats.refused += 1
                    return proto.ChunkResponse(
                        proto.BAD_REQUEST, req.corr, req.offset, total,
                        f"{req.path}: offset {req.offset} is past the end of the file "
                        f"({total} bytes)".encode())
                data = os.pread(f.fileno(), min(req.length, total - req.offset), req.offset)
        except FileNotFoundError:
            self._resolved.pop(req.path, None)
            self.stats.refused += 1
            return proto.ChunkResponse(proto.NOT_FOUND, req.corr, req.offset, 0,
                                       f"{req.path} not found".encode())
        except OSError as err:
            self.stats.refused += 1
            return proto.ChunkResponse(proto.SERVER_ERROR, req.corr, req.offset, 0,
                                       f"cannot read {req.path}: {err.strerror}".encode())
        return proto.ChunkResponse(proto.OK, req.corr, req.offset, total, data)
