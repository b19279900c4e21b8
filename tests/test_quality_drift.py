"""Input drift statistics (edge_sdk.quality._drift): figures against numpy, the channel
rule, PSI and the chi-square test on known values, and hostile reported blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_sdk.errors import UsageError
from edge_sdk.quality._drift import (
    ALERT,
    FEW,
    HIST_LEN,
    MAX_CHANNELS,
    NO_REFERENCE,
    OK,
    WARN,
    ChannelRule,
    DriftConfig,
    InputAccumulator,
    Reference,
    ReportedInput,
    channel_rule,
    chi2_sf,
    chi2_two_sample,
    judge_input,
    psi,
    reference_stats,
)
from tests._drift_rig import evaluation_like


def _feeds(n: int = 40, shift: float = 0.0, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(size=(1, 3, 6, 5)) * [[[[1.0]], [[2.0]], [[0.5]]]]
                   + shift).astype(np.float32)} for _ in range(n)]


def test_channel_statistics_match_numpy_per_channel() -> None:
    feeds = _feeds()
    ref = reference_stats(feeds)["x"]
    allx = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    assert ref["axis"] == 1 and ref["channels_in"] == 3 and ref["samples"] == 40
    for c, row in enumerate(ref["channels"]):
        vals = allx[:, c].ravel()
        assert row["mean"] == pytest.approx(vals.mean(), rel=1e-5)
        assert row["std"] == pytest.approx(vals.std(), rel=1e-5)
        assert row["min"] == pytest.approx(vals.min(), rel=1e-5)
        assert row["max"] == pytest.approx(vals.max(), rel=1e-5)
        assert row["count"] == vals.size and row["nan_share"] == 0.0
        edges = np.array(ref["edges"][c])
        lo, hi = np.percentile(vals, [0.5, 99.5])
        assert edges[0] == pytest.approx(lo) and edges[-1] == pytest.approx(hi)
        inner, _ = np.histogram(vals, bins=edges)
        hist = row["hist"]
        assert len(hist) == HIST_LEN and sum(hist) == vals.size
        assert hist[0] == (vals < lo).sum()
        # numpy's last bin is closed ([lo, hi]); ours is half-open and hi overflows
        assert hist[1:-2] == list(inner[:-1])
        assert hist[-2] + hist[-1] == inner[-1] + (vals > hi).sum()


def test_merged_accumulators_equal_one_pass_and_count_nan_and_inf() -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.normal(loc=50.0, size=(4, 7)) for _ in range(6)]
    arrays[2][0, 3] = np.nan
    arrays[3][1, 3] = np.inf
    rule = channel_rule((4, 7), np.float64)
    assert rule == ChannelRule(1, 7)
    lows, widths = np.full(7, 45.0), np.full(7, 1.0)
    one = InputAccumulator(rule, lows, widths)
    a, b = one.empty(), one.empty()
    for i, arr in enumerate(arrays):
        one.add(arr)
        (a if i % 2 else b).add(arr)
    a.merge(b)
    allv = np.concatenate(arrays)
    fin = np.where(np.isfinite(allv), allv, np.nan)
    for acc in (one, a):
        rows = acc.channels()
        assert [r["mean"] for r in rows] == pytest.approx(np.nanmean(fin, axis=0), rel=1e-6)
        assert [r["std"] for r in rows] == pytest.approx(np.nanstd(fin, axis=0), rel=1e-5)
        assert rows[3]["nan_share"] == pytest.approx(2 / 24)
        assert rows[3]["hist"][-1] >= 1  # +inf overflows; NaN is in no bin
        assert sum(rows[3]["hist"]) == 23 and sum(rows[0]["hist"]) == 24


@pytest.mark.parametrize(("shape", "dtype", "want"), [
    ((1, 3, 32, 32), np.float32, ChannelRule(1, 3)),          # NCHW image
    ((1, 1, 28, 28), np.float32, ChannelRule(1, 1)),          # grey NCHW
    ((1, 224, 224, 3), np.uint8, ChannelRule(3, 3)),          # NHWC, uint8 pixels
    ((1, 4, 4, 4), np.float32, ChannelRule(1, 4)),            # ambiguous: axis 1 wins
    ((8, 12), np.float32, ChannelRule(1, 12)),                # tabular
    ((1, 50, 80), np.float32, ChannelRule(2, 80)),            # sequence of features
    ((1, 128), np.int64, ChannelRule(None, 1, "ids")),        # token ids
    ((1, 16, 2), np.int32, ChannelRule(None, 1, "ids")),
    ((1,), np.float32, ChannelRule(None, 1)),                 # a scalar-like input
    ((2, 1, 2, 3, 4), np.float32, ChannelRule(None, 1)),
])
def test_channel_rule_per_kind_of_input(shape: tuple[int, ...], dtype: type,
                                        want: ChannelRule) -> None:
    assert channel_rule(shape, dtype) == want


@pytest.mark.parametrize("dtype", [np.bool_, np.str_, "str"])
def test_strings_and_booleans_are_skipped(dtype: object) -> None:
    assert channel_rule((1, 4), dtype) is None
    if dtype is np.bool_:
        assert reference_stats([{"b": np.zeros((1, 4), bool)}]) == {}


def test_more_than_64_channels_are_grouped_contiguously() -> None:
    rule = channel_rule((1, 200, 768), np.float32)
    assert rule is not None and rule.channels == 768 and rule.groups == MAX_CHANNELS
    groups = rule.group_of()
    assert (np.diff(groups) >= 0).all() and np.bincount(groups).tolist() == [12] * 64
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 200, 768))
    acc = InputAccumulator(rule)
    acc.add(x)
    rows = acc.channels()
    assert len(rows) == 64
    assert rows[5]["mean"] == pytest.approx(x[0, :, 60:72].mean(), rel=1e-5)
    assert rows[5]["count"] == 200 * 12


def test_ids_report_histogram_min_max_but_no_mean() -> None:
    ref = reference_stats([{"ids": np.arange(100).reshape(1, 100)}])["ids"]
    row = ref["channels"][0]
    assert ref["kind"] == "ids" and row["mean"] is None and row["std"] is None
    assert row["min"] == 0 and row["max"] == 99 and sum(row["hist"]) == 100


def test_psi_known_values() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert psi([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0)  # only proportions count
    # (0.5-0.25)ln(2) + (0.5-0.75)ln(2/3) = 0.25 ln 2 + 0.25 ln 1.5
    assert psi([25, 75], [50, 50]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    # an empty bin on one side is clamped to the epsilon, not infinite
    assert psi([50, 50, 0], [50, 50, 0]) == 0.0
    v = psi([100, 0], [50, 50])
    assert math.isfinite(v) and v > 1.0
    assert math.isnan(psi([0, 0], [1, 1]))


def test_chi_square_known_values() -> None:
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(16.918977604620448, 9) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(200.0, 150) == pytest.approx(0.003973185970821635, rel=1e-9)
    assert chi2_sf(0.5, 4) == pytest.approx(0.9735009788392561, rel=1e-9)
    # the 2 x k contingency table's Pearson statistic (scipy.stats.chi2_contingency)
    stat, dof, p = chi2_two_sample([10, 20, 30, 40], [12, 18, 35, 30])
    assert (stat, dof, p) == (pytest.approx(1.9733604345792717), 3,
                              pytest.approx(0.577954216114059))
    same = chi2_two_sample([10, 20, 30, 0], [10, 20, 30, 0])
    assert same[0] == pytest.approx(0.0) and same[1] == 2 and same[2] == pytest.approx(1.0)


def test_chi_square_counts_observations_not_values() -> None:
    ref, got = [1000, 2000, 3000], [1100, 2000, 2900]
    _, _, p_values = chi2_two_sample(ref, got)
    _, _, p_requests = chi2_two_sample(ref, got, n_expected=60, n_actual=90)
    assert p_values < 0.05 < p_requests
    assert chi2_two_sample(ref, got, n_expected=60, n_actual=90) == \
        pytest.approx(chi2_two_sample([10, 20, 30], [16.5, 30, 43.5]))


def test_the_host_counts_requests_not_pixels() -> None:
    # 30 values per channel per request: a shift of a tenth of a deviation is certain
    # over the pixels and within noise over 300 requests against 2000 samples
    ref = Reference.from_json(reference_stats(_feeds(2000))["x"])
    assert ref is not None
    acc = ref.accumulator()
    for f in _feeds(300, shift=0.1, seed=3):
        acc.add(f["x"])
    assert judge_input(ref, _reported(acc), DriftConfig(method="chi2")).level == OK


def _reported(acc: InputAccumulator) -> ReportedInput:
    got = ReportedInput.from_json({"n": acc.samples, "channels": acc.channels()})
    assert got is not None
    return got


def test_shifted_inputs_alert_and_like_inputs_do_not() -> None:
    ref_doc = reference_stats(_feeds(200))["x"]
    ref = Reference.from_json(ref_doc)
    assert ref is not None
    cfg = DriftConfig()
    like, shifted = ref.accumulator(), ref.accumulator()
    for f in _feeds(300, seed=7):
        like.add(f["x"])
    for f in _feeds(300, shift=1.5, seed=8):
        shifted.add(f["x"])
    calm = judge_input(ref, _reported(like), cfg)
    moved = judge_input(ref, _reported(shifted), cfg)
    assert calm.level == OK and calm.psi_max is not None and calm.psi_max < 0.1
    assert moved.level == ALERT and moved.psi_max is not None and moved.psi_max > 0.25
    assert moved.worst_channel == 2  # the narrowest channel moved furthest
    chi = DriftConfig(method="chi2")
    assert judge_input(ref, _reported(like), chi).level == OK
    assert judge_input(ref, _reported(shifted), chi).level == ALERT
    assert judge_input(ref, _reported(shifted), DriftConfig(min_samples=1000)).level == FEW
    assert judge_input(None, _reported(shifted), cfg).level == NO_REFERENCE
    assert judge_input(ref, _reported(shifted), DriftConfig(psi_warn=0.1, psi_alert=1e9)
                       ).level == WARN


@pytest.mark.parametrize("doc", [
    None, [], {"n": 5}, {"n": -1, "channels": []}, {"n": True, "channels": [{}]},
    {"n": 5, "channels": [{}] * (MAX_CHANNELS + 1)},
    {"n": 5, "channels": [{"mean": "1"}]},
    {"n": 5, "channels": [{"hist": [1] * (HIST_LEN + 1)}]},
    {"n": 5, "channels": [{"hist": [-1] * HIST_LEN}]},
    {"n": 5, "channels": [{"hist": [1.5] * HIST_LEN}]},
    {"n": 5, "channels": ["x"]},
])
def test_hostile_reported_blocks_are_refused(doc: object) -> None:
    assert ReportedInput.from_json(doc) is None


@pytest.mark.parametrize("change", [
    {"axis": 9}, {"kind": "pixels"}, {"channels_in": 0}, {"edges": []},
    {"edges": [[1.0] * 11] * 3}, {"channels": [{"hist": [1] * 3}] * 3},
])
def test_malformed_references_are_not_used(change: dict[str, object]) -> None:
    doc = {**reference_stats(_feeds(5))["x"], **change}
    assert Reference.from_json(doc) is None


def test_drift_config_is_validated_and_parsed() -> None:
    assert DriftConfig.parse(["min_samples=50", "method=chi2"], psi_alert=0.3) == \
        DriftConfig(psi_alert=0.3, min_samples=50, method="chi2")
    assert DriftConfig.parse([], psi_alert=0.05).psi_warn == 0.05
    for bad in ({"psi_warn": 0.3, "psi_alert": 0.2}, {"min_samples": 0}, {"method": "ks"},
                {"chi2_alpha": 1.0}):
        with pytest.raises(UsageError):
            DriftConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--drift"):
        DriftConfig.parse(["bins=3"])


def test_a_large_psi_from_few_observations_is_not_called_drift() -> None:
    # 30 evaluation samples: their histogram is coarse, so PSI against 250 requests of the
    # same distribution is often over the warning level by chance; the test says noise
    ref = Reference.from_json(reference_stats(evaluation_like(30, seed=11))["x"])
    assert ref is not None
    noisy = []
    for seed in range(12, 20):
        acc = ref.accumulator()
        for f in evaluation_like(250, seed=seed):
            acc.add(f["x"])
        verdict = judge_input(ref, _reported(acc), DriftConfig())
        noisy.append(verdict.psi_max or 0.0)
        assert verdict.level == OK, verdict
    assert max(noisy) > 0.1
