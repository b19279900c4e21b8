"""The chunk window of one transfer: what to request, when, and what to accept. No I/O.

:class:`ChunkWindow` is the bookkeeping of :class:`~edge_sdk.transport.ChunkClient`
pulled out of its network loop, so that every rule (pipelining, per-chunk
timeouts, retries with backoff, ``SLOW_DOWN`` waits, duplicate answers, the
length checks that stop endless data) is driven by plain calls and a clock
passed in as floats. The loop around it only does this::

    window = ChunkWindow(path, config, start=start, length=length, max_length=max_length)
    while not window.done:
        for req in window.requests(now):        # new chunks and the ones due again
            publish(req.encode())
        for resp in what_arrived(timeout=window.wait_s(now)):
            window.accept(resp, now)
        for data in window.ready():             # in order, from ``start``
            sink(data)

How much is in flight is decided by :class:`Pace` alone (today a fixed window
of ``FetchConfig.window`` chunks asked for ``batch`` at a time). It is told of
every answer with its round-trip time, every timeout and every ``SLOW_DOWN``:
a pace that adapts to the link replaces that one class.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from ..errors import ConfigError, TransportError
from . import _chunks as proto
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError

#: The longest the loop sleeps between looks at the link and the timers.
MAX_WAIT_S = 0.5


@dataclass(frozen=True)
class FetchConfig:
    """Limits of a device-side transfer; the defaults suit a small device on a slow link.

    ``chunk_size`` ≤ 127 KiB keeps every message under the 128 KiB broker limit.
    ``window`` is how many chunks are in flight, requested ``batch`` at a time (one
    small request message answered by up to ``batch`` chunk messages). ``chunk_timeout`` is how
    long one chunk may take before it is requested again, up to ``retries`` times
    with backoff ``backoff_base * 2**attempt`` (jittered, capped at ``backoff_max``).
    A ``SLOW_DOWN`` answer (the responder's per-device budget is spent) is not a
    failed attempt: the chunks it names are asked for again after the wait it
    gives (jittered), until one chunk has been held back ``max_slowdown_s`` in
    total. ``reconnect_timeout`` is how long a transfer waits for a lost broker
    link before failing. ``max_artifact_bytes`` is a hard cap on any file.
    """

    chunk_size: int = proto.DEFAULT_CHUNK
    window: int = 64
    batch: int = 8
    chunk_timeout: float = 5.0
    retries: int = 4
    backoff_base: float = 0.25
    backoff_max: float = 5.0
    reconnect_timeout: float = 60.0
    max_slowdown_s: float = 120.0
    max_artifact_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_size <= proto.MAX_CHUNK:
            raise ConfigError(
                f"chunk size {self.chunk_size} must be 1024..{proto.MAX_CHUNK} bytes so that "
                "each message stays under 128 KiB"
            )
        if not 1 <= self.window <= 256:
            raise ConfigError(f"window {self.window} must be 1..256 chunks in flight")
        if not 1 <= self.batch <= proto.MAX_BATCH:
            raise ConfigError(f"batch {self.batch} must be 1..{proto.MAX_BATCH} chunks")
        if (self.chunk_timeout <= 0 or self.retries < 0 or self.max_artifact_bytes <= 0
                or self.max_slowdown_s <= 0):
            raise ConfigError("chunk timeout, max slowdown and max artifact size must be > 0, "
                              "retries >= 0")


@dataclass
class FetchStats:
    """Counters of one :class:`ChunkClient` (cumulative over its transfers)."""

    requests_sent: int = 0
    chunks_resent: int = 0
    chunks_received: int = 0
    bytes_received: int = 0
    stale_responses: int = 0
    reconnects: int = 0
    slowdowns: int = 0


class Pace:
    """How many chunks may be in flight and how long one may take: the one place a
    link-adaptive policy (RTT estimate, bandwidth probing) goes.

    This one is fixed: ``FetchConfig.window`` chunks, new ones asked for ``batch`` at a
    time once that many slots are free, ``FetchConfig.chunk_timeout`` per chunk. The
    hooks are called by :class:`ChunkWindow` and do nothing here.
    """

    def __init__(self, config: FetchConfig) -> None:
        self.window = config.window
        self.batch = min(config.batch, config.window)
        self.chunk_timeout = config.chunk_timeout

    def room(self, in_flight: int) -> int:
        """How many new chunks to ask for now, with ``in_flight`` outstanding."""
        free = self.window - in_flight
        return free if free >= self.batch or in_flight == 0 else 0

    def answered(self, now: float, rtt_s: float, nbytes: int) -> None:
        """A chunk of ``nbytes`` arrived ``rtt_s`` after it was (last) requested."""

    def timed_out(self, now: float) -> None:
        """A chunk was not answered within ``chunk_timeout``."""

    def slowed_down(self, now: float, wait_s: float) -> None:
        """The responder asked us to wait ``wait_s`` before asking again."""


class _Chunk:
    __slots__ = ("attempts", "corr", "length", "offset", "resend_at", "sent_at", "slowed_for")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.corr = b""
        self.sent_at = 0.0
        self.attempts = 0
        #: When to ask again (after a timeout's backoff, a SLOW_DOWN or a lost link);
        #: None while a request for it is out.
        self.resend_at: float | None = None
        self.slowed_for = 0.0


class ChunkWindow:
    """Bookkeeping of one download of ``path`` from byte ``start``; see the module doc.

    ``length`` is the signed file size when known; otherwise the first answer's
    size is used. Either is bounded by ``max_length`` and
    ``FetchConfig.max_artifact_bytes`` (the constructor raises
    :class:`EndlessDataError` for a signed length past them). ``now`` arguments are seconds on any
    monotonic clock. ``rng`` (jitter, in [0, 1)) and ``new_id`` (16-byte request
    ids) are injectable for tests. Methods raise :class:`SlowRetrievalError`,
    :class:`EndlessDataError`, :class:`RemoteNotFoundError` or
    :class:`TransportError` when the transfer cannot go on.
    """

    def __init__(self, path: str, config: FetchConfig, *, start: int = 0,
                 length: int | None = None, max_length: int | None = None,
                 stats: FetchStats | None = None, pace: Pace | None = None,
                 rng: Callable[[], float] = random.random,
                 new_id: Callable[[int], bytes] = secrets.token_bytes) -> None:
        if not proto.is_safe_path(path):
            raise TransportError(f"{path!r} is not a repository path")
        self.cap = config.max_artifact_bytes if max_length is None else \
            min(max_length, config.max_artifact_bytes)
        if length is not None and length > self.cap:
            raise EndlessDataError(
                f"{path}: signed length {length} bytes exceeds the limit of {self.cap} bytes")
        self.path = path
        self.config = config
        self.start = start
        self.total = length
        self.stats = stats if stats is not None else FetchStats()
        self.pace = pace or Pace(config)
        self._rng = rng
        self._new_id = new_id
        #: Next byte to hand to the caller, and next byte not yet asked for.
        self.delivered = start
        self._next = start
        self._chunks: dict[int, _Chunk] = {}  # by offset: every chunk not yet accepted
        self._out: dict[tuple[bytes, int], _Chunk] = {}  # (corr, offset): requested, unanswered
        self._ready: dict[int, bytes] = {}
        self._wake_at: float | None = None
        if length is not None and start > length:
            raise TransportError(f"{path}: resume offset {start} is past the end ({length})")

    @property
    def done(self) -> bool:
        """Every byte up to the file's size was accepted and taken with :meth:`ready`."""
        return self.total is not None and self.delivered >= self.total

    def in_flight(self) -> set[bytes]:
        """Ids of the requests still awaiting an answer."""
        return {corr for corr, _ in self._out}

    # -- what to send --------------------------------------------------------------------

    def requests(self, now: float) -> list[proto.ChunkRequest]:
        """The requests to publish now: new chunks the pace makes room for, and chunks
        due again (timed out and backed off, slowed down, or lost with the link)."""
        cfg = self.config
        out: list[proto.ChunkRequest] = []
        if self.total is None:
            # Before the size is known, ask for the first chunk only.
            if not self._chunks and self._next == self.start:
                c = self._chunks[self._next] = _Chunk(self._next, cfg.chunk_size)
                self._next += cfg.chunk_size
                out.append(self._send([c], now))
        else:
            while self._next < self.total and (room := self.pace.room(len(self._chunks))):
                run: list[_Chunk] = []
                while self._next < self.total and len(run) < min(self.pace.batch, room):
                    want = min(cfg.chunk_size, self.total - self._next)
                    c = self._chunks[self._next] = _Chunk(self._next, want)
                    run.append(c)
                    self._next += want
                out.append(self._send(run, now))
        out.extend(self._due(now))
        return out

    def _due(self, now: float) -> list[proto.ChunkRequest]:
        cfg = self.config
        timeout = self.pace.chunk_timeout
        wake = now + MAX_WAIT_S
        again: list[_Chunk] = []
        for c in self._chunks.values():
            if c.resend_at is not None:
                if now >= c.resend_at:
                    again.append(c)
                else:
                    wake = min(wake, c.resend_at)
                continue
            due = c.sent_at + timeout
            if now < due:
                wake = min(wake, due)
                continue
            del self._out[(c.corr, c.offset)]
            c.attempts += 1
            self.pace.timed_out(now)
            if c.attempts > cfg.retries:
                raise SlowRetrievalError(
                    f"{self.path}: no answer for bytes {c.offset}..{c.offset + c.length} "
                    f"after {cfg.retries + 1} requests of {timeout:g} s each; "
                    f"{self.delivered - self.start} bytes received, partial download kept"
                )
            backoff = min(cfg.backoff_max, cfg.backoff_base * 2 ** (c.attempts - 1))
            c.resend_at = now + backoff * (0.5 + self._rng())
            wake = now
        self._wake_at = wake
        if not again:
            return []
        self.stats.chunks_resent += len(again)
        self._wake_at = min(wake, now + timeout)
        return [self._send(run, now) for run in _runs(again, cfg.chunk_size, self.pace.batch)]

    def _send(self, run: list[_Chunk], now: float) -> proto.ChunkRequest:
        # One request covers consecutive chunks: fewer small messages each way.
        corr = self._new_id(16)
        for c in run:
            c.corr, c.sent_at, c.resend_at = corr, now, None
            self._out[(corr, c.offset)] = c
        first = run[0]
        self.stats.requests_sent += 1
        return proto.ChunkRequest(corr, self.path, first.offset,
                                  self.config.chunk_size if len(run) > 1 else first.length,
                                  len(run))

    def wait_s(self, now: float) -> float:
        """How long the caller may wait for answers before calling :meth:`requests` again."""
        if self._wake_at is None:
            return 0.0
        return min(MAX_WAIT_S, max(0.0, self._wake_at - now))

    def link_restored(self, now: float, *, lost: Collection[bytes] = (),
                      requeued: Collection[bytes] = ()) -> None:
        """The broker link came back. Answers to the ``lost`` requests (the broker had
        acknowledged them) died with the old link: their chunks are due at once. The
        ``requeued`` ones are re-sent by the connection itself: their timers restart."""
        for (corr, offset), c in list(self._out.items()):
            if corr in lost:
                del self._out[(corr, offset)]
                c.resend_at = now
            elif corr in requeued:
                c.sent_at = now
        self._wake_at = now

    # -- what arrived --------------------------------------------------------------------

    def accept(self, resp: proto.ChunkResponse, now: float) -> None:
        """Take one answer: a chunk, a ``SLOW_DOWN``, an error, or a duplicate/stale one
        (counted in ``stats.stale_responses`` and otherwise ignored)."""
        if resp.status == proto.SLOW_DOWN:
            self._slow_down(resp, now)
            return
        c = self._out.pop((resp.corr, resp.offset), None)
        if c is None:
            if resp.status != proto.OK:
                # Errors answer a whole request; match them to any chunk it covered.
                key = next((k for k in self._out if k[0] == resp.corr), None)
                c = self._out.pop(key) if key is not None else None
            if c is None:
                self.stats.stale_responses += 1
                return
        path, total = self.path, self.total
        if resp.status == proto.NOT_FOUND:
            raise RemoteNotFoundError(f"{path}: not in the repository ({resp.reason})")
        if resp.status != proto.OK:
            raise TransportError(f"{path}: the responder refused the request: {resp.reason}")
        if resp.offset != c.offset:
            raise TransportError(
                f"{path}: asked for offset {c.offset}, the responder answered {resp.offset}")
        if resp.total > self.cap or (total is not None and resp.total > total):
            limit = self.cap if total is None else total
            raise EndlessDataError(
                f"{path}: the responder offers {resp.total} bytes but at most {limit} are "
                "allowed (signed length or configured maximum)"
            )
        n = len(resp.payload)
        if n > c.length:
            raise EndlessDataError(
                f"{path}: asked for {c.length} bytes at offset {c.offset}, received {n}")
        if total is None:
            total = self.total = resp.total
        if n < c.length and c.offset + n < total:
            raise TransportError(
                f"{path}: short chunk at offset {c.offset} ({n} of {c.length} bytes)")
        del self._chunks[c.offset]
        self.stats.chunks_received += 1
        self.stats.bytes_received += n
        self.pace.answered(now, now - c.sent_at, n)
        if n or c.offset >= total:
            self._ready[c.offset] = resp.payload

    def _slow_down(self, resp: proto.ChunkResponse, now: float) -> None:
        # The responder sent the chunks of this request before resp.offset and none
        # after: ask for those again once the wait it names is over (capped, jittered
        # so that devices slowed down together do not come back together).
        cfg = self.config
        held = [k for k in self._out if k[0] == resp.corr and k[1] >= resp.offset]
        if not held:
            self.stats.stale_responses += 1
            return
        self.stats.slowdowns += 1
        wait = min(resp.total / 1000 * (1 + 0.25 * self._rng()), cfg.max_slowdown_s)
        self.pace.slowed_down(now, wait)
        for key in held:
            c = self._out.pop(key)
            c.slowed_for += wait
            if c.slowed_for > cfg.max_slowdown_s:
                raise SlowRetrievalError(
                    f"{self.path}: the responder held back bytes "
                    f"{c.offset}..{c.offset + c.length} for more than "
                    f"{cfg.max_slowdown_s:g} s ({resp.reason}); partial download kept")
            c.resend_at = now + wait
        self._wake_at = now

    def ready(self) -> Iterator[bytes]:
        """The accepted bytes that continue the file from ``delivered``, in order."""
        while self.delivered in self._ready:
            data = self._ready.pop(self.delivered)
            self.delivered += len(data)
            yield data

    def deliver(self, sink: Callable[[bytes], object],
                progress: Callable[[int, int], None] | None = None) -> None:
        """Hand :meth:`ready` bytes to ``sink`` in order, reporting ``progress(delivered,
        total)`` after each piece once the total is known."""
        for data in self.ready():
            sink(data)
            if progress is not None and self.total is not None:
                progress(self.delivered, self.total)


def _runs(chunks: list[_Chunk], chunk_size: int, batch: int) -> Iterator[list[_Chunk]]:
    """Consecutive chunks in groups of at most ``batch``, each group one request's worth."""
    run: list[_Chunk] = []
    for c in sorted(chunks, key=lambda c: c.offset):
        if run and (len(run) >= batch or run[-1].offset + chunk_size != c.offset
                    or run[-1].length != chunk_size):
            yield run
            run = []
        run.append(c)
    if run:
        yield run
