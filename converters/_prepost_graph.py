"""Pre- and post-processing as ONNX operators around a model (``onnx.helper``), at the
model's own opset (11 or later: Resize with sizes, Pad with a value input, TopK,
NonMaxSuppression, Range, CumSum).

    model = wrap(onnx.load(path), bound)          # image in, answers out
    pre_only = preprocess_model(bound, opset=17)  # image in, the model's input out

The ops stay float32 whatever the model's scheme; only the model part is quantized.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edge_sdk.errors import ConversionError

from ._prepost import IMAGE_INPUT, LETTERBOX_PAD, Bound

MIN_OPSET = 11
_P = "prepost/"  # prefix of every tensor and node the wrapper adds
_I64_MAX = np.iinfo(np.int64).max


class _Graph:
    """Nodes and constants under construction, opset-aware where an op changed form."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{_P}{hint}_{self.count}"

    def const(self, value: Any, dtype: Any = np.float32, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1,
           outs: list[str] | None = None, **attrs: Any) -> Any:
        from onnx import helper

        if outs is None:
            outs = [out] if out is not None and n_out == 1 else [
                self._name(op_type.lower()) for _ in range(n_out)]
        n_out = len(outs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self._name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        since = 13 if op_type == "ReduceSum" else 18
        if self.opset >= since:
            return str(self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims))
        return str(self.op(op_type, x, axes=axes, keepdims=keepdims))

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return str(self.op("Slice", x, self.const([start], np.int64),
                           self.const([end], np.int64), self.const([axis], np.int64)))

    def cast(self, x: str, to: int) -> str:
        return str(self.op("Cast", x, to=to))


def _f32() -> int:
    from onnx import TensorProto

    return int(TensorProto.FLOAT)


def _i64() -> int:
    from onnx import TensorProto

    return int(TensorProto.INT64)


class _Geo:
    """Tensors of the in-graph geometry: model = image * s + t, per (y, x)."""

    def __init__(self, hw: str, s: str, t: str) -> None:
        self.hw, self.s, self.t = hw, s, t  # image (h, w) float [2]; s, t float [2]


def _pre(g: _Graph, bound: Bound) -> _Geo:
    """``image`` uint8 [N, H, W, 3] → ``bound.model_input``."""
    from onnx import helper

    pre = bound.pre
    assert pre is not None
    th, tw = bound.size
    x = g.op("Transpose", g.cast(IMAGE_INPUT, _f32()), perm=[0, 3, 1, 2])  # [N, 3, H, W]
    shape = g.op("Shape", IMAGE_INPUT)
    hw_i = g.slice(shape, 1, 3, 0)
    hw = g.cast(hw_i, _f32())
    target = g.const([th, tw], np.float32)
    target_i = g.const([th, tw], np.int64)
    ratio = g.op("Div", target, hw)
    if pre.resize == "stretch":
        new, s, t = target_i, ratio, g.const([0.0, 0.0])
    elif pre.resize == "letterbox":
        r = g.reduce("ReduceMin", ratio, [0])
        new = g.cast(g.op("Round", g.op("Mul", hw, r)), _i64())
        gap = g.op("Sub", target_i, new)
        top_left = g.cast(g.op("Round", g.op("Sub", g.op("Div", g.cast(gap, _f32()),
                                                        g.const([2.0])), g.const([0.1]))),
                          _i64())
        bottom_right = g.op("Sub", gap, top_left)
        s, t = g.op("Mul", g.const([1.0, 1.0]), r), g.cast(top_left, _f32())
    else:  # center-crop: cover, then the middle
        r = g.reduce("ReduceMax", ratio, [0])
        # Max in float: opset 11's Max takes no int64.
        new = g.cast(g.op("Max", g.op("Round", g.op("Mul", hw, r)), target), _i64())
        crop = g.cast(g.op("Round", g.op("Div", g.cast(g.op("Sub", new, target_i), _f32()),
                                         g.const([2.0]))), _i64())
        s, t = g.op("Mul", g.const([1.0, 1.0]), r), g.op("Neg", g.cast(crop, _f32()))
    sizes = g.op("Concat", g.slice(g.op("Shape", x), 0, 2, 0), new, axis=0)
    empty = g.const(np.zeros(0, np.float32))
    x = g.op("Resize", x, empty, empty, sizes, mode="linear",
             coordinate_transformation_mode="half_pixel")
    if pre.resize == "letterbox":
        z2 = g.const([0, 0], np.int64)
        pads = g.op("Concat", z2, top_left, z2, bottom_right, axis=0)
        x = g.op("Pad", x, pads, g.const(LETTERBOX_PAD, np.float32), mode="constant")
    elif pre.resize == "center-crop":
        x = g.op("Slice", x, crop, g.op("Add", crop, target_i), g.const([2, 3], np.int64))
    if pre.channels == "bgr":
        x = g.op("Gather", x, g.const([2, 1, 0], np.int64), axis=1)
    x = g.op("Mul", x, g.const(pre.scale))
    x = g.op("Sub", x, g.const(np.reshape(pre.mean, (1, 3, 1, 1))))
    x = g.op("Div", x, g.const(np.reshape(pre.std, (1, 3, 1, 1))))
    if bound.layout == "nhwc":
        x = g.op("Transpose", x, perm=[0, 2, 3, 1])
    to = helper.np_dtype_to_tensor_dtype(np.dtype(bound.input_dtype))
    g.op("Cast", x, out=bound.model_input, to=int(to))
    return _Geo(hw, s, t)


def _as_float(g: _Graph, name: str, elem: int) -> str:
    return name if elem == _f32() else g.cast(name, _f32())


def _post(g: _Graph, bound: Bound, geo: _Geo | None, elems: dict[str, int]) -> list[Any]:
    """The model's outputs → the answers; returns their value infos."""
    from onnx import TensorProto, helper

    post = bound.post
    assert post is not None and bound.output is not None
    out = _as_float(g, bound.output, elems[bound.output])
    f, i = TensorProto.FLOAT, TensorProto.INT64
    if post.task == "classify":
        p = g.op("Flatten", out, axis=1)
        if bound.softmax:
            p = g.op("Softmax", p, axis=1)
        k = min(post.topk, bound.classes)
        g.op("TopK", p, g.const([k], np.int64), outs=["scores", "class_ids"], axis=-1,
             largest=1, sorted=1)
        return [helper.make_tensor_value_info("scores", f, ["batch", k]),
                helper.make_tensor_value_info("class_ids", i, ["batch", k])]
    if post.task == "embed":
        e = g.op("Flatten", out, axis=1)
        n = g.op("Sqrt", g.reduce("ReduceSum", g.op("Mul", e, e), [1]))
        g.op("Div", e, g.op("Max", n, g.const([1e-12])), out="embedding")
        return [helper.make_tensor_value_info("embedding", f, ["batch", "dim"])]
    if post.task == "segment":
        cls = g.op("ArgMax", out, axis=1 if bound.class_axis == 1 else 3, keepdims=0)
        if geo is None:
            g.op("Identity", cls, out="class_map")
        else:
            mshape = g.cast(g.slice(g.op("Shape", cls), 1, 3, 0), _f32())  # (mh, mw)
            to_mask = g.op("Div", mshape, g.const(list(bound.size)))
            idx = []
            for axis in (0, 1):
                pick = g.const(axis, np.int64)
                n = g.op("Gather", geo.hw, pick, axis=0)
                u = g.op("Mul", g.op("Add", g.op("Mul", g.op("Add", g.op(
                    "Range", g.const(0.0), n, g.const(1.0)), g.const(0.5)),
                    g.op("Gather", geo.s, pick, axis=0)), g.op("Gather", geo.t, pick, axis=0)),
                    g.op("Gather", to_mask, pick, axis=0))
                hi = g.op("Sub", g.op("Gather", mshape, pick, axis=0), g.const(1.0))
                u = g.op("Min", g.op("Max", g.op("Floor", u), g.const(0.0)), hi)
                idx.append(g.cast(u, _i64()))
            rows = g.op("Gather", cls, idx[0], axis=1)
            g.op("Gather", rows, idx[1], axis=2, out="class_map")
        return [helper.make_tensor_value_info("class_map", i, ["batch", "height", "width"])]
    return _detect(g, bound, out, geo, elems)


def _detect(g: _Graph, bound: Bound, out: str, geo: _Geo | None,
            elems: dict[str, int]) -> list[Any]:
    from onnx import TensorProto, helper

    post = bound.post
    assert post is not None
    if post.layout == "yolov8":  # [B, 4+C, N]
        box = g.op("Transpose", g.slice(out, 0, 4, 1), perm=[0, 2, 1])  # [B, N, 4] cxcywh
        cls = g.slice(out, 4, _I64_MAX, 1)  # [B, C, N]
        if bound.sigmoid:
            cls = g.op("Sigmoid", cls)
        cxcywh = True
    elif post.layout == "yolov5":  # [B, N, 5+C]
        box = g.slice(out, 0, 4, 2)
        obj, c = g.slice(out, 4, 5, 2), g.slice(out, 5, _I64_MAX, 2)
        if bound.sigmoid:
            obj, c = g.op("Sigmoid", obj), g.op("Sigmoid", c)
        cls = g.op("Transpose", g.op("Mul", obj, c), perm=[0, 2, 1])
        cxcywh = True
    else:
        assert bound.partner is not None
        box = g.op("Transpose", out, perm=[0, 2, 1]) if bound.boxes_t else out
        sc = _as_float(g, bound.partner, elems[bound.partner])
        cls = sc if bound.scores_t else g.op("Transpose", sc, perm=[0, 2, 1])
        if bound.sigmoid:
            cls = g.op("Sigmoid", cls)
        cxcywh = bound.box_format == "cxcywh"
    if cxcywh:
        xy, wh = g.slice(box, 0, 2, 2), g.slice(box, 2, 4, 2)
        half = g.op("Mul", wh, g.const(0.5))
        box = g.op("Concat", g.op("Sub", xy, half), g.op("Add", xy, half), axis=2)
    # One class per box (its best), as the reference NMS: the others' scores are zeroed.
    best = g.op("ArgMax", cls, axis=1, keepdims=1)  # [B, 1, N]
    rng = g.const(np.arange(bound.classes).reshape(1, -1, 1), np.int64)
    cls = g.op("Mul", cls, g.cast(g.op("Equal", rng, best), _f32()))
    sel = g.op("NonMaxSuppression", box, cls, g.const([post.max], np.int64),
               g.const([post.iou]), g.const([post.score]), center_point_box=0)
    col = [g.op("Gather", sel, g.const(k, np.int64), axis=1) for k in range(3)]
    bi, ci, ni = col
    cshape = g.op("Shape", cls)
    n_cls, n_anch = g.slice(cshape, 1, 2, 0), g.slice(cshape, 2, 3, 0)
    flat = g.op("Add", g.op("Mul", g.op("Add", g.op("Mul", bi, n_cls), ci), n_anch), ni)
    scores = g.op("Gather", g.op("Reshape", cls, g.const([-1], np.int64)), flat, axis=0)
    boxes = g.op("Gather", g.op("Reshape", box, g.const([-1, 4], np.int64)),
                 g.op("Add", g.op("Mul", bi, n_anch), ni), axis=0)
    # Per image, best first, at most `max`: sort by (image, -score), rank within the image.
    key = g.op("Sub", g.op("Clip", scores, g.const(0.0), g.const(1.0)),
               g.op("Mul", g.cast(bi, _f32()), g.const(2.0)))
    m = g.op("Shape", key)
    _, order = g.op("TopK", key, m, n_out=2, axis=0, largest=1, sorted=1)
    bi, ci, scores = (g.op("Gather", v, order, axis=0) for v in (bi, ci, scores))
    boxes = g.op("Gather", boxes, order, axis=0)
    batch = g.slice(g.op("Shape", cls), 0, 1, 0)
    images = g.op("Range", g.const(0, np.int64), g.op("Reshape", batch, g.const(
        [], np.int64)), g.const(1, np.int64))
    onehot = g.cast(g.op("Equal", g.op("Unsqueeze", bi, axes=[1]) if g.opset < 13 else
                         g.op("Unsqueeze", bi, g.const([1], np.int64)), images), _i64())
    counts = g.reduce("ReduceSum", onehot, [0], keepdims=0)
    starts = g.op("CumSum", counts, g.const(0, np.int64), exclusive=1)
    m0 = g.op("Reshape", m, g.const([], np.int64))
    pos = g.op("Range", g.const(0, np.int64), m0, g.const(1, np.int64))
    rank = g.op("Sub", pos, g.op("Gather", starts, bi, axis=0))
    keep = g.op("Less", rank, g.const(post.max, np.int64))
    bi, ci, scores = (g.op("Compress", v, keep, axis=0) for v in (bi, ci, scores))
    boxes = g.op("Compress", boxes, keep, axis=0)
    if geo is not None:
        xyxy = g.const([1, 0, 1, 0], np.int64)  # (y, x) pairs → x0 y0 x1 y1
        s4 = g.op("Gather", geo.s, xyxy, axis=0)
        t4 = g.op("Gather", geo.t, xyxy, axis=0)
        boxes = g.op("Div", g.op("Sub", boxes, t4), s4)
        hi = g.op("Gather", geo.hw, xyxy, axis=0)
        boxes = g.op("Min", g.op("Max", boxes, g.const(0.0)), hi)
    g.op("Identity", boxes, out="boxes")
    g.op("Identity", scores, out="scores")
    g.op("Identity", ci, out="class_ids")
    g.op("Identity", bi, out="batch_index")
    f, i = TensorProto.FLOAT, TensorProto.INT64
    return [helper.make_tensor_value_info("boxes", f, ["detections", 4]),
            helper.make_tensor_value_info("scores", f, ["detections"]),
            helper.make_tensor_value_info("class_ids", i, ["detections"]),
            helper.make_tensor_value_info("batch_index", i, ["detections"])]


def model_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=0)


def wrap(model: Any, bound: Bound) -> Any:
    """``model`` (an ``onnx.ModelProto``) with the bound pre-processing before it and
    post-processing after it, as one graph at the model's opset."""
    from onnx import TensorProto, helper

    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ConversionError(f"the model's opset {opset} is older than {MIN_OPSET}, which "
                              "the in-graph pre/post-processing needs; re-export it at opset "
                              f">= {MIN_OPSET}")
    model = _clear_names(model, bound)
    graph = model.graph
    rename = {o: _MODEL + o for o in (bound.model_input, bound.output, bound.partner)
              if o is not None and o and _MODEL + o in _names(graph)}
    if rename:
        bound = replace(
            bound, model_input=rename.get(bound.model_input, bound.model_input),
            output=None if bound.output is None else rename.get(bound.output, bound.output),
            partner=None if bound.partner is None else rename.get(bound.partner,
                                                                  bound.partner))
    g = _Graph(opset)
    geo = _pre(g, bound) if bound.pre is not None else None
    elems = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    outs = (_post(g, bound, geo, elems) if bound.post is not None
            else list(graph.output))
    inputs = ([helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8,
                                             [_batch_dim(graph, bound), "height", "width", 3])]
              if bound.pre is not None else list(graph.input))
    if bound.pre is not None:
        model_in = next(i for i in graph.input if i.name == bound.model_input)
        value_info = [*graph.value_info, model_in]
    else:
        value_info = list(graph.value_info)
    pre_nodes = g.nodes[:_pre_count(g, bound)] if bound.pre is not None else []
    post_nodes = g.nodes[len(pre_nodes):]
    known = {IMAGE_INPUT} if bound.pre is not None else {i.name for i in graph.input}
    known |= {i.name for i in graph.initializer} | {o for n in pre_nodes for o in n.output}
    new = helper.make_graph(
        [*pre_nodes, *_sorted(graph.node, known), *post_nodes], graph.name or "model", inputs, outs,
        initializer=[*graph.initializer, *g.inits], value_info=value_info)
    new.sparse_initializer.extend(graph.sparse_initializer)
    wrapped = helper.make_model(new, opset_imports=list(model.opset_import),
                                producer_name="edge-sdk prepost")
    wrapped.ir_version = model.ir_version
    for f in model.functions:
        wrapped.functions.append(f)
    return wrapped


_MODEL = "model/"  # prefix of a model tensor whose name an answer (or ``image``) takes
_ANSWERS = (IMAGE_INPUT, "scores", "class_ids", "boxes", "batch_index", "class_map",
            "embedding")


def _names(graph: Any) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _clear_names(model: Any, bound: Bound) -> Any:
    """A copy of ``model`` whose tensors named like an answer (or ``image``) carry the
    ``model/`` prefix, so that the wrapper's names are free."""
    import onnx

    taken = [n for n in _ANSWERS if n in _names(model.graph)]
    if not taken:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    mapping = {n: _MODEL + n for n in taken}
    _rename(out.graph, mapping)
    return out


def _rename(graph: Any, mapping: dict[str, str]) -> None:
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in coll:
            if item.name in mapping:
                item.name = mapping[item.name]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in mapping:
                node.input[k] = mapping[name]
        for k, name in enumerate(node.output):
            if name in mapping:
                node.output[k] = mapping[name]
        for attr in node.attribute:  # subgraphs may read outer names
            if attr.HasField("g"):
                _rename(attr.g, mapping)
            for sub in attr.graphs:
                _rename(sub, mapping)


def _batch_dim(graph: Any, bound: Bound) -> int | str:
    """The image input's batch dim: the model input's when it is fixed (a model exported
    for one image takes one image), else symbolic."""
    inp = next(i for i in graph.input if i.name == bound.model_input)
    dims = inp.type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else "batch"


def _sorted(nodes: Any, known: set[str]) -> list[Any]:
    """``nodes`` in an order where each comes after the nodes making its inputs (some
    converters append nodes out of order, e.g. float16's input casts); the given order
    where it already is one, or where no order is found."""
    done, out, rest = set(known) | {""}, [], list(nodes)
    while rest:
        ready = [n for n in rest if all(i in done for i in n.input)]
        if not ready:
            return list(nodes)
        for n in ready:
            out.append(n)
            done.update(n.output)
        rest = [n for n in rest if not any(n is r for r in ready)]
    return out


def _pre_count(g: _Graph, bound: Bound) -> int:
    """How many of ``g``'s nodes are the pre-processing (built first, ending at the model
    input)."""
    for k, node in enumerate(g.nodes):
        if bound.model_input in node.output:
            return k + 1
    raise AssertionError("pre-processing did not produce the model input")


def preprocess_model(bound: Bound, opset: int) -> Any:
    """The pre-processing alone: ``image`` in, the model's input tensor out (what the skew
    check compares against the training pipeline's tensors; ``model/image`` when the
    model's input is named ``image`` too)."""
    from onnx import TensorProto, helper

    if bound.model_input == IMAGE_INPUT:
        bound = replace(bound, model_input=_MODEL + IMAGE_INPUT)
    g = _Graph(max(opset, MIN_OPSET))
    _pre(g, bound)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(bound.input_dtype))
    graph = helper.make_graph(
        g.nodes, "preprocess",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8,
                                       ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(bound.model_input, elem, None)], initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)])


__all__ = ["MIN_OPSET", "model_opset", "preprocess_model", "wrap"]
