"""Tiny models for the pre/post-processing tests: a classifier, a YOLOv8-layout detector
with known boxes and a segmenter, and photo-like images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def classifier(path: Path, size: int = 32, classes: int = 10) -> Path:
    """A small CNN with logits (no softmax) and a symbolic batch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, classes)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "cls",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


#: The detector's anchors in model-input pixels (cx, cy, w, h) and their best class/score.
ANCHORS = np.array([[20, 30, 20, 20],   # class 1, 0.9
                    [21, 31, 20, 20],   # class 1, 0.8: suppressed by the first (IoU 0.82)
                    [45, 40, 10, 16],   # class 2, 0.7
                    [10, 20, 14, 14]],  # class 0, 0.6: reaches into the top padding
                   np.float32)
BEST = [(1, 0.9), (1, 0.8), (2, 0.7), (0, 0.6)]


def detector(path: Path, size: int = 64, classes: int = 3, anchors: int = 16) -> Path:
    """A YOLOv8-layout head ``[N, 4+C, A]`` whose boxes are known constants and whose
    scores move by at most 1e-3 with the image (so that it is a function of it)."""
    box = np.tile(np.array([32, 32, 4, 4], np.float32), (anchors, 1))
    box[:len(ANCHORS)] = ANCHORS
    sc = np.full((classes, anchors), 0.02, np.float32)
    for a, (c, s) in enumerate(BEST):
        sc[c, a] = s
    inits = [numpy_helper.from_array(box.T[None].copy(), "anchor_boxes"),
             numpy_helper.from_array(sc[None], "anchor_scores"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shp"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "eps"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMean", ["images", "axes"], ["m4"], keepdims=1),
             helper.make_node("Reshape", ["m4", "shp"], ["m"]),  # [N, 1, 1]
             helper.make_node("Mul", ["m", "eps"], ["d"]),
             helper.make_node("Add", ["anchor_scores", "d"], ["s"]),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["anchor_boxes", "z"], ["b"]),
             helper.make_node("Concat", ["b", "s"], ["output0"], axis=1)]
    graph = helper.make_graph(
        nodes, "det",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       ["N", 4 + classes, anchors])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def images(n: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    """Smooth images (gradients and blobs), more like photos than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(1, 4, 3)
        ph = rng.uniform(0, 6, 3)
        chans = [127 + 120 * np.sin(f[c] * 3 * (xx + yy * (c + 1)) + ph[c]) for c in range(3)]
        out[i] = np.clip(np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3)), 0, 255)
    return out


def segmenter(path: Path, size: int = 16, classes: int = 4) -> Path:
    """Per-pixel class scores at half the input size; its input is named ``image`` and its
    output ``scores``, the names the wrapper's own tensors take."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (classes, 3, 3, 3)).astype(np.float32),
                                     "w")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["scores"], kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                       ["N", classes, size // 2, size // 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path
