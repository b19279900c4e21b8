"""Calibration/evaluation file layout and the selection rule, on their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters._data import load_samples, split_holdout, synthetic_samples
from converters._measure import Accuracy, Measurement, accuracy, closed_loop, select, state_pairs
from edge_sdk import ConversionError, TensorSpec, UsageError

STATEFUL = (
    TensorSpec("x", "float32", (1, 16)),
    TensorSpec("state", "float32", (2, 1, 16)),
    TensorSpec("sr", "int64", ()),
)


def test_same_rank_arrays_are_split_along_the_batch_axis(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=np.arange(12, dtype=np.float64).reshape(3, 4))
    s = load_samples(tmp_path / "c.npz", [TensorSpec("x", "float32", ("batch", 4))])
    assert len(s) == 3
    assert s.feeds[1]["x"].shape == (1, 4) and s.feeds[1]["x"].dtype == np.float32
    assert s.feeds[1]["x"][0, 0] == 4


def test_rank_plus_one_arrays_are_whole_feeds_for_stateful_models(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 16), np.float32),
             state=np.ones((5, 2, 1, 16), np.float32), sr=np.full(5, 16000, np.int64))
    s = load_samples(tmp_path / "c.npz", STATEFUL)
    assert len(s) == 5
    feed = s.feeds[0]
    assert feed["x"].shape == (1, 16)
    assert feed["state"].shape == (2, 1, 16)
    assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == () and feed["sr"] == 16000


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((5, 16)), "state": np.zeros((5, 2, 16)), "sr": np.zeros(5, np.int64)},
     "'state' has shape [5, 2, 16]"),
    ({"x": np.zeros((5, 16)), "state": np.zeros((5, 2, 1, 16)), "sr": np.zeros(4, np.int64)},
     "disagree on the number of samples"),
    ({"x": np.zeros((5, 16)), "state": np.zeros((5, 2, 1, 16))}, "missing input(s) 'sr'"),
    ({"x": np.zeros((5, 16)), "state": np.zeros((5, 2, 1, 16)), "sr": np.zeros(5, np.int64),
      "labels": np.zeros(3)}, "one label per sample (5)"),
    ({"x": np.zeros((5, 16)), "state": np.zeros((5, 2, 1, 16)), "sr": np.zeros(5, np.float32)},
     "'sr' has dtype float32"),
])
def test_malformed_data_is_a_usage_error_naming_the_input(
    tmp_path: Path, arrays: dict[str, Any], message: str,
) -> None:
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(UsageError, match=r"c\.npz") as info:
        load_samples(tmp_path / "c.npz", STATEFUL)
    assert message in str(info.value)


def test_holdout_keeps_labels_aligned_and_both_parts_non_empty(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=np.arange(8, dtype=np.float32).reshape(8, 1),
             labels=np.arange(8))
    s = load_samples(tmp_path / "c.npz", [TensorSpec("x", "float32", ("batch", 1))])
    calib, held = split_holdout(s, 0.25)
    assert (len(calib), len(held)) == (6, 2)
    assert held.labels is not None and list(held.labels) == [6, 7]
    assert held.feeds[0]["x"][0, 0] == 6
    assert not synthetic_samples(STATEFUL, n=2).real


def _m(name: str, lat: float, drop: float, size: int, scheme: str = "int8-dynamic") -> Measurement:
    acc = Accuracy("cosine", 1 - drop, drop, {"y": 1 - drop}, 10)
    return Measurement(name, scheme, name, size, latency_ms=lat, accuracy=acc)


def test_select_takes_fastest_within_budget_never_slower_than_fp32() -> None:
    base = _m("fp32", 1.0, 0.0, 100, "none")
    ms = [base, _m("fast-bad", 0.3, 0.05, 25), _m("fast-ok", 0.6, 0.005, 30),
          _m("slow", 1.5, 0.0, 25)]
    sel = select(ms, baseline="fp32", max_drop=0.01)
    assert sel.chosen.name == "fast-ok"
    assert "fast-ok" in sel.within_budget and "fast-bad" not in sel.within_budget
    sel = select([base, _m("slow", 1.5, 0.0, 25)], baseline="fp32", max_drop=0.01)
    assert sel.chosen.name == "fp32" and "1.50× latency" in sel.why


def test_select_prefers_the_smaller_of_equally_fast_candidates() -> None:
    # 40 is not under half of 60, so only the tie-break (not balanced's size trade) can
    # pick "b"; under both preferences.
    ms = [_m("fp32", 1.0, 0.0, 100, "none"), _m("a", 0.500, 0.0, 60), _m("b", 0.505, 0.0, 40)]
    for prefer in ("latency", "balanced"):
        assert select(ms, baseline="fp32", max_drop=0.01, prefer=prefer).chosen.name == "b"


def test_select_explicit_scheme_over_budget_raises_with_figure_unless_forced() -> None:
    ms = [_m("fp32", 1.0, 0.0, 100, "none"), _m("int8-dynamic", 0.5, 0.04, 25)]
    with pytest.raises(ConversionError, match=r"drop 0\.04 > 0\.01 on 10 evaluation samples"):
        select(ms, baseline="fp32", max_drop=0.01, requested="int8-dynamic")
    sel = select(ms, baseline="fp32", max_drop=0.01, requested="int8-dynamic", force=True)
    assert sel.chosen.name == "int8-dynamic" and sel.warnings


def test_select_never_picks_an_ineligible_noop_candidate() -> None:
    ms = [_m("fp32", 1.0, 0.0, 100, "none"), _m("int8-dynamic", 0.9, 0.0, 100)]
    sel = select(ms, baseline="fp32", max_drop=0.01, ineligible={"int8-dynamic": "no-op"})
    assert sel.chosen.name == "fp32"


def test_accuracy_metrics_compare_every_output() -> None:
    ref = [{"y": np.array([[1.0, 0.0, 0.0]]), "label": np.array([0])}]
    same = accuracy(ref, ref, "cosine")
    assert same.drop == pytest.approx(0.0)
    other = [{"y": np.array([[0.0, 1.0, 0.0]]), "label": np.array([0])}]
    assert accuracy(other, ref, "cosine").drop == pytest.approx(1.0)
    assert accuracy(other, ref, "top1").drop == pytest.approx(1.0)
    assert accuracy(other, ref, "max-abs").drop == pytest.approx(1.0)
    assert accuracy(other, ref, "mse").drop == pytest.approx(2 / 3)
    wrong_label = [{"y": np.array([[1.0, 0.0, 0.0]]), "label": np.array([2])}]
    acc = accuracy(wrong_label, ref, "cosine")
    assert acc.drop == pytest.approx(1.0) and acc.per_output["label"] == 0.0


def test_state_pairs_match_fed_back_outputs_only() -> None:
    outputs = (TensorSpec("y", "float32", (1, 4)), TensorSpec("state_out", "float32", (2, 1, 16)))
    assert state_pairs(STATEFUL, outputs) == {"state": "state_out"}
    unrelated = (TensorSpec("y", "float32", (2, 1, 16)),)
    assert state_pairs(STATEFUL, unrelated) == {}


def test_closed_loop_rollout_exposes_error_that_compounds_through_the_state() -> None:
    def source(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = feed["state"] + feed["x"]
        return {"y": s.copy(), "state_out": s}

    def leaky(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = source(feed)
        out["state_out"] = out["state_out"] * 0.8  # small per-step error in the state
        return out

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(1, 8)) + 1.0, "state": np.zeros((1, 8))} for _ in range(30)]
    ref_steps = [source(f) for f in feeds]
    open_loop = accuracy([leaky(f) for f in feeds], ref_steps, "cosine")
    closed = accuracy(closed_loop(leaky, feeds, {"state": "state_out"}),
                      closed_loop(source, feeds, {"state": "state_out"}), "cosine")
    assert open_loop.per_output["y"] == pytest.approx(1.0)
    assert closed.per_output["y"] < 0.999
