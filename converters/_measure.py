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

The choice rule (``prefer``): ``latency`` takes the fastest candidate (equally
fast within the noise band: the smaller); ``size`` the smallest; ``balanced``
the fastest unless one at most ``balanced_max_slowdown`` slower is less than
``balanced_max_size_ratio`` of its size (then the smallest such). In auto mode
every rule only considers candidates within the accuracy budget and no slower
than the float baseline.

Accuracy ("drop", smaller is better, compared with ``max_drop``):
- ``cosine``: per output, mean over samples of the cosine similarity to the
  reference; drop = 1 - the worst output's mean.
- ``top1``: argmax agreement with the reference on every class-score output
  (float, last dim >= 2) and exact agreement on integer outputs; with
  ``labels`` the first such output is scored as accuracy, and the drop is the
  reference's accuracy minus the candidate's.
- ``mse`` / ``max-abs``: the worst output's mean squared / max absolute error.
Integer or boolean outputs count, under every metric, as 1 - exact agreement.

Latency: interquartile mean over ``rounds`` of the p50 of ``runs_per_round`` batch-1 calls
on the first evaluation sample, candidates interleaved in a shuffled order with a
fresh session each round, so that machine noise hits all alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import measure
from edge_sdk.errors import ConversionError, EdgeError

METRICS = ("cosine", "top1", "mse", "max-abs")
PREFER = ("latency", "size", "balanced")


@dataclass(frozen=True)
class MeasureConfig:
    rounds: int = 8
    runs_per_round: int = 20
    warmup: int = 5
    max_eval_samples: int = 500
    seed: int = 0
    # Candidates whose latency is within this fraction of the fastest are treated as
    # equally fast, and the smallest of them wins.
    latency_tolerance: float = 0.05
    # --prefer balanced: a candidate at most this fraction slower than the fastest...
    balanced_max_slowdown: float = 0.10
    # ...and smaller than this fraction of its size wins over it.
    balanced_max_size_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.balanced_max_slowdown <= 1.0:
            raise ValueError(f"balanced_max_slowdown must be in [0, 1], got "
                             f"{self.balanced_max_slowdown}")
        if not 0.0 < self.balanced_max_size_ratio <= 1.0:
            raise ValueError(f"balanced_max_size_ratio must be in (0, 1], got "
                             f"{self.balanced_max_size_ratio}")


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
class Selection:
    chosen: Measurement
    why: str
    within_budget: tuple[str, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    rule: str = ""  # the choice rule applied, in words (see choice_rule)


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
            results[name] = _with(base, error=f"does not run: {_short(err)}")
            bar.step(name)
            continue
        del pred
        paths[name] = Path(path)
        results[name] = _with(base, accuracy=acc)
        bar.step(name)
    timings: dict[str, list[float]] = {name: [] for name in paths}
    feed = dict(feeds[0])
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.rounds):
        # A fresh session per round and a shuffled order: on a small shared machine a
        # session's thread placement, a neighbour's spinning threads or a frequency
        # change otherwise favour one candidate systematically. Only one timed session
        # is alive at a time.
        order = [n for n in rng.permutation(list(paths)) if n in paths]
        for name in order:
            try:
                pred = edge_sdk.load(paths[name], threads=threads)
                stats = measure(_caller(pred, feed), runs=cfg.runs_per_round,
                                warmup=cfg.warmup)
                del pred
            except Exception as err:
                results[name] = _with(results[name], error=f"fails while timed: {_short(err)}")
                paths.pop(name, None)
                timings.pop(name, None)
                continue
            timings[name].append(stats.p50_ms)
            bar.step(name)
    bar.close()
    for name, ts in timings.items():
        if ts and results[name].error is None:
            results[name] = _with(results[name], latency_ms=_interquartile_mean(ts),
                                  latency_rounds_ms=tuple(ts))
    return [results[name] for name, _, _ in candidates]


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


def _interquartile_mean(values: Sequence[float]) -> float:
    """Mean of the middle half. Like a median it ignores outlier rounds, but it does
    not jump between the two modes that 2-thread sessions show on a busy 2-core
    machine (both threads on free cores or not), so rankings stay stable."""
    v = sorted(values)
    k = len(v) // 4
    mid = v[k: len(v) - k] or v
    return float(np.mean(mid))


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
        pool = f"among candidates within the accuracy budget and no slower than {baseline}"
    else:
        pool = f"among the {requested} variants within the accuracy budget"
    fastest = (f"the fastest wins (within {latency_tolerance:.0%} or the measured noise, "
               "at most 10%, the smaller)")
    if prefer == "latency":
        return f"{pool}, {fastest}"
    if prefer == "size":
        return f"{pool}, the smallest wins (equal sizes: the faster)"
    return (f"{pool}, {fastest}, unless one at most {balanced_max_slowdown:.0%} slower "
            "(plus the fastest's measured noise, at most 10%) is "
            f"less than {balanced_max_size_ratio:.0%} of its size: then the smallest such")


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
    that are no slower than ``baseline`` (the baseline itself always counts),
    the one ``prefer`` names (see the module docstring; candidates within
    ``latency_tolerance`` of the fastest, widened to its measured round-to-round
    noise, at most 10%, count as equally fast). ``requested`` a scheme name: the
    same rule among that scheme's candidates within budget; none within budget
    raises :class:`ConversionError` with the measured figure unless ``force``
    (then the most accurate one, with a warning). ``ineligible`` maps candidate
    names to the reason they may not be chosen (e.g. no-op quantization).
    ``preferred`` (a candidate name; ``preferred_why`` says why in words) wins whenever
    it was measured and is within the budget, whatever its latency; otherwise the rule
    above applies, with a warning. ``Selection.rule`` states the rule, ``Selection.why``
    the figures behind it.
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
    pick = _Rule(prefer, latency_tolerance, balanced_max_slowdown, balanced_max_size_ratio)
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

    ok = [m for m in measurements if m.ok and m.name not in skip]
    budget_ok = tuple(m.name for m in ok if within(m))
    if preferred is not None and requested != "none":
        pref = next((m for m in ok if m.name == preferred), None)
        if pref is not None and within(pref):
            assert pref.latency_ms is not None
            if pref.latency_ms > base.latency_ms:
                warnings.append(f"{pref.name} is {pref.latency_ms / base.latency_ms:.2f}× the "
                                f"latency of {base.name} on this machine")
            why = (f"{pref.name}: {preferred_why}, within the budget ({_acc(pref, max_drop)}), "
                   f"{_ratio(pref, base)}")
            return Selection(pref, why, budget_ok, tuple(warnings),
                             f"{preferred_why} when within the accuracy budget")
        m = by_name.get(preferred)
        state = (skip.get(preferred) or (m.error if m is not None else None) or "not built")
        if m is not None and m.ok and m.name not in skip:
            assert m.accuracy is not None
            state = f"{metric} drop {m.accuracy.drop:.4g} > budget {max_drop:.4g}"
        warnings.append(f"{preferred} ({preferred_why}) was not chosen: {state}; the usual "
                        "rule chose instead")
        rule = f"{preferred_why} when within the accuracy budget; it was not, so: {rule}"
    if requested in (None, "auto"):
        pool = [m for m in ok if within(m) and m.latency_ms is not None
                and m.latency_ms <= base.latency_ms]
        if base not in pool:
            pool.append(base)
        chosen, note = pick(pool)
        if chosen is base:
            why = f"{base.name}: no quantized candidate was faster within the budget (" + \
                "; ".join(_rejection(m, base, max_drop, skip) for m in measurements
                          if m is not base) + ")"
            if len(measurements) == 1:
                why = f"{base.name}: the only candidate"
        else:
            why = (f"{chosen.name}: {note}, within the budget ({_acc(chosen, max_drop)}), "
                   f"{_ratio(chosen, base)}")
        return Selection(chosen, why, budget_ok, tuple(warnings), rule)
    if requested == "none":
        return Selection(base, f"{base.name}: float model requested (--quantize none)",
                         budget_ok, tuple(warnings), "float model requested (--quantize none)")
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
    assert chosen.latency_ms is not None
    if chosen.latency_ms > base.latency_ms:
        warnings.append(f"{chosen.name} is {chosen.latency_ms / base.latency_ms:.2f}× the "
                        f"latency of {base.name} on this machine")
    return Selection(chosen, why, budget_ok, tuple(warnings), rule)


_MAX_TIE = 0.10


@dataclass(frozen=True)
class _Rule:
    """One ``prefer`` rule over a pool: the chosen candidate and a phrase with the
    figures behind it ("fastest", "smallest (...)", "at most 10% slower than ...")."""

    prefer: str
    tolerance: float
    max_slowdown: float
    max_size_ratio: float

    def __call__(self, pool: Sequence[Measurement]) -> tuple[Measurement, str]:
        quick = _fastest_smallest(pool, self.tolerance)
        if self.prefer == "size":
            small = min(pool, key=lambda m: (m.size_bytes, _lat(m)))
            fastest, _ = _tie_band(pool, self.tolerance)
            note = "smallest"
            if small is not fastest:
                note += (f" ({_times(small.size_bytes, fastest.size_bytes)} the size and "
                         f"{_times(_lat(small), _lat(fastest))} the latency of the fastest, "
                         f"{fastest.name})")
            return small, note
        fastest_note = "fastest" + _tie_note(quick, pool, self.tolerance)
        if self.prefer == "latency":
            return quick, fastest_note
        # The allowance is widened by the fastest's measured noise (at most 10 %): on a
        # busy host the round-to-round spread exceeds 10 %, and an unwidened allowance
        # made the choice flip from run to run.
        fastest, _ = _tie_band(pool, self.tolerance)
        band = min(_MAX_TIE, _noise(fastest))
        allow = self.max_slowdown + band
        noisy = f" (+ {band:.0%} measured noise)" if band >= 0.005 else ""
        limit = _lat(fastest) * (1 + allow)
        smaller = [m for m in pool if _lat(m) <= limit
                   and m.size_bytes < self.max_size_ratio * quick.size_bytes]
        if not smaller:
            # Say what the trade would have been, when there was one on offer.
            halves = [m for m in pool if m.size_bytes < self.max_size_ratio * quick.size_bytes]
            if halves:
                best = min(halves, key=lambda m: (_lat(m), m.size_bytes))
                fastest_note += (
                    f" (the nearest under {self.max_size_ratio:.0%} of its size, {best.name} "
                    f"at {_times(best.size_bytes, quick.size_bytes)}, is "
                    f"{_times(_lat(best), _lat(fastest))} the latency of the fastest, more "
                    f"than {1 + allow:.2f}×{noisy})")
            return quick, fastest_note
        chosen = min(smaller, key=lambda m: (m.size_bytes, _lat(m)))
        slower = (f"at most {self.max_slowdown:.0%}{noisy} slower than the fastest, "
                  f"{fastest.name} ({_times(_lat(chosen), _lat(fastest))})")
        whose = "its size" if quick is fastest else f"the size of {quick.name}, as fast"
        return chosen, (f"{slower}, and under {self.max_size_ratio:.0%} of {whose} "
                        f"({_times(chosen.size_bytes, quick.size_bytes)})")


def _lat(m: Measurement) -> float:
    return m.latency_ms if m.latency_ms is not None else float("inf")


def _times(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def _tie_band(pool: Sequence[Measurement], tol: float) -> tuple[Measurement, float]:
    """The fastest candidate and the relative latency band counted as "as fast": at
    least ``tol``, widened to the fastest's own round-to-round noise (half its
    interquartile range), at most 10%."""
    fastest = min(pool, key=_lat)
    return fastest, min(_MAX_TIE, max(tol, _noise(fastest)))


def _noise(m: Measurement) -> float:
    """Relative round-to-round spread of a latency (half the interquartile range over
    the median); 0 with fewer than 4 rounds."""
    rounds = sorted(m.latency_rounds_ms)
    if len(rounds) < 4 or not m.latency_ms:
        return 0.0
    q1, q3 = np.percentile(rounds, [25, 75])
    return float(q3 - q1) / 2 / m.latency_ms


def _fastest_smallest(pool: Sequence[Measurement], tol: float) -> Measurement:
    fastest, band = _tie_band(pool, tol)
    limit = _lat(fastest) * (1 + band)
    near = [m for m in pool if _lat(m) <= limit]
    return min(near, key=lambda m: (m.size_bytes, _lat(m)))


def _tie_note(chosen: Measurement, pool: Sequence[Measurement], tol: float) -> str:
    fastest, band = _tie_band(pool, tol)
    if fastest is chosen:
        return ""
    return f" (as fast as {fastest.name} within {band:.0%} measurement noise, and smaller)"


def _acc(m: Measurement, max_drop: float) -> str:
    assert m.accuracy is not None
    return f"{m.accuracy.metric} drop {m.accuracy.drop:.4g} ≤ {max_drop:.4g}"


def _ratio(m: Measurement, base: Measurement) -> str:
    assert m.latency_ms is not None and base.latency_ms
    size = m.size_bytes / base.size_bytes if base.size_bytes else float("nan")
    return f"{m.latency_ms / base.latency_ms:.2f}× {base.name} latency, {size:.2f}× size"


def _rejection(m: Measurement, base: Measurement, max_drop: float,
               skip: Mapping[str, str]) -> str:
    if m.name in skip:
        return f"{m.name} {skip[m.name]}"
    if not m.ok:
        return f"{m.name} {m.error or 'not measured'}"
    assert m.accuracy is not None and m.latency_ms is not None and base.latency_ms
    if not m.accuracy.within(max_drop):
        return f"{m.name} over budget ({_over(m.accuracy)})"
    return f"{m.name} {m.latency_ms / base.latency_ms:.2f}× latency"


def _over(acc: Accuracy) -> str:
    """Why an accuracy is over its budget, in a phrase."""
    if acc.breaks:
        return "; ".join(acc.breaks)
    return f"{acc.metric} drop {acc.drop:.3g}"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:240] if text else type(err).__name__)


__all__ = [
    "METRICS",
    "PREFER",
    "Accuracy",
    "MeasureConfig",
    "Measurement",
    "Selection",
    "accuracy",
    "choice_rule",
    "closed_loop",
    "default_max_drop",
    "measure_candidates",
    "select",
    "state_pairs",
]
