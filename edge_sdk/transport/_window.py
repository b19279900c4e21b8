"""The chunk window of one transfer: what to request, when, and what to accept. No I/O.

:class:`ChunkWindow` is the bookkeeping of :class:`~edge_sdk.transport.ChunkClient`
pulled out of its network loop, so that every rule (loss detection, ``SLOW_DOWN``
waits, duplicate answers, the length checks that stop endless data, reassembly in
order) is driven by plain calls and a clock passed in as floats. How much is in
flight, in chunks of what size, and how long an answer may take is the business of
its :class:`~edge_sdk.transport._pace.Pace` (flow control, told of every request,
answer, loss and timeout). The loop around it only does this::

    window = ChunkWindow(path, config, start=start, length=length, max_length=max_length)
    while not window.done:
        for req in window.requests(now):        # new chunks and the ones due again
            publish(req.encode())
        for resp in what_arrived(timeout=window.wait_s(now)):
            window.accept(resp, now)
        for data in window.ready():             # in order, from ``start``
            sink(data)

The window also samples what the pace needs and cannot see: the round-trip time of
each chunk and the delivery rate (bytes accepted over the time they took, BBR's
estimator), with the round trips it counts in.

Loss is decided by evidence, never by a clock alone: a chunk is asked for again
when a chunk requested after it has arrived and it is older than the retransmit
timeout (the pace's ``base_rto``), or when *nothing* has arrived for that timeout
with its backoff (``rto``; then only the oldest chunk, and the pace backs off). A
chunk that is merely late on a slow link, behind others that keep arriving, is never
asked for twice. An answer to an earlier request of a chunk is as good as one to the
last request; answers for bytes already received are counted as duplicates. The
transfer fails for slowness only when nothing at all arrived for
``FetchConfig.stall_timeout``.
"""

from __future__ import annotations

import random
import secrets
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from ..errors import TransportError
from . import _chunks as proto
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError
from ._fetch_types import FetchConfig, FetchStats, TransferProgress
from ._pace import BbrPace, Pace

#: The longest the loop sleeps between looks at the link and the timers.
MAX_WAIT_S = 0.5
#: A delivery-rate sample counts only over at least this many bytes (or two chunks): a
#: small file (TUF metadata) rides on the link's burst allowance and would claim line
#: rate. Four of the pace's first chunks.
MIN_RATE_SAMPLE_BYTES = 32 * 1024
#: Requests remembered per transfer (to tell a late duplicate from a stranger's answer).
MAX_ASKED = 4096
#: Progress rates are measured over about this long.
RATE_WINDOW_S = 10.0


class _Chunk:
    __slots__ = ("attempts", "corr", "dlv", "dlv_at", "length", "lost_with_link", "offset",
                 "resend_at", "sent_at", "seq", "size", "slowed_for")

    def __init__(self, offset: int, size: int, length: int) -> None:
        self.offset = offset
        #: The chunk size it was cut with, and its length (shorter at the end of the file).
        self.size = size
        self.length = length
        self.corr = b""
        self.sent_at = 0.0
        #: Send order, and bytes delivered (and when) at the send: BBR's rate sample.
        self.seq = 0
        self.dlv = 0
        self.dlv_at = 0.0
        self.attempts = 0
        #: When to ask again (after a loss, a SLOW_DOWN or a lost link); None while a
        #: request for it is out.
        self.resend_at: float | None = None
        self.slowed_for = 0.0
        #: Its answer died with the broker link: the responder is to send it at once.
        self.lost_with_link = False


@dataclass(frozen=True)
class _Asked:
    """One request sent: ``count`` chunks of ``size`` bytes from ``offset``."""

    offset: int
    size: int
    count: int
    sent_at: float

    def covers(self, offset: int) -> bool:
        i, rem = divmod(offset - self.offset, self.size)
        return rem == 0 and 0 <= i < self.count


class ChunkWindow:
    """Bookkeeping of one download of ``path`` from byte ``start``; see the module doc.

    ``length`` is the signed file size when known; otherwise the first answer's
    size is used. Either is bounded by ``max_length`` and
    ``FetchConfig.max_artifact_bytes`` (the constructor raises
    :class:`EndlessDataError` for a signed length past them). ``now`` arguments are seconds on any
    monotonic clock. ``pace`` is the flow control (a :class:`BbrPace` of ``config``
    unless given; one that served an earlier transfer keeps what it learnt of the
    link). ``rng`` (jitter, in [0, 1)) and ``new_id`` (16-byte request ids) are
    injectable for tests. Methods raise :class:`SlowRetrievalError`,
    :class:`EndlessDataError`, :class:`RemoteNotFoundError` or
    :class:`TransportError` when the transfer cannot go on.
    """

    def __init__(self, path: str, config: FetchConfig, *, start: int = 0,
                 length: int | None = None, max_length: int | None = None,
                 stats: FetchStats | None = None, pace: Pace | None = None,
                 rng: Callable[[], float] = random.random,
                 new_id: Callable[[int], bytes] = secrets.token_bytes,
                 roots: tuple[str, ...] = proto.REPO_ROOTS) -> None:
        if not proto.is_safe_path(path, roots):
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
        self.pace: Pace = pace if pace is not None else BbrPace(config)
        self._rng = rng
        self._new_id = new_id
        #: Next byte to hand to the caller, and next byte not yet asked for.
        self.delivered = start
        self._next = start
        self._chunks: dict[int, _Chunk] = {}  # by offset: every chunk not yet accepted
        self._out: dict[tuple[bytes, int], _Chunk] = {}  # (corr, offset): requested, unanswered
        self._asked: dict[bytes, _Asked] = {}  # every request of this transfer, by id
        self._ready: dict[int, bytes] = {}
        self._wake_at: float | None = None
        #: Whether chunks wait to be asked again later (then no new chunk is asked for).
        self._held_back = False
        #: Bytes of chunks requested and not yet here: on the wire, and all of them.
        self._in_flight_bytes = 0
        self._open_bytes = 0
        self._seq = 0
        #: Highest send order answered so far: chunks sent before it and unanswered
        #: are lost once older than the RTO.
        self._acked_seq = -1
        #: BBR's delivery accounting: bytes accepted, when the last one was, and the
        #: delivered count that ends the current round trip.
        self._dlv = 0
        self._dlv_at: float | None = None
        self._round_end = 0
        #: When something last arrived (for the stall limit) and when the RTO timer
        #: started (an arrival, the pipe filling from empty, or the last timeout).
        self._heard_at: float | None = None
        self._timer_from = 0.0
        #: Bytes accepted of this transfer, for its rate and progress: (time, received)
        #: marks about a second apart.
        self.received = 0
        self.started_at: float | None = None
        self._marks: deque[tuple[float, int]] = deque()
        if length is not None and start > length:
            raise TransportError(f"{path}: resume offset {start} is past the end ({length})")

    @property
    def done(self) -> bool:
        """Every byte up to the file's size was accepted and taken with :meth:`ready`."""
        return self.total is not None and self.delivered >= self.total

    def in_flight(self) -> set[bytes]:
        """Ids of the requests still awaiting an answer."""
        return {corr for corr, _ in self._out}

    @property
    def rto(self) -> float:
        """The retransmit timeout without backoff (what a request tells the responder)."""
        return self.pace.base_rto

    def progress(self, now: float) -> TransferProgress:
        """The transfer's progress, its rate measured over about ``RATE_WINDOW_S``."""
        marks = self._marks
        if not marks or now - marks[-1][0] >= 1.0:
            marks.append((now, self.received))
        while len(marks) > 2 and now - marks[1][0] >= RATE_WINDOW_S:
            marks.popleft()
        t0, got0 = marks[0]
        rate = (self.received - got0) / (now - t0) if now > t0 else 0.0
        left = None if self.total is None else self.total - self.delivered
        eta = None if left is None or rate <= 0 else left / rate
        return TransferProgress(self.path, self.delivered, self.total, rate, eta,
                                0.0 if self.started_at is None else now - self.started_at)

    # -- what to send --------------------------------------------------------------------

    def requests(self, now: float) -> list[proto.ChunkRequest]:
        """The requests to publish now: new chunks the pace makes room for, and chunks
        due again (lost, slowed down, or lost with the link)."""
        if self.started_at is None:
            self.started_at = self._timer_from = now
            self._heard_at = now
            self.pace.transfer_started(now)
        out = self._due(now)
        if self._held_back:
            # Chunks wait to be asked again (a SLOW_DOWN, a lost link): they go before any
            # new one. New chunks asked meanwhile took the device's share at the responder
            # first every time, and the oldest missing bytes were held back until the end
            # of the transfer (ten devices sharing a responder: delivery stuck at 1 MiB
            # of 16 for six seconds).
            return out
        pace = self.pace
        if self.total is None:
            # Before the size is known, ask for the first chunk only.
            if not self._chunks and self._next == self.start:
                size = pace.chunk_size
                c = self._chunks[self._next] = _Chunk(self._next, size, size)
                self._next += size
                self._open_bytes += size
                out.append(self._send([c], now))
            return out
        # Out-of-order bytes wait in memory for a missing chunk: bound how far ahead.
        ahead = 2 * self.config.window * self.config.chunk_size
        while self._next < self.total and self._next - self.delivered < ahead and \
                (room := pace.room(now, self._open_bytes, len(self._chunks))):
            run: list[_Chunk] = []
            size = pace.chunk_size
            while self._next < self.total and len(run) < min(pace.batch, room):
                want = min(size, self.total - self._next)
                c = self._chunks[self._next] = _Chunk(self._next, size, want)
                run.append(c)
                self._next += want
                self._open_bytes += want
            out.append(self._send(run, now))
        return out

    def _due(self, now: float) -> list[proto.ChunkRequest]:
        pace, cfg = self.pace, self.config
        rto = pace.base_rto
        wake = now + MAX_WAIT_S
        again: list[_Chunk] = []
        lost_bytes = 0
        oldest: _Chunk | None = None
        self._held_back = False
        for c in self._chunks.values():
            if c.resend_at is not None:
                if now >= c.resend_at:
                    again.append(c)
                else:
                    wake = min(wake, c.resend_at)
                    self._held_back = True
                continue
            if c.seq < self._acked_seq:
                # Overtaken: a chunk asked for after this one has arrived.
                if now - c.sent_at >= rto:
                    again.append(c)
                    lost_bytes += c.length
                    continue
                wake = min(wake, c.sent_at + rto)
            if oldest is None or c.offset < oldest.offset:
                oldest = c
        if self._out and self._heard_at is not None:
            quiet = now - self._heard_at
            if quiet >= cfg.stall_timeout:
                raise SlowRetrievalError(
                    f"{self.path}: nothing arrived for {quiet:.0f} s "
                    f"(fetch stall_timeout {cfg.stall_timeout:g} s); "
                    f"{self.delivered - self.start} bytes received, partial download kept")
            wake = min(wake, self._heard_at + cfg.stall_timeout)
        if not again and oldest is not None:
            due = self._timer_from + pace.rto
            if now >= due:
                # Nothing at all arrived for a whole RTO: ask again for the first missing
                # chunk only, and wait twice as long before the next one.
                self.stats.timeouts += 1
                pace.timed_out(now)
                self._timer_from = now
                again.append(oldest)
            else:
                wake = min(wake, due)
        for c in again:
            if c.resend_at is None:
                self._forget(c)
            c.attempts += 1
        self._wake_at = wake
        if lost_bytes:
            pace.lost(now, lost_bytes)
        if not again:
            return []
        self.stats.chunks_resent += len(again)
        return [self._send(run, now) for run in _runs(again, pace.batch)]

    def _forget(self, c: _Chunk) -> None:
        """``c``'s current request no longer counts as in flight (a late answer to it is
        still taken)."""
        if self._out.pop((c.corr, c.offset), None) is not None:
            self._in_flight_bytes -= c.length

    def _send(self, run: list[_Chunk], now: float) -> proto.ChunkRequest:
        # One request covers consecutive chunks: fewer small messages each way.
        if not self._out:
            self._timer_from = max(self._timer_from, now)  # the pipe fills from empty
        corr = self._new_id(16)
        dlv_at = self._dlv_at if self._out and self._dlv_at is not None else now
        for c in run:
            c.corr, c.sent_at, c.resend_at = corr, now, None
            c.seq, c.dlv, c.dlv_at = self._seq, self._dlv, dlv_at
            self._seq += 1
            self._out[(corr, c.offset)] = c
            self._in_flight_bytes += c.length
        first = run[0]
        self._asked[corr] = _Asked(first.offset, first.size, len(run), now)
        if len(self._asked) > MAX_ASKED:
            del self._asked[next(iter(self._asked))]
        self.stats.requests_sent += 1
        self.pace.sent(now, sum(c.length for c in run))
        # The rto tells the responder when asking again is no longer premature; a chunk
        # whose answer is known to be lost is asked for with the smallest one.
        urgent = any(c.lost_with_link for c in run)
        for c in run:
            c.lost_with_link = False
        return proto.ChunkRequest(corr, self.path, first.offset,
                                  first.size if len(run) > 1 else first.length, len(run),
                                  rto_ms=1 if urgent else max(1, int(self.rto * 1000)))

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
        for (corr, _), c in list(self._out.items()):
            if corr in lost:
                self._forget(c)
                c.resend_at = now
                c.lost_with_link = True
            elif corr in requeued:
                c.sent_at = now
        self._heard_at = self._timer_from = now
        self._wake_at = now

    # -- what arrived --------------------------------------------------------------------

    def accept(self, resp: proto.ChunkResponse, now: float) -> None:
        """Take one answer: a chunk, a ``SLOW_DOWN``, an error, a duplicate (counted in
        ``stats.duplicates``) or a stale one (``stats.stale_responses``), the last two
        otherwise ignored."""
        asked = self._asked.get(resp.corr)
        if asked is None:
            self.stats.stale_responses += 1
            return
        if resp.status == proto.SLOW_DOWN:
            self._slow_down(resp, now)
            return
        path, total = self.path, self.total
        if resp.status != proto.OK:
            # Errors answer a whole request: they count while any chunk it covered waits.
            if not any(k[0] == resp.corr for k in self._out):
                self.stats.stale_responses += 1
                return
            if resp.status == proto.NOT_FOUND:
                raise RemoteNotFoundError(f"{path}: not in the repository ({resp.reason})")
            raise TransportError(f"{path}: the responder refused the request: {resp.reason}")
        if not asked.covers(resp.offset):
            self.stats.stale_responses += 1  # not a chunk we asked for under this id
            return
        n = len(resp.payload)
        c = self._chunks.get(resp.offset)
        if c is None:
            # Asked for twice (or answered twice): these bytes are here already.
            self.stats.duplicates += 1
            self.stats.duplicate_bytes += n
            self._heard(now)
            return
        if resp.total > self.cap or (total is not None and resp.total > total):
            limit = self.cap if total is None else total
            raise EndlessDataError(
                f"{path}: the responder offers {resp.total} bytes but at most {limit} are "
                "allowed (signed length or configured maximum)"
            )
        if n > c.length:
            raise EndlessDataError(
                f"{path}: asked for {c.length} bytes at offset {c.offset}, received {n}")
        if total is None:
            total = self.total = resp.total
        if n < c.length and c.offset + n < total:
            raise TransportError(
                f"{path}: short chunk at offset {c.offset} ({n} of {c.length} bytes)")
        current = resp.corr == c.corr and c.resend_at is None
        if c.resend_at is None:
            self._forget(c)
        del self._chunks[c.offset]
        self._open_bytes -= c.length
        self.stats.chunks_received += 1
        self.stats.bytes_received += n
        self.received += n
        self._heard(now)
        self._dlv += n
        rate = None
        new_round = False
        if current:
            self._acked_seq = max(self._acked_seq, c.seq)
            if now > c.dlv_at and self._dlv - c.dlv >= min(MIN_RATE_SAMPLE_BYTES, 2 * c.size):
                rate = (self._dlv - c.dlv) / (now - c.dlv_at)
            if c.dlv >= self._round_end:
                new_round, self._round_end = True, self._dlv
        self._dlv_at = now
        self.pace.answered(now, max(0.0, now - (c.sent_at if current else asked.sent_at)), n,
                           rate, new_round)
        if n or c.offset >= total:
            self._ready[c.offset] = resp.payload

    def _heard(self, now: float) -> None:
        self._heard_at = self._timer_from = now

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
        # A sign of life; and the wait it asks for is no silence either.
        self._heard(now + wait)
        for key in held:
            c = self._out[key]
            self._forget(c)
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


def _runs(chunks: list[_Chunk], batch: int) -> Iterator[list[_Chunk]]:
    """Consecutive chunks of one size in groups of at most ``batch``, each group one
    request's worth."""
    run: list[_Chunk] = []
    for c in sorted(chunks, key=lambda c: c.offset):
        if run and (len(run) >= batch or run[-1].offset + run[-1].size != c.offset
                    or run[-1].length != run[-1].size or c.size != run[-1].size):
            yield run
            run = []
        run.append(c)
    if run:
        yield run
