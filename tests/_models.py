"""Small real models the tests build (onnx.helper, TensorFlow for .tflite)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def add_model(path: Path, n: int = 4) -> Path:
    """y = x + c with x float32 [batch, n]; the trivial model of the overhead bench."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    c = numpy_helper.from_array(np.arange(n, dtype=np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "add", [x], [y], [c])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def multi_io_model(path: Path) -> Path:
    """Two inputs (float32 [batch, 3], int64 [batch, 1]), two outputs (sum and a scaled copy)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 1])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3])
    d = helper.make_tensor_value_info("double_b", TensorProto.INT64, ["batch", 1])
    two = numpy_helper.from_array(np.array([2], dtype=np.int64), "two")
    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "bf"], ["sum"]),
        helper.make_node("Mul", ["b", "two"], ["double_b"]),
    ]
    graph = helper.make_graph(nodes, "multi", [a, b], [s, d], [two])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def small_cnn(path: Path, seed: int = 0, channels: int = 8, size: int = 32) -> Path:
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm: [batch, 3, size, size] → [batch, 10]."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (channels, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "b1"),
        numpy_helper.from_array(
            rng.normal(0, 0.2, (channels * 2, channels, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(channels * 2, np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.2, (10, channels * 2)).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def ort_format(onnx_path: Path, ort_path: Path) -> Path:
    """Save ``onnx_path`` in ORT format via onnxruntime itself."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(ort_path)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return ort_path


def tflite_dense(path: Path, *, int8: bool = False) -> Path:
    """A Dense(8)-ReLU-Dense(3) model with a dynamic batch, from TensorFlow's converter.

    With ``int8`` the model is fully integer-quantized (int8 inputs and outputs).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w1 = tf.constant(rng.normal(size=(4, 8)).astype(np.float32))
    w2 = tf.constant(rng.normal(size=(8, 3)).astype(np.float32))

    class Dense(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scores": tf.matmul(tf.nn.relu(tf.matmul(features, w1)), w2)}

    module = Dense()
    saved = path.with_suffix(".savedmodel")
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if int8:
        def rep():  # type: ignore[no-untyped-def]
            for _ in range(64):
                yield [rng.normal(size=(1, 4)).astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())
    return path


def tflite_reference(x: np.ndarray) -> np.ndarray:
    """What :func:`tflite_dense` computes, in numpy."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, 3)).astype(np.float32)
    return np.asarray(np.maximum(x @ w1, 0) @ w2, dtype=np.float32)


def offset_model(path: Path, offset: float, n: int = 4) -> Path:
    """y = x + offset with x float32 [batch, n]; a NaN offset gives a model whose every
    output is NaN (it fails the agent's smoke test)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    c = numpy_helper.from_array(np.full(n, offset, dtype=np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "offset", [x], [y],
                              [c])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def padded_offset_model(path: Path, offset: float, pad_bytes: int, n: int = 4) -> Path:
    """:func:`offset_model` carrying ``pad_bytes`` of random weights (y = x + table[:n], the
    rest of the table unused): an artifact of a chosen size for transfer tests."""
    rng = np.random.default_rng(int(offset * 1000) % 2**32)
    table = rng.standard_normal(max(n, pad_bytes // 4)).astype(np.float32)
    table[:n] = offset
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
             numpy_helper.from_array(np.array([n], dtype=np.int64), "end")]
    nodes = [helper.make_node("Slice", ["table", "start", "end"], ["c"]),
             helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "padded", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def batch1_only_model(path: Path, n: int = 4) -> Path:
    """Declares x float32 [batch, n] but reshapes to [1, n]: batch 1 (the smoke test) works,
    any larger batch fails inside onnxruntime (a model fault the health window must catch)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    shape = numpy_helper.from_array(np.array([1, n], dtype=np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "batch1",
                              [x], [y], [shape])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def string_identity_model(path: Path) -> Path:
    """out = text with text a string tensor [batch]: BYTES must come back as sent."""
    x = helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])
    y = helper.make_tensor_value_info("out", TensorProto.STRING, ["batch"])
    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["out"])], "echo", [x],
                              [y])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def weighted_offset_model(path: Path, offset: float, weights: np.ndarray,
                          head: np.ndarray | None = None, n: int = 4) -> Path:
    """y = x + offset, with float32 ``weights`` [n, k] (and ``head``, any float32 shape)
    that travel in the file and run (``0 * sum(x @ weights)`` is added) but change nothing:
    an artifact as big as its weights whose output tests can predict, for delta updates."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    inits = [numpy_helper.from_array(np.full(n, offset, dtype=np.float32), "c"),
             numpy_helper.from_array(weights.astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ReduceSum", ["h"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("Add", ["x", "c"], ["xc"])]
    last = "z"
    if head is not None:
        inits.append(numpy_helper.from_array(head.astype(np.float32), "head"))
        nodes += [helper.make_node("ReduceSum", ["head"], ["hs"], keepdims=0),
                  helper.make_node("Mul", ["hs", "zero"], ["hz"]),
                  helper.make_node("Add", ["z", "hz"], ["zh"])]
        last = "zh"
    nodes.append(helper.make_node("Add", ["xc", last], ["y"]))
    graph = helper.make_graph(nodes, "weighted_offset", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def stride_model(path: Path, offset: float, stride: int = 32) -> Path:
    """y = x + offset with x float32 [batch, 3, height, width], through a SpaceToDepth
    of block ``stride`` and back, as a detector with a stride-32 backbone: the signature
    takes any height and width, the runtime only multiples of ``stride``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    c = numpy_helper.from_array(np.array(offset, dtype=np.float32), "c")
    nodes = [helper.make_node("SpaceToDepth", ["x"], ["d"], blocksize=stride),
             helper.make_node("DepthToSpace", ["d"], ["s"], blocksize=stride, mode="DCR"),
             helper.make_node("Add", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, f"stride{stride}", [x], [y], [c])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def linear_model(path: Path, weights: np.ndarray) -> Path:
    """y = x @ weights with x float32 [batch, n], weights [n, k]: logits of a one-layer
    classifier (swap two columns of ``weights`` to perturb its last layer)."""
    n, k = weights.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])
    w = numpy_helper.from_array(weights.astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [x], [y], [w])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def slow_model(path: Path, weights: np.ndarray, size: int = 768) -> Path:
    """y = x @ weights (as :func:`linear_model`), after a ``size`` x ``size`` matrix product
    per row that changes nothing (``0 *``): the same answers, much more CPU per request."""
    n, k = weights.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])
    inits = [numpy_helper.from_array(weights.astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, size // n], dtype=np.int64), "reps"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    nodes = [helper.make_node("Tile", ["x", "reps"], ["row"]),            # [b, size]
             helper.make_node("Transpose", ["row"], ["col"]),             # [size, b]
             helper.make_node("MatMul", ["col", "row"], ["outer"]),       # [size, size]
             helper.make_node("MatMul", ["outer", "outer"], ["sq"]),      # size^3 work
             helper.make_node("ReduceSum", ["sq"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]),
             helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Add", ["logits", "z"], ["y"])]
    graph = helper.make_graph(nodes, "slow_linear", [x], [y], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)
