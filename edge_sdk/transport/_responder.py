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

A device's requests are served in the order they arrive (one at a time, on the
connection's network thread), and a request for a chunk this responder sent the
same device less than the device's retransmit timeout ago (the request's
``rto``) is dropped for that chunk: the first answer is still on its way, so a
burst of premature retries cannot multiply the bytes on a slow link.
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
from collections import OrderedDict
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
    """What one responder gives one device; the defaults let a device pull at LAN speed
    for a while and then at ``bytes_per_s``, and stop any device from flooding the broker.

    Two token buckets per device: ``requests_per_s`` (bucket ``burst_requests``) and
    ``bytes_per_s`` (bucket ``burst_bytes``) of chunk payload. A request over the
    request rate is **dropped unanswered**: a device that keeps asking after a
    slow-down is flooding, and answering each of its requests would itself be a
    flood (the fetcher's chunk timeout and backoff cover a lost request). A request
    within the request rate but over the byte budget, or one that would push the
    device's chunks not yet acknowledged by the broker past ``max_inflight_bytes``,
    gets the chunks that fit and then one short ``SLOW_DOWN`` answer naming how
    long to wait (at least ``slow_down_ms``); :class:`~edge_sdk.transport.ChunkClient`
    waits that long and asks again. Budgets are per responder process: N responders
    sharing the requests give a device up to N times these rates. The table of
    devices holds at most ``max_devices`` entries (least recently seen forgotten).
    """

    bytes_per_s: int = 8 * MiB
    burst_bytes: int = 16 * MiB
    requests_per_s: float = 200.0
    burst_requests: int = 400
    max_inflight_bytes: int = 8 * MiB
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


@dataclass(frozen=True)
class ResponderConfig:
    """``shared`` joins the ``$share/{share_group}/...`` subscription so responders split
    the load; ``announce_interval`` is how often (s) the repository is checked for a
    new timestamp to announce; ``limits`` is each device's budget.

    ``partition`` = (k, n) answers only the devices whose :func:`partition_of` is ``k``
    among ``n``: n responders with plain subscriptions (brokers without MQTT 5 shared
    subscriptions, such as NATS) then split the devices between them. Every responder
    still receives every request (requests are small); each device is answered by one.
    """

    shared: bool = True
    share_group: str = RESPONDER_SHARE_GROUP
    announce_interval: float = 1.0
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    partition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
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
    device's retransmit timeout."""

    requests: int = 0
    chunks: int = 0
    bytes_sent: int = 0
    refused: int = 0
    dropped: int = 0
    slowed: int = 0
    resends_dropped: int = 0


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


class _Budget:
    """One device's buckets and its chunks published but not yet acknowledged by the broker."""

    def __init__(self, limits: DeviceLimits, now: float) -> None:
        self.requests = _TokenBucket(limits.requests_per_s, limits.burst_requests, now)
        self.bytes = _TokenBucket(limits.bytes_per_s, limits.burst_bytes, now)
        self.inflight: list[tuple[PublishHandle, int]] = []
        self.dropped = 0
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

    def unacked(self) -> int:
        self.inflight = [(h, n) for h, n in self.inflight if not h.published]
        return sum(n for _, n in self.inflight)

    def sent(self, key: tuple[str, int, int], now: float, limit: int) -> None:
        self.recent.pop(key, None)
        self.recent[key] = now
        while len(self.recent) > limit:
            self.recent.popitem(last=False)


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

    def _watch(self) -> None:
        while not self._stop.wait(self.config.announce_interval):
            try:
                self.announce()
            except EdgeError as err:
                log.warning("announce failed: %s", err)

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
        handle = self.connection.publish(reply_to, resp.encode(), qos=1)
        if resp.status == proto.OK:
            self.stats.chunks += 1
            self.stats.bytes_sent += len(resp.payload)
            budget.inflight.append((handle, len(resp.payload)))

    def _on_request(self, topic: str, payload: bytes) -> None:
        # Runs on the connection's network thread, one message at a time: the budgets
        # need no lock, and PUBACKs for what we publish here arrive only after we return.
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
            self.stats.dropped += 1
            budget.dropped += 1
            if budget.dropped % 1000 == 1:
                log.warning("device %s is over %g chunk requests/s: dropping (%d so far)",
                            device, self.config.limits.requests_per_s, budget.dropped)
            return
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
            wait = 0.0
            if budget.bytes.wait(n, now) > 0:
                # Long enough for the rest of this request, so that it comes back once.
                rest = min(limits.burst_bytes, (req.count - i) * req.length)
                wait = budget.bytes.wait(rest, now)
            elif budget.unacked() + n > limits.max_inflight_bytes:
                wait = limits.slow_down_ms / 1000
            if wait > 0:
                self.stats.slowed += 1
                ms = max(limits.slow_down_ms, int(wait * 1000) + 1)
                self._send(reply_to, proto.ChunkResponse(
                    proto.SLOW_DOWN, req.corr, one.offset, ms,
                    f"slow down: {device} is over its budget, retry in {ms} ms".encode()),
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
