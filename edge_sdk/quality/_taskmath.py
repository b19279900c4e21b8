"""Per-sample task arithmetic shared by the converter's accuracy check
(``converters._tasks``, over an evaluation set) and the device's shadow comparison
(:mod:`edge_sdk.quality._compare`, one request at a time).

Everything here takes one sample (one image, one row) as numpy arrays and returns
numbers; pooling over a data set, budgets and reports belong to the callers.

- detection: :func:`decode` (a detector's raw output → boxes and class scores),
  :func:`iou`, :func:`nms` (class-aware), :func:`detections`, :func:`match_detections`,
  :func:`class_changes`, :func:`first_unmatched` (what a detail line names);
- classification: :func:`softmax`, :func:`top1`;
- embedding: :func:`cosine`;
- segmentation: :func:`segment_counts` (per-class intersection and union),
  :func:`pixel_agreement`;
- regression: :func:`abs_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConversionError

DETECT_KINDS = ("detect-yolov8", "detect-yolov5", "detect-boxes")


@dataclass(frozen=True)
class DetectConfig:
    score_threshold: float = 0.25
    nms_iou: float = 0.45
    match_iou: float = 0.5
    # A detection within this margin of the threshold may fall just under it in the
    # other model without counting as lost: it is matched against that model's
    # detections down to threshold - margin.
    margin: float = 0.05
    max_detections: int = 300
    # Candidates (boxes over the threshold) NMS looks at, best first; None: all. A broken
    # model scoring every anchor alike would otherwise cost O(anchors²).
    max_candidates: int | None = None


# ---------------------------------------------------------------- detection

def xyxy(cxcywh: np.ndarray) -> np.ndarray:
    """``[N, 4]`` centre and size → corners."""
    cx, cy, w, h = cxcywh.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def corners(cxcywh: np.ndarray) -> np.ndarray:
    """``[..., 4]`` centre and size → corners (any leading axes)."""
    a = np.asarray(cxcywh, np.float64)
    return np.concatenate([a[..., :2] - a[..., 2:4] / 2, a[..., :2] + a[..., 2:4] / 2], axis=-1)


def sigmoid(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-a))  # type: ignore[no-any-return]


def decode(kind: str, out: np.ndarray, scores: np.ndarray | None = None, *,
           sigmoid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw output → (boxes ``[N, 4]`` x1y1x2y2, class scores ``[N, C]``).

    ``detect-yolov8``: ``[4+C, N]`` (cx cy w h, classes); ``detect-yolov5``: ``[N, 5+C]``
    (cx cy w h, objectness, classes); ``detect-boxes``: boxes ``[N, 4]`` x1y1x2y2 with
    ``scores`` ``[N, C]``. ``sigmoid``: the scores are logits."""
    sig = _sigmoid if sigmoid else _same
    a = np.asarray(out, np.float64)
    if kind == "detect-yolov8":
        return xyxy(a[:4].T), sig(a[4:].T)
    if kind == "detect-yolov5":
        return xyxy(a[:, :4]), sig(a[:, 4:5]) * sig(a[:, 5:])
    if kind == "detect-boxes":
        if scores is None:
            raise ConversionError("detect-boxes needs its scores output")
        return a.reshape(-1, 4), sig(np.asarray(scores, np.float64))
    raise ConversionError(f"unknown detection layout {kind!r}")


_sigmoid = sigmoid


def _same(a: np.ndarray) -> np.ndarray:
    return a


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1y1x2y2 box with each of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = area(box) + area(boxes) - inter
    out: np.ndarray = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return out


def area(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.clip(b[..., 2] - b[..., 0], 0, None)
                       * np.clip(b[..., 3] - b[..., 1], 0, None))
    return out


def nms(boxes: np.ndarray, cls_scores: np.ndarray, *, threshold: float,
        iou_threshold: float, max_detections: int,
        max_candidates: int | None = None) -> np.ndarray:
    """Class-aware NMS (one class per box: its best) → ``[K, 6]`` rows
    x1, y1, x2, y2, score, class, best score first. ``max_candidates``: only that many
    boxes over the threshold are looked at, the best first."""
    if cls_scores.size == 0 or cls_scores.ndim != 2:
        return np.zeros((0, 6))
    cls = np.argmax(cls_scores, axis=1)
    score = cls_scores[np.arange(len(cls)), cls]
    over = np.flatnonzero(score >= threshold)
    if max_candidates is not None and over.size > max_candidates:
        over = over[np.argsort(-score[over], kind="stable")[:max_candidates]]
    keep_rows: list[np.ndarray] = []
    for k in np.unique(cls[over]):
        idx = over[cls[over] == k]
        idx = idx[np.argsort(-score[idx], kind="stable")]
        # The overall best max_detections lie among each class's best max_detections kept;
        # stopping there bounds a broken candidate that scores every anchor alike.
        kept = 0
        while idx.size and kept < max_detections:
            i = idx[0]
            kept += 1
            keep_rows.append(np.array([*boxes[i], score[i], k], np.float64))
            if idx.size == 1:
                break
            rest = idx[1:]
            idx = rest[iou(boxes[i], boxes[rest]) <= iou_threshold]
    if not keep_rows:
        return np.zeros((0, 6))
    dets = np.stack(keep_rows)
    return dets[np.argsort(-dets[:, 4], kind="stable")][:max_detections]


def detections(kind: str, out: np.ndarray, scores: np.ndarray | None, *, sigmoid: bool,
               cfg: DetectConfig = DetectConfig()) -> np.ndarray:
    """One image's raw output → its detections ``[K, 6]`` down to threshold - margin."""
    low = cfg.score_threshold - cfg.margin
    out, scores = _over(kind, np.asarray(out), None if scores is None else np.asarray(scores),
                        low, sigmoid)
    boxes, cls = decode(kind, out, scores, sigmoid=sigmoid)
    return nms(boxes, cls, threshold=cfg.score_threshold - cfg.margin,
               iou_threshold=cfg.nms_iou, max_detections=cfg.max_detections,
               max_candidates=cfg.max_candidates)


def _over(kind: str, out: np.ndarray, scores: np.ndarray | None, threshold: float,
          sigmoid: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The anchors whose best class score may reach ``threshold``, before anything is
    decoded: on a YOLOv8n head ([84, 8400]) the rest is nearly all of it, and decoding
    it in float64 would cost more than the comparison."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if kind == "detect-yolov8" and out.ndim == 2 and out.shape[0] > 4:
            best = _sigmoid(out[4:].max(axis=0)) if sigmoid else out[4:].max(axis=0)
            return out[:, best >= threshold], scores
        if kind == "detect-yolov5" and out.ndim == 2 and out.shape[1] > 5:
            obj, cls = out[:, 4], out[:, 5:].max(axis=1)
            best = _sigmoid(obj) * _sigmoid(cls) if sigmoid else obj * cls
            return out[best >= threshold], scores
        if kind == "detect-boxes" and scores is not None and scores.ndim == 2 and \
                out.reshape(-1, 4).shape[0] == scores.shape[0] and scores.shape[1]:
            best = scores.max(axis=1)
            keep = (_sigmoid(best) if sigmoid else best) >= threshold
            return out.reshape(-1, 4)[keep], scores[keep]
    return out, scores


def _matched(strong: np.ndarray, other: np.ndarray, match_iou: float) -> int:
    """How many of ``strong`` find a one-to-one partner of the same class with IoU >=
    ``match_iou`` in ``other`` (greedy, best score first)."""
    used = np.zeros(len(other), bool)
    n = 0
    for d in strong:
        if not len(other):
            break
        same = (other[:, 5] == d[5]) & ~used
        if not same.any():
            continue
        ious = np.where(same, iou(d[:4], other[:, :4]), -1.0)
        j = int(np.argmax(ious))
        if ious[j] >= match_iou:
            used[j] = True
            n += 1
    return n


def match_detections(src: np.ndarray, cand: np.ndarray,
                     cfg: DetectConfig = DetectConfig()) -> tuple[int, int]:
    """(matched, total) over one image: each detection at or above the score threshold,
    on either side, counts once and is matched against the other side's detections down
    to the threshold minus the margin."""
    low = cfg.score_threshold - cfg.margin
    s_strong = src[src[:, 4] >= cfg.score_threshold]
    c_strong = cand[cand[:, 4] >= cfg.score_threshold]
    matched = (_matched(s_strong, cand[cand[:, 4] >= low], cfg.match_iou)
               + _matched(c_strong, src[src[:, 4] >= low], cfg.match_iou))
    return matched, len(s_strong) + len(c_strong)


def class_changes(src: np.ndarray, cand: np.ndarray,
                  cfg: DetectConfig = DetectConfig()) -> int:
    """Source detections (at or above the threshold) with no same-class partner whose
    place (IoU >= ``match_iou``) a candidate detection of another class took."""
    low = cfg.score_threshold - cfg.margin
    other = cand[cand[:, 4] >= low]
    n = 0
    for d in src[src[:, 4] >= cfg.score_threshold]:
        if not len(other):
            break
        near = iou(d[:4], other[:, :4]) >= cfg.match_iou
        if near.any() and not (other[near, 5] == d[5]).any():
            n += 1
    return n


def first_unmatched(src: np.ndarray, cand: np.ndarray,
                    cfg: DetectConfig = DetectConfig()) -> str | None:
    """The first detection (best score first; ``src``'s, then ``cand``'s) without a
    partner on the other side, in words: ``class 2 -> 7`` (another class took its
    place), ``detection of class 2 at IoU 0.31`` (the nearest of its class), ``detection
    of class 2 lost`` / ``detection of class 2 added``; None when all match."""
    low = cfg.score_threshold - cfg.margin
    for strong, other, gone in ((src, cand, "lost"), (cand, src, "added")):
        pool = other[other[:, 4] >= low]
        used = np.zeros(len(pool), bool)
        for d in strong[strong[:, 4] >= cfg.score_threshold]:
            k = int(d[5])
            ious = iou(d[:4], pool[:, :4]) if len(pool) else np.zeros(0)
            same = (pool[:, 5] == d[5]) & ~used if len(pool) else np.zeros(0, bool)
            if same.any():
                j = int(np.argmax(np.where(same, ious, -1.0)))
                if ious[j] >= cfg.match_iou:
                    used[j] = True
                    continue
            near = ious >= cfg.match_iou
            if near.any():
                j = int(np.argmax(np.where(near, pool[:, 4], -1.0)))
                a, b = (k, int(pool[j, 5])) if gone == "lost" else (int(pool[j, 5]), k)
                return f"class {a} -> {b}"
            if same.any():
                best = float(np.max(ious[same]))
                return f"detection of class {k} at IoU {best:.2f}"
            return f"detection of class {k} {gone}"
    return None


# ---------------------------------------------------------------- classes

def softmax(a: np.ndarray, axis: int = -1) -> np.ndarray:
    z = a - a.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)  # type: ignore[no-any-return]


def is_probabilities(a: np.ndarray, axis: int = -1) -> bool:
    """Scores in [0, 1] summing to 1 along ``axis`` ([B, C], [B, 1, C], [B, T, C])."""
    if a.dtype.kind != "f" or not 2 <= a.ndim <= 4 or a.shape[axis] < 2 or not a.size:
        return False
    if float(a.min()) < 0 or float(a.max()) > 1:
        return False
    return bool(np.allclose(a.sum(axis=axis), 1.0, atol=1e-3))


def top1(scores: np.ndarray) -> np.ndarray:
    """The best class of each position: argmax over the last axis."""
    out: np.ndarray = np.argmax(scores, axis=-1)
    return out


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Class scores as probabilities over the last axis: as they are when they already
    are some (each position in [0, 1] summing to 1), else their softmax."""
    a = np.asarray(scores, np.float64)
    if a.size and a.min() >= 0 and a.max() <= 1 and np.allclose(a.sum(-1), 1, atol=1e-3):
        return a
    out: np.ndarray = softmax(a)
    return out


# ---------------------------------------------------------------- embeddings, values

def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two samples flattened; two zero vectors are identical (1.0), one zero
    or a non-finite norm is 0.0."""
    x = np.asarray(a, np.float64).reshape(-1)
    y = np.asarray(b, np.float64).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        if nx == 0.0 and ny == 0.0:
            return 1.0
        if nx == 0.0 or ny == 0.0 or not (np.isfinite(nx) and np.isfinite(ny)):
            return 0.0
        return float(np.dot(x, y) / (nx * ny))


def abs_error(cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``|cand - ref|`` in float64."""
    return np.abs(np.asarray(cand, np.float64) - np.asarray(ref, np.float64))


# ---------------------------------------------------------------- segmentation

def segment_counts(cand_map: np.ndarray, ref_map: np.ndarray,
                   classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel intersection and union of two class maps (same shape)."""
    c = np.asarray(cand_map).reshape(-1)
    r = np.asarray(ref_map).reshape(-1)
    inter = np.bincount(r[c == r], minlength=classes)[:classes].astype(np.float64)
    hc = np.bincount(c, minlength=classes)[:classes].astype(np.float64)
    hr = np.bincount(r, minlength=classes)[:classes].astype(np.float64)
    return inter, hc + hr - inter


def segment_layout(a: np.ndarray) -> str:
    """``segment`` (classes on axis 1, NCHW) or ``segment-nhwc`` (classes last): the axis
    the scores sum to 1 along, else the one that is not part of a square H x W, else
    the shorter one (fewer classes than pixels across)."""
    if is_probabilities(a, 1):
        return "segment"
    if is_probabilities(a, -1):
        return "segment-nhwc"
    _, d1, d2, d3 = a.shape
    if d2 == d3 != d1:
        return "segment"
    if d1 == d2 != d3:
        return "segment-nhwc"
    return "segment" if d1 <= d3 else "segment-nhwc"


def pixel_agreement(cand_map: np.ndarray, ref_map: np.ndarray) -> float:
    """Share of pixels of equal class (1.0 for empty maps)."""
    c, r = np.asarray(cand_map), np.asarray(ref_map)
    return float(np.mean(c == r)) if r.size else 1.0


__all__ = [
    "DETECT_KINDS",
    "DetectConfig",
    "abs_error",
    "area",
    "class_changes",
    "corners",
    "cosine",
    "decode",
    "detections",
    "first_unmatched",
    "iou",
    "is_probabilities",
    "match_detections",
    "nms",
    "pixel_agreement",
    "probabilities",
    "segment_counts",
    "segment_layout",
    "sigmoid",
    "softmax",
    "top1",
    "xyxy",
]
