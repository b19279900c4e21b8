"""Input drift: per-input, per-channel statistics and how far a device's inputs moved
from the evaluation set a model was verified on.

The same code computes both sides, so that they are comparable by construction:

- at conversion, :func:`reference_stats` over the evaluation set gives, for each model
  input, the channel rule it used (:func:`channel_rule`), per channel ``mean``, ``std``,
  ``min``, ``max``, ``nan_share`` (NaN or infinite values), ``count`` and a histogram of
  :data:`BINS` equal-width bins between the set's 0.5 and 99.5 percentiles, with one
  underflow and one overflow count around them (:data:`HIST_LEN` counts). This goes into
  the manifest's ``input_stats`` (signed with the artifact) and report.json;
- on the device, :class:`InputAccumulator` adds requests up on the reference's edges;
- on the host, :func:`judge_input` recomputes the population stability index
  (:func:`psi`) per channel from the histogram a device reported and the reference, and
  a two-sample chi-square test (:func:`chi2_two_sample`) as the alternative
  (:class:`DriftConfig`).

Channel rule: a rank-4 input is an image batch, its channels on axis 1 when ``shape[1]``
is 1, 3 or 4 (NCHW) and on axis 3 otherwise (NHWC); a rank-2 or rank-3 numeric input has
its features on the last axis; any other rank is one channel. More than
:data:`MAX_CHANNELS` channels are summed into that many contiguous groups. Integer inputs
of rank <= 3 other than uint8 are token ids (``kind: "ids"``): one channel over all
values, histogram, min and max only (a mean of ids means nothing). Strings and booleans
are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from .._settings import numeric_settings
from ..errors import UsageError

#: Bins between the reference's 0.5 and 99.5 percentiles.
BINS = 10
#: Counts of one histogram: underflow, :data:`BINS` bins, overflow.
HIST_LEN = BINS + 2
#: Channels reported per input at most (more are summed into contiguous groups).
MAX_CHANNELS = 64
#: Inputs per model and models per report a host reads at most.
MAX_INPUTS = 32
MAX_MODELS = 16
#: The percentiles the histogram's inner range spans.
LOW_PCT, HIGH_PCT = 0.5, 99.5
#: Proportions are clamped to this before PSI's logarithm (an empty bin on one side).
PSI_EPSILON = 1e-4
KINDS = ("values", "ids")


@dataclass(frozen=True)
class ChannelRule:
    """How one input's values are split into reported channels.

    ``axis``: the channel axis (None: one channel); ``channels``: the size of that axis
    (1 without one); ``groups``: the reported channels (``min(channels, MAX_CHANNELS)``);
    ``kind``: ``values`` or ``ids``."""

    axis: int | None
    channels: int
    kind: str = "values"

    @property
    def groups(self) -> int:
        return min(self.channels, MAX_CHANNELS)

    def starts(self) -> np.ndarray:
        """The first channel of each group (contiguous groups, sizes differing by <= 1)."""
        return (np.arange(self.groups) * self.channels) // self.groups

    def group_of(self) -> np.ndarray:
        """The group of each channel."""
        return (np.arange(self.channels) * self.groups) // self.channels

    def matrix(self, arr: np.ndarray) -> np.ndarray | None:
        """``arr`` as a ``[values, channels]`` float64 matrix, or None when its shape does
        not have this rule's channel count."""
        if self.axis is None:
            return np.asarray(arr, dtype=np.float64).reshape(-1, 1)
        if arr.ndim <= self.axis or arr.shape[self.axis] != self.channels:
            return None
        moved = np.moveaxis(np.asarray(arr), self.axis, -1)
        return np.asarray(moved, dtype=np.float64).reshape(-1, self.channels)


def channel_rule(shape: Sequence[int], dtype: Any) -> ChannelRule | None:
    """The rule for an input of concrete ``shape`` and ``dtype`` (None: not summarised)."""
    dt = np.dtype(dtype) if not isinstance(dtype, str) or dtype != "str" else np.dtype("U")
    if dt.kind in ("U", "S", "O", "b", "V"):
        return None
    rank = len(shape)
    if dt.kind in ("i", "u") and dt != np.uint8 and rank <= 3:
        return ChannelRule(None, 1, "ids")
    if rank == 4:
        axis = 1 if shape[1] in (1, 3, 4) else 3
        return ChannelRule(axis, int(shape[axis]))
    if rank in (2, 3) and int(shape[-1]) >= 1:
        return ChannelRule(rank - 1, int(shape[-1]))
    return ChannelRule(None, 1)


# ---------------------------------------------------------------- accumulation


class InputAccumulator:
    """Running per-channel sums of one input on fixed histogram edges: add arrays with
    :meth:`add`, merge accumulators with :meth:`merge`, read figures with :meth:`channels`.

    ``lows``/``widths``: each group's first edge and bin width (None: no histogram)."""

    __slots__ = ("hist", "lows", "m2", "max", "mean", "min", "n", "nonfinite", "rule",
                 "samples", "total", "widths")

    def __init__(self, rule: ChannelRule, lows: np.ndarray | None = None,
                 widths: np.ndarray | None = None) -> None:
        g = rule.groups
        self.rule = rule
        self.lows = lows
        self.widths = widths
        self.samples = 0  # arrays (requests, evaluation samples) added
        self.total = np.zeros(g, np.int64)  # values seen
        self.n = np.zeros(g, np.int64)  # finite values
        self.nonfinite = np.zeros(g, np.int64)
        self.mean = np.zeros(g)
        self.m2 = np.zeros(g)  # sum of squared deviations from the mean
        self.min = np.full(g, np.inf)
        self.max = np.full(g, -np.inf)
        self.hist = np.zeros((g, HIST_LEN), np.int64) if lows is not None else None

    def empty(self) -> InputAccumulator:
        return InputAccumulator(self.rule, self.lows, self.widths)

    def add(self, arr: np.ndarray) -> bool:
        """Add one array; False (nothing added) when its shape does not fit the rule."""
        mat = self.rule.matrix(arr)
        if mat is None:
            return False
        rule = self.rule
        finite = np.isfinite(mat)
        clean = np.where(finite, mat, 0.0)
        if rule.groups == rule.channels:
            cnt = finite.sum(axis=0)
            tot = np.full(rule.groups, mat.shape[0], np.int64)
            s = clean.sum(axis=0)
            ss = np.square(clean).sum(axis=0)
            lo = np.where(finite, mat, np.inf).min(axis=0, initial=np.inf)
            hi = np.where(finite, mat, -np.inf).max(axis=0, initial=-np.inf)
        else:
            starts = rule.starts()
            cnt = np.add.reduceat(finite.sum(axis=0), starts)
            tot = np.add.reduceat(np.full(rule.channels, mat.shape[0], np.int64), starts)
            s = np.add.reduceat(clean.sum(axis=0), starts)
            ss = np.add.reduceat(np.square(clean).sum(axis=0), starts)
            lo = np.minimum.reduceat(
                np.where(finite, mat, np.inf).min(axis=0, initial=np.inf), starts)
            hi = np.maximum.reduceat(
                np.where(finite, mat, -np.inf).max(axis=0, initial=-np.inf), starts)
        cnt = cnt.astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            bmean = np.where(cnt > 0, s / np.maximum(cnt, 1), 0.0)
            bm2 = np.maximum(ss - cnt * bmean * bmean, 0.0)
        self._merge_moments(cnt, bmean, bm2)
        self.total += tot
        self.nonfinite += tot - cnt
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        if self.hist is not None:
            self.hist += self._histogram(mat, finite)
        self.samples += 1
        return True

    def _histogram(self, mat: np.ndarray, finite: np.ndarray) -> np.ndarray:
        assert self.lows is not None and self.widths is not None
        rule = self.rule
        groups = rule.group_of() if rule.groups != rule.channels else np.arange(rule.channels)
        lows, widths = self.lows[groups], self.widths[groups]
        with np.errstate(invalid="ignore", over="ignore"):
            pos = np.floor((mat - lows) / widths)
        # underflow 0, bins 1..BINS, overflow BINS+1; -inf and +inf land outside; NaN
        # is counted in nonfinite only.
        idx = np.clip(np.nan_to_num(pos, nan=-1.0, posinf=BINS, neginf=-1.0), -1, BINS) + 1
        flat = (groups * HIST_LEN)[None, :] + idx.astype(np.int64)
        flat = flat[~np.isnan(mat)]
        return np.bincount(flat, minlength=rule.groups * HIST_LEN).reshape(
            rule.groups, HIST_LEN)

    def _merge_moments(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.n
        n = n_a + n_b
        safe = np.maximum(n, 1)
        delta = mean_b - self.mean
        self.mean = np.where(n > 0, self.mean + delta * n_b / safe, 0.0)
        self.m2 = self.m2 + m2_b + delta * delta * n_a * n_b / safe
        self.n = n

    def merge(self, other: InputAccumulator) -> None:
        """Add ``other``'s figures (same rule and edges) to these."""
        self._merge_moments(other.n, other.mean, other.m2)
        self.total += other.total
        self.nonfinite += other.nonfinite
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist
        self.samples += other.samples

    def channels(self, digits: int = 6) -> list[dict[str, Any]]:
        """Per reported channel: ``mean``, ``std``, ``min``, ``max``, ``nan_share``,
        ``count`` (values) and ``hist`` (when there are edges); figures a channel has no
        finite value for are None. ``ids`` inputs leave ``mean`` and ``std`` None."""
        out = []
        ids = self.rule.kind == "ids"
        for g in range(self.rule.groups):
            n = int(self.n[g])
            row: dict[str, Any] = {
                "mean": None if ids or n == 0 else _round(self.mean[g], digits),
                "std": None if ids or n == 0 else _round(math.sqrt(self.m2[g] / n), digits),
                "min": None if n == 0 else _round(self.min[g], digits),
                "max": None if n == 0 else _round(self.max[g], digits),
                "nan_share": _round(self.nonfinite[g] / self.total[g], digits)
                if self.total[g] else 0.0,
                "count": int(self.total[g]),
            }
            if self.hist is not None:
                row["hist"] = [int(v) for v in self.hist[g]]
            out.append(row)
        return out


def _round(v: float, digits: int) -> float | None:
    f = float(v)
    if not math.isfinite(f):
        return None
    return float(f"{f:.{digits}g}")


def _edges(rule: ChannelRule, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the first edge and the bin width, from the percentiles of ``arrays``."""
    mats = [m for m in (rule.matrix(a) for a in arrays) if m is not None]
    lows = np.zeros(rule.groups)
    widths = np.ones(rule.groups)
    if not mats:
        return lows, widths
    mat = np.concatenate(mats)
    group_of = rule.group_of() if rule.groups != rule.channels else None
    for g in range(rule.groups):
        cols = mat[:, group_of == g].ravel() if group_of is not None else mat[:, g]
        cols = cols[np.isfinite(cols)]
        if cols.size == 0:
            continue
        lo, hi = np.percentile(cols, [LOW_PCT, HIGH_PCT])
        lo, hi = float(lo), float(hi)
        if not hi > lo:  # a constant channel: one narrow bin's worth around it
            pad = max(abs(lo) * 1e-6, 1e-12)
            lo, hi = lo - pad * BINS / 2, hi + pad * BINS / 2
        lows[g] = lo
        widths[g] = (hi - lo) / BINS
    return lows, widths


def reference_stats(feeds: Iterable[Mapping[str, np.ndarray]],
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """The manifest's ``input_stats`` over evaluation ``feeds`` (each one run's inputs):
    ``{input: {"axis", "kind", "channels_in", "samples", "channels": [...], "edges":
    [[BINS+1 edges] per channel]}}``. Inputs the channel rule skips are left out;
    ``names`` limits it to those inputs."""
    by_input: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for k, v in feed.items():
            if names is None or k in names:
                by_input.setdefault(k, []).append(np.asarray(v))
    out: dict[str, Any] = {}
    for name, arrays in by_input.items():
        rule = channel_rule(arrays[0].shape, arrays[0].dtype)
        if rule is None:
            continue
        lows, widths = _edges(rule, arrays)
        acc = InputAccumulator(rule, lows, widths)
        for a in arrays:
            acc.add(a)
        if acc.samples == 0:
            continue
        out[name] = {
            "axis": rule.axis, "kind": rule.kind, "channels_in": rule.channels,
            "samples": acc.samples, "channels": acc.channels(),
            "edges": [[_round(lows[g] + widths[g] * i, 9) for i in range(BINS + 1)]
                      for g in range(rule.groups)],
        }
    return out


@dataclass(frozen=True)
class Reference:
    """One input's reference as read back from a manifest (checked: hostile-safe)."""

    rule: ChannelRule
    lows: np.ndarray
    widths: np.ndarray
    hist: np.ndarray  # [groups, HIST_LEN]
    samples: int
    #: Per channel: the reference's ``mean`` and ``std`` (None where it has none).
    stats: tuple[dict[str, float | None], ...] = ()

    def accumulator(self) -> InputAccumulator:
        return InputAccumulator(self.rule, self.lows, self.widths)

    @classmethod
    def from_json(cls, doc: object) -> Reference | None:
        """The reference of one input from ``input_stats[input]``; None when it is not
        one this code can use (any malformed part)."""
        try:
            if not isinstance(doc, Mapping):
                return None
            axis, kind, cin = doc.get("axis"), doc.get("kind", "values"), doc.get("channels_in")
            if axis is not None and not (_int(axis) and 0 <= axis < 8):
                return None
            if kind not in KINDS or not (_int(cin) and 1 <= cin <= 1 << 20):
                return None
            rule = ChannelRule(axis, cin, kind)
            chans, edges = doc.get("channels"), doc.get("edges")
            if not isinstance(chans, list) or not isinstance(edges, list) \
                    or len(chans) != rule.groups or len(edges) != rule.groups:
                return None
            hist = np.array([c["hist"] for c in chans], dtype=np.float64)
            e = np.array(edges, dtype=np.float64)
            if hist.shape != (rule.groups, HIST_LEN) or e.shape != (rule.groups, BINS + 1) \
                    or not np.isfinite(e).all() or (hist < 0).any():
                return None
            widths = (e[:, -1] - e[:, 0]) / BINS
            if not (widths > 0).all():
                return None
            samples = doc.get("samples", 0)
            stats = tuple({k: _number(c.get(k)) for k in ("mean", "std")} for c in chans)
            return cls(rule, e[:, 0].copy(), widths, hist, samples if _int(samples) else 0,
                       stats)
        except (KeyError, TypeError, ValueError):
            return None


def _number(v: object) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None  # type: ignore[arg-type]


def _int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- comparison


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
        epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` counts against ``expected`` counts over
    the same bins: ``sum((a - e) * ln(a / e))`` over the proportions, each clamped to at
    least ``epsilon``. 0 for the same distribution; rule of thumb: < 0.1 no real change,
    0.1-0.25 a moderate shift, > 0.25 a major one. NaN when either side is empty."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError("psi needs two histograms over the same bins")
    se, sa = e.sum(), a.sum()
    if not se > 0 or not sa > 0:
        return math.nan
    p = np.maximum(e / se, epsilon)
    q = np.maximum(a / sa, epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_two_sample(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
                    n_expected: float | None = None,
                    n_actual: float | None = None) -> tuple[float, int, float]:
    """Two-sample chi-square test that two histograms come from one distribution:
    ``(statistic, degrees of freedom, p-value)``; bins empty on both sides do not count.

    ``n_expected``/``n_actual``: the number of independent observations behind each
    histogram, when it is not the sum of the counts. The values of one image or one
    sequence are far from independent, so the host passes the number of requests and
    of evaluation samples: without that, a histogram of a million pixels rejects any
    difference at all."""
    r = np.asarray(expected, dtype=np.float64)
    s = np.asarray(actual, dtype=np.float64)
    if r.shape != s.shape or r.ndim != 1:
        raise ValueError("chi2_two_sample needs two histograms over the same bins")
    if not r.sum() > 0 or not s.sum() > 0:
        return math.nan, 0, math.nan
    if n_expected is not None:
        r = r * (n_expected / r.sum())
    if n_actual is not None:
        s = s * (n_actual / s.sum())
    keep = (r + s) > 0
    r, s = r[keep], s[keep]
    big_r, big_s = r.sum(), s.sum()
    k1, k2 = math.sqrt(big_s / big_r), math.sqrt(big_r / big_s)
    stat = float(np.sum((k1 * r - k2 * s) ** 2 / (r + s)))
    dof = int(keep.sum()) - 1
    if dof < 1:
        return stat, 0, 1.0
    return stat, dof, chi2_sf(stat, dof)


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom."""
    if x <= 0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series below a+1, continued fraction
    above: Numerical Recipes' gser/gcf)."""
    lg = math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - lg) * h)


# ---------------------------------------------------------------- the host's judgement

METHODS = ("psi", "chi2")
OK, WARN, ALERT, FEW, NO_REFERENCE = "ok", "warn", "alert", "few", "no_reference"


@dataclass(frozen=True)
class DriftConfig:
    """When the host calls a device's input drifting (``edge-sdk serve --drift-psi``,
    ``--drift KEY=N``).

    PSI measures how far a histogram moved, but on few observations it is large by
    chance alone (about ``(bins - 1) * (1/n + 1/m)`` on average: 0.07 for 250 requests
    against 400 evaluation samples), so a channel only counts when the two-sample
    chi-square test also says its shift is no sampling noise: p-value below
    ``chi2_alpha`` divided by the input's channels (Bonferroni), one observation per
    request and per evaluation sample. An input with at least ``min_samples`` analysed
    requests is ``alert`` (the device is flagged) when such a channel's PSI reaches
    ``psi_alert``, ``warn`` from ``psi_warn``. ``method = "chi2"``: the test alone
    decides (``alert`` for any such channel). Fewer requests: ``few``, never flagged."""

    psi_warn: float = 0.1
    psi_alert: float = 0.25
    min_samples: int = 200
    method: str = "psi"
    chi2_alpha: float = 0.001

    def __post_init__(self) -> None:
        if not 0 < self.psi_warn <= self.psi_alert or not math.isfinite(self.psi_alert):
            raise UsageError(f"drift psi_warn {self.psi_warn!r} and psi_alert "
                             f"{self.psi_alert!r} must be numbers with 0 < warn <= alert")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) \
                or self.min_samples < 1:
            raise UsageError(f"drift min_samples {self.min_samples!r} must be a whole "
                             "number >= 1")
        if self.method not in METHODS:
            raise UsageError(f"drift method {self.method!r} is not one of "
                             f"{', '.join(METHODS)}")
        if not 0 < self.chi2_alpha < 1:
            raise UsageError(f"drift chi2_alpha {self.chi2_alpha!r} must be in (0, 1)")

    @classmethod
    def parse(cls, settings: Sequence[str], **given: Any) -> DriftConfig:
        """From ``KEY=N`` strings (``--drift``) and keyword values (``--drift-psi``)."""
        try:
            changes: dict[str, Any] = dict(numeric_settings(
                cls, [s for s in settings if not s.startswith("method=")], "--drift"))
        except ValueError as err:
            raise UsageError(str(err)) from None
        for s in settings:
            if s.startswith("method="):
                changes["method"] = s.partition("=")[2].strip()
        changes.update({k: v for k, v in given.items() if v is not None})
        if "psi_alert" in changes and "psi_warn" not in changes:
            changes["psi_warn"] = min(cls.psi_warn, changes["psi_alert"])
        return cls(**changes)


@dataclass(frozen=True)
class InputDrift:
    """The host's judgement of one input of one model on one device."""

    n: int
    level: str  # OK | WARN | ALERT | FEW | NO_REFERENCE
    psi: tuple[float | None, ...] = ()
    psi_max: float | None = None
    p_min: float | None = None
    worst_channel: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "level": self.level,
                "psi": [None if v is None else round(v, 4) for v in self.psi],
                "psi_max": None if self.psi_max is None else round(self.psi_max, 4),
                "p_min": None if self.p_min is None else float(f"{self.p_min:.3g}"),
                "worst_channel": self.worst_channel}


def judge_input(reference: Reference | None, reported: ReportedInput,
                config: DriftConfig) -> InputDrift:
    """Compare one reported input with its reference (PSI and chi-square per channel;
    see :class:`DriftConfig` for how they decide)."""
    if reference is None or reported.hist is None \
            or reported.hist.shape != reference.hist.shape:
        return InputDrift(reported.n, NO_REFERENCE)
    psis: list[float | None] = []
    p_min: float | None = None
    alpha = config.chi2_alpha / max(1, len(reference.hist))
    significant: list[tuple[float, int]] = []
    for i, (ref, got) in enumerate(zip(reference.hist, reported.hist, strict=True)):
        v = psi(ref, got)
        psis.append(None if math.isnan(v) else v)
        _, _, p = chi2_two_sample(ref, got, n_expected=max(reference.samples, 1),
                                  n_actual=max(reported.n, 1))
        if not math.isnan(p):
            p_min = p if p_min is None else min(p_min, p)
            if p < alpha:
                significant.append((0.0 if math.isnan(v) else v, i))
    finite = [(v, i) for i, v in enumerate(psis) if v is not None]
    worst = max(significant) if significant else max(finite) if finite else None
    psi_max = max(finite)[0] if finite else None
    moved = max(significant)[0] if significant else None
    if reported.n < config.min_samples:
        level = FEW
    elif config.method == "chi2":
        level = ALERT if significant else OK
    elif moved is not None and moved >= config.psi_alert:
        level = ALERT
    elif moved is not None and moved >= config.psi_warn:
        level = WARN
    else:
        level = OK
    return InputDrift(reported.n, level, tuple(psis), psi_max, p_min,
                      None if worst is None else worst[1])


@dataclass(frozen=True)
class ReportedInput:
    """One input's figures as a device reported them, bounded and checked."""

    n: int
    hist: np.ndarray | None  # [channels, HIST_LEN] counts, or None
    channels: tuple[dict[str, float | None], ...]

    @classmethod
    def from_json(cls, doc: object) -> ReportedInput | None:
        """None for anything but a well-formed input block within the limits (at most
        :data:`MAX_CHANNELS` channels of :data:`HIST_LEN` counts)."""
        if not isinstance(doc, Mapping):
            return None
        n = doc.get("n")
        chans = doc.get("channels")
        if not (_int(n) and 0 <= n <= 1 << 40) or not isinstance(chans, list) \
                or not 1 <= len(chans) <= MAX_CHANNELS:
            return None
        stats: list[dict[str, float | None]] = []
        hists: list[list[float]] = []
        for c in chans:
            if not isinstance(c, Mapping):
                return None
            row: dict[str, float | None] = {}
            for key in ("mean", "std", "min", "max", "nan_share"):
                v = c.get(key)
                if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                      or not math.isfinite(v)):
                    return None
                row[key] = None if v is None else float(v)
            stats.append(row)
            h = c.get("hist")
            if h is not None:
                if not isinstance(h, list) or len(h) != HIST_LEN or not all(
                        _int(x) and 0 <= x <= 1 << 53 for x in h):
                    return None
                hists.append([float(x) for x in h])
        hist = np.array(hists) if hists and len(hists) == len(chans) else None
        return cls(n, hist, tuple(stats))


__all__ = [
    "ALERT", "BINS", "FEW", "HIST_LEN", "MAX_CHANNELS", "NO_REFERENCE", "OK", "WARN",
    "ChannelRule", "DriftConfig", "InputAccumulator", "InputDrift", "Reference",
    "ReportedInput", "channel_rule", "chi2_sf", "chi2_two_sample", "judge_input", "psi",
    "reference_stats",
]
