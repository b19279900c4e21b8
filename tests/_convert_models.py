"""Models the converter tests and bench/convert_suite.py build with onnx.helper.

Shapes are parameters so that tests use tiny versions and the bench realistic ones.
Weights are random but scaled like trained layers (He-style), so quantization
errors are of a realistic size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _G:
    """Tiny graph builder: unique names, initializers, nodes."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, base: str = "w") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def weight(self, shape: Sequence[int], fan_in: int, base: str = "w") -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        return self.const(w, base)

    def bias(self, n: int) -> str:
        return self.const(self.rng.normal(0, 0.05, n).astype(np.float32), "b")

    def op(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        w = self.weight((cout, cin // group, k, k), fan_in=cin // group * k * k)
        p = k // 2
        return str(self.op("Conv", [x, w, self.bias(cout)], kernel_shape=[k, k],
                           strides=[stride, stride], pads=[p, p, p, p], group=group))

    def relu6(self, x: str) -> str:
        lo = self.const(np.array(0.0, np.float32), "lo")
        hi = self.const(np.array(6.0, np.float32), "hi")
        return str(self.op("Clip", [x, lo, hi]))

    def head(self, x: str, c: int, classes: int, out: str) -> None:
        gap = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [gap])
        w = self.weight((classes, c), fan_in=c)
        self.nodes.append(helper.make_node("Gemm", [flat, w, self.bias(classes)], [out],
                                           transB=1, name="head"))

    def save(self, path: Path, inputs: list[Any], outputs: list[Any],
             opsets: Sequence[tuple[str, int]] = (("", OPSET),)) -> Path:
        graph = helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                        for d, v in opsets])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path


def _vi(name: str, dtype: int, shape: Sequence[int | str]) -> Any:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def mobilenet_like(path: Path, *, size: int = 32, width: int = 8, blocks: int = 3,
                   classes: int = 10, seed: int = 0) -> Path:
    """Stem conv, depthwise-separable blocks with ReLU6 (stride 2 every other block), head."""
    g = _G(seed)
    x = g.relu6(g.conv("input", 3, width, 3, stride=2))
    c = width
    for i in range(blocks):
        stride = 2 if i % 2 == 1 else 1
        x = g.relu6(g.conv(x, c, c, 3, stride=stride, group=c))
        cout = c * 2 if stride == 2 else c
        x = g.relu6(g.conv(x, c, cout, 1))
        c = cout
    g.head(x, c, classes, "logits")
    return g.save(path, [_vi("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                  [_vi("logits", TensorProto.FLOAT, ["batch", classes])])


def resnet_like(path: Path, *, size: int = 32, width: int = 8, blocks: int = 2,
                classes: int = 10, seed: int = 0) -> Path:
    """Stem conv, basic residual blocks (projection on stride 2), head."""
    g = _G(seed)
    x = g.op("Relu", [g.conv("input", 3, width, 3)])
    c = width
    for i in range(blocks):
        stride = 2 if i > 0 else 1
        cout = c * 2 if stride == 2 else c
        y = g.op("Relu", [g.conv(x, c, cout, 3, stride=stride)])
        y = g.conv(y, cout, cout, 3)
        skip = g.conv(x, c, cout, 1, stride=stride) if stride != 1 else x
        x = g.op("Relu", [g.op("Add", [y, skip])])
        c = cout
    g.head(x, c, classes, "logits")
    return g.save(path, [_vi("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                  [_vi("logits", TensorProto.FLOAT, ["batch", classes])])


def transformer_encoder(path: Path, *, d: int = 32, heads: int = 2, ff: int = 64,
                        layers: int = 1, vocab: int = 100, seed: int = 0) -> Path:
    """Token ids [batch, seq] → embedding, post-LN encoder layers, mean-pooled [batch, d]."""
    g = _G(seed)
    dh = d // heads
    emb = g.const(g.rng.normal(0, 1.0, (vocab, d)).astype(np.float32), "emb")
    x = g.op("Gather", [emb, "input_ids"], axis=0)
    split_shape = g.const(np.array([0, -1, heads, dh], np.int64), "shape")
    merge_shape = g.const(np.array([0, -1, d], np.int64), "shape")
    scale = g.const(np.array(1.0 / np.sqrt(dh), np.float32), "scale")

    def ln(v: str) -> str:
        gamma = g.const(np.ones(d, np.float32), "gamma")
        beta = g.const(np.zeros(d, np.float32), "beta")
        return str(g.op("LayerNormalization", [v, gamma, beta], axis=-1, epsilon=1e-5))

    def dense(v: str, cin: int, cout: int) -> str:
        return str(g.op("Add", [g.op("MatMul", [v, g.weight((cin, cout), cin)]), g.bias(cout)]))

    for _ in range(layers):
        q, k, v = (g.op("Reshape", [dense(x, d, d), split_shape]) for _ in range(3))
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, k]), scale])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_shape])
        x = ln(g.op("Add", [x, dense(ctx, d, d)]))
        h = dense(x, d, ff)
        # GELU (erf form), as exported by PyTorch.
        sqrt2 = g.const(np.array(np.sqrt(2.0), np.float32), "c")
        one = g.const(np.array(1.0, np.float32), "c")
        half = g.const(np.array(0.5, np.float32), "c")
        h = g.op("Mul", [g.op("Mul", [h, half]),
                         g.op("Add", [g.op("Erf", [g.op("Div", [h, sqrt2])]), one])])
        x = ln(g.op("Add", [x, dense(h, ff, d)]))
    g.nodes.append(helper.make_node("ReduceMean", [x], ["embedding"], axes=[1], keepdims=0,
                                    name="pool"))
    return g.save(path, [_vi("input_ids", TensorProto.INT64, ["batch", "seq"])],
                  [_vi("embedding", TensorProto.FLOAT, ["batch", d])],
                  opsets=(("", OPSET),))


def mlp_classifier(path: Path, *, features: int = 20, hidden: int = 64, classes: int = 5,
                   seed: int = 0, opsets: Sequence[tuple[str, int]] = (("", OPSET),)) -> Path:
    """Gemm-Relu-Gemm-Relu-Gemm → logits [batch, classes] (the PyTorch Linear export)."""
    g = _G(seed)
    x = "features"
    cin = features
    for i, cout in enumerate((hidden, hidden, classes)):
        w = g.weight((cout, cin), cin)
        out = "logits" if i == 2 else g.name("h")
        g.nodes.append(helper.make_node("Gemm", [x, w, g.bias(cout)], [out], transB=1,
                                        name=g.name("Gemm")))
        x = out if i == 2 else str(g.op("Relu", [out]))
        cin = cout
    return g.save(path, [_vi("features", TensorProto.FLOAT, ["batch", features])],
                  [_vi("logits", TensorProto.FLOAT, ["batch", classes])], opsets=opsets)


def duplicate_opset_mlp(path: Path, **kw: Any) -> Path:
    """The MLP with the default opset imported twice (as skl2onnx writes some models)."""
    return mlp_classifier(path, opsets=(("", OPSET), ("", 13), ("ai.onnx.ml", 3)), **kw)


def constant_weights_mlp(path: Path, *, features: int = 20, hidden: int = 64,
                         classes: int = 5, seed: int = 0) -> Path:
    """MatMul+Add MLP whose weights and biases live in Constant nodes, not initializers."""
    g = _G(seed)
    x = "features"
    cin = features
    for i, cout in enumerate((hidden, hidden, classes)):
        w = g.rng.normal(0, np.sqrt(2.0 / cin), (cin, cout)).astype(np.float32)
        b = g.rng.normal(0, 0.05, cout).astype(np.float32)
        wn, bn = g.name("cw"), g.name("cb")
        g.nodes.append(helper.make_node("Constant", [], [wn], value=numpy_helper.from_array(w)))
        g.nodes.append(helper.make_node("Constant", [], [bn], value=numpy_helper.from_array(b)))
        out = "logits" if i == 2 else g.name("h")
        g.nodes.append(helper.make_node("Add", [g.op("MatMul", [x, wn]), bn], [out]))
        x = out if i == 2 else str(g.op("Relu", [out]))
        cin = cout
    return g.save(path, [_vi("features", TensorProto.FLOAT, ["batch", features])],
                  [_vi("logits", TensorProto.FLOAT, ["batch", classes])])


def weightless(path: Path) -> Path:
    """y = relu(x) * 2: nothing for a quantizer to quantize."""
    g = _G(0)
    two = g.const(np.array(2.0, np.float32), "two")
    g.nodes.append(helper.make_node("Mul", [g.op("Relu", ["x"]), two], ["y"]))
    return g.save(path, [_vi("x", TensorProto.FLOAT, ["batch", 8])],
                  [_vi("y", TensorProto.FLOAT, ["batch", 8])])


def stateful_if(path: Path, *, d: int = 16, seed: int = 0) -> Path:
    """A streaming model: inputs x [1, d], state [2, 1, d], sr (int64 scalar).

    An If picks one of two weight matrices by the sign of sum(x); the new state is
    returned as ``state_out`` (fed back by the caller); y [1, 4] is scaled by sr/16000.
    """
    g = _G(seed)
    h = g.op("MatMul", ["x", g.weight((d, d), d)])
    total = g.op("ReduceSum", ["x"], keepdims=0)
    cond = g.op("Greater", [total, g.const(np.array(0.0, np.float32), "zero")])

    def branch(name: str) -> Any:
        w = g.weight((d, d), d)  # outer-scope initializer used inside the subgraph
        out = g.name(f"{name}_out")
        node = helper.make_node("MatMul", [h, w], [out], name=g.name(name))
        return helper.make_graph([node], name, [], [_vi(out, TensorProto.FLOAT, [1, d])])

    chosen = g.op("If", [cond], then_branch=branch("then"), else_branch=branch("else"))
    s0 = g.op("Gather", ["state", g.const(np.array(0, np.int64), "i0")], axis=0)
    s1 = g.op("Gather", ["state", g.const(np.array(1, np.int64), "i1")], axis=0)
    half = g.const(np.array(0.5, np.float32), "half")
    new0 = g.op("Tanh", [g.op("Add", [g.op("Mul", [s0, half]), chosen])])
    new1 = g.op("Tanh", [g.op("Add", [g.op("Mul", [s1, half]),
                                      g.op("MatMul", [new0, g.weight((d, d), d)])])])
    axes = g.const(np.array([0], np.int64), "axes")
    g.nodes.append(helper.make_node("Concat", [g.op("Unsqueeze", [new0, axes]),
                                               g.op("Unsqueeze", [new1, axes])],
                                    ["state_out"], axis=0))
    srf = g.op("Div", [g.op("Cast", ["sr"], to=TensorProto.FLOAT),
                       g.const(np.array(16000.0, np.float32), "ref")])
    g.nodes.append(helper.make_node("Mul", [g.op("MatMul", [new1, g.weight((d, 4), d)]), srf],
                                    ["y"]))
    return g.save(
        path,
        [_vi("x", TensorProto.FLOAT, [1, d]), _vi("state", TensorProto.FLOAT, [2, 1, d]),
         _vi("sr", TensorProto.INT64, [])],
        [_vi("y", TensorProto.FLOAT, [1, 4]), _vi("state_out", TensorProto.FLOAT, [2, 1, d])],
    )


def stateful_rollout(path: Path, steps: int, *, d: int = 16, seed: int = 1) -> dict[str, Any]:
    """Run the stateful model over a random stream; return per-step feeds in the
    rank+1 layout of calibration files (x [N, 1, d], state [N, 2, 1, d], sr [N])."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    state = np.zeros((2, 1, d), np.float32)
    xs, states = [], []
    for _ in range(steps):
        x = rng.standard_normal((1, d)).astype(np.float32)
        xs.append(x)
        states.append(state)
        _, state = sess.run(None, {"x": x, "state": state, "sr": np.array(16000, np.int64)})
    return {"x": np.stack(xs), "state": np.stack(states),
            "sr": np.full(steps, 16000, np.int64)}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth image-like inputs (low-frequency patterns plus noise), not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
            out[i, c] = np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    out += rng.normal(0, 0.1, out.shape).astype(np.float32)
    return out


def token_ids(n: int, seq: int, vocab: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int64)


def tabular(n: int, features: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, features)).astype(np.float32)


def loop_rnn(path: Path, *, d: int = 16, steps: int = 4, seed: int = 0) -> Path:
    """x [1, d] → h0 = x W0, then a Loop of ``steps`` h = tanh(h W) with W used from
    inside the loop body (outer-scope weight)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(d), (d, d)).astype(np.float32), "W")
    w0 = numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(d), (d, d)).astype(np.float32), "W0")
    trip = numpy_helper.from_array(np.array(steps, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["m"]),
         helper.make_node("Tanh", ["m"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []),
         _vi("h_in", TensorProto.FLOAT, [1, d])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("h_out", TensorProto.FLOAT, [1, d])],
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W0"], ["h0"]),
         helper.make_node("Loop", ["trip", "cond", "h0"], ["y"], body=body)],
        "loop", [_vi("x", TensorProto.FLOAT, [1, d])], [_vi("y", TensorProto.FLOAT, [1, d])],
        [w, w0, trip, cond],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def yolo_like_detector(path: Path, *, size: int = 32, width: int = 8, classes: int = 3,
                       class_spread: float = 0.3, box_scale: float = 640.0,
                       class_bias: float = -1.0, box_size: float = 0.4,
                       seed: int = 0) -> Path:
    """A YOLOv8-style detector: two stride-2 convs, a 1x1 head, output ``output0``
    ``[1, 4+C, N]`` (cx, cy, w, h in pixels of a ``box_scale``-wide image, then sigmoid
    class scores), N = (size/4)². The class rows of the head differ only by
    ``class_spread`` of their weights, so classes compete closely, while the box rows
    hold large values: the whole-tensor cosine is dominated by box coordinates, and
    int8 activations (one scale for the head's output, set by the boxes) flip classes."""
    g = _G(seed)
    x = g.op("Relu", [g.conv("images", 3, width, 3, stride=2)])
    x = g.op("Relu", [g.conv(x, width, width, 3, stride=2)])
    grid = size // 4
    n = grid * grid
    rng = g.rng
    base = rng.normal(0, np.sqrt(2.0 / width), (1, width))
    cls_w = base + class_spread * rng.normal(0, np.sqrt(2.0 / width), (classes, width))
    box_w = rng.normal(0, np.sqrt(2.0 / width), (4, width)) * np.array([[8], [8], [4], [4]])
    w = np.concatenate([box_w, cls_w]).astype(np.float32).reshape(4 + classes, width, 1, 1)
    b = np.concatenate([[0, 0, box_scale * box_size, box_scale * box_size],
                        class_bias + rng.normal(0, 0.05, classes)]).astype(np.float32)
    head = g.op("Conv", [x, g.const(w), g.const(b)], kernel_shape=[1, 1])
    flat = g.op("Reshape", [head, g.const(np.array([1, 4 + classes, n], np.int64), "shape")])
    box, cls = g.op("Split", [flat, g.const(np.array([4, classes], np.int64), "split")],
                    n_out=2, axis=1)
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float32)
    step = box_scale / grid
    offset = np.zeros((1, 4, n), np.float32)
    offset[0, 0] = ((xs + 0.5) * step).reshape(-1)
    offset[0, 1] = ((ys + 0.5) * step).reshape(-1)
    boxes = g.op("Add", [box, g.const(offset, "grid")])
    scores = g.op("Sigmoid", [cls])
    g.nodes.append(helper.make_node("Concat", [boxes, scores], ["output0"], axis=1,
                                    name="concat"))
    return g.save(path, [_vi("images", TensorProto.FLOAT, [1, 3, size, size])],
                  [_vi("output0", TensorProto.FLOAT, [1, 4 + classes, n])])


def tiny_segmenter(path: Path, *, size: int = 32, width: int = 8, classes: int = 4,
                   seed: int = 0) -> Path:
    """Three same-size convs and a 1x1 head: ``masks`` ``[batch, C, size, size]`` logits."""
    g = _G(seed)
    x = g.op("Relu", [g.conv("input", 3, width, 3)])
    x = g.op("Relu", [g.conv(x, width, width, 3)])
    x = g.conv(x, width, classes, 1)
    g.nodes.append(helper.make_node("Identity", [x], ["masks"], name="masks"))
    return g.save(path, [_vi("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                  [_vi("masks", TensorProto.FLOAT, ["batch", classes, size, size])])


def yolo_neck(path: Path, *, width: int = 8, seed: int = 0) -> Path:
    """A detector neck with symbolic H, W: five stride-2 convs, the /32 map upsampled x2
    and concatenated with the /16 map (as YOLO's FPN does), a 1x1 head. Runs only when H
    and W are multiples of 32: on 16x16 the Concat fails."""
    g = _G(seed)
    x, c, maps = "images", 3, []
    for _ in range(5):
        x = g.op("Relu", [g.conv(x, c, width, 3, stride=2)])
        c = width
        maps.append(x)
    scales = g.const(np.array([1, 1, 2, 2], np.float32), "scales")
    up = g.op("Resize", [maps[-1], "", scales], mode="nearest")
    cat = g.op("Concat", [up, maps[-2]], axis=1)
    g.nodes.append(helper.make_node("Conv", [cat, g.weight((6, 2 * width, 1, 1), 2 * width),
                                              g.bias(6)], ["preds"], kernel_shape=[1, 1]))
    return g.save(path, [_vi("images", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
                  [_vi("preds", TensorProto.FLOAT, ["batch", 6, "h", "w"])])


def stride3_concat(path: Path, *, width: int = 8, seed: int = 0) -> Path:
    """Symbolic H, W that must be multiples of 3 (a stride-3 pool upsampled x3 and
    concatenated with its input): none of the sizes a shape search tries."""
    g = _G(seed)
    pool = g.op("MaxPool", ["images"], kernel_shape=[3, 3], strides=[3, 3])
    scales = g.const(np.array([1, 1, 3, 3], np.float32), "scales")
    cat = g.op("Concat", [g.op("Resize", [pool, "", scales], mode="nearest"), "images"],
               axis=1)
    g.nodes.append(helper.make_node("Conv", [cat, g.weight((width, 6, 1, 1), 6),
                                              g.bias(width)], ["y"], kernel_shape=[1, 1]))
    return g.save(path, [_vi("images", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
                  [_vi("y", TensorProto.FLOAT, ["batch", width, "H", "W"])])


def fixed_width_mlp(path: Path, *, width: int = 24, seed: int = 0) -> Path:
    """x [batch, n] plus a [1, width] offset, then a dense layer: n must be ``width``,
    which onnxruntime's broadcast error names ("16 by 24")."""
    g = _G(seed)
    shifted = g.op("Add", ["x", g.const(g.rng.normal(0, 0.1, (1, width)).astype(np.float32))])
    g.nodes.append(helper.make_node("MatMul", [shifted, g.weight((width, 4), width)], ["y"]))
    return g.save(path, [_vi("x", TensorProto.FLOAT, ["batch", "n"])],
                  [_vi("y", TensorProto.FLOAT, ["batch", 4])])
