"""What a model is for, and accuracy judged in those terms on every sample.

A :class:`TaskPlan` says which output is scored how (``output → kind``); it comes
from ``--task``, ``--metric OUTPUT:KIND`` or is detected from the source (a
scikit-learn estimator's kind, a detector's output layout, a softmax head)::

    plan = plan_task(task=None, output_metrics=("output0:detect-yolov8",),
                     reference=reference, source_extra={})
    scorer = TaskScorer(plan, generic_metric="cosine", max_drop=None)
    acc = scorer(candidate_outputs, reference)   # -> Accuracy, acc.within(budget)

Kinds (figure per sample; the main figure is pooled over the evaluation set):

- ``top1`` (classify): top-1 agreement with the source; top-5 overlap and the largest
  probability change are reported.
- ``detect-yolov8`` ``[B, 4+C, N]``, ``detect-yolov5`` ``[B, N, 5+C]``, ``detect-boxes``
  (boxes ``[B, N, 4]`` or ``[B, 4, N]``, x1y1x2y2 or cx cy w h, with a scores output
  ``[B, N, C]`` or ``[B, C, N]``): decode, score
  threshold, class-aware NMS, then each image's detections are matched between source
  and candidate by class and IoU >= 0.5; the figure is the share matched.
- ``segment`` / ``segment-nhwc``: argmax over the class axis (1, or last), IoU per class
  (pooled), mean over classes.
- ``cosine`` (embed): cosine per sample (row of the batch), never over the whole batch.
- ``regress``: absolute error, and relative to the mean magnitude of the source's outputs.

A candidate with NaN/inf where the source is finite fails the output whole.
Outputs the plan does not name are scored with the generic metric (``--metric cosine``
etc.) and its default budget, as before tasks existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sdk.errors import ConversionError, UsageError
from edge_sdk.quality import (
    DetectConfig,
    abs_error,
    class_changes,
    corners,
    cosine,
    decode,
    detections,
    iou,
    is_probabilities,
    match_detections,
    nms,
    segment_counts,
    segment_layout,
    softmax,
)

from ._measure import Accuracy, accuracy, default_max_drop

TASKS = ("classify", "detect", "segment", "embed", "regress", "generic")
KIND_TASK = {
    "top1": "classify", "detect-yolov8": "detect", "detect-yolov5": "detect",
    "detect-boxes": "detect", "segment": "segment", "segment-nhwc": "segment", "cosine": "embed",
    "regress": "regress",
}
KINDS = tuple(KIND_TASK)
DETECT_DEFAULTS = DetectConfig()


@dataclass(frozen=True)
class Budget:
    """``main``: the largest drop of the pooled figure; ``sample``: the largest drop any
    single sample may show (None: no per-sample bound)."""

    main: float
    sample: float | None
    text: str


#: Default budgets per kind (the README states them).
BUDGETS: Mapping[str, Budget] = {
    "top1": Budget(0.01, None, "top-1 agreement >= 99%"),
    "detect": Budget(0.02, 0.10, "detections matched >= 98%, no image below 90%"),
    "segment": Budget(0.02, 0.10, "mean IoU over classes >= 0.98, no sample below 0.90"),
    "cosine": Budget(0.01, 0.05, "mean per-sample cosine >= 0.99, no sample below 0.95"),
    "regress": Budget(0.01, 0.05, "mean absolute error <= 1% of the mean |output|, no "
                                  "sample above 5%"),
}


def _budget_key(kind: str) -> str:
    return "detect" if kind.startswith("detect") else kind.split("-")[0]


@dataclass(frozen=True)
class OutputMetric:
    kind: str
    partner: str | None = None  # detect-boxes: the scores output
    sigmoid: bool = False  # detect: class scores are logits in the source
    # detect-boxes: boxes are [B, 4, N] / scores [B, C, N] (transposed), and their format
    # ("xyxy", or "cxcywh" where some box has x2 < x1 or y2 < y1 read as corners).
    boxes_t: bool = False
    scores_t: bool = False
    box_format: str = "xyxy"


@dataclass(frozen=True)
class TaskPlan:
    task: str
    outputs: Mapping[str, OutputMetric] = field(default_factory=dict)
    detected_from: str = ""
    hint: str = ""  # generic when detected: what the user may mean and the flag for it

    def describe(self) -> dict[str, Any]:
        return {"name": self.task, "detected_from": self.detected_from,
                **({"hint": self.hint} if self.hint else {}),
                "outputs": {k: v.kind for k, v in self.outputs.items()},
                "budget": {k: BUDGETS[_budget_key(v.kind)].text
                           for k, v in self.outputs.items()}}

    def task_outputs(self) -> dict[str, dict[str, Any]]:
        """The manifest's ``extra["task_outputs"]``: per output, how it is judged, so
        that a device comparing a shadow model's answers (edge_sdk.quality.Comparer)
        reads them as the conversion did."""
        out: dict[str, dict[str, Any]] = {}
        for name, m in self.outputs.items():
            entry: dict[str, Any] = {"kind": m.kind}
            if m.kind.startswith("detect"):
                entry["sigmoid"] = m.sigmoid
            if m.kind == "detect-boxes":
                entry.update(partner=m.partner, boxes_t=m.boxes_t, scores_t=m.scores_t,
                             box_format=m.box_format)
            out[name] = entry
        return out

    def default_max_drop(self) -> float:
        """The main budget of the plan's strictest output kind."""
        return min((BUDGETS[_budget_key(v.kind)].main for v in self.outputs.values()),
                   default=0.01)


# ---------------------------------------------------------------- planning

def parse_output_metrics(values: Sequence[str]) -> dict[str, str]:
    """``OUTPUT:KIND`` entries → {output: kind}; a bad entry is a :class:`UsageError`."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, kind = v.rpartition(":")
        if not sep or not name or kind not in KINDS:
            raise UsageError(f"--metric {v!r}: expected OUTPUT:KIND with KIND one of "
                             f"{', '.join(KINDS)} (or one of cosine, top1, mse, max-abs alone)")
        out[name] = kind
    return out


def plan_task(
    task: str | None, output_metrics: Sequence[str],
    reference: Sequence[Mapping[str, np.ndarray]], source_extra: Mapping[str, Any], *,
    given_by: str = "--task",
) -> TaskPlan:
    """The task and per-output metrics: ``--metric OUTPUT:KIND`` first, then ``task``
    (given by ``given_by``: ``--task``, ``--postprocess``; when None, what the source
    says), else ``generic`` (no plan)."""
    if task is not None and task not in TASKS:
        raise UsageError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    first = reference[0]
    given = parse_output_metrics(output_metrics)
    for name in given:
        if name not in first:
            raise UsageError(f"--metric {name}:{given[name]}: the model has no output "
                             f"{name!r} (outputs: {', '.join(first)})")
    outputs: dict[str, OutputMetric] = {}
    for name, kind in given.items():
        outputs[name] = _output_metric(name, kind, reference, given=True)
    if outputs:
        named = task if task not in (None, "generic") else KIND_TASK[
            next(iter(outputs.values())).kind]
        return TaskPlan(named, outputs, "--metric OUTPUT:KIND")
    if task is None:
        task, why = _detect(reference, source_extra)
    else:
        why = given_by
    if task == "generic":
        return TaskPlan("generic", hint=generic_hint(reference) if why == "" else "")
    outputs = _plan_outputs(task, reference, strict=why == given_by)
    return TaskPlan(task, outputs, why)


def _detect(reference: Sequence[Mapping[str, np.ndarray]],
            extra: Mapping[str, Any]) -> tuple[str, str]:
    sk = extra.get("sklearn")
    if isinstance(sk, Mapping) and sk.get("task") in TASKS:
        return str(sk["task"]), f"scikit-learn {sk.get('estimator', 'estimator')}"
    if isinstance(sk, Mapping) and "labels" in extra:
        return "classify", f"scikit-learn {sk.get('estimator', 'estimator')} (classifier)"
    if _detector_outputs(reference, strict=True):
        return "detect", "detector output layout"
    first = {k: np.asarray(v) for k, v in reference[0].items()}
    # Classes on axis 1, or last ([B, H, W, C]; not [B, heads, T, T] attention weights).
    if any(v.ndim == 4 and (is_probabilities(v, 1) or (
            v.shape[2] != v.shape[3] and is_probabilities(v, -1))) for v in first.values()):
        return "segment", "per-pixel softmax head"
    if any(v.ndim <= 3 and is_probabilities(v) for v in first.values()):
        return "classify", "softmax/probabilities head"
    return "generic", ""


def generic_hint(reference: Sequence[Mapping[str, np.ndarray]]) -> str:
    """For a model judged generically: the outputs laid out like a detector's or shaped
    like class scores ``[B, C]``, which the generic cosine does not judge in their terms,
    and the flag that does."""
    first = {k: np.asarray(v) for k, v in reference[0].items()}
    det = _detector_outputs(reference, strict=False)
    if det:  # the layout without a detector's value ranges (class logits, say)
        return (f"no task detected; {', '.join(f'{k} {list(first[k].shape)}' for k in det)} "
                "has a detector layout: pass --task detect (or --metric "
                f"{next(iter(det))}:{next(iter(det.values())).kind}) to judge detections")
    like = [f"{k} {list(v.shape)}" for k, v in first.items()
            if v.dtype.kind == "f" and v.ndim == 2 and v.shape[-1] >= 2]
    if not like:
        return ""
    return (f"no task detected; {', '.join(like)} may be class scores (logits) judged by "
            "the generic metric only: pass --task classify (or --task embed/regress) to "
            "judge it in its task's terms")


def _plan_outputs(task: str, reference: Sequence[Mapping[str, np.ndarray]],
                  strict: bool) -> dict[str, OutputMetric]:
    first = {k: np.asarray(v) for k, v in reference[0].items()}
    floats = [k for k, v in first.items() if v.dtype.kind == "f"]
    out: dict[str, OutputMetric] = {}
    if task == "detect":
        out = _detector_outputs(reference, strict=not strict)
        if not out and strict:
            raise UsageError(
                "--task detect: no output has a detector layout ([1, 4+C, N], [1, N, 5+C] or "
                "boxes [1, N, 4] with scores [1, N, C]); name it with --metric "
                "OUTPUT:detect-yolov8 (or detect-yolov5, detect-boxes)")
        return out
    if task == "classify":
        # Probabilities are the head when there are any; another float output next to them
        # (an embedding, say) is no class-score vector and keeps the generic metric.
        probs = [k for k in floats if is_probabilities(first[k])]
        for k in probs or floats:
            if 1 <= first[k].ndim <= 3 and first[k].shape[-1] >= 2:
                out[k] = OutputMetric("top1")
        if strict and not out:
            raise UsageError("--task classify: no output has class scores on its last axis; "
                             "name one with --metric OUTPUT:top1")
        return out
    kind = {"segment": "segment", "embed": "cosine", "regress": "regress"}[task]
    for k in floats:
        if kind == "segment":
            if first[k].ndim == 4:
                out[k] = OutputMetric(segment_layout(first[k]))
            continue
        out[k] = OutputMetric(kind)
    if strict and not out:
        raise UsageError(f"--task {task}: no float output fits it (segment needs "
                         "[B, C, H, W]); name one with --metric OUTPUT:KIND")
    return out


def _output_metric(name: str, kind: str, reference: Sequence[Mapping[str, np.ndarray]],
                   given: bool) -> OutputMetric:
    a = np.asarray(reference[0][name])
    if a.dtype.kind != "f":
        raise UsageError(f"--metric {name}:{kind}: output {name!r} is {a.dtype}, not float "
                         "scores")
    if kind == "detect-boxes":
        m = _boxes_metric(name, reference) if a.ndim == 3 else None
        if m is None:
            raise UsageError(f"--metric {name}:detect-boxes: no scores output [B, N, C] or "
                             f"[B, C, N] next to boxes {list(a.shape)} (boxes are [B, N, 4] "
                             "or [B, 4, N])")
        return m
    need = {"detect-yolov8": 3, "detect-yolov5": 3, "segment": 4,
            "segment-nhwc": 4}.get(kind)
    if need is not None and a.ndim != need:
        raise UsageError(f"--metric {name}:{kind}: output {name!r} has shape {list(a.shape)}, "
                         f"expected {need} dimensions")
    if kind == "detect-yolov8":
        return OutputMetric(kind, sigmoid=_outside01(a[:, 4:, :]))
    if kind == "detect-yolov5":
        return OutputMetric(kind, sigmoid=_outside01(a[:, :, 4:]))
    return OutputMetric(kind)


def _outside01(a: np.ndarray) -> bool:
    return bool(a.size and (float(a.min()) < 0.0 or float(a.max()) > 1.0))


def _boxes_metric(boxes: str, reference: Sequence[Mapping[str, np.ndarray]],
                  strict: bool = False) -> OutputMetric | None:
    """Boxes ``[B, N, 4]`` or ``[B, 4, N]`` and the scores output next to them,
    ``[B, N, C]`` or ``[B, C, N]`` (the untransposed one first); None: no pair. ``strict``
    also asks for scores in [0, 1]."""
    first = reference[0]
    b = np.asarray(first[boxes])
    if b.ndim != 3 or 4 not in b.shape[1:]:
        return None
    boxes_t = b.shape[2] != 4
    n = b.shape[2] if boxes_t else b.shape[1]
    found: list[tuple[bool, str]] = []
    for k, v in first.items():
        v = np.asarray(v)
        if k == boxes or v.dtype.kind != "f" or v.ndim != 3 or v.shape[0] != b.shape[0]:
            continue
        if v.shape[1] == n:
            found.append((False, k))
        elif v.shape[2] == n:
            found.append((True, k))
    if not found:
        return None
    scores_t, partner = sorted(found)[0]
    sc = np.asarray(first[partner])
    if strict and _outside01(sc):
        return None
    return OutputMetric("detect-boxes", partner=partner, sigmoid=_outside01(sc),
                        boxes_t=boxes_t, scores_t=scores_t,
                        box_format=_box_format([np.asarray(r[boxes]) for r in reference],
                                               boxes_t))


def _box_format(boxes: Sequence[np.ndarray], transposed: bool) -> str:
    """Corners (x1 <= x2, y1 <= y2 in every box) or centre and size: a box read as
    corners with x2 < x1 or y2 < y1 cannot be corners."""
    for a in boxes:
        a = np.asarray(a, np.float64)
        a = np.swapaxes(a, -1, -2) if transposed else a
        a = a.reshape(-1, 4)
        if np.any(a[:, 2] < a[:, 0]) or np.any(a[:, 3] < a[:, 1]):
            return "cxcywh"
    return "xyxy"


def _detector_outputs(reference: Sequence[Mapping[str, np.ndarray]],
                      strict: bool) -> dict[str, OutputMetric]:
    """Outputs with a detector layout; ``strict`` also asks for the value ranges a
    detector has (class scores in [0, 1], widths and heights >= 0) so that, say, a
    transformer's hidden states are not taken for one."""
    first = {k: np.asarray(v) for k, v in reference[0].items()}
    found: dict[str, OutputMetric] = {}
    for k, a in first.items():
        if a.dtype.kind != "f" or a.ndim != 3:
            continue
        _, d1, d2 = a.shape
        if (d1 == 4 and d2 >= 16) or (d2 == 4 and d1 >= 16):
            m = _boxes_metric(k, reference, strict=strict)
            if m is not None:
                found[k] = m
            continue
        if 5 <= d1 < d2 and d2 >= 16:
            cls, wh = a[:, 4:, :], a[:, 2:4, :]
            if strict and (_outside01(cls) or float(wh.min()) < 0):
                continue
            found[k] = OutputMetric("detect-yolov8", sigmoid=_outside01(cls))
        elif 6 <= d2 < d1 and d1 >= 16:
            cls, wh = a[:, :, 4:], a[:, :, 2:4]
            if strict and (_outside01(cls) or float(wh.min()) < 0):
                continue
            found[k] = OutputMetric("detect-yolov5", sigmoid=_outside01(cls))
    partners = {m.partner for m in found.values() if m.partner}
    return {k: v for k, v in found.items() if k not in partners}


def detector_outputs(reference: Sequence[Mapping[str, np.ndarray]]) -> dict[str, OutputMetric]:
    """Outputs laid out like a detector's (the layout alone, not its value ranges)."""
    return _detector_outputs(reference, strict=False)


# ---------------------------------------------------------------- scoring

@dataclass(frozen=True)
class OutputScore:
    """One output's figures: ``score`` higher is better, ``drop`` compared with the main
    budget, ``per_sample`` each sample's drop (compared with the per-sample budget)."""

    name: str
    kind: str
    score: float
    drop: float
    per_sample: np.ndarray
    figure: str  # what per_sample measures, in words
    details: dict[str, Any]

    def worst(self) -> tuple[int, float]:
        i = int(np.argmax(self.per_sample)) if self.per_sample.size else 0
        return i, float(self.per_sample[i]) if self.per_sample.size else 0.0


def _rows(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Samples: each feed's outputs split along the batch axis."""
    out: list[np.ndarray] = []
    for a in arrays:
        a = np.asarray(a)
        out.extend([a] if a.ndim <= 1 else list(a))
    return out


def score_top1(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray],
               name: str = "output") -> OutputScore:
    """Classes on the last axis; a sample with more positions (tokens, say) counts each."""
    rc, rr = _rows(cand), _rows(ref)
    classes = int(np.asarray(rr[0]).shape[-1])
    sample = np.concatenate([np.full(int(np.asarray(x).size) // classes, i)
                             for i, x in enumerate(rr)])
    c = np.concatenate([np.asarray(x, np.float64).reshape(-1, classes) for x in rc])
    r = np.concatenate([np.asarray(x, np.float64).reshape(-1, classes) for x in rr])
    agree = np.argmax(c, axis=-1) == np.argmax(r, axis=-1)
    k = min(5, classes)
    tc = np.argsort(-c, axis=-1)[:, :k]
    tr = np.argsort(-r, axis=-1)[:, :k]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(tc, tr, strict=True)])
    probs = bool(r.min() >= 0 and r.max() <= 1 and np.allclose(r.sum(-1), 1, atol=1e-3))
    pc, pr = (c, r) if probs else (softmax(c), softmax(r))
    change = np.max(np.abs(pc - pr), axis=-1)
    agreement = float(np.mean(agree))
    # Per sample: the share of its positions flipped; among equals the larger
    # probability change ranks worse.
    per = np.array([float(np.mean(~agree[sample == i])) + 1e-3 * float(
        np.max(change[sample == i])) for i in range(len(rr))])
    return OutputScore(name, "top1", agreement, 1.0 - agreement, per, "share of top-1 flipped",
                       {"top1_agreement": agreement, "top5_overlap": float(np.mean(overlap)),
                        "max_probability_change": float(np.max(change)),
                        "flipped": int(np.sum(~agree))})


def score_cosine(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                 name: str = "output") -> OutputScore:
    cos = np.array([cosine(c, r) for c, r in zip(_rows(cand), _rows(ref), strict=True)])
    mean = float(np.mean(cos))
    return OutputScore(name, "cosine", mean, 1.0 - mean, 1.0 - cos, "1 - cosine",
                       {"mean_cosine": mean, "min_cosine": float(np.min(cos))})


def score_regress(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                  name: str = "output") -> OutputScore:
    rc, rr = _rows(cand), _rows(ref)
    err = [abs_error(c, r) for c, r in zip(rc, rr, strict=True)]
    scale = float(np.mean([np.mean(np.abs(np.asarray(r, np.float64))) for r in rr])) or 1e-12
    per_mae = np.array([float(np.mean(e)) for e in err])
    mae = float(np.mean(per_mae))
    rel = mae / scale
    return OutputScore(name, "regress", 1.0 - rel, rel, per_mae / scale,
                       "mean |error| / mean |output|",
                       {"mean_abs_error": mae, "max_abs_error": float(max(np.max(e) for e in err)),
                        "relative_error": rel, "output_scale": scale})


def score_segment(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                  name: str = "output") -> OutputScore:
    rc, rr = _rows(cand), _rows(ref)
    classes = int(np.asarray(rr[0]).shape[0])
    inter = np.zeros(classes)
    union = np.zeros(classes)
    per: list[float] = []
    for c, r in zip(rc, rr, strict=True):
        i, u = segment_counts(np.argmax(c, axis=0), np.argmax(r, axis=0), classes)
        inter += i
        union += u
        ious = i[u > 0] / u[u > 0]
        per.append(1.0 - (float(np.mean(ious)) if ious.size else 1.0))
    present = union > 0
    per_class = np.where(present, inter / np.maximum(union, 1), np.nan)
    miou = float(np.nanmean(per_class)) if present.any() else 1.0
    return OutputScore(name, "segment", miou, 1.0 - miou, np.array(per), "1 - mean IoU",
                       {"mean_iou": miou, "iou_per_class": {
                           str(k): round(float(v), 6) for k, v in enumerate(per_class)
                           if np.isfinite(v)}})


# ---- detection

def score_detect(cand: Sequence[np.ndarray], ref: Sequence[np.ndarray], kind: str, *,
                 sigmoid: bool = False, cand_scores: Sequence[np.ndarray] | None = None,
                 ref_scores: Sequence[np.ndarray] | None = None, name: str = "output",
                 cfg: DetectConfig = DETECT_DEFAULTS) -> OutputScore:
    rc, rr = _rows(cand), _rows(ref)
    sc = _rows(cand_scores) if cand_scores is not None else [None] * len(rc)
    sr = _rows(ref_scores) if ref_scores is not None else [None] * len(rr)
    matched = total = 0
    per: list[float] = []
    counts: list[int] = []
    changed = 0
    for c, r, csc, rsc in zip(rc, rr, sc, sr, strict=True):
        dr = detections(kind, r, rsc, sigmoid=sigmoid, cfg=cfg)
        dc = detections(kind, c, csc, sigmoid=sigmoid, cfg=cfg)
        m, t = match_detections(dr, dc, cfg)
        changed += class_changes(dr, dc, cfg)
        matched += m
        total += t
        per.append(1.0 - (m / t if t else 1.0))
        counts.append(int(np.sum(dr[:, 4] >= cfg.score_threshold)))
    share = matched / total if total else 1.0
    return OutputScore(name, kind, share, 1.0 - share, np.array(per),
                       "1 - share of detections matched",
                       {"matched_share": share, "detections_source": int(sum(counts)),
                        "class_changed": changed,
                        "images": len(rr), "images_with_detections": int(sum(
                            1 for n in counts if n)),
                        "score_threshold": cfg.score_threshold, "match_iou": cfg.match_iou})


# ---------------------------------------------------------------- the scorer

def task_scorer(
    task: str | None, output_metrics: Sequence[str],
    reference: Sequence[Mapping[str, np.ndarray]], source_extra: Mapping[str, Any], *,
    generic_metric: str = "cosine", max_drop: float | None = None,
    labels: np.ndarray | None = None, given_by: str = "--task",
) -> tuple[TaskPlan, TaskScorer | None]:
    """The plan and, when it scores any output in task terms, the scorer to hand to
    :func:`measure_candidates` (None: the generic metric alone, as before tasks)."""
    plan = plan_task(task, output_metrics, reference, source_extra, given_by=given_by)
    if not plan.outputs:
        return plan, None
    return plan, TaskScorer(plan, generic_metric=generic_metric, max_drop=max_drop,
                            labels=labels)


class TaskScorer:
    """``scorer(outputs, reference) -> Accuracy`` for :func:`measure_candidates`: the
    plan's outputs in their task's terms with their budgets, the rest with the generic
    metric. ``max_drop`` (``--max-drop``) replaces every main budget."""

    def __init__(self, plan: TaskPlan, *, generic_metric: str = "cosine",
                 max_drop: float | None = None, labels: np.ndarray | None = None,
                 detect: DetectConfig = DETECT_DEFAULTS) -> None:
        self.plan, self.generic, self.max_drop = plan, generic_metric, max_drop
        self.labels, self.detect = labels, detect

    def budget(self, kind: str) -> Budget:
        b = BUDGETS[_budget_key(kind)]
        return b if self.max_drop is None else Budget(self.max_drop, b.sample, b.text)

    def score_output(self, name: str, m: OutputMetric,
                     outputs: Sequence[Mapping[str, np.ndarray]],
                     reference: Sequence[Mapping[str, np.ndarray]]) -> OutputScore:
        cand = [np.asarray(o[name]) for o in outputs]
        ref = [np.asarray(r[name]) for r in reference]
        for c, r in zip(cand, ref, strict=True):
            if c.shape != r.shape:
                raise ConversionError(f"output '{name}' has shape {list(c.shape)}, the "
                                      f"reference {list(r.shape)}")
        if m.kind == "top1":
            return score_top1(cand, ref, name)
        if m.kind == "cosine":
            return score_cosine(cand, ref, name)
        if m.kind == "regress":
            return score_regress(cand, ref, name)
        if m.kind == "segment":
            return score_segment(cand, ref, name)
        if m.kind == "segment-nhwc":
            return _renamed(score_segment([np.moveaxis(c, -1, -3) for c in cand],
                                          [np.moveaxis(r, -1, -3) for r in ref], name), m.kind)
        cs = rs = None
        if m.partner is not None:
            cs = [np.asarray(o[m.partner]) for o in outputs]
            rs = [np.asarray(r[m.partner]) for r in reference]
            if m.scores_t:
                cs, rs = [np.swapaxes(x, -1, -2) for x in cs], [np.swapaxes(x, -1, -2) for x in rs]
            if m.boxes_t:
                cand, ref = [np.swapaxes(x, -1, -2) for x in cand], [np.swapaxes(x, -1, -2)
                                                                     for x in ref]
            if m.box_format == "cxcywh":
                cand, ref = [corners(x) for x in cand], [corners(x) for x in ref]
        return score_detect(cand, ref, m.kind, sigmoid=m.sigmoid, cand_scores=cs,
                            ref_scores=rs, name=name, cfg=self.detect)

    def scored(self, name: str, m: OutputMetric,
               outputs: Sequence[Mapping[str, np.ndarray]],
               reference: Sequence[Mapping[str, np.ndarray]]) -> OutputScore:
        """:meth:`score_output`, except that NaN or inf where the source is finite fails
        the output whole: no task figure may pass on values that are not numbers (NaN
        compares false against every budget, and an image without detections matches
        anything)."""
        bad = [i for i, (o, r) in enumerate(zip(outputs, reference, strict=True))
               if any(_nonfinite(o[k], r[k]) for k in (name, m.partner) if k is not None)]
        if bad:
            n = len(_rows([np.asarray(r[name]) for r in reference]))
            return OutputScore(name, m.kind, 0.0, 1.0, np.ones(n), "NaN/inf where the source "
                               "is finite", {"non_finite_feeds": bad[:10]})
        return self.score_output(name, m, outputs, reference)

    def __call__(self, outputs: Sequence[Mapping[str, np.ndarray]],
                 reference: Sequence[Mapping[str, np.ndarray]]) -> Accuracy:
        outputs = _by_name(outputs, reference)
        scores = [self.scored(k, m, outputs, reference)
                  for k, m in self.plan.outputs.items()]
        breaks: list[str] = []
        per: dict[str, float] = {}
        details: dict[str, Any] = {}
        ratios: list[tuple[float, OutputScore]] = []
        for s in scores:
            b = self.budget(s.kind)
            per[s.name] = s.score
            details[s.name] = {"kind": s.kind, **s.details}
            i, worst = s.worst()
            details[s.name]["worst_sample"] = {"index": i, "figure": s.figure,
                                               "value": round(worst, 6)}
            if not s.drop <= b.main:  # NaN breaks it too
                breaks.append(f"{s.name} ({s.kind}) drop {s.drop:.4g} > {b.main:.4g}")
            if b.sample is not None and not worst <= b.sample:
                breaks.append(f"{s.name} ({s.kind}) sample {i}: {s.figure} {worst:.4g} > "
                              f"{b.sample:.4g}")
            ratios.append((max(s.drop / b.main if b.main else s.drop,
                               worst / b.sample if b.sample else 0.0), s))
        covered = set(self.plan.outputs) | {m.partner for m in self.plan.outputs.values()
                                            if m.partner}
        rest = [k for k in reference[0] if k not in covered]
        generic: Accuracy | None = None
        if rest:
            sub_ref = [{k: r[k] for k in rest} for r in reference]
            sub_out = [{k: o[k] for k in rest} for o in outputs]
            try:
                generic = accuracy(sub_out, sub_ref, self.generic, labels=self.labels)
            except ConversionError:
                generic = None  # e.g. top1 with no class-score output among the rest
            if generic is not None:
                gb = default_max_drop(self.generic, sub_ref)
                for k, v in generic.per_output.items():
                    per[k] = v
                if not generic.drop <= gb:
                    breaks.append(f"{', '.join(rest)} ({self.generic}) drop "
                                  f"{generic.drop:.4g} > {gb:.4g}")
                details["generic"] = {"metric": self.generic, "outputs": rest,
                                      "drop": generic.drop, "budget": gb}
        if not scores:
            assert generic is not None
            return generic
        _, main = max(ratios, key=lambda t: t[0])
        i, worst = main.worst()
        return Accuracy(
            metric=main.kind, score=main.score, drop=main.drop, per_output=per,
            samples=len(outputs), task=self.plan.task, breaks=tuple(breaks),
            worst={"output": main.name, "index": i, "figure": main.figure,
                   "value": round(worst, 6)},
            details=details)


def _nonfinite(cand: Any, ref: Any) -> bool:
    c, r = np.asarray(cand), np.asarray(ref)
    if c.dtype.kind not in "fc" or c.shape != r.shape:
        return False
    return bool(np.any(~np.isfinite(c) & np.isfinite(r)))


def _renamed(s: OutputScore, kind: str) -> OutputScore:
    return OutputScore(s.name, kind, s.score, s.drop, s.per_sample, s.figure, s.details)


def _by_name(outputs: Sequence[Mapping[str, np.ndarray]],
             reference: Sequence[Mapping[str, np.ndarray]]) -> list[Mapping[str, np.ndarray]]:
    names = list(reference[0])
    if all(k in outputs[0] for k in names):
        return list(outputs)
    if len(outputs[0]) == len(names):  # frameworks may name outputs differently
        return [dict(zip(names, o.values(), strict=True)) for o in outputs]
    raise ConversionError(f"candidate outputs {list(outputs[0])} do not match the reference "
                          f"outputs {names}")


__all__ = [
    "BUDGETS",
    "KINDS",
    "TASKS",
    "Budget",
    "DetectConfig",
    "OutputMetric",
    "TaskPlan",
    "TaskScorer",
    "class_changes",
    "decode",
    "detections",
    "detector_outputs",
    "iou",
    "is_probabilities",
    "match_detections",
    "nms",
    "parse_output_metrics",
    "plan_task",
    "score_cosine",
    "score_detect",
    "score_regress",
    "score_segment",
    "score_top1",
    "segment_layout",
    "task_scorer",
]
