"""Flow control of a transfer: how much may be in flight, in chunks of what size, and
when a chunk is late. No I/O, no clock of its own.

:class:`Pace` is what :class:`~edge_sdk.transport._window.ChunkWindow` (loss
detection and reassembly) needs of a flow controller, as aioquic keeps congestion
control apart from recovery: the window tells the pace of every request sent,
every answer (with its round-trip time and a delivery-rate sample), every chunk it
decides is lost and every retransmit timeout; it asks the pace how many new chunks
to request (:meth:`~Pace.room`), of what size and how many per request, and how long
an answer may take (:attr:`~Pace.rto`). :class:`BbrPace` is the controller the
fetcher uses.

:class:`BbrPace` follows the link, the way BBR does for TCP, because a thin link
between a device and its broker loses nothing: TCP below MQTT turns too much in
flight into queueing delay, never into loss, so a loss-driven (AIMD) window would
grow until the queue alone outlasts every timeout. It measures, per transfer, the
round-trip time of each chunk and the delivery rate (bytes accepted over the time
they took, BBR's estimator, sampled by the window), and keeps about twice the
bandwidth-delay product in flight: enough to keep the link busy, little enough that
the queue stays under one round trip. It starts small and doubles each round trip
until the delivery rate stops growing, then follows the rate; every ten seconds it
lets the queue drain for a moment to measure the bare RTT again. Chunks are about a
quarter of a second of the link each (so a slow link gets small chunks), and fewer
per request on a small window. The retransmit timeout is TCP's (SRTT + 4·RTTVAR),
doubled for each timeout in a row.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from ._fetch_types import FetchConfig

__all__ = ["BbrPace", "Pace"]

#: Lower bound of the retransmit timeout derived from the RTT (TCP's is 0.2 s; the upper
#: one is ``FetchConfig.max_rto``).
MIN_RTO_S = 0.2
#: How long one chunk should take on the link: small chunks on slow links keep every
#: RTT sample (and every chunk asked for again) short; large ones on fast links keep
#: the per-message cost down.
CHUNK_TIME_S = 0.25
#: The first chunks of a transfer, before anything is known about the link.
INITIAL_CHUNK = 8 * 1024
INITIAL_WINDOW_CHUNKS = 4
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


class Pace(Protocol):
    """The flow controller a :class:`~edge_sdk.transport._window.ChunkWindow` drives.

    Every call carries ``now``, seconds on the window's monotonic clock. A pace may
    serve several transfers in a row (the fetcher keeps what one learnt of the link
    for the next); :meth:`transfer_started` begins each.
    """

    # -- what the window asks -------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        """Bytes per new chunk, from now on (chunks already cut keep their size)."""
        ...

    @property
    def batch(self) -> int:
        """Most chunks asked for in one request."""
        ...

    @property
    def base_rto(self) -> float:
        """The retransmit timeout without backoff: a chunk overtaken by a later one is
        lost once its request is this old; each request tells the responder this."""
        ...

    @property
    def rto(self) -> float:
        """The retransmit timeout with the backoff of the timeouts in a row: how long
        nothing at all may arrive before the oldest chunk is asked for again."""
        ...

    def room(self, now: float, in_flight_bytes: int, in_flight_chunks: int) -> int:
        """How many new chunks of :attr:`chunk_size` to ask for now, with
        ``in_flight_chunks`` chunks of ``in_flight_bytes`` requested and not yet
        here (0: wait for answers)."""
        ...

    # -- what the window tells ------------------------------------------------------------

    def transfer_started(self, now: float) -> None:
        """A transfer begins: what the pace learnt of the link before still holds,
        timeouts of an earlier transfer no longer count."""
        ...

    def sent(self, now: float, nbytes: int) -> None:
        """A request for chunks of ``nbytes`` in all went out (new chunks or ones asked
        for again)."""
        ...

    def answered(self, now: float, rtt_s: float, nbytes: int, rate: float | None,
                 new_round: bool) -> None:
        """A chunk of ``nbytes`` arrived ``rtt_s`` after the request it answers;
        ``rate`` is a delivery-rate sample (bytes/s) or None; ``new_round``: the first
        answer to a request sent after the previous round began."""
        ...

    def lost(self, now: float, nbytes: int) -> None:
        """Chunks of ``nbytes`` in all are lost: requested before a chunk that has
        arrived, and older than :attr:`base_rto`. They are asked for again."""
        ...

    def timed_out(self, now: float) -> None:
        """Nothing at all arrived for :attr:`rto`: the oldest chunk is asked for again."""
        ...


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


class BbrPace:
    """The :class:`Pace` that follows the link (see the module doc), within the bounds
    of ``config``. Like BBR it sets the window from the delivery rate and the
    round-trip time alone, so neither a request sent nor a chunk lost moves it; only
    silence for a whole RTO (:meth:`timed_out`) backs it off."""

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

    def transfer_started(self, now: float) -> None:
        self.backoff = 0

    def sent(self, now: float, nbytes: int) -> None:
        pass

    def lost(self, now: float, nbytes: int) -> None:
        pass

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
        """Back off, and use smaller chunks for a while."""
        self.backoff = min(self.backoff + 1, 16)
        self._loss_shift = min(self._loss_shift + 1, 3)
        self._clean_rounds = 0
        self.chunk_size = max(self.min_chunk,
                              min(self.chunk_size, self.max_chunk >> self._loss_shift))
        self._size()
