"""The chunk window on its own: no broker, no threads, time passed in as floats.

Each test drives :class:`ChunkWindow` the way ``ChunkClient`` does (ask for
``requests(now)``, feed answers to ``accept``, take ``ready()``) and answers
requests the way the responder does. Bookkeeping tests use a fixed pace (an
implementation of the :class:`Pace` protocol, so that request shapes are exact); the
flow-control tests run the real pace (:class:`BbrPace`) against :class:`SimLink`, a
thin link on a virtual clock.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from edge_sdk.errors import TransportError
from edge_sdk.transport import (
    EndlessDataError,
    FetchConfig,
    RemoteNotFoundError,
    SlowRetrievalError,
)
from edge_sdk.transport import _chunks as proto
from edge_sdk.transport._pace import MIN_RTO_S, BbrPace, Pace
from edge_sdk.transport._window import MAX_WAIT_S, ChunkWindow

K = 1024
DATA = bytes(range(256)) * 40  # 10 KiB: ten 1 KiB chunks
CFG = FetchConfig(chunk_size=K, min_chunk_size=K, window=8, batch=4, chunk_timeout=1.0,
                  max_rto=8.0, stall_timeout=20.0, max_slowdown_s=5.0)


class FixedPace:
    """A :class:`Pace`: ``window`` chunks of ``config.chunk_size`` bytes in flight,
    ``batch`` per request, a fixed RTO doubled for each timeout in a row (up to
    ``config.max_rto``)."""

    def __init__(self, config: FetchConfig = CFG, *, window: int = 8, batch: int = 4,
                 rto: float = 1.0) -> None:
        self.config = config
        self.chunk_size, self.batch, self._window, self._rto = config.chunk_size, batch, \
            window, rto
        self.backoff = 0
        self.rtts: list[float] = []
        self.timeouts = 0
        self.sent_bytes = self.lost_bytes = 0

    @property
    def base_rto(self) -> float:
        return self._rto

    @property
    def rto(self) -> float:
        return min(self.config.max_rto, self._rto * float(2 ** self.backoff))

    def room(self, now: float, in_flight_bytes: int, in_flight_chunks: int) -> int:
        free = self._window - in_flight_chunks
        return free if free >= self.batch or in_flight_chunks == 0 else 0

    def transfer_started(self, now: float) -> None:
        self.backoff = 0

    def sent(self, now: float, nbytes: int) -> None:
        self.sent_bytes += nbytes

    def answered(self, now: float, rtt_s: float, nbytes: int, rate: float | None,
                 new_round: bool) -> None:
        self.backoff = 0
        self.rtts.append(rtt_s)

    def lost(self, now: float, nbytes: int) -> None:
        self.lost_bytes += nbytes

    def timed_out(self, now: float) -> None:
        self.backoff += 1
        self.timeouts += 1


def window(config: FetchConfig = CFG, path: str = "targets/m/1.0/x.onnx", *,
           pace: Pace | None = None, adaptive: bool = False, **kw: object) -> ChunkWindow:
    ids = itertools.count(1)
    kw.setdefault("length", len(DATA))
    if pace is None and not adaptive:
        pace = FixedPace(config)
    # rng 0.5: every slow-down jitter factor is exactly 1.125.
    return ChunkWindow(path, config, rng=lambda: 0.5, pace=pace,
                       new_id=lambda n: next(ids).to_bytes(n, "big"), **kw)  # type: ignore[arg-type]


def answers(req: proto.ChunkRequest, data: bytes = DATA) -> list[proto.ChunkResponse]:
    """What an honest responder sends for ``req``: one OK message per chunk."""
    out = []
    for i in range(req.count):
        off = req.offset + i * req.length
        if off > len(data) or (i and off >= len(data)):
            break
        out.append(proto.ChunkResponse(proto.OK, req.corr, off, len(data),
                                       data[off:off + req.length]))
    return out


def chunks_of(reqs: list[proto.ChunkRequest]) -> list[int]:
    return [r.offset + i * r.length for r in reqs for i in range(r.count)]


def run_honest(w: ChunkWindow, now: float = 0.0, data: bytes = DATA) -> bytes:
    got = bytearray()
    while not w.done:
        reqs = w.requests(now)
        assert reqs, "the window stalled with nothing to ask for"
        for req in reqs:
            for resp in answers(req, data):
                w.accept(resp, now)
        for piece in w.ready():
            got += piece
        now += 0.01
    return bytes(got)


# -- bookkeeping -------------------------------------------------------------------------


def test_fills_the_window_in_batches_and_delivers_in_order() -> None:
    w = window()
    first = w.requests(0.0)
    assert [(r.offset, r.count, r.length) for r in first] == [(0, 4, K), (4 * K, 4, K)]
    assert w.stats.requests_sent == 2
    a, b = answers(first[0]), answers(first[1])
    w.accept(a[1], 0.1)
    assert list(w.ready()) == []  # byte 0 has not arrived: nothing can be handed on
    w.accept(a[0], 0.1)
    assert b"".join(w.ready()) == DATA[:2 * K] and w.delivered == 2 * K
    w.accept(a[2], 0.1)
    assert w.requests(0.1) == []  # 7 chunks out, 1 free slot: less than a batch
    w.accept(a[3], 0.1)
    nxt = w.requests(0.1)
    assert [(r.offset, r.count) for r in nxt] == [(8 * K, 2)]  # the last two chunks
    for resp in b + answers(nxt[0]):
        w.accept(resp, 0.2)
    assert b"".join(w.ready()) == DATA[2 * K:]
    assert w.done and w.stats.chunks_received == 10 and w.stats.bytes_received == len(DATA)


def test_whole_file_arrives_intact_with_the_adaptive_pace_and_any_limits() -> None:
    big = bytes(range(251)) * 2000  # ~490 KiB
    for win, batch, chunk in [(1, 1, 1024), (3, 2, 4096), (8, 8, 65536), (64, 8, 8192)]:
        cfg = FetchConfig(chunk_size=chunk, min_chunk_size=1024, window=win, batch=batch)
        w = window(cfg, adaptive=True, length=len(big))
        assert run_honest(w, data=big) == big
        assert w.stats.duplicates == 0 and w.stats.chunks_resent == 0


def test_unknown_size_asks_for_one_chunk_and_learns_the_size_from_it() -> None:
    w = window(length=None)
    reqs = w.requests(0.0)
    assert [(r.offset, r.count) for r in reqs] == [(0, 1)]
    assert w.requests(0.0) == []  # nothing more until the size is known
    w.accept(answers(reqs[0])[0], 0.0)
    assert w.total == len(DATA)
    assert chunks_of(w.requests(0.0)) == [K * i for i in range(1, 9)]  # a full window


def test_resume_starts_at_the_kept_prefix() -> None:
    assert chunks_of(window(start=7 * K).requests(0.0)) == [7 * K, 8 * K, 9 * K]
    assert run_honest(window(start=7 * K)) == DATA[7 * K:]


def test_resume_at_the_end_is_done_and_past_the_end_is_refused() -> None:
    assert window(start=len(DATA)).done
    with pytest.raises(TransportError, match="past the end"):
        window(start=len(DATA) + 1)


def test_duplicate_answer_is_counted_and_a_strangers_answer_is_stale() -> None:
    w = window()
    req = w.requests(0.0)[0]
    resp = answers(req)[0]
    w.accept(resp, 0.1)
    w.accept(resp, 0.1)
    w.accept(proto.ChunkResponse(proto.OK, b"x" * 16, 0, len(DATA), DATA[:K]), 0.1)
    assert w.stats.chunks_received == 1
    assert (w.stats.duplicates, w.stats.duplicate_bytes, w.stats.stale_responses) == (1, K, 1)
    assert b"".join(w.ready()) == DATA[:K]


def test_requests_tell_the_responder_the_retransmit_timeout() -> None:
    req = window(pace=FixedPace(rto=1.5)).requests(0.0)[0]
    assert req.rto_ms == 1500
    assert proto.ChunkRequest.decode(req.encode()).rto_ms == 1500


def test_a_chunk_merely_late_behind_chunks_that_keep_arriving_is_never_asked_again() -> None:
    # A slow link: one chunk every 0.9 s (just under the RTO), all ten in flight at once,
    # so the last one waits 9 s, nine RTOs, and is still never asked for twice.
    w = window(pace=FixedPace(window=10, batch=10, rto=1.0))
    (req,) = w.requests(0.0)
    now = 0.0
    for resp in answers(req):
        now += 0.9
        assert w.requests(now) == []
        w.accept(resp, now)
        list(w.ready())
    assert w.done and w.stats.chunks_resent == 0 and w.stats.timeouts == 0


def test_an_overtaken_chunk_is_asked_again_once_older_than_the_rto() -> None:
    w = window(pace=FixedPace(window=2, batch=1, rto=1.0))
    lost, second = w.requests(0.0)
    w.accept(answers(second)[0], 0.3)  # asked for after chunk 0, here first: 0 is lost
    list(w.ready())
    assert [r for r in w.requests(0.5) if r.offset == 0] == []  # not yet older than the RTO
    again = [r for r in w.requests(1.0) if r.offset == 0]
    assert len(again) == 1 and again[0].corr != lost.corr
    assert w.stats.chunks_resent == 1 and w.stats.timeouts == 0


def test_the_pace_hears_of_every_request_and_of_each_loss_but_a_timeout_is_no_loss() -> None:
    pace = FixedPace(window=2, batch=1, rto=1.0)
    w = window(pace=pace)
    sent = w.requests(0.0)
    w.accept(answers(sent[1])[0], 0.3)  # chunk 0 is overtaken ...
    list(w.ready())
    sent += w.requests(1.0)  # ... and lost once older than the RTO
    assert pace.lost_bytes == K and pace.timeouts == 0
    sent += w.requests(2.0)  # then silence for a whole RTO: a timeout, not a loss
    assert pace.timeouts == 1 and pace.lost_bytes == K
    assert pace.sent_bytes == sum(r.length * r.count for r in sent) == 5 * K


def test_a_pace_carried_over_from_an_earlier_transfer_starts_without_its_backoff() -> None:
    pace = FixedPace(rto=1.0)
    pace.backoff = 3  # the last transfer ended in timeouts
    req = window(pace=pace).requests(0.0)[0]
    assert pace.backoff == 0 and req.rto_ms == 1000


def test_a_late_answer_to_the_first_request_is_taken_and_the_second_is_a_duplicate() -> None:
    w = window(pace=FixedPace(window=2, batch=1, rto=1.0))
    first, second = w.requests(0.0)
    w.accept(answers(second)[0], 0.1)
    again = next(r for r in w.requests(1.0) if r.offset == 0)
    w.accept(answers(first)[0], 1.1)  # the first answer was only late: it counts
    assert b"".join(w.ready()) == DATA[:2 * K]
    w.accept(answers(again)[0], 1.2)
    assert w.stats.duplicates == 1 and w.stats.chunks_received == 2


def test_silence_asks_again_for_the_oldest_chunk_only_with_doubling_timeouts() -> None:
    pace = FixedPace(window=4, batch=4, rto=1.0)
    w = window(pace=pace)
    (req,) = w.requests(0.0)
    assert w.wait_s(0.0) == MAX_WAIT_S  # the timeout is further away than the cap
    assert w.requests(0.9) == [] and w.wait_s(0.9) == pytest.approx(0.1)
    resent_at = []
    now = 0.9
    while len(resent_at) < 4:
        now = round(now + 0.05, 6)
        for r in w.requests(now):
            assert (r.offset, r.count) == (0, 1)  # the oldest chunk, alone
            resent_at.append(now)
    assert resent_at == [1.0, 3.0, 7.0, 15.0]  # RTO 1, then 2, 4, 8 s of silence
    assert pace.timeouts == 4 and w.stats.timeouts == 4
    w.accept(answers(req)[1], 15.5)  # anything arriving ends the backoff
    assert pace.backoff == 0


def test_silence_past_the_stall_timeout_raises_slow_retrieval() -> None:
    w = window(FetchConfig(chunk_size=K, window=1, batch=1, chunk_timeout=1.0,
                           stall_timeout=5.0))
    w.requests(0.0)
    now = 0.0
    with pytest.raises(SlowRetrievalError, match=r"nothing arrived for 5 s \(fetch "
                                                  r"stall_timeout 5 s\).*partial download kept"):
        while now < 10:
            now += 0.25
            w.requests(now)
    assert now == pytest.approx(5.0)


def test_an_unanswered_first_chunk_of_unknown_size_stalls_too() -> None:
    w = window(FetchConfig(chunk_size=K, min_chunk_size=K, chunk_timeout=0.5, max_rto=1.0,
                           stall_timeout=5.0), length=None)
    now = 0.0
    with pytest.raises(SlowRetrievalError, match="nothing arrived for 5 s"):
        while now < 10:  # its only chunk asked again and again: still nothing arrived
            w.requests(now)
            now += 0.25
    assert w.stats.chunks_resent >= 4


def test_a_slow_down_longer_than_the_stall_timeout_is_no_stall() -> None:
    cfg = FetchConfig(chunk_size=K, min_chunk_size=K, stall_timeout=5.0, max_slowdown_s=30.0)
    w = window(cfg, pace=FixedPace(cfg, window=1, batch=1))
    (req,) = w.requests(0.0)
    w.accept(proto.ChunkResponse(proto.SLOW_DOWN, req.corr, 0, 8000, b"busy"), 0.5)
    (again,) = w.requests(9.5)  # 8 s (+12.5 %) later
    w.accept(answers(again)[0], 10.0)
    assert b"".join(w.ready()) == DATA[:K] and w.stats.slowdowns == 1


def test_a_slow_but_steady_transfer_outlasts_the_stall_timeout() -> None:
    cfg = FetchConfig(chunk_size=K, min_chunk_size=K, window=1, batch=1, stall_timeout=5.0)
    w = window(cfg, pace=FixedPace(cfg, window=1, batch=1, rto=4.0))
    now = 0.0
    while not w.done:  # one chunk each 3 s: 30 s in all, six stall timeouts
        (req,) = w.requests(now)
        now += 3.0
        assert w.requests(now) == []
        w.accept(answers(req)[0], now)
        list(w.ready())
    assert w.stats.chunks_resent == 0


def test_resent_chunks_go_out_as_consecutive_runs() -> None:
    w = window(pace=FixedPace(window=8, batch=4, rto=1.0))
    first = w.requests(0.0)
    for resp in answers(first[1])[:2]:  # 4 and 5 answered: 0..3 were asked before them
        w.accept(resp, 0.5)
    again = w.requests(1.0)
    assert [(r.offset, r.count) for r in again] == [(0, 4)]
    assert w.stats.chunks_resent == 4


def test_slow_down_holds_the_named_chunks_for_the_wait_it_gives() -> None:
    w = window(pace=FixedPace(window=4, batch=4, rto=1.0))
    req = w.requests(0.0)[0]
    w.accept(answers(req)[0], 0.1)
    # The budget ran out after chunk 0: chunks 1..3 come back after 2 s (+12.5 % jitter).
    w.accept(proto.ChunkResponse(proto.SLOW_DOWN, req.corr, K, 2000, b"budget"), 0.1)
    assert w.stats.slowdowns == 1
    assert w.requests(2.0) == []  # neither due nor timed out (a wait is no failed attempt)
    assert w.wait_s(2.0) == pytest.approx(0.35)
    again = w.requests(2.35)
    assert [(r.offset, r.count) for r in again] == [(K, 3)]
    for resp in answers(again[0]):
        w.accept(resp, 2.4)
    assert b"".join(w.ready()) == DATA[:4 * K]


def test_chunks_held_back_by_a_slow_down_are_asked_for_before_any_new_one() -> None:
    # Two requests of one chunk each in flight; the responder slows the first down and
    # answers the second. Until the first is asked again no new chunk may go out: a new
    # one asked meanwhile would take the device's share at the responder first, every
    # time, and the first bytes of the file would wait until the end.
    w = window(pace=FixedPace(window=2, batch=1, rto=5.0))
    first, second = w.requests(0.0)
    w.accept(proto.ChunkResponse(proto.SLOW_DOWN, first.corr, 0, 10, b"share"), 0.05)
    w.accept(answers(second)[0], 0.05)
    assert w.requests(0.055) == []  # room for two, but chunk 0 waits for its turn
    again = w.requests(0.07)  # 10 ms × 1.125 after the slow-down
    assert (again[0].offset, again[0].count) == (0, 1)
    assert all(r.offset > K for r in again[1:])  # new chunks only after it


def test_slow_down_past_the_limit_raises_slow_retrieval() -> None:
    w = window()
    now = 0.0
    req = w.requests(now)[0]
    with pytest.raises(SlowRetrievalError, match="held back"):
        for _ in range(3):  # 2.25 s each, 5 s allowed
            w.accept(proto.ChunkResponse(proto.SLOW_DOWN, req.corr, 0, 2000, b"b"), now)
            now += 2.25
            req = next(r for r in w.requests(now) if r.offset == 0)


def test_slow_down_for_a_request_already_answered_is_stale() -> None:
    w = window()
    req = w.requests(0.0)[0]
    for resp in answers(req):
        w.accept(resp, 0.1)
    w.accept(proto.ChunkResponse(proto.SLOW_DOWN, req.corr, 0, 2000, b"b"), 0.1)
    assert w.stats.slowdowns == 0 and w.stats.stale_responses == 1


def test_link_restored_re_requests_lost_answers_at_once_and_waits_for_requeued_ones() -> None:
    w = window()
    lost, requeued = w.requests(0.0)
    w.link_restored(0.9, lost={lost.corr}, requeued={requeued.corr})
    again = w.requests(0.9)
    assert [(r.offset, r.count) for r in again] == [(0, 4)]  # at once, no backoff
    assert again[0].rto_ms == 1  # known lost: the responder must not hold it back
    assert w.stats.chunks_resent == 4
    # The requeued request's timer restarted at 0.9: not timed out at 1.5.
    assert w.requests(1.5) == [] and w.wait_s(1.5) == pytest.approx(0.4)
    assert w.in_flight() == {again[0].corr, requeued.corr}


def test_endless_data_beyond_the_signed_length_is_refused() -> None:
    w = window()
    req = w.requests(0.0)[0]
    with pytest.raises(EndlessDataError, match="offers 20480 bytes but at most 10240"):
        w.accept(proto.ChunkResponse(proto.OK, req.corr, 0, 2 * len(DATA), DATA[:K]), 0.0)


def test_endless_data_beyond_the_cap_is_refused_when_the_size_is_unknown() -> None:
    w = window(length=None, max_length=4 * K)
    req = w.requests(0.0)[0]
    with pytest.raises(EndlessDataError, match="at most 4096"):
        w.accept(proto.ChunkResponse(proto.OK, req.corr, 0, 1 << 30, DATA[:K]), 0.0)


def test_signed_length_past_the_limits_is_refused_before_any_request() -> None:
    with pytest.raises(EndlessDataError, match="signed length 10240 bytes exceeds"):
        window(max_length=4 * K)
    with pytest.raises(EndlessDataError, match="limit of 2048 bytes"):
        window(FetchConfig(chunk_size=K, min_chunk_size=K, max_artifact_bytes=2 * K))


def test_paths_outside_metadata_and_targets_are_refused() -> None:
    with pytest.raises(TransportError, match="not a repository path"):
        window(length=None, path="../etc/passwd")


def test_chunk_longer_than_asked_is_refused() -> None:
    w = window()
    req = w.requests(0.0)[0]
    with pytest.raises(EndlessDataError, match="asked for 1024 bytes"):
        w.accept(proto.ChunkResponse(proto.OK, req.corr, 0, len(DATA), DATA[:K + 1]), 0.0)


def test_short_chunk_before_the_end_is_refused_and_at_the_end_accepted() -> None:
    w = window()
    req = w.requests(0.0)[0]
    with pytest.raises(TransportError, match="short chunk at offset 0"):
        w.accept(proto.ChunkResponse(proto.OK, req.corr, 0, len(DATA), DATA[:10]), 0.0)
    odd = DATA[:K + 10]
    w = window(length=len(odd))
    reqs = w.requests(0.0)
    assert [(r.offset, r.count, r.length) for r in reqs] == [(0, 2, K)]
    for resp in answers(reqs[0], odd):
        w.accept(resp, 0.0)
    assert b"".join(w.ready()) == odd and w.done


def test_not_found_and_refusals_end_the_transfer() -> None:
    w = window()
    req = w.requests(0.0)[0]
    # An error answers the whole request: it is matched to any chunk it covered.
    with pytest.raises(RemoteNotFoundError, match="not in the repository"):
        w.accept(proto.ChunkResponse(proto.NOT_FOUND, req.corr, 0, 0, b"no such file"), 0.0)
    w = window()
    req = w.requests(0.0)[0]
    with pytest.raises(TransportError, match="refused the request: bad"):
        w.accept(proto.ChunkResponse(proto.BAD_REQUEST, req.corr, 0, 0, b"bad"), 0.0)


def test_answer_at_another_offset_than_asked_is_refused() -> None:
    w = window(pace=FixedPace(window=1, batch=1))
    req = w.requests(0.0)[0]
    w.accept(proto.ChunkResponse(proto.OK, req.corr, K, len(DATA), DATA[K:2 * K]), 0.0)
    assert w.stats.stale_responses == 1  # not a chunk we asked for under this id


def test_the_pace_alone_decides_how_much_is_in_flight_and_hears_each_answer() -> None:
    pace = FixedPace(window=1, batch=1)
    w = window(pace=pace)
    now = 0.0
    while not w.done:
        reqs = w.requests(now)
        assert chunks_of(reqs) == [w.delivered]
        now += 0.02
        for resp in answers(reqs[0]):
            w.accept(resp, now)
        list(w.ready())
    assert pace.rtts == pytest.approx([0.02] * 10) and pace.timeouts == 0


def test_progress_reports_bytes_rate_and_time_left() -> None:
    w = window(pace=FixedPace(window=1, batch=1))
    now = 0.0
    w.progress(now)
    for _ in range(4):  # 1 KiB a second
        (req,) = w.requests(now)
        now += 1.0
        w.accept(answers(req)[0], now)
        list(w.ready())
        p = w.progress(now)
    assert (p.done, p.total, p.rate, p.elapsed_s) == (4 * K, len(DATA), K, 4.0)
    assert p.eta_s == pytest.approx(6.0)
    assert p.as_dict()["rate_bytes_s"] == K


# -- flow control on a simulated link -------------------------------------------------------


class SimLink:
    """A link of ``rate_bps`` towards the device with ``delay_s`` each way and a FIFO
    queue in front of it; the responder answers at once, ``overhead`` bytes per message.
    Drives a window to the end on a virtual clock and records what the link did."""

    def __init__(self, rate_bps: float, delay_s: float = 0.02, overhead: int = 100) -> None:
        self.rate = rate_bps / 8
        self.delay = delay_s
        self.overhead = overhead
        self.sent = 0
        self.busy_s = 0.0
        self.max_queue_s = 0.0

    def run(self, w: ChunkWindow, data: bytes, *, cut: tuple[float, float] | None = None,
            limit_s: float = 10_000.0) -> float:
        now, free = 0.0, 0.0
        order = itertools.count()
        arriving: list[tuple[float, int, proto.ChunkResponse]] = []
        while not w.done:
            assert now < limit_s, "the transfer never ends"
            for req in w.requests(now):
                at = now + self.delay
                for resp in answers(req, data):
                    start = max(free, at)
                    if cut is not None and cut[0] <= start < cut[1]:
                        start = cut[1]
                    self.max_queue_s = max(self.max_queue_s, start - at)
                    took = (len(resp.payload) + self.overhead) / self.rate
                    free = start + took
                    self.busy_s += took
                    self.sent += len(resp.payload)
                    heapq.heappush(arriving, (free + self.delay, next(order), resp))
            wait = w.wait_s(now)
            if arriving and arriving[0][0] <= now + wait:
                now = max(now, arriving[0][0])
                while arriving and arriving[0][0] <= now:
                    w.accept(heapq.heappop(arriving)[2], now)
                list(w.ready())
            else:
                now += max(wait, 1e-4)
        return now


@pytest.mark.parametrize("rate_bps", [256e3, 1e6, 10e6])
def test_on_a_thin_link_nothing_is_sent_twice_and_the_link_stays_busy(rate_bps: float) -> None:
    data = bytes(range(256)) * (1024 * 4)  # 1 MiB
    link = SimLink(rate_bps)
    w = window(FetchConfig(), adaptive=True, length=len(data))
    took = link.run(w, data)
    # The old fixed window (64 chunks of 64 KiB, 5 s timeout) sent 12× the file at 1 Mbit/s.
    assert link.sent == len(data)
    assert w.stats.chunks_resent == w.stats.duplicates == w.stats.timeouts == 0
    # Busy almost all the time (the start and the last round trip excepted) ...
    assert link.busy_s >= 0.8 * took
    # ... with a queue of about one round trip, not of the whole window.
    assert link.max_queue_s <= 4 * (w.pace.min_rtt + 2 * w.pace.chunk_size / link.rate)


def test_chunks_are_small_on_a_slow_link_and_large_on_a_fast_one() -> None:
    data = bytes(range(256)) * (1024 * 2)
    sizes = {}
    for rate in (256e3, 10e6):
        w = window(FetchConfig(), adaptive=True, length=len(data))
        SimLink(rate).run(w, data)
        sizes[rate] = w.pace.chunk_size
    assert sizes[256e3] == 8 * K  # about a quarter second of the link each
    assert sizes[10e6] == FetchConfig().chunk_size  # the largest allowed


def test_a_cut_link_costs_one_chunk_per_doubled_timeout_and_the_transfer_resumes() -> None:
    data = bytes(range(256)) * (1024 * 4)
    link = SimLink(1e6)
    w = window(FetchConfig(stall_timeout=60.0), adaptive=True, length=len(data))
    link.run(w, data, cut=(2.0, 22.0))
    assert w.stats.timeouts <= 7  # RTO ~0.5 s doubling across 20 s
    assert link.sent - len(data) <= w.stats.timeouts * FetchConfig().chunk_size
    assert w.stats.duplicates == w.stats.chunks_resent


def test_rto_is_srtt_plus_four_rttvar_and_backs_off_while_nothing_arrives() -> None:
    pace = BbrPace(FetchConfig(chunk_timeout=0.5, max_rto=20.0))
    assert pace.rto == 0.5  # before any sample
    fast = 1e9  # bytes/s: a chunk's own time on the link is negligible
    pace.answered(1.0, 1.0, K, fast, True)
    assert (pace.srtt, pace.rttvar, pace.rto) == (1.0, 0.5, 3.0)
    pace.answered(2.0, 0.5, K, fast, False)  # RFC 6298: β = 1/4, α = 1/8
    assert pace.rttvar == pytest.approx(0.75 * 0.5 + 0.25 * 0.5)
    assert pace.srtt == pytest.approx(0.875 * 1.0 + 0.125 * 0.5)
    base = pace.rto
    pace.timed_out(3.0)
    pace.timed_out(4.0)
    assert pace.rto == pytest.approx(4 * base)
    for _ in range(10):
        pace.timed_out(5.0)
    assert pace.rto == 20.0  # capped at max_rto
    pace.answered(6.0, 0.01, K, fast, False)
    assert pace.backoff == 0
    for _ in range(50):
        pace.answered(7.0, 0.001, K, fast, False)
    assert pace.rto == MIN_RTO_S


def test_rto_covers_a_chunks_own_time_on_the_link_however_small_the_rtt() -> None:
    # RTTs measured on tiny answers (TUF metadata riding the link's burst allowance)
    # must not make the first full chunk on a slow link look lost.
    pace = BbrPace(FetchConfig(chunk_timeout=2.0))
    for _ in range(20):
        pace.answered(1.0, 0.001, 500, None, False)
    assert pace.rto == 2.0  # rate unknown: the configured first timeout
    slow = 32_000.0  # 256 kbit/s
    pace.answered(2.0, 0.3, pace.chunk_size, slow, True)
    assert pace.rto >= 2 * pace.chunk_size / slow
