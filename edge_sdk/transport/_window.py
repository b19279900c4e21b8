"""The chunk window of one transfer: what to request, when, and what to accept. No I/O.

:class:`ChunkWindow` is the bookkeeping of :class:`~edge_sdk.transport.ChunkClient`
pulled out of its network loop, so that every rule (flow control, loss detection,
``SLOW_DOWN`` waits, duplicate answers, the length checks that stop endless data)
is driven by plain calls and a clock passed in as floats. The loop around it only
does this::

    window = ChunkWindow(path, config, start=start, length=length, max_length=max_length)
    while not window.done:
        for req in window.requests(now):        # new chunks and the ones due again
            publish(req.encode())
        for resp in what_arrived(timeout=window.wait_s(now)):
            window.accept(resp, now)
        for data in window.ready():             # in order, from ``start``
            sink(data)

Flow control (:class:`Pace`) follows the link, the way BBR does for TCP, because
a thin link between a device and its broker loses nothing: TCP below MQTT turns
too much in flight into queueing delay, never into loss, so a loss-driven (AIMD)
window would grow until the queue alone outlasts every timeout. The window
measures, per transfer, the round-trip time of each chunk and the delivery rate
(bytes accepted over the time they took, BBR's estimator), and keeps about twice
the bandwidth-delay product in flight: enough to keep the link busy, little
enough that the queue stays under one round trip. It starts small and doubles
each round trip until the delivery rate stops growing, then follows the rate;
every ten seconds it lets the queue drain for a moment to measure the bare RTT
again. Chunks are about a quarter of a second of the link each (so a slow link
gets small chunks), and fewer per request on a small window.

Loss is decided by evidence, never by a clock alone: a chunk is asked for again
when a chunk requested after it has arrived and it is older than the retransmit
timeout (TCP's SRTT + 4·RTTVAR), or when *nothing* has arrived for that timeout
(then only the oldest chunk, and the timeout doubles each time). A chunk that is
merely late on a slow link, behind others that keep arriving, is never asked for
twice. An answer to an earlier request of a chunk is as good as one to the last
request; answers for bytes already received are counted as duplicates. The
transfer fails for slowness only when nothing at all arrived for
``FetchConfig.stall_timeout``.
"""

from __future__ import annotations

import math
import random
import secrets
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from ..errors import TransportError
from . import _chunks as proto
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError
from ._fetch_types import FetchConfig, FetchStats, TransferProgress

#: The longest the loop sleeps between looks at the link and the timers.
MAX_WAIT_S = 0.5
#: Bounds of the retransmit timeout derived from the RTT (TCP uses 0.2 s .. 60 s).
MIN_RTO_S = 0.2
#: How long one chunk should take on the link: small chunks on slow links keep every
#: RTT sample (and every chunk asked for again) short; large ones on fast links keep
#: the per-message cost down.
CHUNK_TIME_S = 0.25
#: The first chunks of a transfer, before anything is known about the link.
INITIAL_CHUNK = 8 * 1024
INITIAL_WINDOW_CHUNKS = 4
#: A delivery-rate sample counts only over at least this many bytes (or two chunks): a
#: small file (TUF metadata) rides on the link's burst allowance and would claim line
#: rate.
MIN_RATE_SAMPLE_BYTES = 4 * INITIAL_CHUNK
#: Fewest chunks in flight: one on the wire while the next is asked for.
MIN_WINDOW_CHUNKS = 2
#: In flight = this × delivery rate × minimum RTT (BBR's cwnd gain) ...
CWND_GAIN = 2.0
#: ... and at least this long of the delivery rate: on a fast link (loopback, a LAN)
#: the "link" is the processes on both ends, which move more per message when more is
#: queued, and a queue this short costs nothing worth measuring.
QUEUE_FLOOR_S = 0.05
#: The minimum RTT is measured again (in-flight drained to one chunk) this often.
MIN_RTT_WINDOW_S = 10.0
#: The delivery rate estimate is the best of the last this many round trips.
BW_ROUNDS = 10
#: Startup ends after this many round trips without 25 % more delivery rate.
FULL_BW_ROUNDS = 3
#: A probe of the bare RTT ends after two clean samples or this long.
PROBE_RTT_MAX_S = 2.0
#: Requests remembered per transfer (to tell a late duplicate from a stranger's answer).
MAX_ASKED = 4096
#: Progress rates are measured over about this long.
RATE_WINDOW_S = 10.0


class _MaxFilter:
    """The largest value seen over the last ``n`` rounds (BBR's windowed max)."""

    def __init__(self, n: int) -> None:
        self._rounds: deque[float] = deque(maxlen=n)
        self._current = 0.0

    def add(self, value: float) -> None:
        self._current = max(self._current, value)

    def new_round(self) -> None:
        self._rounds.append(self._current)
        self._current = 0.0

    @property
    def value(self) -> float:
        return max(self._current, max(self._rounds, default=0.0))


class Pace:
    """How much may be in flight, in chunks of what size, and when a chunk is late: the
    link-adaptive policy (see the module doc). Pure; :class:`ChunkWindow` tells it of
    every answer (with its RTT and a delivery-rate sample), every timeout and every
    ``SLOW_DOWN``, and asks it :meth:`room`, :attr:`chunk_size`, :attr:`batch` and
    :attr:`rto`."""

    STARTUP, STEADY, PROBE_RTT = "startup", "steady", "probe_rtt"

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.max_chunk = config.chunk_size
        self.min_chunk = min(config.min_chunk_size, config.chunk_size)
        self.chunk_size = max(self.min_chunk, min(self.max_chunk, INITIAL_CHUNK))
        self.max_batch = min(config.batch, config.window)
        self.batch = 1
        self.state = self.STARTUP
        self.cwnd = float(min(INITIAL_WINDOW_CHUNKS, config.window) * self.chunk_size)
        #: RFC 6298 estimators (None until the first sample), the bare RTT and when it
        #: was last seen, and the delivery rate (bytes/s).
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt = math.inf
        self._min_rtt_at = 0.0
        self._bw = _MaxFilter(BW_ROUNDS)
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._probe_since = 0.0
        self._probe_clean_from = math.inf
        self._probe_min = math.inf
        self._probe_samples = 0
        #: Timeouts in a row (the RTO doubles for each) and recent ones (smaller chunks).
        self.backoff = 0
        self._loss_shift = 0
        self._clean_rounds = 0

    # -- what the window asks -------------------------------------------------------------

    @property
    def bw(self) -> float:
        """Estimated delivery rate of the link, bytes/s (0 until measured)."""
        return self._bw.value

    @property
    def base_rto(self) -> float:
        """SRTT + 4·RTTVAR, within bounds, and never less than two chunks' time on the
        link: an RTT measured on small answers says nothing of a chunk's own time on
        the wire. Until the rate is known, at least ``chunk_timeout``."""
        floor = self.config.chunk_timeout if self.bw <= 0 else \
            max(MIN_RTO_S, 2 * self.chunk_size / self.bw)
        rto = floor if self.srtt is None else max(floor, self.srtt + 4 * self.rttvar)
        return min(self.config.max_rto, rto)

    @property
    def rto(self) -> float:
        """The retransmit timeout with the backoff of the timeouts in a row."""
        return min(self.config.max_rto, self.base_rto * float(2 ** self.backoff))

    def room(self, now: float, in_flight_bytes: int, in_flight_chunks: int) -> int:
        """How many new chunks of :attr:`chunk_size` to ask for now."""
        if self.state == self.PROBE_RTT and in_flight_chunks == 0:
            # Drained: what is sent from now on sees the bare round trip.
            self._probe_clean_from = min(self._probe_clean_from, now)
        by_count = self.config.window - in_flight_chunks
        if by_count <= 0:
            return 0
        free = int((self.cwnd - in_flight_bytes) // self.chunk_size)
        if in_flight_chunks == 0:
            return max(1, min(free, by_count))
        n = min(free, by_count)
        return n if n >= self.batch else 0

    # -- what the window tells ------------------------------------------------------------

    def answered(self, now: float, rtt_s: float, nbytes: int, rate: float | None,
                 new_round: bool) -> None:
        """A chunk of ``nbytes`` arrived ``rtt_s`` after the request it answers;
        ``rate`` is a delivery-rate sample (bytes/s) or None; ``new_round``: the first
        answer to a request sent after the previous round began."""
        self.backoff = 0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt_s, rtt_s / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_s)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_s
        sent_at = now - rtt_s
        if rtt_s <= self.min_rtt:
            self.min_rtt, self._min_rtt_at = rtt_s, now
        if rate is not None and rate > 0:
            self._bw.add(rate)
        if self.state == self.PROBE_RTT:
            if sent_at >= self._probe_clean_from:
                self._probe_min = min(self._probe_min, rtt_s)
                self._probe_samples += 1
            if self._probe_samples >= 2 or now - self._probe_since > PROBE_RTT_MAX_S:
                if self._probe_samples:
                    self.min_rtt = self._probe_min
                self._min_rtt_at = now
                self.state = self.STEADY
        elif self.state == self.STARTUP:
            queued = rtt_s - self.min_rtt - nbytes / max(self.bw, 1.0)
            if self._full_bw and queued > max(self.min_rtt, QUEUE_FLOOR_S):
                # The queue grew by a round trip: the link is full (HyStart's signal).
                self.state = self.STEADY
            else:
                self.cwnd = min(self.cwnd + nbytes, self._max_cwnd())
        elif now - self._min_rtt_at > MIN_RTT_WINDOW_S:
            self.state = self.PROBE_RTT
            self._probe_since, self._probe_min, self._probe_samples = now, math.inf, 0
            self._probe_clean_from = math.inf
        if new_round:
            self._round(now)
        self._size()

    def _round(self, now: float) -> None:
        self._bw.new_round()
        bw = self.bw
        if self.state == self.STARTUP:
            if bw >= self._full_bw * 1.25:
                self._full_bw, self._full_bw_rounds = bw, 0
            else:
                self._full_bw_rounds += 1
                if self._full_bw_rounds >= FULL_BW_ROUNDS:
                    self.state = self.STEADY
        self._clean_rounds += 1
        if self._loss_shift and self._clean_rounds >= 16:
            self._loss_shift -= 1
            self._clean_rounds = 0
        if bw > 0:
            # The power of two nearest to a quarter second of the link.
            size = 1 << max(10, round(math.log2(max(1.0, bw * CHUNK_TIME_S))))
            cap = max(self.min_chunk, self.max_chunk >> self._loss_shift)
            self.chunk_size = max(self.min_chunk, min(cap, size))

    def _max_cwnd(self) -> float:
        return float(self.config.window * self.max_chunk)

    def _size(self) -> None:
        # Window and batch from the estimates; startup grows the window on its own.
        floor = MIN_WINDOW_CHUNKS * self.chunk_size
        if self.state == self.PROBE_RTT:
            self.cwnd = float(self.chunk_size)
        elif self.state == self.STEADY:
            bdp = self.bw * self.min_rtt if math.isfinite(self.min_rtt) else 0.0
            want = max(CWND_GAIN * bdp, self.bw * QUEUE_FLOOR_S)
            self.cwnd = max(float(floor), min(self._max_cwnd(), want))
        chunks = int(self.cwnd // self.chunk_size)
        self.batch = max(1, min(self.max_batch, chunks // 2))

    def timed_out(self, now: float) -> None:
        """Nothing arrived for :attr:`rto`: back off, and use smaller chunks for a while."""
        self.backoff = min(self.backoff + 1, 16)
        self._loss_shift = min(self._loss_shift + 1, 3)
        self._clean_rounds = 0
        self.chunk_size = max(self.min_chunk,
                              min(self.chunk_size, self.max_chunk >> self._loss_shift))
        self._size()

    def slowed_down(self, now: float, wait_s: float) -> None:
        """The responder asked us to wait ``wait_s`` before asking again."""


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
        self._asked: dict[bytes, _Asked] = {}  # every request of this transfer, by id
        self._ready: dict[int, bytes] = {}
        self._wake_at: float | None = None
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
        out = self._due(now)
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
        oldest: _Chunk | None = None
        for c in self._chunks.values():
            if c.resend_at is not None:
                if now >= c.resend_at:
                    again.append(c)
                else:
                    wake = min(wake, c.resend_at)
                continue
            if c.seq < self._acked_seq:
                # Overtaken: a chunk asked for after this one has arrived.
                if now - c.sent_at >= rto:
                    again.append(c)
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
        self.pace.slowed_down(now, wait)
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
