"""Models for quality-gate tests: a small classifier and its retrained / perturbed twins.

``classifier(path, seed, perturb)``: x float32 ``[batch, 16]`` → ``probs`` ``[batch, 10]``
(softmax over a two-layer MLP). ``perturb=0`` is the reference; a small ``perturb`` (1e-4)
moves every probability a little and never the top class on :func:`field_inputs`; a large
one (1.0, "a perturbed last layer") changes the top class of a large share of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests._models import OPSET, _save

FEATURES, CLASSES, HIDDEN = 16, 10, 32


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (FEATURES, HIDDEN)).astype(np.float32)
    b1 = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    w2 = rng.normal(0, 0.5, (HIDDEN, CLASSES)).astype(np.float32)
    b2 = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    return w1, b1, w2, b2


def classifier(path: Path, *, seed: int = 0, perturb: float = 0.0) -> Path:
    """The classifier; ``perturb`` scales noise added to its last layer (0: none)."""
    w1, b1, w2, b2 = _weights(seed)
    if perturb:
        noise = np.random.default_rng(seed + 1000).normal(0, 1, w2.shape).astype(np.float32)
        w2 = (w2 + perturb * noise).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "classifier", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def field_inputs(n: int, *, seed: int = 7, shift: float = 0.0) -> np.ndarray:
    """``n`` inputs ``[n, 16]`` like the evaluation set (``shift`` moves every feature)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, FEATURES)) + shift).astype(np.float32)
