"""The responder's fair share, without I/O: who counts as asking, and whether a device
holds more than its share of the responses waiting to be written.

Besides the rule itself, a small model of the responder's outgoing queue (written
first in, first out, a fixed number of bytes per tick) shows what the rule does to
throughput: the numbers are bytes, never wall-clock time."""

from __future__ import annotations

import contextlib
import math
import socket
import sys
from collections import deque
from dataclasses import dataclass

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.transport import DeviceLimits
from edge_sdk.transport._connection import unacknowledged
from edge_sdk.transport._responder import _FairShare, _Pipe

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB


def share(slack: int = 1 * MiB, active_s: float = 1.0) -> _FairShare:
    return _FairShare(active_s, slack, limit=1000)


@pytest.mark.parametrize(("asking", "holders", "mine", "total", "n", "held"), [
    # Alone: never held, whatever it holds (the ceiling and the queue bounds do that).
    (1, 0, 0, 0, CHUNK, False),
    (1, 1, 60 * MiB, 60 * MiB, CHUNK, False),
    # Two asking: compared with what the other holds.
    (2, 1, 1 * MiB, 1 * MiB, CHUNK, True),                # the other holds nothing
    (2, 2, 1 * MiB + 256 * KiB, 2 * MiB, CHUNK, False),   # within the 1 MiB slack
    (2, 2, 3 * MiB, 3 * MiB + CHUNK, CHUNK, True),        # 3 MiB > 64 KiB + 1 MiB
    (2, 2, 4 * MiB, 8 * MiB, CHUNK, False),               # equal: neither is over
    # Ten asking: one holding most is over; one at the others' average is not.
    (10, 10, 2 * MiB, 3 * MiB, CHUNK, True),
    (10, 10, 1 * MiB, 10 * MiB, CHUNK, False),
    # Ten asking, two holding: the ones holding nothing do not lower the average.
    (10, 2, 2 * MiB, 4 * MiB, CHUNK, False),
    # A device holding nothing is never held, however much the others hold.
    (10, 9, 0, 30 * MiB, CHUNK, False),
], ids=["alone-empty", "alone-full", "two-other-empty", "two-within-slack", "two-over",
        "two-equal", "ten-hog", "ten-at-average", "ten-two-holding", "ten-light"])
def test_a_device_is_held_only_above_what_the_other_devices_with_bytes_on_the_way_hold(
        asking: int, holders: int, mine: int, total: int, n: int, held: bool) -> None:
    s = share()
    for i in range(asking):
        s.asked(f"d{i}", 0.0)
    assert (s.over(mine, total, n, holders, 0.5) > 0) is held


def test_a_chunk_counts_from_its_middle() -> None:
    # Nine devices hold 160 KiB each (slack: a fifth of that, 32 KiB): a device holding
    # 128 KiB may have a 127 KiB chunk more (its middle, 191.5 KiB, is within the share,
    # 192 KiB), one holding 160 KiB may not.
    s = share(slack=0)
    for i in range(10):
        s.asked(f"d{i}", 0.0)
    big, others = 127 * KiB, 9 * 160 * KiB
    assert not s.over(128 * KiB, others + 128 * KiB, big, 10, 0.5)
    assert s.over(160 * KiB, others + 160 * KiB, big, 10, 0.5)


def test_a_device_may_always_hold_its_part_of_a_few_milliseconds_of_the_queue() -> None:
    # The queue has been written at a rate that makes BUSY_S of it 1 MiB, a tenth of
    # that 102.4 KiB. The nine others hold 16 KiB each, so their average and the slack
    # (48 KiB) would hold a device with a 64 KiB chunk on its way; its part does not.
    s = share(slack=32 * KiB)
    for i in range(10):
        s.asked(f"d{i}", 0.0)
    s.written(0, 0.0)
    s.written(round(MiB / s.BUSY_S * 0.05), 0.05)
    assert math.isclose(s.rate * s.BUSY_S, MiB, rel_tol=1e-6)
    others = 9 * 16 * KiB
    assert not s.over(CHUNK, others + CHUNK, CHUNK, 10, 0.05)
    assert s.over(2 * CHUNK, others + 2 * CHUNK, CHUNK, 10, 0.05)


def test_devices_that_stopped_asking_take_nothing_from_a_lone_device() -> None:
    s = share(active_s=1.0)
    for i in range(50):
        s.asked(f"idle{i}", 0.0)  # known to the responder, asked once
    s.asked("d", 0.5)
    # While they were asking, holding everything that waits was over the share ...
    assert s.active(0.9) == 51 and s.over(60 * MiB, 61 * MiB, CHUNK, 2, 0.9) > 0
    # ... and once they have not asked for a second it is not.
    s.asked("d", 5.0)
    assert s.active(5.0) == 1
    assert not s.over(60 * MiB, 61 * MiB, CHUNK, 2, 5.0)


def test_the_table_of_asking_devices_is_bounded() -> None:
    s = _FairShare(1.0, MiB, limit=3)
    for i in range(10):
        s.asked(f"d{i}", 0.0)
    assert s.active(0.0) == 3 and list(s.seen) == ["d7", "d8", "d9"]


@pytest.mark.parametrize(("key", "value"), [("share_slack_bytes", -1), ("active_ms", 0),
                                            ("share_wait_ms", 0)])
def test_fair_share_settings_are_validated(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=key.split("_")[0]):
        DeviceLimits(**{key: value})  # type: ignore[arg-type]


def test_default_ceiling_is_above_a_gigabit() -> None:
    limits = DeviceLimits()
    assert limits.bytes_per_s * 8 > 1e9 * 1.25
    # A device sending the default fetcher's requests (8 chunks of 64 KiB) at 1 Gbit/s
    # stays within the request rate.
    assert limits.requests_per_s * 8 * CHUNK * 8 > 1e9 * 1.25


# -- a model of the outgoing queue -------------------------------------------------------


@dataclass
class Device:
    name: str
    window: int            # bytes it keeps asked for and not yet received
    rate: int | None = None  # bytes it wants per tick (None: as many as it may)
    chunk: int = CHUNK
    wish: int = 0          # bytes it wanted and has not asked for yet (with ``rate``)
    wait_until: int = 0
    outstanding: int = 0
    queued: int = 0
    received: int = 0
    held: int = 0


def simulate(devices: list[Device], *, capacity: int, ticks: int, rule: bool = True,
             slack: int = DeviceLimits.share_slack_bytes,
             longest_wait: float = DeviceLimits.share_wait_ms / 1000,
             bound: int = 64 * MiB, inflight: int = DeviceLimits.max_inflight_bytes) -> None:
    """Ticks of 1 ms: every device asks (in turns) for chunks while its window and wish
    allow, the queue bounds and the rule deciding (``held`` counts the rule's refusals;
    a device held waits what the rule says); then the queue writes ``capacity`` bytes,
    oldest first."""
    s = share(slack=slack)
    queue: deque[tuple[Device, int]] = deque()
    total = written = 0
    for tick in range(ticks):
        now = tick * 0.001
        s.written(written, now)
        order = devices[tick % len(devices):] + devices[:tick % len(devices)]
        for d in order:
            if d.rate is not None:
                # What it could not ask for while held it asks for later (its own link
                # brings it at that rate: a device catching up, not a flood).
                d.wish = min(d.window, d.wish + d.rate)
            if tick < d.wait_until:
                continue
            budget = d.wish if d.rate is not None else bound
            n = d.chunk
            while d.outstanding + n <= d.window and budget >= n:
                s.asked(d.name, now)
                if total + n > bound or d.queued + n > inflight:
                    break
                holders = sum(1 for x in devices if x.queued or x is d)
                excess = s.over(d.queued, total, n, holders, now) if rule else 0
                if excess:
                    d.held += 1
                    d.wait_until = tick + math.ceil(s.wait_s(excess, longest_wait) * 1000)
                    break
                queue.append((d, n))
                total += n
                d.queued += n
                d.outstanding += n
                budget -= n
                d.wish -= n if d.rate is not None else 0
        left = capacity
        while queue and left >= queue[0][1]:
            d, n = queue.popleft()
            left -= n
            total -= n
            written += n
            d.queued -= n
            d.outstanding -= n
            d.received += n


def test_in_the_model_a_lone_device_gets_the_whole_capacity() -> None:
    (d,) = devs = [Device("lone", window=32 * MiB)]
    simulate(devs, capacity=8 * CHUNK, ticks=1000)
    assert d.held == 0
    assert d.received >= 999 * 8 * CHUNK


def test_in_the_model_greedy_devices_with_unequal_windows_get_equal_shares() -> None:
    # One device keeps 32 MiB asked for, nine keep 4 MiB (the default fetcher's most):
    # without the rule the big window takes most of the queue and so of the bytes.
    def run(rule: bool) -> list[Device]:
        devs = [Device("big", window=32 * MiB)] + [Device(f"d{i}", window=4 * MiB)
                                                      for i in range(9)]
        simulate(devs, capacity=10 * CHUNK, ticks=3000, rule=rule)
        return devs

    unfair = run(rule=False)
    assert unfair[0].received > 1.5 * unfair[1].received
    devs = run(rule=True)
    equal = sum(d.received for d in devs) / len(devs)
    assert all(abs(d.received / equal - 1) < 0.2 for d in devs), \
        [round(d.received / equal, 2) for d in devs]
    # And the queue kept writing all along: nothing of the capacity was lost.
    assert sum(d.received for d in devs) >= 2990 * 10 * CHUNK


def test_in_the_model_a_device_asking_less_than_its_share_leaves_the_rest_to_others() -> None:
    # Capacity 20 chunks a tick, three devices: a fair share is 6.7 chunks. The light one
    # wants 2 a tick and gets them, give or take a few per cent: when it asks for its two
    # at the start of a tick, with the queue empty, the second one is over the mean and
    # waits a tick. The two greedy ones split the other 18.
    devs = [Device("light", window=4 * MiB, rate=2 * CHUNK),
            Device("g1", window=32 * MiB), Device("g2", window=32 * MiB)]
    simulate(devs, capacity=20 * CHUNK, ticks=3000)
    light, g1, g2 = devs
    assert light.received >= 0.95 * 3000 * 2 * CHUNK
    for g in (g1, g2):
        assert abs(g.received / (2999 * 9 * CHUNK) - 1) < 0.1, g


def test_in_the_model_a_flooder_is_held_to_its_share_while_an_honest_device_downloads() -> None:
    # The flooder asks for everything, all the time; the honest device keeps the default
    # fetcher's most (4 MiB) asked for, more than half the queue: each gets about half
    # (both are held now and then).
    def run(rule: bool) -> list[Device]:
        devs = [Device("flood", window=1 << 40), Device("honest", window=4 * MiB)]
        simulate(devs, capacity=4 * CHUNK, ticks=4000, rule=rule)
        return devs

    flooder, honest = run(rule=True)
    assert flooder.held > 0
    # At most the others' average and a fifth (the slack on a deep queue).
    assert honest.received >= 0.44 * (honest.received + flooder.received)
    # Without the rule the flooder holds the whole per-device cap (8 MiB) of the queue.
    flooder, honest = run(rule=False)
    assert honest.received < 0.36 * (honest.received + flooder.received)


def test_in_the_model_bigger_chunks_buy_no_bigger_share_of_a_shallow_queue() -> None:
    # Nine devices keep two 64 KiB chunks asked for (what a pace that measured the link
    # keeps), one keeps 32 MiB in 127 KiB chunks: the queue holds a few chunks per device
    # (about 9 ms of it), so a rule that let a device one chunk over the others would
    # give the big chunks about twice their bytes.
    def run(rule: bool) -> list[Device]:
        devs = [Device("big", window=32 * MiB, chunk=127 * KiB)] + [
            Device(f"d{i}", window=2 * CHUNK) for i in range(9)]
        simulate(devs, capacity=2 * CHUNK, ticks=3000, rule=rule)
        return devs

    unfair = run(rule=False)
    assert unfair[0].received > 2 * unfair[1].received
    devs = run(rule=True)
    small = sum(d.received for d in devs[1:]) / 9
    # At most what the others hold and a fifth (the slack), give or take a chunk's rounding.
    assert abs(devs[0].received / small - 1) < 0.25, [round(d.received / small, 2) for d in devs]
    assert sum(d.received for d in devs) >= 2990 * 2 * CHUNK


# -- what is on its way -------------------------------------------------------------------


def test_a_devices_responses_are_on_their_way_until_the_bytes_before_them_have_left() -> None:
    pipe = _Pipe()
    pipe.add("a", 100)
    pipe.add("b", 50)
    pipe.add("a", 100)  # handed over: bytes 0-100 a, 100-150 b, 150-250 a
    pipe.advance(120)   # the first 120 left: a's first response, not yet b's
    assert pipe.held == {"a": 100, "b": 50} and pipe.nbytes == 150
    pipe.advance(250)
    assert pipe.held == {} and pipe.nbytes == 0


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is Linux's")
def test_bytes_a_socket_still_holds_count_as_on_their_way() -> None:
    # A peer that does not read: what the kernel took from us but could not deliver
    # is what the responder's share must still count (its queue is empty by then).
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with sender, peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sender.setblocking(False)
            written = 0
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):
                    written += sender.send(b"x" * 65536)
            assert 0 < unacknowledged(sender) <= written
            assert unacknowledged(None) == 0
