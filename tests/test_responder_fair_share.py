"""The responder's fair share, without I/O: who counts as asking, and whether a device
holds more than its share of the responses waiting to be written.

Besides the rule itself, a small model of the responder's outgoing queue (written
first in, first out, a fixed number of bytes per tick) shows what the rule does to
throughput: the numbers are bytes, never wall-clock time."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.transport import DeviceLimits
from edge_sdk.transport._responder import _FairShare

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB


def share(slack: int = 1 * MiB, active_s: float = 1.0) -> _FairShare:
    return _FairShare(active_s, slack, limit=1000)


@pytest.mark.parametrize(("asking", "mine", "total", "n", "held"), [
    # Alone: never held, whatever it holds (the ceiling and the queue bounds do that).
    (1, 0, 0, CHUNK, False),
    (1, 60 * MiB, 60 * MiB, CHUNK, False),
    # Two asking, the other holding nothing: the mean is half of what waits.
    (2, 1 * MiB, 1 * MiB, CHUNK, False),   # 1 MiB + 64 KiB <= 1 MiB slack + mean
    (2, 3 * MiB, 3 * MiB, CHUNK, True),    # 3 MiB + 64 KiB > 1 MiB + ~1.5 MiB
    # Two asking and holding the same: neither is over.
    (2, 4 * MiB, 8 * MiB, CHUNK, False),
    # Ten asking: one holding everything is over; one at the mean is not.
    (10, 2 * MiB, 2 * MiB, CHUNK, True),
    (10, 1 * MiB, 10 * MiB, CHUNK, False),
    # A device holding less than the others is never held.
    (10, 0, 30 * MiB, CHUNK, False),
], ids=["alone-empty", "alone-full", "two-within-slack", "two-over", "two-equal",
        "ten-hog", "ten-at-mean", "ten-light"])
def test_a_device_is_held_only_above_the_mean_of_the_asking_devices(
        asking: int, mine: int, total: int, n: int, held: bool) -> None:
    s = share()
    for i in range(asking):
        s.asked(f"d{i}", 0.0)
    assert (s.over(mine, total, n, 0.5) > 0) is held


def test_devices_that_stopped_asking_take_nothing_from_a_lone_device() -> None:
    s = share(active_s=1.0)
    for i in range(50):
        s.asked(f"idle{i}", 0.0)  # known to the responder, asked once
    s.asked("d", 0.5)
    # While they were asking, holding everything that waits was over the share ...
    assert s.active(0.9) == 51 and s.over(60 * MiB, 60 * MiB, CHUNK, 0.9) > 0
    # ... and once they have not asked for a second it is not.
    s.asked("d", 5.0)
    assert s.active(5.0) == 1
    assert not s.over(60 * MiB, 60 * MiB, CHUNK, 5.0)


def test_the_table_of_asking_devices_is_bounded() -> None:
    s = _FairShare(1.0, MiB, limit=3)
    for i in range(10):
        s.asked(f"d{i}", 0.0)
    assert s.active(0.0) == 3 and list(s.seen) == ["d7", "d8", "d9"]


@pytest.mark.parametrize(("key", "value"), [("share_slack_bytes", 1000), ("active_ms", 0),
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
            if tick < d.wait_until:
                continue
            budget = d.rate if d.rate is not None else bound
            while d.outstanding + CHUNK <= d.window and budget >= CHUNK:
                s.asked(d.name, now)
                if total + CHUNK > bound or d.queued + CHUNK > inflight:
                    break
                excess = s.over(d.queued, total, CHUNK, now) if rule else 0
                if excess:
                    d.held += 1
                    d.wait_until = tick + math.ceil(s.wait_s(excess, longest_wait) * 1000)
                    break
                queue.append((d, CHUNK))
                total += CHUNK
                d.queued += CHUNK
                d.outstanding += CHUNK
                budget -= CHUNK
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
    # wants 2 a tick and gets them; the two greedy ones split the other 18.
    devs = [Device("light", window=4 * MiB, rate=2 * CHUNK),
            Device("g1", window=32 * MiB), Device("g2", window=32 * MiB)]
    simulate(devs, capacity=20 * CHUNK, ticks=3000)
    light, g1, g2 = devs
    assert light.held == 0 and light.received >= 2990 * 2 * CHUNK
    for g in (g1, g2):
        assert abs(g.received / (2999 * 9 * CHUNK) - 1) < 0.1, g


def test_in_the_model_a_flooder_is_held_to_its_share_while_an_honest_device_downloads() -> None:
    # The flooder asks for everything, all the time; the honest device keeps the default
    # fetcher's most (4 MiB) asked for. Each gets about half; the flooder is the one held.
    def run(rule: bool) -> list[Device]:
        devs = [Device("flood", window=1 << 40), Device("honest", window=4 * MiB)]
        simulate(devs, capacity=4 * CHUNK, ticks=4000, rule=rule)
        return devs

    flooder, honest = run(rule=True)
    assert flooder.held > 10 * honest.held
    # Half, give or take the slack (4 MiB against at most 4 MiB + 2 × 512 KiB).
    assert honest.received >= 0.42 * (honest.received + flooder.received)
    # Without the rule the flooder holds the whole per-device cap (8 MiB) of the queue.
    flooder, honest = run(rule=False)
    assert honest.received < 0.36 * (honest.received + flooder.received)
