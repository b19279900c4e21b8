"""The latency ratios and the choice rule: a choice that does not flip with machine load.

Most tests feed ``select`` hand-made per-round timings (deterministic, no timing
thresholds); one converts a real model twice while a bounded busy loop loads the CPU.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters import ConvertConfig, convert
from converters._candidates import CandidateConfig
from converters._cli import summary
from converters._measure import (
    Accuracy,
    MeasureConfig,
    Measurement,
    Ratio,
    measure_candidates,
    round_ratios,
    select,
)
from converters._report import candidate_rows, latency_fields, measured_status
from tests import _convert_models as M

TOL = 0.05


def _m(name: str, rounds: tuple[float, ...], size: int, scheme: str = "int8-dynamic",
       drop: float = 0.001) -> Measurement:
    acc = Accuracy("cosine", 1 - drop, drop, {"y": 1 - drop}, 10)
    return Measurement(name, scheme, name, size, latency_ms=float(np.median(rounds)),
                       latency_rounds_ms=rounds, accuracy=acc)


# The baseline's per-round figures under load that comes and goes: 10 ms idle, up to 5×
# that when a neighbour's job runs through a round.
LOADED = (10.0, 31.0, 12.0, 48.0, 11.0, 25.0, 10.5)
FP32 = _m("fp32", LOADED, 100, "none", drop=0.0)


def _scaled(factors: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b * f for b, f in zip(LOADED, factors, strict=True))


def test_round_ratios_cancel_load_that_hits_a_whole_round() -> None:
    r = round_ratios(_scaled((0.5,) * 7), LOADED)
    assert r.median == pytest.approx(0.5) and r.spread == pytest.approx(0.0) and r.rounds == 7
    assert r.status(TOL) == "faster"
    # The plain latencies, compared as medians of the rounds, would say little: 0.5× of
    # a 12 ms median is within the baseline's own 10-48 ms range.


def test_round_ratios_report_the_interquartile_range_of_the_per_round_ratios() -> None:
    r = round_ratios((1.0, 2.0, 3.0, 4.0, 5.0), (1.0,) * 5)
    assert (r.q1, r.median, r.q3, r.spread) == (2.0, 3.0, 4.0, 2.0)
    with pytest.raises(ValueError):
        round_ratios((1.0, 2.0), (1.0,))


def test_faster_needs_the_upper_quartile_below_one() -> None:
    assert Ratio(0.80, 0.70, 0.99, 7).status(TOL) == "faster"
    assert Ratio(0.80, 0.70, 1.01, 7).status(TOL) == "same"


def test_slower_needs_the_lower_quartile_above_one_plus_the_tolerance() -> None:
    assert Ratio(1.30, 1.06, 1.40, 7).status(TOL) == "slower"
    assert Ratio(1.30, 1.04, 1.40, 7).status(TOL) == "same"
    assert Ratio(1.30, 1.04, 1.40, 7).status(0.0) == "slower"


def test_a_noisy_ratio_whose_band_reaches_the_fastest_ties_and_the_smaller_wins() -> None:
    fast = _m("int8-static", _scaled((0.70,) * 7), 60, "int8-static")
    # Median 0.78× fp32, 1.11× the fastest; but its per-round ratios to the fastest
    # spread 0.86-1.29 and their lower quartile is within 1 + tolerance: the same.
    noisy = _m("fp16", _scaled((0.60, 0.66, 0.78, 0.84, 0.90, 0.79, 0.64)), 40, "fp16")
    sel = select([FP32, fast, noisy], baseline="fp32", max_drop=0.01, prefer="latency")
    assert sel.chosen.name == "fp16"
    assert "as fast as int8-static within the noise band" in sel.why
    # The same median without the noise is told apart: the faster one stays.
    quiet = _m("fp16", _scaled((0.78,) * 7), 40, "fp16")
    sel = select([FP32, fast, quiet], baseline="fp32", max_drop=0.01, prefer="latency")
    assert sel.chosen.name == "int8-static"


def test_a_faster_median_inside_the_band_is_not_called_faster() -> None:
    # 0.90× fp32 at the median, but q3 is above 1: within the noise band, not faster.
    cand = _m("int8-dynamic", _scaled((0.80, 0.85, 0.90, 1.02, 1.04, 1.06, 0.88)), 60)
    sel = select([FP32, cand], baseline="fp32", max_drop=0.01, prefer="latency")
    assert sel.latency_status("int8-dynamic") == "same"
    # Equally fast within the band: the smaller of the two, not "the faster median".
    assert sel.chosen.name == "int8-dynamic"
    big = replace(cand, size_bytes=150)
    sel = select([FP32, big], baseline="fp32", max_drop=0.01, prefer="latency")
    assert sel.chosen.name == "fp32"


@pytest.mark.parametrize("prefer", ["latency", "balanced"])
def test_a_tie_goes_to_the_smallest_not_to_the_hair_faster(prefer: str) -> None:
    # 40 is not under half of 60: balanced's size trade does not apply, only the tie.
    hair_faster = _m("a-fast", _scaled((0.600, 0.61, 0.59, 0.60, 0.60, 0.61, 0.60)), 60)
    smaller = _m("b-small", _scaled((0.610, 0.60, 0.62, 0.61, 0.61, 0.60, 0.61)), 40)
    for ms in ([FP32, hair_faster, smaller], [smaller, FP32, hair_faster]):
        sel = select(ms, baseline="fp32", max_drop=0.01, prefer=prefer)
        assert sel.chosen.name == "b-small"


@pytest.mark.parametrize("prefer", ["latency", "balanced"])
def test_equal_sizes_tie_by_the_fixed_scheme_order_whichever_measured_faster(
        prefer: str) -> None:
    # Names sort against the scheme order (none, fp16, int8-dynamic, int8-static), so
    # only the scheme order picks "z-half".
    a = _scaled((0.60,) * 7)
    b = _scaled((0.61,) * 7)
    for fp16_rounds, int8_rounds in ((a, b), (b, a)):
        half = _m("z-half", fp16_rounds, 50, "fp16")
        int8 = _m("a-int8", int8_rounds, 50, "int8-static")
        for ms in ([FP32, half, int8], [FP32, int8, half]):
            sel = select(ms, baseline="fp32", max_drop=0.01, prefer=prefer)
            assert sel.chosen.name == "z-half"


def test_auto_never_takes_a_candidate_the_band_calls_slower() -> None:
    slow = _m("int8-dynamic", _scaled((1.06, 1.07, 1.10, 1.12, 1.08, 1.09, 1.11)), 25)
    sel = select([FP32, slow], baseline="fp32", max_drop=0.01, prefer="size")
    assert sel.chosen.name == "fp32" and sel.latency_status("int8-dynamic") == "slower"
    assert "int8-dynamic 1.09× latency (IQR 1.08–1.10), slower" in sel.why


def test_report_says_slower_exactly_when_the_rule_does() -> None:
    near = _m("near", _scaled((1.02, 1.04, 1.08, 1.12, 1.03, 1.09, 1.10)), 90)
    slow = _m("slow", _scaled((1.06, 1.07, 1.10, 1.12, 1.08, 1.09, 1.11)), 90)
    fast = _m("fast", _scaled((0.5,) * 7), 60)
    bad = _m("bad", _scaled((1.3,) * 7), 50, drop=0.5)
    ms = [FP32, near, slow, fast, bad]
    sel = select(ms, baseline="fp32", max_drop=0.01, prefer="latency")
    status = {m.name: measured_status(sel, m, 0.01) for m in ms}
    # "near" has a median 1.08× fp32 (the old rule called that slower), but its lower
    # quartile 1.035 is inside the band: the rule counts it as the same, so does the report.
    assert status == {"fp32": "ok", "near": "ok", "slow": "slower", "fast": "chosen",
                      "bad": "over-budget"}
    fields = {m.name: latency_fields(sel, m.name)["latency_ratio"] for m in ms}
    assert fields["near"]["status"] == "same" and fields["slow"]["status"] == "slower"
    assert fields["slow"]["q1"] == pytest.approx(1.075)
    assert fields["slow"]["spread"] == pytest.approx(0.03)


def test_cli_table_shows_every_ratio_with_its_spread() -> None:
    report = {
        "baseline": "fp32", "metric": {"name": "cosine", "max_drop": 0.01},
        "candidates": [
            {"name": "fp32", "size_bytes": 1024, "latency_ms": 10.0, "status": "ok",
             "latency_ratio": {"median": 1.0, "q1": 1.0, "q3": 1.0, "spread": 0.0}},
            {"name": "fp16", "size_bytes": 512, "latency_ms": 9.0, "status": "chosen",
             "latency_ratio": {"median": 0.93, "q1": 0.88, "q3": 1.04, "spread": 0.16}},
        ],
    }
    rows = candidate_rows(report)
    assert rows[0][4:6] == ["× latency", "IQR"]
    assert rows[2][4:6] == ["0.93", "0.88–1.04"] and rows[1][4:6] == ["1.00", "–"]
    assert "0.88–1.04" in summary(report, "out")


def _busy_loop(seconds: float) -> subprocess.Popen[bytes]:
    """One process spinning on a core, ending by itself after ``seconds`` at most."""
    code = (f"import time\nend = time.monotonic() + {seconds}\n"
            "while time.monotonic() < end:\n    pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def test_same_model_converted_idle_and_under_load_keeps_its_choice_or_one_in_the_band(
        tmp_path: Path) -> None:
    model = M.mlp_classifier(tmp_path / "mlp.onnx", features=64, hidden=256, classes=10)
    np.savez(tmp_path / "tab.npz", features=M.tabular(32, 64))
    cfg = ConvertConfig(
        measure=MeasureConfig(rounds=5, max_rounds=10, runs_per_round=8, warmup=2,
                              time_budget_s=15.0),
        candidates=CandidateConfig(static_methods=("minmax",)))
    reports = []
    for i, loaded in enumerate((False, True)):
        busy = _busy_loop(90.0) if loaded else None
        try:
            result = convert(model, tmp_path / f"art{i}", calibration=tmp_path / "tab.npz",
                             prefer="latency", config=cfg)
        finally:
            if busy is not None:
                busy.terminate()
                busy.wait(timeout=30)
        reports.append(result.report)
    chosen = [r["chosen"] for r in reports]
    for r in reports:
        rows = {c["name"]: c for c in r["candidates"]}
        for c in rows.values():
            ratio = c.get("latency_ratio")
            if ratio is not None and c["status"] in ("ok", "slower"):
                assert (c["status"] == "slower") == (ratio["status"] == "slower")
        assert "IQR" in summary(r, "out")
    if chosen[0] != chosen[1]:
        # A different choice is only allowed inside the noise band one of the runs
        # reported between the two: one of them the "same" as the other (the tolerance
        # sits on the slower side, so a/b "faster" may go with b/a "same": a tie).
        def band(r: Mapping[str, Any]) -> set[str]:
            rows = {c["name"]: c for c in r["candidates"]}
            a, b = (rows[n]["latency_rounds_ms"] for n in chosen)
            return {round_ratios(a, b).status(TOL), round_ratios(b, a).status(TOL)}
        assert "same" in band(reports[0]) | band(reports[1]), chosen


def _two_candidates(tmp_path: Path) -> tuple[list[tuple[str, Path, str]], list[Any], list[Any]]:
    model = M.mlp_classifier(tmp_path / "mlp.onnx", features=8, hidden=16, classes=3)
    feeds = [{"features": M.tabular(1, 8)}]
    import edge_sdk

    ref = [edge_sdk.load(model).predict(dict(feeds[0]))]
    return [("fp32", model, "none"), ("copy", model, "none")], feeds, ref


def test_more_rounds_run_while_a_ratio_spread_is_wider_than_asked(tmp_path: Path) -> None:
    cands, feeds, ref = _two_candidates(tmp_path)
    cfg = MeasureConfig(rounds=2, max_rounds=5, runs_per_round=2, warmup=0,
                        time_budget_s=600.0, max_ratio_spread=0.0)
    # Any measured spread is wider than 0: rounds go on to max_rounds.
    ms = measure_candidates(cands, feeds, ref, config=cfg)
    assert [len(m.latency_rounds_ms) for m in ms] == [5, 5]
    # No spread is wider than 1000×: the minimum rounds suffice.
    ms = measure_candidates(cands, feeds, ref, config=replace(cfg, max_ratio_spread=1e3))
    assert [len(m.latency_rounds_ms) for m in ms] == [2, 2]
    # An exhausted time budget stops after the minimum too, however wide the spread.
    ms = measure_candidates(cands, feeds, ref, config=replace(cfg, time_budget_s=0.0))
    assert [len(m.latency_rounds_ms) for m in ms] == [2, 2]
    assert ms[1].latency_ms == pytest.approx(float(np.median(ms[1].latency_rounds_ms)))
