"""Measure candidates on this machine and pick one by a fixed rule.

Format-agnostic (everything goes through :func:`edge_sdk.load`, so .onnx, .ort
and .tflite candidates are measured the same way)::

    ms = measure_candidates(
        [("fp32", Path("fp32.onnx"), "none"), ("int8", Path("q.tflite"), "int8-static")],
        feeds,                 # Sequence[Mapping[str, np.ndarray]]: eval samples
        reference,             # Sequence[Mapping[str, np.ndarray]]: source outputs per sample
        metric="cosine", labels=None, threads=None, config=MeasureConfig(), progress=False,
    )                          # -> list[Measurement], same order
    budget = max_drop if max_drop is not None else default_max_drop("cosine", reference)
    sel = select(ms, baseline="fp32", max_drop=budget, requested=None, force=False,
                 ineligible={"int8-dynamic": "no weight quantized"},
                 prefer="balanced")   # -> Selection (chosen, why, rule, ...)

Latency is compared as ratios to the baseline, measured in interleaved rounds: each
round loads every candidate afresh and times ``runs_per_round`` batch-1 calls on the
first evaluation sample (the round's figure is their median), candidates in an order
rotated by one each round. A candidate's ratio is the median over rounds of its
round's figure over the baseline's in the same round, so load that hits a whole round
cancels; its spread is the interquartile range (q1..q3) of those per-round ratios. After
``rounds`` rounds, more run while some ratio's spread is wider than ``max_ratio_spread``,
up to ``max_rounds`` rounds and ``time_budget_s`` seconds of timing.

The noise band (:meth:`Ratio.status`): a candidate is ``faster`` than a reference only
when its ratio's q3 is below 1, ``slower`` only when its q1 is above
1 + ``latency_tolerance``, otherwise ``same``. Between two candidates the ratio is
formed round by round the same way (:func:`ratio_of`).

The choice rule (``prefer``), in auto mode among the candidates within the accuracy
budget that are not ``slower`` than the baseline (the baseline always counts):
``latency`` takes the fastest (lowest median ratio); every candidate not ``slower`` than
it ties with it, and the tie goes to the smallest, then the first in the fixed scheme
order (``SCHEMES``: none, fp16, int8-dynamic, int8-static), then the name. ``size``
takes the smallest (then the lower ratio). ``balanced`` takes the ``latency`` choice
unless a candidate whose ratio to the fastest has q1 at most 1 + ``balanced_max_slowdown``
is under ``balanced_max_size_ratio`` of the chosen one's size (then the smallest such,
same ties).

Accuracy ("drop", smaller is better, compared with ``max_drop``):
- ``cosine``: per output, mean over samples of the cosine similarity to the
  reference; drop = 1 - the worst output's mean.
- ``top1``: argmax agreement with the reference on every class-score output
  (float, last dim >= 2) and exact agreement on integer outputs; with
  ``labels`` the first such output is scored as accuracy, and the drop is the
  reference's accuracy minus the candidate's.
- ``mse`` / ``max-abs``: the worst output's mean squared / max absolute error.
Integer or boolean outputs count, under every metric, as 1 - exact agreement.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import measure, one_line
from edge_sdk.errors import ConversionError, EdgeError

from ._candidates import SCHEMES

METRICS = ("cosine", "top1", "mse", "max-abs")
PREFER = ("latency", "size", "balanced")


@dataclass(frozen=True)
class MeasureConfig:
    # Interleaved rounds: at least ``rounds``; more while a ratio's spread (the IQR of
    # its per-round ratios to the baseline) is wider than ``max_ratio_spread``, up to
    # ``max_rounds`` (None: 3 × rounds) and while the timing has taken less than
    # ``time_budget_s`` seconds.
    rounds: int = 8
    max_rounds: int | None = None
    max_ratio_spread: float = 0.10
    time_budget_s: float = 20.0
    runs_per_round: int = 20
    warmup: int = 5
    max_eval_samples: int = 500
    # The noise band's margin: a candidate is "slower" than another only when the lower
    # quartile of their per-round latency ratios is above 1 + this.
    latency_tolerance: float = 0.05
    # --prefer balanced: a candidate at most this fraction slower than the fastest...
    balanced_max_slowdown: float = 0.10
    # ...and smaller than this fraction of its size wins over it.
    balanced_max_size_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.runs_per_round < 1:
            raise ValueError(f"rounds and runs_per_round must be >= 1, got {self.rounds} "
                             f"and {self.runs_per_round}")
        if self.max_rounds is not None and self.max_rounds < self.rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) must be >= rounds "
                             f"({self.rounds})")
        if self.max_ratio_spread < 0 or self.time_budget_s < 0 or self.latency_tolerance < 0:
            raise ValueError("max_ratio_spread, time_budget_s and latency_tolerance must be "
                             ">= 0")
        if not 0.0 <= self.balanced_max_slowdown <= 1.0:
            raise ValueError(f"balanced_max_slowdown must be in [0, 1], got "
                             f"{self.balanced_max_slowdown}")
        if not 0.0 < self.balanced_max_size_ratio <= 1.0:
            raise ValueError(f"balanced_max_size_ratio must be in (0, 1], got "
                             f"{self.balanced_max_size_ratio}")

    @property
    def round_limit(self) -> int:
        return self.max_rounds if self.max_rounds is not None else 3 * self.rounds


@dataclass(frozen=True)
class Accuracy:
    metric: str
    score: float  # cosine / top1: higher is better; mse / max-abs: the error itself
    drop: float
    per_output: Mapping[str, float]
    samples: int
    reference_score: float | None = None  # top1 with labels: the reference's accuracy
    closed_loop: bool = False  # the drop is from feeding the model its own state back
    # Task metrics (converters._tasks): the task, the budgets it broke (checked against
    # each output kind's own budget), the worst sample and per-output figures.
    task: str | None = None
    breaks: tuple[str, ...] = ()
    worst: Mapping[str, Any] | None = None
    details: Mapping[str, Any] | None = None

    def within(self, max_drop: float) -> bool:
        """Within the budget: a task metric's own budgets, else ``drop <= max_drop``."""
        if self.task is not None:
            return not self.breaks
        return self.drop <= max_drop

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "score": self.score, "drop": self.drop,
                               "per_output": dict(self.per_output), "samples": self.samples}
        if self.task is not None:
            out.update(task=self.task, breaks=list(self.breaks),
                       worst_sample=dict(self.worst or {}), details=dict(self.details or {}))
        if self.reference_score is not None:
            out["reference_score"] = self.reference_score
        if self.closed_loop:
            out["closed_loop"] = True
        return out


@dataclass(frozen=True)
class Measurement:
    name: str
    scheme: str
    path: str
    size_bytes: int
    latency_ms: float | None = None
    latency_rounds_ms: tuple[float, ...] = ()
    accuracy: Accuracy | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.accuracy is not None and self.latency_ms is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "scheme": self.scheme, "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms, "latency_rounds_ms": list(self.latency_rounds_ms),
            "accuracy": None if self.accuracy is None else self.accuracy.to_json(),
            "error": self.error,
        }


@dataclass(frozen=True)
class Ratio:
    """A latency ratio to a reference: the median of the per-round ratios and their
    interquartile range ``q1``..``q3`` (equal to the median when there is a single
    figure, e.g. a device's median or a hand-set latency)."""

    median: float
    q1: float
    q3: float
    rounds: int

    @property
    def spread(self) -> float:
        return self.q3 - self.q1

    def status(self, tolerance: float) -> str:
        """``faster`` only when even q3 is below 1, ``slower`` only when even q1 is
        above 1 + ``tolerance``; otherwise ``same`` (within the noise band)."""
        if self.q3 < 1.0:
            return "faster"
        if self.q1 > 1.0 + tolerance:
            return "slower"
        return "same"

    def text(self) -> str:
        if self.spread <= 0:
            return f"{self.median:.2f}×"
        return f"{self.median:.2f}× (IQR {self.q1:.2f}–{self.q3:.2f}, {self.rounds} rounds)"

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "spread": self.spread,
                "rounds": self.rounds}


def round_ratios(rounds: Sequence[float], reference: Sequence[float]) -> Ratio:
    """The ratio of two latencies timed in the same rounds: per round ``rounds[i] /
    reference[i]``, then the median and quartiles of those ratios."""
    if not rounds or len(rounds) != len(reference):
        raise ValueError(f"round_ratios needs two equally long, non-empty series, got "
                         f"{len(rounds)} and {len(reference)}")
    per = np.asarray(rounds, np.float64) / np.asarray(reference, np.float64)
    q1, med, q3 = (float(x) for x in np.percentile(per, [25, 50, 75]))
    return Ratio(median=med, q1=q1, q3=q3, rounds=len(per))


def ratio_of(m: Measurement, ref: Measurement) -> Ratio:
    """``m``'s latency over ``ref``'s: per round when both were timed in the same rounds,
    else the ratio of the two single figures (no spread)."""
    if m is ref:
        return Ratio(1.0, 1.0, 1.0, len(m.latency_rounds_ms))
    if m.latency_rounds_ms and len(m.latency_rounds_ms) == len(ref.latency_rounds_ms):
        return round_ratios(m.latency_rounds_ms, ref.latency_rounds_ms)
    if m.latency_ms is None or not ref.latency_ms:
        raise ValueError(f"no latency to compare {m.name} with {ref.name}")
    r = m.latency_ms / ref.latency_ms
    return Ratio(r, r, r, 1)


@dataclass(frozen=True)
class Selection:
    chosen: Measurement
    why: str
    within_budget: tuple[str, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    rule: str = ""  # the choice rule applied, in words (see choice_rule)
    # Every measured candidate's latency ratio to the baseline, and the noise band's
    # margin the rule used: ``latency_status`` is what the report shows.
    ratios: Mapping[str, Ratio] = field(default_factory=dict)
    tolerance: float = 0.05

    def latency_status(self, name: str) -> str | None:
        """``faster`` / ``same`` / ``slower`` than the baseline by the rule's noise band,
        None for a candidate without a latency."""
        r = self.ratios.get(name)
        return None if r is None else r.status(self.tolerance)


def default_max_drop(metric: str, reference: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Budget when the user gives none. mse / max-abs are scaled to the reference's
    own magnitude (1% of its mean square, 5% of its largest value)."""
    if metric in ("cosine", "top1"):
        return 0.01
    floats = [np.asarray(v, np.float64) for r in reference for v in r.values()
              if np.asarray(v).dtype.kind == "f"]
    if not floats:
        return 0.0
    if metric == "mse":
        return float(0.01 * np.mean([np.mean(f * f) for f in floats])) or 1e-6
    return float(0.05 * max(float(np.max(np.abs(f))) for f in floats)) or 1e-6


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = max(1, total), 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\rmeasuring [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {label[:28]:<28}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def measure_candidates(
    candidates: Sequence[tuple[str, Path, str]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    *,
    metric: str = "cosine",
    labels: np.ndarray | None = None,
    threads: int | None = None,
    config: MeasureConfig | None = None,
    progress: bool = False,
    state: Mapping[str, str] | None = None,
    closed_loop_reference: Sequence[Mapping[str, np.ndarray]] | None = None,
    baseline: str | None = None,
    scorer: Callable[[Sequence[Mapping[str, np.ndarray]], Sequence[Mapping[str, np.ndarray]]],
                     Accuracy] | None = None,
) -> list[Measurement]:
    """Accuracy vs ``reference``, latency and size of every candidate (same order).

    A candidate that fails to load or to run is returned with ``error`` set.
    With ``state`` (input name → output name fed back, see :func:`state_pairs`)
    and ``closed_loop_reference`` (the reference's :func:`closed_loop` over ``feeds``),
    each candidate also streams ``feeds`` feeding its own state back, and its
    accuracy is the worse of the open-loop and closed-loop figures: quantization
    error that compounds through the state shows up. ``scorer(outputs, reference)``
    replaces the metric (task metrics, see ``converters._tasks``).
    """
    cfg = config or MeasureConfig()
    if metric not in METRICS:
        raise ConversionError(f"unknown metric {metric!r} (expected {', '.join(METRICS)})")

    def score(outs: Sequence[Mapping[str, np.ndarray]],
              ref: Sequence[Mapping[str, np.ndarray]]) -> Accuracy:
        return scorer(outs, ref) if scorer is not None else accuracy(outs, ref, metric,
                                                                        labels=labels)

    if not feeds:
        raise ConversionError("no evaluation samples to measure candidates on")
    n = min(len(feeds), len(reference), cfg.max_eval_samples)
    feeds, reference = list(feeds[:n]), list(reference[:n])
    if labels is not None:
        labels = np.asarray(labels)[:n]
    bar = _Progress(len(candidates) * (1 + cfg.rounds), progress)
    paths: dict[str, Path] = {}
    results: dict[str, Measurement] = {}
    for name, path, scheme in candidates:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        base = Measurement(name=name, scheme=scheme, path=str(path), size_bytes=size)
        try:
            pred = edge_sdk.load(path, threads=threads)
            outs = [pred.predict(dict(f)) for f in feeds]
            acc = score(outs, reference)
            if state and closed_loop_reference is not None:
                loop = score(closed_loop(pred.predict, feeds, state),
                             closed_loop_reference[:n])
                if loop.drop > acc.drop:
                    acc = _with_acc(loop)
        except (EdgeError, Exception) as err:
            results[name] = _with(base, error=f"does not run: {one_line(err)}")
            bar.step(name)
            continue
        del pred
        paths[name] = Path(path)
        results[name] = _with(base, accuracy=acc)
        bar.step(name)
    timings = _timed_rounds(paths, dict(feeds[0]), threads, cfg, bar, results,
                            baseline if baseline is not None else candidates[0][0])
    bar.close()
    for name, ts in timings.items():
        if ts and results[name].error is None:
            results[name] = _with(results[name], latency_ms=float(np.median(ts)),
                                  latency_rounds_ms=tuple(ts))
    return [results[name] for name, _, _ in candidates]


def _timed_rounds(
    paths: Mapping[str, Path], feed: dict[str, np.ndarray], threads: int | None,
    cfg: MeasureConfig, bar: _Progress, results: dict[str, Measurement], baseline: str,
) -> dict[str, list[float]]:
    """Per candidate, the median of ``runs_per_round`` timed calls in each round.

    Every round times every candidate once, in an order rotated by one per round, each
    with a fresh session (on a small shared machine a session's thread placement, a
    neighbour's spinning threads or a frequency change otherwise favour one candidate
    systematically; only one timed session is alive at a time). A candidate that fails
    while timed gets ``error`` in ``results`` and leaves the rounds.
    """
    names = list(paths)
    timings: dict[str, list[float]] = {name: [] for name in names}
    start = time.monotonic()
    done = 0
    while done < cfg.round_limit:
        if done >= cfg.rounds and (
                time.monotonic() - start >= cfg.time_budget_s
                or _widest_spread(timings, baseline) <= cfg.max_ratio_spread):
            break
        k = done % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name not in timings:
                continue
            try:
                pred = edge_sdk.load(paths[name], threads=threads)
                stats = measure(_caller(pred, feed), runs=cfg.runs_per_round,
                                warmup=cfg.warmup)
                del pred
            except Exception as err:
                results[name] = _with(results[name], error=f"fails while timed: {one_line(err)}")
                timings.pop(name, None)
                continue
            timings[name].append(stats.p50_ms)
            if done < cfg.rounds:
                bar.step(name)
        done += 1
    return timings


def _widest_spread(timings: Mapping[str, Sequence[float]], baseline: str) -> float:
    """The widest IQR of a per-round ratio to ``baseline`` (0 without a baseline)."""
    ref = timings.get(baseline)
    if not ref:
        return 0.0
    return max((round_ratios(ts, ref).spread for name, ts in timings.items()
                if name != baseline and ts and len(ts) == len(ref)), default=0.0)


def state_pairs(
    inputs: Sequence[edge_sdk.TensorSpec], outputs: Sequence[edge_sdk.TensorSpec],
) -> dict[str, str]:
    """Input name → output name for state the caller feeds back: same dtype and the
    same fully fixed shape, and the output is named after the input (``state`` →
    ``state_out``, ``h`` → ``h_n``). Ambiguous matches are left out."""
    pairs: dict[str, str] = {}
    for i in inputs:
        if not i.shape or not all(isinstance(d, int) for d in i.shape):
            continue
        named = [o for o in outputs if o.dtype == i.dtype and o.shape == i.shape
                 and o.name != i.name and _related(i.name, o.name)]
        if len(named) == 1:
            pairs[i.name] = named[0].name
    return pairs


def _related(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a in b or b in a:
        return True
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common >= 3


def closed_loop(
    predict: Callable[[dict[str, np.ndarray]], Mapping[str, Any]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    state: Mapping[str, str],
) -> list[dict[str, np.ndarray]]:
    """Stream ``feeds`` in order, starting from the first feed's state and then
    feeding each step's state outputs back as the next step's state inputs."""
    current = {k: np.asarray(feeds[0][k]) for k in state}
    outs: list[dict[str, np.ndarray]] = []
    for f in feeds:
        out = predict({**dict(f), **current})
        step = {k: np.asarray(v) for k, v in out.items()}
        outs.append(step)
        missing = [o for o in state.values() if o not in step]
        if missing:
            raise ConversionError(f"state output(s) {missing} missing from the outputs "
                                  f"{list(step)}")
        current = {i: step[o] for i, o in state.items()}
    return outs


def _with_acc(acc: Accuracy) -> Accuracy:
    from dataclasses import replace

    return replace(acc, closed_loop=True)


def _caller(pred: Any, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
    predict = pred.predict
    return lambda: predict(feed)


def _with(m: Measurement, **changes: Any) -> Measurement:
    from dataclasses import replace

    return replace(m, **changes)


def accuracy(
    outputs: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    metric: str,
    *,
    labels: np.ndarray | None = None,
) -> Accuracy:
    """Compare per-sample ``outputs`` with ``reference`` (matched by output name; a
    reference output missing from ``outputs`` is an error)."""
    names = list(reference[0].keys())
    missing = [k for k in names if k not in outputs[0]]
    if missing:
        # Frameworks may name outputs differently; fall back to position when counts agree.
        if len(outputs[0]) == len(names):
            outputs = [dict(zip(names, o.values(), strict=True)) for o in outputs]
        else:
            raise ConversionError(
                f"candidate outputs {list(outputs[0])} do not match the reference outputs {names}"
            )
    per: dict[str, float] = {}
    drops: dict[str, float] = {}
    ref_score: float | None = None
    scored_labels = False
    for key in names:
        cand = [np.asarray(o[key]) for o in outputs]
        ref = [np.asarray(r[key]) for r in reference]
        for c, r in zip(cand, ref, strict=True):
            if c.shape != r.shape:
                raise ConversionError(
                    f"output '{key}' has shape {list(c.shape)}, the reference {list(r.shape)}"
                )
        if ref[0].dtype.kind not in "fc":
            agree = float(np.mean([np.array_equal(c, r) for c, r in zip(cand, ref, strict=True)]))
            per[key] = agree
            drops[key] = 1.0 - agree
            continue
        if metric == "cosine":
            cos = float(np.mean([_cosine(c, r) for c, r in zip(cand, ref, strict=True)]))
            per[key], drops[key] = cos, 1.0 - cos
        elif metric == "mse":
            err = float(np.mean([np.mean((c.astype(np.float64) - r) ** 2)
                                 for c, r in zip(cand, ref, strict=True)]))
            per[key], drops[key] = err, err
        elif metric == "max-abs":
            err = float(max(np.max(np.abs(c.astype(np.float64) - r)) if c.size else 0.0
                            for c, r in zip(cand, ref, strict=True)))
            per[key], drops[key] = err, err
        else:  # top1
            if ref[0].ndim == 0 or ref[0].shape[-1] < 2:
                continue
            ca = np.concatenate([np.argmax(c, axis=-1).reshape(-1) for c in cand])
            ra = np.concatenate([np.argmax(r, axis=-1).reshape(-1) for r in ref])
            if labels is not None and not scored_labels and ca.shape[0] == labels.shape[0]:
                scored_labels = True
                acc_c = float(np.mean(ca == labels))
                ref_score = float(np.mean(ra == labels))
                per[key], drops[key] = acc_c, max(0.0, ref_score - acc_c)
            else:
                agree = float(np.mean(ca == ra))
                per[key], drops[key] = agree, 1.0 - agree
    if not drops:
        raise ConversionError(
            f"metric {metric!r} found no output to score (top1 needs an output with class "
            "scores on its last axis); choose --metric cosine, mse or max-abs"
        )
    worst = max(drops, key=lambda k: drops[k])
    return Accuracy(metric=metric, score=per[worst], drop=drops[worst], per_output=per,
                    samples=len(outputs), reference_score=ref_score)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64).reshape(-1)
    y = b.astype(np.float64).reshape(-1)
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0 or not np.isfinite(nx) or not np.isfinite(ny):
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def choice_rule(
    prefer: str, *, baseline: str, requested: str | None = None,
    latency_tolerance: float = 0.05, balanced_max_slowdown: float = 0.10,
    balanced_max_size_ratio: float = 0.5,
) -> str:
    """The rule :func:`select` applies, in words, for reports."""
    if prefer not in PREFER:
        raise ConversionError(f"unknown preference {prefer!r} (expected {', '.join(PREFER)})")
    if requested in (None, "auto"):
        pool = (f"among candidates within the accuracy budget and not slower than {baseline} "
                "(slower: the lower quartile of its per-round latency ratios to "
                f"{baseline} above {1 + latency_tolerance:.2f})")
    else:
        pool = f"among the {requested} variants within the accuracy budget"
    order = ", ".join(SCHEMES)
    fastest = ("the fastest wins (lowest median ratio; every candidate not slower than it "
               "by the same band ties with it, and the tie goes to the smallest, then the "
               f"scheme order {order})")
    if prefer == "latency":
        return f"{pool}, {fastest}"
    if prefer == "size":
        return f"{pool}, the smallest wins (equal sizes: the lower latency ratio)"
    return (f"{pool}, {fastest}, unless one at most {balanced_max_slowdown:.0%} slower than "
            "the fastest (the lower quartile of its per-round ratios to it at most "
            f"{1 + balanced_max_slowdown:.2f}) is less than {balanced_max_size_ratio:.0%} of "
            "its size: then the smallest such")


def select(
    measurements: Sequence[Measurement],
    *,
    baseline: str,
    max_drop: float,
    requested: str | None = None,
    force: bool = False,
    ineligible: Mapping[str, str] | None = None,
    prefer: str = "balanced",
    latency_tolerance: float = 0.05,
    balanced_max_slowdown: float = 0.10,
    balanced_max_size_ratio: float = 0.5,
    preferred: str | None = None,
    preferred_why: str = "preferred",
) -> Selection:
    """Pick a candidate.

    ``requested`` None (auto): among the candidates within the accuracy budget
    that are not slower than ``baseline`` by the noise band (:meth:`Ratio.status` with
    ``latency_tolerance``; the baseline itself always counts), the one ``prefer`` names
    (see the module docstring). ``requested`` a scheme name: the
    same rule among that scheme's candidates within budget; none within budget
    raises :class:`ConversionError` with the measured figure unless ``force``
    (then the most accurate one, with a warning). ``ineligible`` maps candidate
    names to the reason they may not be chosen (e.g. no-op quantization).
    ``preferred`` (a candidate name; ``preferred_why`` says why in words) wins whenever
    it was measured and is within the budget, whatever its latency; otherwise the rule
    above applies, with a warning. ``Selection.rule`` states the rule, ``Selection.why``
    the figures behind it, ``Selection.ratios`` every measured candidate's latency ratio
    to the baseline.
    """
    if prefer not in PREFER:
        raise ConversionError(f"unknown preference {prefer!r} (expected {', '.join(PREFER)})")
    skip = dict(ineligible or {})
    by_name = {m.name: m for m in measurements}
    base = by_name.get(baseline)
    if base is None or not base.ok:
        why = "missing" if base is None else base.error
        raise ConversionError(f"the float baseline '{baseline}' could not be measured: {why}")
    assert base.accuracy is not None and base.latency_ms is not None
    rule = choice_rule(prefer, baseline=baseline, requested=requested,
                       latency_tolerance=latency_tolerance,
                       balanced_max_slowdown=balanced_max_slowdown,
                       balanced_max_size_ratio=balanced_max_size_ratio)
    tol = latency_tolerance
    ratios = {m.name: ratio_of(m, base) for m in measurements if m.ok}
    pick = _Rule(prefer, tol, balanced_max_slowdown, balanced_max_size_ratio, base)
    warnings: list[str] = []
    metric = base.accuracy.metric
    if not base.accuracy.within(max_drop):
        msg = ("the converted float model itself differs from the source: "
               + (_over(base.accuracy) if base.accuracy.breaks else
                  f"{metric} drop {base.accuracy.drop:.4g} > budget {max_drop:.4g}"))
        if not force:
            raise ConversionError(msg + " (pass --force to accept)")
        warnings.append(msg)

    def within(m: Measurement) -> bool:
        return m.accuracy is not None and m.accuracy.within(max_drop)

    def slower(m: Measurement) -> bool:
        return ratios[m.name].status(tol) == "slower"

    def done(chosen: Measurement, why: str, rule: str) -> Selection:
        return Selection(chosen, why, budget_ok, tuple(warnings), rule, ratios, tol)

    ok = [m for m in measurements if m.ok and m.name not in skip]
    budget_ok = tuple(m.name for m in ok if within(m))
    if preferred is not None and requested != "none":
        pref = next((m for m in ok if m.name == preferred), None)
        if pref is not None and within(pref):
            if slower(pref):
                warnings.append(f"{pref.name} is {ratios[pref.name].text()} the latency of "
                                f"{base.name} on this machine")
            why = (f"{pref.name}: {preferred_why}, within the budget ({_acc(pref, max_drop)}), "
                   f"{_ratio(pref, base)}")
            return done(pref, why, f"{preferred_why} when within the accuracy budget")
        m = by_name.get(preferred)
        state = (skip.get(preferred) or (m.error if m is not None else None) or "not built")
        if m is not None and m.ok and m.name not in skip:
            assert m.accuracy is not None
            state = f"{metric} drop {m.accuracy.drop:.4g} > budget {max_drop:.4g}"
        warnings.append(f"{preferred} ({preferred_why}) was not chosen: {state}; the usual "
                        "rule chose instead")
        rule = f"{preferred_why} when within the accuracy budget; it was not, so: {rule}"
    if requested in (None, "auto"):
        pool = [m for m in ok if within(m) and not slower(m)]
        if base not in pool:
            pool.append(base)
        chosen, note = pick(pool)
        if chosen is base:
            why = f"{base.name}: no quantized candidate was chosen within the budget (" + \
                "; ".join(_rejection(m, base, max_drop, skip, tol) for m in measurements
                          if m is not base) + ")"
            if len(measurements) == 1:
                why = f"{base.name}: the only candidate"
        else:
            why = (f"{chosen.name}: {note}, within the budget ({_acc(chosen, max_drop)}), "
                   f"{_ratio(chosen, base)}")
        return done(chosen, why, rule)
    if requested == "none":
        return done(base, f"{base.name}: float model requested (--quantize none)",
                    "float model requested (--quantize none)")
    pool = [m for m in ok if m.scheme == requested]
    if not pool:
        reasons = "; ".join(f"{m.name}: {skip.get(m.name) or m.error or 'not measured'}"
                            for m in measurements if m.scheme == requested) or "no variant built"
        raise ConversionError(f"--quantize {requested} produced no usable model ({reasons})")
    good = [m for m in pool if within(m)]
    if good:
        chosen, note = pick(good)
        why = (f"{chosen.name}: among the {requested} variants, {note}, within the budget "
               f"({_acc(chosen, max_drop)}), {_ratio(chosen, base)}")
    else:
        best = min(pool, key=lambda m: m.accuracy.drop if m.accuracy else float("inf"))
        assert best.accuracy is not None
        over = (_over(best.accuracy) if best.accuracy.breaks else
                f"{metric} drop {best.accuracy.drop:.4g} > {max_drop:.4g}")
        msg = (f"--quantize {requested} breaks the accuracy budget: best variant {best.name} "
               f"has {over} on {best.accuracy.samples} evaluation samples")
        if not force:
            raise ConversionError(msg + " (pass --force to accept it, or raise --max-drop)")
        warnings.append(msg + " (accepted with --force)")
        chosen = best
        why = f"{chosen.name}: most accurate {requested} variant (forced over budget)"
        rule = f"the most accurate {requested} variant (forced over the budget)"
    if slower(chosen):
        warnings.append(f"{chosen.name} is {ratios[chosen.name].text()} the latency of "
                        f"{base.name} on this machine")
    return done(chosen, why, rule)


def _order(m: Measurement) -> tuple[int, str]:
    """The fixed scheme order, then the name: the last tie-break."""
    rank = SCHEMES.index(m.scheme) if m.scheme in SCHEMES else len(SCHEMES)
    return rank, m.name


def _smallest(m: Measurement) -> tuple[int, int, str]:
    return (m.size_bytes, *_order(m))


@dataclass(frozen=True)
class _Rule:
    """One ``prefer`` rule over a pool: the chosen candidate and a phrase with the
    figures behind it ("fastest", "smallest (...)", "at most 10% slower than ...")."""

    prefer: str
    tolerance: float
    max_slowdown: float
    max_size_ratio: float
    base: Measurement

    def __call__(self, pool: Sequence[Measurement]) -> tuple[Measurement, str]:
        fastest = min(pool, key=lambda m: (ratio_of(m, self.base).median, *_order(m)))
        # Everything the noise band cannot tell from the fastest ties with it; the tie
        # goes by size and the fixed scheme order, never by which of them happened to
        # measure a hair faster in this run.
        tied = [m for m in pool if ratio_of(m, fastest).status(self.tolerance) != "slower"]
        quick = min(tied, key=_smallest)
        if self.prefer == "size":
            small = min(pool, key=lambda m: (m.size_bytes, ratio_of(m, self.base).median,
                                             *_order(m)))
            note = "smallest"
            if small is not fastest:
                note += (f" ({_times(small.size_bytes, fastest.size_bytes)} the size and "
                         f"{ratio_of(small, fastest).text()} the latency of the fastest, "
                         f"{fastest.name})")
            return small, note
        fastest_note = "fastest"
        if quick is not fastest:
            fastest_note += (f" (as fast as {fastest.name} within the noise band: "
                             f"{ratio_of(quick, fastest).text()} its latency, and smaller)")
        if self.prefer == "latency":
            return quick, fastest_note
        limit = 1 + self.max_slowdown
        halves = [m for m in pool if m.size_bytes < self.max_size_ratio * quick.size_bytes]
        smaller = [m for m in halves if ratio_of(m, fastest).q1 <= limit]
        if not smaller:
            # Say what the trade would have been, when there was one on offer.
            if halves:
                best = min(halves, key=lambda m: (ratio_of(m, fastest).median, *_smallest(m)))
                fastest_note += (
                    f" (the nearest under {self.max_size_ratio:.0%} of its size, {best.name} "
                    f"at {_times(best.size_bytes, quick.size_bytes)}, is "
                    f"{ratio_of(best, fastest).text()} the latency of the fastest, more "
                    f"than {limit:.2f}× at its lower quartile)")
            return quick, fastest_note
        chosen = min(smaller, key=_smallest)
        slower = (f"at most {self.max_slowdown:.0%} slower than the fastest, {fastest.name} "
                  f"({ratio_of(chosen, fastest).text()})")
        whose = "its size" if quick is fastest else f"the size of {quick.name}, as fast"
        return chosen, (f"{slower}, and under {self.max_size_ratio:.0%} of {whose} "
                        f"({_times(chosen.size_bytes, quick.size_bytes)})")


def _times(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def _acc(m: Measurement, max_drop: float) -> str:
    assert m.accuracy is not None
    return f"{m.accuracy.metric} drop {m.accuracy.drop:.4g} ≤ {max_drop:.4g}"


def _ratio(m: Measurement, base: Measurement) -> str:
    size = m.size_bytes / base.size_bytes if base.size_bytes else float("nan")
    return f"{ratio_of(m, base).text()} {base.name} latency, {size:.2f}× size"


def _rejection(m: Measurement, base: Measurement, max_drop: float,
               skip: Mapping[str, str], tol: float) -> str:
    if m.name in skip:
        return f"{m.name} {skip[m.name]}"
    if not m.ok:
        return f"{m.name} {m.error or 'not measured'}"
    assert m.accuracy is not None
    if not m.accuracy.within(max_drop):
        return f"{m.name} over budget ({_over(m.accuracy)})"
    r = ratio_of(m, base)
    band = f" (IQR {r.q1:.2f}–{r.q3:.2f})" if r.spread > 0 else ""
    return f"{m.name} {r.median:.2f}× latency{band}, {r.status(tol)}"


def _over(acc: Accuracy) -> str:
    """Why an accuracy is over its budget, in a phrase."""
    if acc.breaks:
        return "; ".join(acc.breaks)
    return f"{acc.metric} drop {acc.drop:.3g}"


__all__ = [
    "METRICS",
    "PREFER",
    "Accuracy",
    "MeasureConfig",
    "Measurement",
    "Ratio",
    "Selection",
    "accuracy",
    "choice_rule",
    "closed_loop",
    "default_max_drop",
    "measure_candidates",
    "ratio_of",
    "round_ratios",
    "select",
    "state_pairs",
]
