"""The chunk window on its own: no broker, no threads, time passed in as floats.

Each test drives :class:`ChunkWindow` the way ``ChunkClient`` does (ask for
``requests(now)``, feed answers to ``accept``, take ``ready()``) and answers
requests the way the responder does.
"""

from __future__ import annotations

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
from edge_sdk.transport._window import MAX_WAIT_S, ChunkWindow, Pace

K = 1024
DATA = bytes(range(256)) * 40  # 10 KiB: ten 1 KiB chunks
CFG = FetchConfig(chunk_size=K, window=8, batch=4, chunk_timeout=1.0, retries=2,
                  backoff_base=0.25, backoff_max=2.0, max_slowdown_s=5.0)


def window(config: FetchConfig = CFG, path: str = "targets/m/1.0/x.onnx",
           **kw: object) -> ChunkWindow:
    ids = itertools.count(1)
    kw.setdefault("length", len(DATA))
    # rng 0.5: every jitter factor is exactly 1 (backoff) or 1.125 (slow-down).
    return ChunkWindow(path, config, rng=lambda: 0.5,
                       new_id=lambda n: next(ids).to_bytes(n, "big"), **kw)  # type: ignore[arg-type]


def answers(req: proto.ChunkRequest, data: bytes = DATA) -> list[proto.ChunkResponse]:
    """What an honest responder sends for ``req``: one OK message per chunk."""
    out = []
    for i in range(req.count):
        off = req.offset + i * req.length
        out.append(proto.ChunkResponse(proto.OK, req.corr, off, len(data),
                                       data[off:off + req.length]))
    return out


def chunks_of(reqs: list[proto.ChunkRequest]) -> list[int]:
    return [r.offset + i * r.length for r in reqs for i in range(r.count)]


def run_honest(w: ChunkWindow, now: float = 0.0) -> bytes:
    got = bytearray()
    while not w.done:
        reqs = w.requests(now)
        assert reqs, "the window stalled with nothing to ask for"
        for req in reqs:
            for resp in answers(req):
                w.accept(resp, now)
        for data in w.ready():
            got += data
        now += 0.01
    return bytes(got)


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


def test_whole_file_arrives_intact_with_any_window_and_batch() -> None:
    for win, batch in [(1, 1), (3, 2), (8, 8), (64, 8)]:
        cfg = FetchConfig(chunk_size=K, window=win, batch=batch)
        assert run_honest(window(cfg)) == DATA


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


def test_duplicate_answer_is_counted_stale_and_ignored() -> None:
    w = window()
    req = w.requests(0.0)[0]
    resp = answers(req)[0]
    w.accept(resp, 0.1)
    w.accept(resp, 0.1)
    w.accept(proto.ChunkResponse(proto.OK, b"x" * 16, 0, len(DATA), DATA[:K]), 0.1)
    assert w.stats.chunks_received == 1 and w.stats.stale_responses == 2
    assert b"".join(w.ready()) == DATA[:K]


def test_unanswered_chunk_is_asked_again_after_timeout_and_backoff() -> None:
    w = window(FetchConfig(chunk_size=K, window=1, batch=1, chunk_timeout=1.0,
                           backoff_base=0.25))
    req = w.requests(0.0)[0]
    assert w.wait_s(0.0) == MAX_WAIT_S  # the timeout is further away than the cap
    assert w.requests(0.9) == [] and w.wait_s(0.9) == pytest.approx(0.1)
    assert w.requests(1.0) == []  # timed out: backs off 0.25 s before asking again
    assert w.wait_s(1.0) == 0.0
    assert w.requests(1.1) == [] and w.wait_s(1.1) == pytest.approx(0.15)
    again = w.requests(1.25)
    assert [(r.offset, r.count) for r in again] == [(0, 1)] and again[0].corr != req.corr
    assert w.stats.chunks_resent == 1
    w.accept(answers(req)[0], 1.3)  # the late answer to the first request: stale
    assert w.stats.stale_responses == 1 and list(w.ready()) == []
    w.accept(answers(again[0])[0], 1.3)
    assert b"".join(w.ready()) == DATA[:K]


def test_backoff_doubles_per_attempt_up_to_the_cap() -> None:
    cfg = FetchConfig(chunk_size=K, window=1, batch=1, chunk_timeout=1.0, retries=5,
                      backoff_base=0.5, backoff_max=1.5)
    w = window(cfg)
    now = 0.0
    w.requests(now)
    gaps = []
    for _ in range(4):
        now += 1.0
        assert w.requests(now) == []  # timed out: the caller is to look again at once
        assert w.wait_s(now) == 0.0
        timed_out_at = now
        while not (reqs := w.requests(now)):
            assert 0 < w.wait_s(now) <= MAX_WAIT_S
            now += w.wait_s(now)
        assert len(reqs) == 1
        gaps.append(round(now - timed_out_at, 6))
    assert gaps == [0.5, 1.0, 1.5, 1.5]


def test_retries_exhausted_raise_slow_retrieval() -> None:
    w = window(FetchConfig(chunk_size=K, window=1, batch=1, chunk_timeout=1.0, retries=1,
                           backoff_base=0.25))
    w.requests(0.0)
    w.requests(1.0)
    assert len(w.requests(1.25)) == 1
    with pytest.raises(SlowRetrievalError, match=r"bytes 0\.\.1024 after 2 requests"):
        w.requests(2.25)


def test_resent_chunks_go_out_as_consecutive_runs() -> None:
    w = window(FetchConfig(chunk_size=K, window=8, batch=4, chunk_timeout=1.0))
    first = w.requests(0.0)
    for resp in answers(first[0])[1:3] + answers(first[1])[:1]:  # 1, 2 and 4 answered
        w.accept(resp, 0.5)
    w.requests(1.0)
    again = w.requests(1.25)
    assert [(r.offset, r.count) for r in again] == [(0, 1), (3 * K, 1), (5 * K, 3)]
    assert w.stats.chunks_resent == 5


def test_slow_down_holds_the_named_chunks_for_the_wait_it_gives() -> None:
    w = window(FetchConfig(chunk_size=K, window=4, batch=4, chunk_timeout=1.0))
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


def test_link_restored_re_requests_lost_answers_and_waits_for_requeued_ones() -> None:
    w = window()
    lost, requeued = w.requests(0.0)
    w.link_restored(0.9, lost={lost.corr}, requeued={requeued.corr})
    again = w.requests(0.9)
    assert [(r.offset, r.count) for r in again] == [(0, 4)]  # at once, no backoff
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
        window(FetchConfig(chunk_size=K, max_artifact_bytes=2 * K))


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
    w = window(FetchConfig(chunk_size=K, window=1, batch=1))
    req = w.requests(0.0)[0]
    w.accept(proto.ChunkResponse(proto.OK, req.corr, K, len(DATA), DATA[K:2 * K]), 0.0)
    assert w.stats.stale_responses == 1  # not a chunk we asked for under this id


class _OneAtATime(Pace):
    def __init__(self, config: FetchConfig) -> None:
        super().__init__(config)
        self.rtts: list[float] = []
        self.timeouts = 0

    def room(self, in_flight: int) -> int:
        return 1 if in_flight == 0 else 0

    def answered(self, now: float, rtt_s: float, nbytes: int) -> None:
        self.rtts.append(rtt_s)

    def timed_out(self, now: float) -> None:
        self.timeouts += 1


def test_the_pace_alone_decides_how_much_is_in_flight_and_hears_each_answer() -> None:
    pace = _OneAtATime(CFG)
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
