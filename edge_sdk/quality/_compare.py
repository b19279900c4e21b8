"""Two models' answers to one request compared in the artifact's task terms.

The device runs a shadow model beside the serving one and hands both outputs to
:meth:`Comparer.compare`; the :class:`Comparer` was built once per model from its
manifest (:meth:`Comparer.for_manifest`), which says how each output is judged, in this
order:

1. in-graph post-processing (``extra["postprocess"]``: the outputs are answers):
   classify ``class_ids`` (top-1 id), detect ``boxes``/``scores``/``class_ids``/
   ``batch_index`` (matched by class and IoU), segment ``class_map`` (pixel agreement),
   embed ``embedding`` (cosine);
2. ``extra["task_outputs"]`` (written by the converter from its task plan): per output
   ``kind`` (``top1``, ``detect-yolov8``, ``detect-yolov5``, ``detect-boxes`` with
   ``partner``/``boxes_t``/``scores_t``/``box_format``, ``segment``, ``segment-nhwc``,
   ``cosine``, ``regress``) and ``sigmoid``;
3. the manifest's ``task`` alone, each output read from its shape;
4. a generic rule: integer, bool and string outputs compare exactly, float outputs by
   cosine per row when a row has >= 8 values, by relative error otherwise.

Rows are the batch axis (axis 0 of outputs of rank >= 2). A comparison agrees when every
row of every output does; its score is the lowest row score (1.0 = identical, 0.0 =
nothing alike); its detail is the worst disagreeing row's in a few words ("row 0: class
3 -> 5", "row 1: detection of class 2 at IoU 0.31", "row 0: cosine 0.981 < 0.99").
Shape, dtype, missing outputs, NaN and inf are disagreements with score 0, never
exceptions: :meth:`Comparer.compare` never raises.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _taskmath as tm

#: What ``extra["task_outputs"]`` may name (the converter's task kinds).
KINDS = ("top1", "detect-yolov8", "detect-yolov5", "detect-boxes", "segment",
         "segment-nhwc", "cosine", "regress")
#: Outputs of in-graph post-processing, per task (edge_sdk._answers.ImageTask.answers).
ANSWERS: Mapping[str, tuple[str, ...]] = {
    "classify": ("class_ids", "scores"),
    "detect": ("boxes", "scores", "class_ids", "batch_index"),
    "segment": ("class_map",),
    "embed": ("embedding",),
}
DETAIL_CHARS = 200
#: A float output with at least this many values per row is compared by cosine (else
#: by relative error) when nothing says what it is.
COSINE_MIN_VALUES = 8


@dataclass(frozen=True)
class CompareConfig:
    """When two answers agree. ``cosine_min``: per-row cosine (embeddings, generic float
    outputs); ``rel_error_max``: mean |error| / mean |serving output| per row
    (regression, short float rows); ``match_iou`` / ``score_threshold``: a detection
    at or above the threshold must find one of the same class at that IoU on the other
    side (down to threshold - ``score_margin``); ``mask_agreement_min``: share of equal
    pixels of a class map. Work is bounded: ``max_candidates`` boxes per image are
    looked at (best score first), ``max_detections`` kept after NMS, ``max_rows`` rows
    per output."""

    cosine_min: float = 0.99
    rel_error_max: float = 0.01
    match_iou: float = 0.5
    score_threshold: float = 0.25
    mask_agreement_min: float = 0.99
    score_margin: float = 0.05
    nms_iou: float = 0.45
    max_candidates: int = 1000
    max_detections: int = 300
    max_rows: int = 256

    def __post_init__(self) -> None:
        for name in ("cosine_min", "match_iou", "score_threshold", "mask_agreement_min",
                     "nms_iou"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"CompareConfig.{name} must be in [0, 1], not {v}")
        if not self.rel_error_max >= 0.0:
            raise ValueError("CompareConfig.rel_error_max must be >= 0")
        if not 0.0 <= self.score_margin <= self.score_threshold:
            raise ValueError("CompareConfig.score_margin must be in [0, score_threshold]")
        for name in ("max_candidates", "max_detections", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"CompareConfig.{name} must be >= 1")

    def detect(self) -> tm.DetectConfig:
        return tm.DetectConfig(score_threshold=self.score_threshold, nms_iou=self.nms_iou,
                               match_iou=self.match_iou, margin=self.score_margin,
                               max_detections=self.max_detections,
                               max_candidates=self.max_candidates)


@dataclass(frozen=True)
class Comparison:
    """``agree``: every row of every output agrees; ``score`` in [0, 1], the lowest row
    score (1.0 = identical); ``detail``: what changed, in a few words."""

    agree: bool
    score: float
    detail: str


@dataclass(frozen=True)
class Rule:
    """How one output (and its partners) is compared. ``kind``: one of :data:`KINDS`, or
    ``labels`` / ``detections`` / ``class_map`` (in-graph answers), ``exact``, ``auto``
    (the generic rule), ``task:TASK`` (read from the array's shape)."""

    output: str
    kind: str
    partners: tuple[str, ...] = ()
    sigmoid: bool | None = None  # None: logits when the serving scores leave [0, 1]
    boxes_t: bool = False
    scores_t: bool = False
    box_format: str = "xyxy"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.output, *self.partners)


@dataclass(frozen=True)
class _Row:
    agree: bool
    score: float
    detail: str


class Comparer:
    """Compares a serving model's outputs with a shadow model's, request by request.
    Build it with :meth:`for_manifest`; it holds no state between calls (thread-safe)."""

    def __init__(self, rules: Sequence[Rule] = (), config: CompareConfig | None = None,
                 basis: str = "generic", per_row: Collection[str] = ()) -> None:
        self.rules = tuple(rules)
        self.config = config or CompareConfig()
        self.basis = basis  # postprocess | task_outputs | task | generic
        # 1-D outputs whose one axis is the batch (one value per row, e.g. a binary
        # classifier's score or an sklearn label): compared row by row, never as one
        # vector in which a changed row is diluted by the others.
        self.per_row = frozenset(per_row)
        self._covered = {n for r in self.rules for n in r.names}

    @classmethod
    def for_manifest(cls, manifest: Any, config: CompareConfig | None = None) -> Comparer:
        """The comparer for an artifact's :class:`~edge_sdk.Manifest` (None, or a
        manifest that says nothing usable: the generic rule)."""
        extra = getattr(manifest, "extra", None)
        extra = extra if isinstance(extra, Mapping) else {}
        outputs = {getattr(t, "name", None): t for t in getattr(manifest, "outputs", ())}
        per_row = _batch_vectors(outputs)
        post = extra.get("postprocess")
        task = post.get("task") if isinstance(post, Mapping) else None
        if isinstance(task, str) and task in ANSWERS and ANSWERS[task][0] in outputs:
            return cls(_answer_rules(task), config, "postprocess", per_row)
        rules = _task_output_rules(extra.get("task_outputs"), outputs)
        if rules:
            return cls(rules, config, "task_outputs", per_row)
        task = getattr(manifest, "task", "generic")
        if task == "detect" and sum(len(getattr(t, "shape", ())) == 3
                                    for t in outputs.values()) != 1:
            # Boxes [B, N, 4] beside scores [B, N, C] would pass for a YOLOv5 head: with
            # the task alone only a single packed head is read as one.
            task = "generic"
        if isinstance(task, str) and task in ("classify", "detect", "segment", "embed",
                                              "regress"):
            return cls([Rule(str(n), f"task:{task}") for n in outputs if isinstance(n, str)],
                       config, "task", per_row)
        return cls((), config, "generic", per_row)

    def plan(self) -> dict[str, str]:
        """Output → how it is compared (partners omitted; other outputs: ``auto``)."""
        return {r.output: r.kind for r in self.rules}

    def compare(self, serving: Mapping[str, Any], shadow: Mapping[str, Any]) -> Comparison:
        """``serving``'s and ``shadow``'s outputs for one request (a batch of rows)
        compared; never raises."""
        try:
            return self._compare(serving, shadow)
        except Exception as err:  # hostile arrays: a disagreement, never an exception
            return Comparison(False, 0.0, _cut(f"cannot compare: {type(err).__name__}: {err}"))

    # ------------------------------------------------------------------ inside

    def _compare(self, serving: Mapping[str, Any], shadow: Mapping[str, Any]) -> Comparison:
        if not isinstance(serving, Mapping) or not isinstance(shadow, Mapping):
            return Comparison(False, 0.0, "outputs are not a mapping of names to arrays")
        rules = [r for r in self.rules if r.output in serving]
        rules += [Rule(str(k), "auto") for k in serving if k not in self._covered]
        if not rules:
            return Comparison(True, 1.0, "no outputs to compare")
        results: list[tuple[str, _Row]] = []
        for rule in rules:
            results.append((rule.output, self._rule(rule, serving, shadow)))
        named = len(results) > 1
        worst_all = min(results, key=lambda t: t[1].score)
        bad = [t for t in results if not t[1].agree]
        name, row = min(bad, key=lambda t: t[1].score) if bad else worst_all
        detail = f"{name} {row.detail}" if named else row.detail
        return Comparison(not bad, _unit(worst_all[1].score), _cut(detail))

    def _rule(self, rule: Rule, serving: Mapping[str, Any],
              shadow: Mapping[str, Any]) -> _Row:
        s: dict[str, np.ndarray] = {}
        h: dict[str, np.ndarray] = {}
        for n in rule.names:
            if n not in serving:
                return _Row(False, 0.0, f"output {n} missing in serving")
            if n not in shadow:
                return _Row(False, 0.0, f"output {n} missing in shadow")
            zs = _zipmap(serving[n], self.config.max_rows)
            zh = _zipmap(shadow[n], self.config.max_rows)
            if zs is not None or zh is not None:
                # A classifier's {class: probability} per row (skl2onnx's ZipMap): its
                # class is the one with the best probability, as for a score tensor.
                if zs is None or zh is None or zs[1] != zh[1]:
                    return _Row(False, 0.0, f"output {n}: classes differ")
                s[n], h[n] = zs[0], zh[0]
                if n == rule.output and (rule.kind == "auto" or rule.kind.startswith("task:")):
                    rule = Rule(rule.output, "top1", rule.partners)
                continue
            s[n], h[n] = np.asarray(serving[n]), np.asarray(shadow[n])
            a, b = s[n], h[n]
            if a.dtype != b.dtype and not (a.dtype.kind in "USO" and b.dtype.kind in "USO"):
                return _Row(False, 0.0, f"output {n}: dtype {a.dtype} -> {b.dtype}")
            if a.shape != b.shape and not (rule.kind == "detections" and a.ndim == b.ndim
                                           and a.shape[1:] == b.shape[1:]):
                return _Row(False, 0.0, f"output {n}: shape {list(a.shape)} -> "
                                        f"{list(b.shape)}")
        if all(_same(s[n], h[n]) for n in rule.names):
            return _Row(True, 1.0, "identical")
        if rule.kind not in ("labels", "detections", "class_map"):
            for n in rule.names:
                if n in self.per_row and s[n].ndim == 1:
                    s[n], h[n] = s[n].reshape(-1, 1), h[n].reshape(-1, 1)
        if rule.kind != "detections":
            bad = _nonfinite_row([s[n] for n in rule.names], [h[n] for n in rule.names])
            if bad is not None:
                return bad
        kind = _resolve(rule, s[rule.output])
        fn = _KIND_FN.get(kind)
        if fn is None:
            return _Row(False, 0.0, f"unknown comparison kind {kind!r}")
        rows = fn(self.config, rule, s, h)
        return _worst(rows)


# ---------------------------------------------------------------- per kind: rows


def _top1(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
          h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    if a.ndim < 1 or a.shape[-1] < 1:
        return _exact(cfg, rule, s, h)
    if a.shape[-1] == 1:  # one score per row: its class is which side of the cut it is on
        return _binary(cfg, rule, s, h)
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(*_rows2(a, b, cfg.max_rows, a.shape[-1]),
                                   strict=True)):
        cx, cy = tm.top1(x), tm.top1(y)
        flips = np.flatnonzero(cx != cy)
        if flips.size:
            j = int(flips[0])
            at = f" at position {j}" if len(cx) > 1 else ""
            rows.append(_Row(False, 1.0 - flips.size / len(cx),
                             f"row {i}: class {int(cx[j])} -> {int(cy[j])}{at}"))
        else:
            rows.append(_Row(True, 1.0, f"row {i}: class {int(cx[0])}"))
    return rows


def _binary(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
            h: Mapping[str, np.ndarray]) -> list[_Row]:
    """A single score per row (a binary classifier): class 1 at or above 0.5 when both
    sides are probabilities, at or above 0 (a logit) otherwise."""
    a, b = s[rule.output], h[rule.output]
    a, b = a.reshape(a.shape[0] if a.ndim >= 2 else 1, -1), b.reshape(b.shape[0] if b.ndim >= 2
                                                                     else 1, -1)
    cut = 0.5 if not (_outside01(a) or _outside01(b)) else 0.0
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(a[: cfg.max_rows], b[: cfg.max_rows], strict=True)):
        cx, cy = x >= cut, y >= cut
        flips = np.flatnonzero(cx != cy)
        if flips.size:
            j = int(flips[0])
            at = f" at position {j}" if len(cx) > 1 else ""
            rows.append(_Row(False, 1.0 - flips.size / len(cx),
                             f"row {i}: class {int(cx[j])} -> {int(cy[j])}{at}"))
        else:
            rows.append(_Row(True, 1.0, f"row {i}: class {int(cx[0]) if len(cx) else 0}"))
    return rows


def _labels(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
            h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    if a.ndim < 1 or not a.size:
        return [_Row(True, 1.0, "no labels")]
    # 1-D: one label per row (never only the first row's)
    x = a.reshape(a.shape[0], -1)[: cfg.max_rows, 0] if a.ndim >= 2 else a[: cfg.max_rows]
    y = b.reshape(b.shape[0], -1)[: cfg.max_rows, 0] if b.ndim >= 2 else b[: cfg.max_rows]
    return [_Row(True, 1.0, f"row {i}: class {int(p)}") if p == q else
            _Row(False, 0.0, f"row {i}: class {int(p)} -> {int(q)}")
            for i, (p, q) in enumerate(zip(x.tolist(), y.tolist(), strict=True))]


def _cosine(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
            h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(*_rows2(a, b, cfg.max_rows), strict=True)):
        c = tm.cosine(y, x)
        ok = c >= cfg.cosine_min
        rows.append(_Row(ok, _unit(c), f"row {i}: cosine {_fig(c)}" + (
            "" if ok else f" < {cfg.cosine_min:g}")))
    return rows


def _regress(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
             h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(*_rows2(a, b, cfg.max_rows), strict=True)):
        err = float(np.mean(tm.abs_error(y, x))) if x.size else 0.0
        scale = float(np.mean(np.abs(x))) if x.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        ok = rel <= cfg.rel_error_max
        rows.append(_Row(ok, _unit(1.0 - rel), f"row {i}: relative error {_fig(rel)}" + (
            "" if ok else f" > {cfg.rel_error_max:g}")))
    return rows


def _exact(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
           h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    if a.ndim == 1:  # one value per row
        a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(*_rows2(a, b, cfg.max_rows), strict=True)):
        same = np.asarray(x == y).reshape(-1)
        if same.all():
            rows.append(_Row(True, 1.0, f"row {i}: identical"))
        elif same.size == 1:
            rows.append(_Row(False, 0.0, f"row {i}: {_val(x)} -> {_val(y)}"))
        else:
            n = int(np.sum(~same))
            rows.append(_Row(False, 1.0 - n / same.size,
                             f"row {i}: {n} of {same.size} values differ"))
    return rows


def _segment(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
             h: Mapping[str, np.ndarray], axis: int) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    if a.ndim != 4:
        return _cosine(cfg, rule, s, h) if a.ndim >= 2 else _regress(cfg, rule, s, h)
    n = min(a.shape[0], cfg.max_rows)
    return _maps(cfg, [np.argmax(a[i], axis=axis) for i in range(n)],
                      [np.argmax(b[i], axis=axis) for i in range(n)])


def _class_map(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
               h: Mapping[str, np.ndarray]) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    if a.ndim < 3:  # one map, no batch axis
        a, b = a[None], b[None]
    n = min(a.shape[0], cfg.max_rows)
    return _maps(cfg, [a[i] for i in range(n)], [b[i] for i in range(n)])


def _maps(cfg: CompareConfig, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> list[_Row]:
    rows: list[_Row] = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        share = tm.pixel_agreement(y, x)
        ok = share >= cfg.mask_agreement_min
        rows.append(_Row(ok, _unit(share), f"row {i}: pixel agreement {_fig(share)}" + (
            "" if ok else f" < {cfg.mask_agreement_min:g}" + _moved(x, y))))
    return rows


def _detect_raw(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
                h: Mapping[str, np.ndarray], kind: str) -> list[_Row]:
    a, b = s[rule.output], h[rule.output]
    sa = sb = None
    if kind == "detect-boxes":
        if not rule.partners:
            return [_Row(False, 0.0, "detect-boxes without its scores output")]
        sa, sb = s[rule.partners[0]], h[rule.partners[0]]
        if rule.scores_t:
            sa, sb = np.swapaxes(sa, -1, -2), np.swapaxes(sb, -1, -2)
        if rule.boxes_t:
            a, b = np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2)
        if rule.box_format == "cxcywh":
            a, b = tm.corners(a), tm.corners(b)
    if a.ndim == 2:  # one image without its batch axis
        a, b = a[None], b[None]
        sa, sb = (None, None) if sa is None or sb is None else (sa[None], sb[None])
    if a.ndim != 3:
        return [_Row(False, 0.0, f"{kind}: expected a batch of images, got shape "
                                 f"{list(a.shape)}")]
    sig = rule.sigmoid
    if sig is None:
        sig = _outside01(_class_scores(kind, a, sa))
    det = cfg.detect()
    rows: list[_Row] = []
    for i in range(min(a.shape[0], cfg.max_rows)):
        da = tm.detections(kind, a[i], None if sa is None else sa[i], sigmoid=sig, cfg=det)
        db = tm.detections(kind, b[i], None if sb is None else sb[i], sigmoid=sig, cfg=det)
        rows.append(_match_row(i, da, db, det))
    return rows


def _detections(cfg: CompareConfig, rule: Rule, s: Mapping[str, np.ndarray],
                h: Mapping[str, np.ndarray]) -> list[_Row]:
    det = cfg.detect()
    per_a, why_a = _answer_boxes(s, det.max_detections, "serving")
    per_b, why_b = _answer_boxes(h, det.max_detections, "shadow")
    if why_a or why_b:
        return [_Row(False, 0.0, why_a or why_b)]
    images = sorted(set(per_a) | set(per_b))[: cfg.max_rows]
    if not images:
        return [_Row(True, 1.0, "no detections")]
    empty = np.zeros((0, 6))
    return [_match_row(i, per_a.get(i, empty), per_b.get(i, empty), det)
            for i in images]


_KindFn = Callable[[CompareConfig, Rule, Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
                   list[_Row]]
_KIND_FN: dict[str, _KindFn] = {
    "top1": _top1,
    "labels": _labels,
    "cosine": _cosine,
    "regress": _regress,
    "exact": _exact,
    "segment": lambda c, r, s, h: _segment(c, r, s, h, 0),
    "segment-nhwc": lambda c, r, s, h: _segment(c, r, s, h, -1),
    "class_map": _class_map,
    "detect-yolov8": lambda c, r, s, h: _detect_raw(c, r, s, h, "detect-yolov8"),
    "detect-yolov5": lambda c, r, s, h: _detect_raw(c, r, s, h, "detect-yolov5"),
    "detect-boxes": lambda c, r, s, h: _detect_raw(c, r, s, h, "detect-boxes"),
    "detections": _detections,
}


# ---------------------------------------------------------------- planning


def _answer_rules(task: str) -> list[Rule]:
    if task == "classify":
        return [Rule("class_ids", "labels", ("scores",))]
    if task == "detect":
        return [Rule("boxes", "detections", ("scores", "class_ids", "batch_index"))]
    if task == "segment":
        return [Rule("class_map", "class_map")]
    return [Rule("embedding", "cosine")]


def _task_output_rules(section: Any, outputs: Mapping[Any, Any]) -> list[Rule]:
    """``extra["task_outputs"]`` as rules; an entry that names no output of the model or
    says something this version does not know is left out (the generic rule takes it)."""
    if not isinstance(section, Mapping):
        return []
    rules: list[Rule] = []
    for name, entry in list(section.items())[:256]:
        if not isinstance(name, str) or name not in outputs or not isinstance(entry, Mapping):
            continue
        kind = entry.get("kind")
        partner = entry.get("partner")
        if kind not in KINDS or (partner is not None and (
                not isinstance(partner, str) or partner not in outputs)):
            continue
        if kind == "detect-boxes" and partner is None:
            continue
        sig = entry.get("sigmoid")
        fmt = entry.get("box_format", "xyxy")
        rules.append(Rule(name, str(kind), (partner,) if partner else (),
                          sigmoid=sig if isinstance(sig, bool) else None,
                          boxes_t=entry.get("boxes_t") is True,
                          scores_t=entry.get("scores_t") is True,
                          box_format=fmt if fmt in ("xyxy", "cxcywh") else "xyxy"))
    return rules


def _batch_vectors(outputs: Mapping[Any, Any]) -> frozenset[str]:
    """Outputs declared 1-D with a symbolic (batch) axis: one value per row."""
    names: set[str] = set()
    for name, spec in outputs.items():
        shape = getattr(spec, "shape", None)
        if isinstance(name, str) and isinstance(shape, (tuple, list)) and len(shape) == 1 \
                and not (isinstance(shape[0], int) and shape[0] > 1):
            names.add(name)
    return frozenset(names)


def _resolve(rule: Rule, a: np.ndarray) -> str:
    """The kind to compare ``a`` (the serving array) by: the rule's, or for ``auto`` and
    ``task:TASK`` rules one read from the array."""
    if rule.kind not in ("auto",) and not rule.kind.startswith("task:"):
        return rule.kind
    if a.dtype.kind not in "f":
        return "exact"
    task = rule.kind[5:] if rule.kind.startswith("task:") else None
    if task == "classify" and 1 <= a.ndim <= 3 and a.shape[-1] >= 1:
        return "top1"  # one column: a binary classifier's score (see _top1)
    if task == "detect" and a.ndim == 3:
        _, d1, d2 = a.shape
        if 5 <= d1 < d2 and d2 >= 16:
            return "detect-yolov8"
        if 6 <= d2 < d1 and d1 >= 16:
            return "detect-yolov5"
    if task == "segment" and a.ndim == 4 and a.size:
        return tm.segment_layout(a)
    if task == "embed":
        return "cosine"
    if task == "regress":
        return "regress"
    per_row = a.size // a.shape[0] if a.ndim >= 2 and a.shape[0] else a.size
    return "cosine" if per_row >= COSINE_MIN_VALUES else "regress"


# ---------------------------------------------------------------- helpers


def _rows2(a: np.ndarray, b: np.ndarray, limit: int,
           last: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of two same-shaped arrays (axis 0 when rank >= 2, else the whole array),
    at most ``limit``; ``last``: each row reshaped to ``[-1, last]``."""
    if a.ndim >= 2:
        xs, ys = list(a[:limit]), list(b[:limit])
    else:
        xs, ys = [a.reshape(-1)], [b.reshape(-1)]
    if last is not None and last > 0:
        xs = [x.reshape(-1, last) for x in xs]
        ys = [y.reshape(-1, last) for y in ys]
    return xs, ys


def _zipmap(v: Any, limit: int) -> tuple[np.ndarray, list[str]] | None:
    """A sequence of ``{class: score}`` maps as ``[rows, classes]`` float64 scores (the
    first ``limit`` rows, classes in sorted order) and the classes; None when ``v`` is
    no such sequence."""
    if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 1:
        v = list(v[:limit])
    if not isinstance(v, (list, tuple)) or not v or not isinstance(v[0], Mapping):
        return None
    rows = list(v[:limit])
    if not all(isinstance(d, Mapping) for d in rows):
        raise ValueError("a sequence mixing maps and other values")
    keys = list(rows[0])
    try:
        keys = sorted(keys)
    except TypeError:
        keys = sorted(keys, key=repr)
    if any(len(d) != len(keys) for d in rows):
        raise ValueError("rows with different classes")
    out = np.array([[float(d[k]) for k in keys] for d in rows], dtype=np.float64)
    return out.reshape(len(rows), len(keys)), [repr(k) for k in keys]


def _nonfinite_row(serving: Sequence[np.ndarray], shadow: Sequence[np.ndarray]) -> _Row | None:
    """The first row where one side has NaN/inf and the other not the same value."""
    for a, b in zip(serving, shadow, strict=True):
        if a.dtype.kind not in "fc":
            continue
        fa, fb = np.isfinite(a), np.isfinite(b)
        if fa.all() and fb.all():
            continue
        # The same NaN or inf on both sides is no change.
        same = ~fa & ~fb & ((a == b) | (np.isnan(a) & np.isnan(b)))
        diff = (~fa | ~fb) & ~same
        if not diff.any():
            continue
        where = np.argwhere(diff)[0]
        i = int(where[0]) if a.ndim >= 2 else 0
        side = "shadow" if not fb[tuple(where)] else "serving"
        return _Row(False, 0.0, f"row {i}: NaN/inf in {side}")
    return None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _worst(rows: Sequence[_Row]) -> _Row:
    if not rows:
        return _Row(True, 1.0, "empty output")
    bad = [r for r in rows if not r.agree]
    return min(bad or rows, key=lambda r: r.score)


def _match_row(i: int, a: np.ndarray, b: np.ndarray, cfg: tm.DetectConfig) -> _Row:
    matched, total = tm.match_detections(a, b, cfg)
    if matched == total:
        n = int(np.sum(a[:, 4] >= cfg.score_threshold)) if len(a) else 0
        return _Row(True, 1.0, f"row {i}: {n} detections agree" if n else
                    f"row {i}: no detections")
    what = tm.first_unmatched(a, b, cfg) or "detections differ"
    return _Row(False, matched / total, f"row {i}: {what} ({matched}/{total} matched)")


def _answer_boxes(out: Mapping[str, np.ndarray], limit: int,
                  side: str) -> tuple[dict[int, np.ndarray], str]:
    """In-graph detections ``boxes [K, 4]``, ``scores [K]``, ``class_ids [K]``,
    ``batch_index [K]`` → per image ``[k, 6]`` rows (best ``limit`` by score)."""
    boxes, scores = out["boxes"], out["scores"]
    ids, batch = out["class_ids"], out["batch_index"]
    k = len(scores) if scores.ndim == 1 else -1
    if boxes.ndim != 2 or boxes.shape[1:] != (4,) or k < 0 or len(boxes) != k or \
            ids.shape != (k,) or batch.shape != (k,):
        return {}, (f"detections in {side}: boxes {list(boxes.shape)}, scores "
                    f"{list(scores.shape)}, class_ids {list(ids.shape)}, batch_index "
                    f"{list(batch.shape)} do not line up")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        return {}, f"detections: NaN/inf in {side}"
    rows = np.concatenate([boxes.astype(np.float64), scores.astype(np.float64)[:, None],
                           ids.astype(np.float64)[:, None]], axis=1)
    per: dict[int, np.ndarray] = {}
    for n in np.unique(batch)[:4096].tolist():
        r = rows[batch == n]
        per[int(n)] = r[np.argsort(-r[:, 4], kind="stable")][:limit]
    return per, ""


def _class_scores(kind: str, a: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    if kind == "detect-yolov8":
        return a[:, 4:, :]
    if kind == "detect-yolov5":
        return a[:, :, 4:]
    return scores if scores is not None else np.zeros(0)


def _outside01(a: np.ndarray) -> bool:
    return bool(a.size and (float(np.min(a)) < 0.0 or float(np.max(a)) > 1.0))


def _moved(x: np.ndarray, y: np.ndarray) -> str:
    """The class change covering the most pixels: ``, mostly class 2 -> 4``."""
    diff = x != y
    if not diff.any():
        return ""
    a, b = x[diff].reshape(-1), y[diff].reshape(-1)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        # One integer key per pair: np.unique over pairs (axis=1) sorts structured rows
        # and took 0.4 s for one 512x512 map, for a detail string.
        a, b = a.astype(np.int64), b.astype(np.int64)
        lo = min(int(a.min()), int(b.min()))
        span = max(int(a.max()), int(b.max())) - lo + 1
        if span <= 1 << 31:
            keys, counts = np.unique((a - lo) * span + (b - lo), return_counts=True)
            k = int(keys[int(np.argmax(counts))])
            return f", mostly class {k // span + lo} -> {k % span + lo}"
    pairs, counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
    j = int(np.argmax(counts))
    return f", mostly class {int(pairs[0, j])} -> {int(pairs[1, j])}"


def _val(x: np.ndarray) -> str:
    v = np.asarray(x).reshape(-1)[0]
    return _cut(str(v.item() if hasattr(v, "item") else v), 40)


def _fig(v: float) -> str:
    if not np.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"


def _unit(v: float) -> float:
    return float(min(1.0, max(0.0, v))) if np.isfinite(v) else 0.0


def _cut(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["ANSWERS", "KINDS", "CompareConfig", "Comparer", "Comparison", "Rule"]
