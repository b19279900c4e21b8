"""The reference pipeline in numpy, written from the spec alone (not from the graph):
what the artifact's in-graph pre- and post-processing must agree with.

    feed = preprocess(bound, images)                     # uint8 [N, H, W, 3] -> model feed
    answers = postprocess(bound, outputs, images.shape)  # the source's outputs -> answers

Geometry follows the common training pipelines: a letterbox as ultralytics builds it
(scale keeping aspect, ``round`` sizes, pad split with ``round(d -+ 0.1)``, gray 114), a
center crop as torchvision's (cover, then ``round((h - H) / 2)``); bilinear resizing with
half-pixel centres and no antialias (OpenCV's ``INTER_LINEAR``), clamped at the borders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._prepost import LETTERBOX_PAD, Bound, PreSpec
from ._tasks import decode, nms


@dataclass(frozen=True)
class Geometry:
    """How a model-input pixel coordinate relates to the image's: ``model = image * s + t``
    (per axis), and the resize/pad/crop that made it."""

    resized: tuple[int, int]  # (h, w) after resizing
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    crop: tuple[int, int]  # top, left
    scale: tuple[float, float]  # (sy, sx)
    shift: tuple[float, float]  # (ty, tx)


def geometry(pre: PreSpec, size: tuple[int, int], h: int, w: int) -> Geometry:
    th, tw = size
    if pre.resize == "stretch":
        return Geometry((th, tw), (0, 0, 0, 0), (0, 0), (th / h, tw / w), (0.0, 0.0))
    if pre.resize == "letterbox":
        r = min(th / h, tw / w)
        nh, nw = round(h * r), round(w * r)
        dh, dw = (th - nh) / 2, (tw - nw) / 2
        top, bottom = round(dh - 0.1), round(dh + 0.1)
        left, right = round(dw - 0.1), round(dw + 0.1)
        return Geometry((nh, nw), (top, left, bottom, right), (0, 0), (r, r),
                        (float(top), float(left)))
    r = max(th / h, tw / w)
    nh, nw = max(th, round(h * r)), max(tw, round(w * r))
    top, left = round((nh - th) / 2.0), round((nw - tw) / 2.0)
    return Geometry((nh, nw), (0, 0, 0, 0), (top, left), (r, r), (-float(top), -float(left)))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(n_out) / np.float32(n_in)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) / scale - np.float32(0.5)
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``[N, H, W, C]`` float → ``[N, out_h, out_w, C]``, bilinear, half-pixel centres."""
    _, h, w, _ = img.shape
    y0, y1, fy = _axis_weights(h, out_h)
    x0, x1, fx = _axis_weights(w, out_w)
    top = img[:, y0] * (1 - fy)[None, :, None, None] + img[:, y1] * fy[None, :, None, None]
    out = (top[:, :, x0] * (1 - fx)[None, None, :, None]
           + top[:, :, x1] * fx[None, None, :, None])
    return np.asarray(out, dtype=np.float32)


def preprocess(bound: Bound, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 RGB ``[N, H, W, 3]`` → the model's feed."""
    pre = bound.pre
    assert pre is not None
    x: np.ndarray = np.asarray(images).astype(np.float32)
    g = geometry(pre, bound.size, x.shape[1], x.shape[2])
    x = resize_bilinear(x, *g.resized)
    top, left, bottom, right = g.pad
    if any(g.pad):
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)),
                   constant_values=LETTERBOX_PAD)
    th, tw = bound.size
    x = x[:, g.crop[0]:g.crop[0] + th, g.crop[1]:g.crop[1] + tw]
    if pre.channels == "bgr":
        x = x[..., ::-1]
    x = x * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if bound.layout == "nchw":
        x = np.transpose(x, (0, 3, 1, 2))
    return {bound.model_input: np.ascontiguousarray(x.astype(bound.input_dtype))}


def _softmax(a: np.ndarray) -> np.ndarray:
    z = np.exp(a - a.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def postprocess(bound: Bound, outputs: Mapping[str, np.ndarray],
                image_shape: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    """The source's outputs (one batch) → the answers; ``image_shape`` is the images'
    ``[N, H, W, 3]`` (None: no pre-processing, coordinates stay the model input's)."""
    post = bound.post
    assert post is not None and bound.output is not None
    out = np.asarray(outputs[bound.output], np.float64)
    g = None
    if bound.pre is not None and image_shape is not None:
        g = geometry(bound.pre, bound.size, image_shape[1], image_shape[2])
    if post.task == "classify":
        p = out.reshape(out.shape[0], -1)
        p = _softmax(p) if bound.softmax else p
        k = min(post.topk, p.shape[-1])
        idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        return {"scores": np.take_along_axis(p, idx, -1).astype(np.float32),
                "class_ids": idx.astype(np.int64)}
    if post.task == "embed":
        e = out.reshape(out.shape[0], -1)
        n = np.sqrt(np.sum(e * e, axis=-1, keepdims=True))
        return {"embedding": (e / np.maximum(n, 1e-12)).astype(np.float32)}
    if post.task == "segment":
        cls = np.argmax(out, axis=1 if bound.class_axis == 1 else -1)  # [N, h, w]
        if g is None:
            return {"class_map": cls.astype(np.int64)}
        assert image_shape is not None
        mh, mw = cls.shape[1:]
        iy = _nearest(image_shape[1], g.scale[0], g.shift[0], mh / bound.size[0], mh)
        ix = _nearest(image_shape[2], g.scale[1], g.shift[1], mw / bound.size[1], mw)
        return {"class_map": cls[:, iy][:, :, ix].astype(np.int64)}
    return _detect(bound, out, outputs, g, image_shape)


def _nearest(n: int, s: float, t: float, to_mask: float, limit: int) -> np.ndarray:
    """Mask index of each image pixel's centre."""
    f = np.float32
    u = ((np.arange(n, dtype=f) + f(0.5)) * f(s) + f(t)) * f(to_mask)
    return np.asarray(np.clip(np.floor(u), 0, limit - 1), dtype=np.int64)


def _detect(bound: Bound, out: np.ndarray, outputs: Mapping[str, np.ndarray],
            g: Geometry | None, image_shape: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    post = bound.post
    assert post is not None
    rows: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for b in range(out.shape[0]):
        if post.layout == "yolov8":
            boxes, cls = decode("detect-yolov8", out[b], sigmoid=bound.sigmoid)
        elif post.layout == "yolov5":
            boxes, cls = decode("detect-yolov5", out[b], sigmoid=bound.sigmoid)
        else:
            assert bound.partner is not None
            bx = out[b].T if bound.boxes_t else out[b]
            if bound.box_format == "cxcywh":
                bx = np.concatenate([bx[:, :2] - bx[:, 2:] / 2, bx[:, :2] + bx[:, 2:] / 2], 1)
            sc = np.asarray(outputs[bound.partner], np.float64)[b]
            boxes, cls = decode("detect-boxes", bx, sc.T if bound.scores_t else sc,
                                sigmoid=bound.sigmoid)
        dets = nms(boxes, cls, threshold=post.score, iou_threshold=post.iou,
                   max_detections=post.max)
        # ONNX NonMaxSuppression keeps scores above the threshold, not equal to it.
        dets = dets[dets[:, 4] > post.score]
        rows.append(dets)
        batch.append(np.full(len(dets), b, np.int64))
    d = np.concatenate(rows) if rows else np.zeros((0, 6))
    boxes = d[:, :4]
    if g is not None and image_shape is not None:
        s = np.array([g.scale[1], g.scale[0], g.scale[1], g.scale[0]])
        t = np.array([g.shift[1], g.shift[0], g.shift[1], g.shift[0]])
        boxes = (boxes - t) / s
        h, w = image_shape[1], image_shape[2]
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float64))
    return {"boxes": boxes.astype(np.float32), "scores": d[:, 4].astype(np.float32),
            "class_ids": d[:, 5].astype(np.int64),
            "batch_index": np.concatenate(batch) if batch else np.zeros(0, np.int64)}


__all__ = ["Geometry", "geometry", "postprocess", "preprocess", "resize_bilinear"]
