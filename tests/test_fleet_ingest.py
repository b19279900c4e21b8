"""The registry's intake, without a broker: what one device may put in the queue, how the
queue stays fair when it is full, and how loss is counted. (The same against a real
Mosquitto and `edge-sdk serve`: tests/test_fleet_flood.py.)"""

from __future__ import annotations

import pytest

from edge_sdk.fleet import FleetUsageError, RegistryConfig
from edge_sdk.fleet._ingest import Intake

T0 = 1_000_000.0


def intake(**kw: object) -> Intake:
    return Intake(RegistryConfig(**kw))  # type: ignore[arg-type]


def counts(i: Intake) -> dict[str, tuple[int, int, str | None]]:
    return {d: (c.dropped, c.lost, c.reason) for d, c in i.counts()[2].items()}


def test_a_device_over_its_report_rate_gets_its_own_reports_dropped_and_counted() -> None:
    i = intake(reports_per_s=10, burst_reports=20)
    took = [i.offer("events", "mal", b"{}", T0) for _ in range(100)]
    assert took.count(True) == 20
    # Another device at the same moment is not touched by it.
    assert all(i.offer("events", "honest", b"{}", T0) for _ in range(20))
    # A second later the flooder has earned ten more.
    assert sum(i.offer("events", "mal", b"{}", T0 + 1) for _ in range(50)) == 10
    assert counts(i) == {"mal": (120, 0, "reports_per_s")}


def test_a_report_over_the_size_cap_or_the_byte_budget_is_dropped_before_parsing() -> None:
    i = intake(max_report_bytes=1000, bytes_per_s=1000, burst_bytes=3000)
    assert not i.offer("events", "mal", b"x" * 1001, T0)
    assert counts(i) == {"mal": (1, 0, "max_report_bytes")}
    assert [i.offer("state", "mal", b"x" * 1000, T0) for _ in range(4)] == [True] * 3 + [False]
    assert counts(i) == {"mal": (1, 0, "bytes_per_s")}
    assert i.offer("state", "mal", b"x" * 1000, T0 + 1)  # a second's worth came back


def test_a_full_queue_drops_the_oldest_report_of_the_device_holding_most_of_it() -> None:
    # Budgets large enough to let the flooder fill the queue: only fairness is left.
    i = intake(max_report_bytes=1000, burst_bytes=10**9, bytes_per_s=10**9,
               burst_reports=10**6, reports_per_s=10**6, max_queue_bytes=20 * 1256)
    for n in range(4):
        assert i.offer("events", "honest", b"h%03d" % n + b"-" * 996, T0)
    for n in range(100):
        assert i.offer("events", "mal", b"m%03d" % n + b"-" * 996, T0)
    # The honest device's reports all stayed; the flooder keeps its newest 16.
    left = i.take(1000)
    assert [p[:4] for _, d, p, _ in left if d == "honest"] == [b"h000", b"h001", b"h002",
                                                                b"h003"]
    mal = [p[:4] for _, d, p, _ in left if d == "mal"]
    assert mal == [b"m%03d" % n for n in range(84, 100)]
    assert counts(i) == {"mal": (84, 0, "max_queue_bytes")}
    assert i.backlog() == (0, 0)


def test_the_writer_takes_the_devices_reports_in_turn_each_in_order() -> None:
    i = intake()
    for n in range(50):
        i.offer("events", "mal", b"%d" % n, T0)
    i.offer("state", "honest", b"s1", T0)
    i.offer("events", "honest", b"e1", T0)
    first = i.take(4)
    assert [(d, p) for _, d, p, _ in first] == [("mal", b"0"), ("honest", b"s1"),
                                                 ("mal", b"1"), ("honest", b"e1")]


def test_gaps_in_a_devices_event_numbers_are_lost_unless_its_drops_explain_them() -> None:
    i = intake(reports_per_s=1, burst_reports=1)
    assert i.sequence("d", 1, T0) == 0
    assert i.sequence("d", 2, T0) == 0
    assert i.sequence("d", 6, T0) == 3  # 3, 4, 5 never came
    # Two of its events dropped here (over its rate): a gap of three loses one.
    assert i.offer("events", "d", b"{}", T0)
    assert not i.offer("events", "d", b"{}", T0)
    assert not i.offer("events", "d", b"{}", T0)
    assert i.sequence("d", 10, T0) == 1
    # A heartbeat saying 12 were sent: 11 and 12 never came.
    assert i.sequence("d", 12, T0, sent=True) == 2
    assert i.sequence("d", 12, T0, sent=True) == 0
    assert i.sequence("d", 1, T0) == 0  # a reset agent starts again from 1
    assert i.sequence("d", 2, T0) == 0
    assert counts(i) == {"d": (2, 6, "lost")}


def test_caught_up_is_when_the_oldest_report_not_yet_written_came_in() -> None:
    i = intake()
    assert i.caught_up(T0) == T0
    i.offer("events", "a", b"{}", T0 + 1)
    i.offer("events", "b", b"{}", T0 + 2)
    assert i.caught_up(T0 + 9) == T0 + 1
    taken = i.take(1)
    assert taken[0][1] == "a"
    assert i.caught_up(T0 + 9) == T0 + 1  # being written: not yet
    i.done()
    assert i.caught_up(T0 + 9) == T0 + 2
    i.take(10)
    i.done()
    assert i.caught_up(T0 + 9) == T0 + 9


@pytest.mark.parametrize(("setting", "why"), [
    ("reports_per_s=0", "registry reports_per_s: 0.0 must be > 0"),
    ("burst_bytes=10", "registry burst_bytes: 10 must be at least max_report_bytes"),
    ("max_queue_bytes=100", "registry max_queue_bytes: 100 must hold at least one"),
    ("events_per_device=0", "registry events_per_device: 0 must be a whole number"),
    ("nope=1", "--registry 'nope=1' must be KEY=N with KEY one of max_report_bytes"),
    ("heartbeat_s=soon", "--registry heartbeat_s: 'soon' is not a number"),
    ("silent_after_missed=2.5", "--registry silent_after_missed: '2.5' is not a whole"),
])
def test_a_bad_registry_setting_is_refused_naming_its_key(setting: str, why: str) -> None:
    with pytest.raises(FleetUsageError, match=why.replace("(", r"\(")):
        RegistryConfig.parse([setting])


def test_registry_settings_parse_into_the_config() -> None:
    cfg = RegistryConfig.parse(["reports_per_s=50", "events_per_device=10"])
    assert (cfg.reports_per_s, cfg.events_per_device) == (50.0, 10)
    assert RegistryConfig(heartbeat_s=2, silent_after_missed=3).silent_after_s == 6
