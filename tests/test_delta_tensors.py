"""Tensor byte ranges in real model files (issue 13): the host diffs tensor by tensor and the
device applies plain ranges, so every range must hold exactly one tensor's data, keys must
match across versions, and hostile bytes must give a bounded answer, never an exception."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import flatbuffers
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

from edge_sdk.delta._tensors import TensorRange, tensor_ranges
from tests import _models

OPSET = 17
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture]}


def by_name(ranges: list[TensorRange], data: bytes) -> dict[str, bytes]:
    return {r.name: data[r.offset:r.offset + r.length] for r in ranges}


def assert_well_formed(ranges: list[TensorRange], data: bytes) -> None:
    end = 0
    for r in ranges:
        assert r.offset >= end and r.length > 0 and r.offset + r.length <= len(data), r
        assert r.itemsize in (1, 2, 4, 8), r
        end = r.offset + r.length
    assert len({r.name for r in ranges}) == len(ranges)


def vi(name: str, dtype: int, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def weights_model(seed: int = 0) -> onnx.ModelProto:
    """A runnable model whose weights use every storage the mapper knows: raw_data in
    several dtypes, float_data, double_data, two Constant nodes (named and not) and an If
    whose branches hold an initializer and a Constant."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "dense/w"),
        helper.make_tensor("typed", TensorProto.FLOAT, [4],
                           rng.normal(size=4).astype(np.float32).tolist()),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float16), "half"),
        numpy_helper.from_array(rng.integers(-100, 100, 4).astype(np.int8), "q"),
        helper.make_tensor("dbl", TensorProto.DOUBLE, [4], rng.normal(size=4).tolist()),
        numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
    ]
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["h", "then_w"], ["then_y"])], "then", [],
        [vi("then_y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "then_w")])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["else_c"],
                          value=numpy_helper.from_array(rng.normal(size=4).astype(np.float32))),
         helper.make_node("Add", ["h", "else_c"], ["else_y"])], "else", [],
        [vi("else_y", TensorProto.FLOAT, [1, 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "dense/w"], ["m"]),
        helper.make_node("Add", ["m", "typed"], ["a1"]),
        helper.make_node("Cast", ["half"], ["half_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a1", "half_f"], ["a2"]),
        helper.make_node("Cast", ["q"], ["q_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a2", "q_f"], ["a3"]),
        helper.make_node("Cast", ["dbl"], ["dbl_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a3", "dbl_f"], ["a4"]),
        helper.make_node("Constant", [], ["scale_c"], name="scale",
                         value=numpy_helper.from_array(rng.normal(size=4).astype(np.float32))),
        helper.make_node("Mul", ["a4", "scale_c"], ["a5"]),
        helper.make_node("Constant", [], ["offset_c"],
                         value=numpy_helper.from_array(rng.normal(size=4).astype(np.float32))),
        helper.make_node("Add", ["a5", "offset_c"], ["a6"]),
        helper.make_node("Reshape", ["a6", "shape"], ["h"]),
        helper.make_node("If", ["cond"], ["y"], name="branch",
                         then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(nodes, "weights", [vi("x", TensorProto.FLOAT, [1, 4]),
                                                 vi("cond", TensorProto.BOOL, [])],
                              [vi("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def expected_tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    """What the keys documented by tensor_ranges hold, read with onnx's own parser."""
    def walk(graph: onnx.GraphProto, prefix: str) -> dict[str, bytes]:
        out = {prefix + t.name: numpy_helper.to_array(t).tobytes() for t in graph.initializer}
        for node in graph.node:
            key = node.name or node.output[0]
            for attr in node.attribute:
                if attr.HasField("t"):
                    out[f"{prefix}{key}/{attr.name}"] = numpy_helper.to_array(attr.t).tobytes()
                if attr.HasField("g"):
                    out.update(walk(attr.g, f"{prefix}{key}/{attr.name}/"))
        return out
    return walk(model.graph, "")


def to_ort(model: onnx.ModelProto, tmp_path: Path) -> bytes:
    """The model in ORT format, written by onnxruntime with no graph rewrites."""
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "model.ort")
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return (tmp_path / "model.ort").read_bytes()


def varints(data: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for b in data:
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            values.append(value - (1 << 64) if value >= 1 << 63 else value)
            value, shift = 0, 0
    return values


# --- ONNX -------------------------------------------------------------------------------

def test_onnx_ranges_hold_every_tensor_as_onnx_parses_it() -> None:
    model = weights_model()
    data = model.SerializeToString()
    ranges = tensor_ranges(data, "onnx")
    assert_well_formed(ranges, data)
    assert by_name(ranges, data) == expected_tensors(model)
    assert {"typed", "dbl", "scale/value", "offset_c/value", "branch/then_branch/then_w",
            "branch/else_branch/else_c/value"} <= set(by_name(ranges, data))


def test_onnx_itemsize_follows_the_stored_scalar() -> None:
    data = weights_model().SerializeToString()
    sizes = {r.name: r.itemsize for r in tensor_ranges(data, "onnx")}
    assert sizes["dense/w"] == 4 and sizes["typed"] == 4 and sizes["half"] == 2
    assert sizes["q"] == 1 and sizes["dbl"] == 8 and sizes["shape"] == 8


def test_onnx_varint_typed_data_is_mapped_whole_with_itemsize_one() -> None:
    i64 = helper.make_tensor("i64", TensorProto.INT64, [4], [1, -2, 300, 1 << 40])
    i32 = helper.make_tensor("i32", TensorProto.INT32, [3], [7, -1, 65536])
    graph = helper.make_graph([helper.make_node("Identity", ["i64"], ["y"])], "g", [],
                              [vi("y", TensorProto.INT64, [4])], [i64, i32])
    data = helper.make_model(graph).SerializeToString()
    ranges = {r.name: r for r in tensor_ranges(data, "onnx")}
    for t in (i64, i32):
        r = ranges[t.name]
        assert r.itemsize == 1
        assert varints(data[r.offset:r.offset + r.length]) == numpy_helper.to_array(t).tolist()


def test_onnx_sparse_initializer_maps_values_and_indices() -> None:
    values = numpy_helper.from_array(np.array([1.5, -2.0, 3.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0, 5, 9], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [10])
    graph = helper.make_graph([helper.make_node("Identity", ["sp"], ["y"])], "g", [],
                              [vi("y", TensorProto.FLOAT, [10])], sparse_initializer=[sparse])
    data = helper.make_model(graph).SerializeToString()
    found = by_name(tensor_ranges(data, "onnx"), data)
    assert found == {"sp/values": values.raw_data, "sp/indices": indices.raw_data}


def test_onnx_keys_match_between_versions_of_a_model() -> None:
    old = weights_model(seed=0).SerializeToString()
    new = weights_model(seed=1).SerializeToString()
    old_ranges = {r.name: r for r in tensor_ranges(old, "onnx")}
    new_ranges = {r.name: r for r in tensor_ranges(new, "onnx")}
    assert old_ranges.keys() == new_ranges.keys()
    for name, r in new_ranges.items():
        assert r.length == old_ranges[name].length
        o = old_ranges[name]
        if name != "shape":
            assert new[r.offset:r.offset + r.length] != old[o.offset:o.offset + o.length]


def test_onnx_duplicate_keys_get_numbered_in_file_order() -> None:
    # onnx's checker refuses duplicate names, but a file on disk can hold them.
    inits = [numpy_helper.from_array(np.full(2, i, np.float32), name)
             for i, name in enumerate(["w", "w#2", "w", "w"])]
    graph = helper.make_graph([], "g", [], [], inits)
    data = helper.make_model(graph).SerializeToString()
    found = by_name(tensor_ranges(data, "onnx"), data)
    assert found == {"w": inits[0].raw_data, "w#2": inits[1].raw_data,
                     "w#3": inits[2].raw_data, "w#4": inits[3].raw_data}


def test_onnx_unnamed_nodes_are_keyed_by_output_then_index() -> None:
    value = numpy_helper.from_array(np.ones(3, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c_out"], value=value),
         helper.make_node("Constant", [], [""], value=value)], "g", [], [])
    data = helper.make_model(graph).SerializeToString()
    assert set(by_name(tensor_ranges(data, "onnx"), data)) == {"c_out/value", "#1/value"}


def test_onnx_long_names_are_cut_but_stay_distinct() -> None:
    names = ["a" * 300 + "x", "a" * 300 + "y"]
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in names]
    data = helper.make_model(helper.make_graph([], "g", [], [], inits)).SerializeToString()
    keys = [r.name for r in tensor_ranges(data, "onnx")]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert all(len(k) <= 256 and k.startswith("a" * 200) for k in keys)


def test_onnx_external_and_string_tensors_have_no_range() -> None:
    external = numpy_helper.from_array(np.ones(4, np.float32), "ext")
    external.ClearField("raw_data")
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="weights.bin")
    strings = helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"])
    graph = helper.make_graph([], "g", [], [], [external, strings])
    assert tensor_ranges(helper.make_model(graph).SerializeToString(), "onnx") == []


def test_onnx_function_constants_are_keyed_by_function() -> None:
    value = numpy_helper.from_array(np.arange(3, dtype=np.float32))
    fn = helper.make_function("custom", "Bias", ["x"], ["y"],
                              [helper.make_node("Constant", [], ["b"], value=value),
                               helper.make_node("Add", ["x", "b"], ["y"])],
                              [helper.make_opsetid("", OPSET)])
    model = helper.make_model(helper.make_graph([], "g", [], []), functions=[fn])
    data = model.SerializeToString()
    assert by_name(tensor_ranges(data, "onnx"), data) == {
        "function:custom:Bias/b/value": value.raw_data}


def test_large_onnx_maps_without_copying_payloads() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, 350_000, dtype=np.uint8).view(np.float32)
              for _ in range(300)]
    inits = [numpy_helper.from_array(a, f"layer{i}/w") for i, a in enumerate(arrays)]
    data = helper.make_model(helper.make_graph([], "big", [], [], inits)).SerializeToString()
    del inits
    assert len(data) > 100_000_000
    tracemalloc.start()
    try:
        ranges = tensor_ranges(data, "onnx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the payloads are skipped, not sliced
    assert [r.name for r in ranges] == [f"layer{i}/w" for i in range(300)]
    for r, a in zip(ranges, arrays, strict=True):
        assert data[r.offset:r.offset + r.length] == a.tobytes()
    view = tensor_ranges(memoryview(data), "onnx")
    assert view == ranges


# --- ORT format -------------------------------------------------------------------------

def test_ort_ranges_hold_the_onnx_weights(tmp_path: Path) -> None:
    model = weights_model()
    data = to_ort(model, tmp_path)
    ranges = tensor_ranges(data, "ort")
    assert_well_formed(ranges, data)
    found = by_name(ranges, data)
    for t in model.graph.initializer:
        assert found[t.name] == numpy_helper.to_array(t).tobytes(), t.name
    # onnxruntime turns Constant nodes into initializers named after their output, so
    # those are found by their bytes.
    expected = expected_tensors(model)
    assert set(expected.values()) <= set(found.values())
    assert found["branch/then_branch/then_w"] == expected["branch/then_branch/then_w"]


def test_ort_ranges_agree_with_onnxruntimes_reader(tmp_path: Path) -> None:
    data = to_ort(weights_model(), tmp_path)
    graph = fbs.InferenceSession.InferenceSession.GetRootAs(data, 0).Model().Graph()
    theirs = {}
    for i in range(graph.InitializersLength()):
        t = graph.Initializers(i)
        theirs[t.Name().decode()] = (t.RawDataAsNumpy().tobytes(), t.DataType())
    ours = {r.name: r for r in tensor_ranges(data, "ort")}
    sizes = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.INT8: 1,
             TensorProto.DOUBLE: 8, TensorProto.INT64: 8}
    for name, (raw, dtype) in theirs.items():
        r = ours[name]
        assert data[r.offset:r.offset + r.length] == raw
        assert r.itemsize == sizes[dtype]


def test_ort_keys_match_between_versions_of_a_model(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = tensor_ranges(to_ort(weights_model(0), tmp_path / "a"), "ort")
    new = tensor_ranges(to_ort(weights_model(1), tmp_path / "b"), "ort")
    assert [(r.name, r.length) for r in old] == [(r.name, r.length) for r in new]


# --- TFLite -----------------------------------------------------------------------------

def dense_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)  # as tests._models.tflite_dense draws them
    return [rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)]


def test_tflite_buffers_hold_the_dense_weights(tflite_float: Path) -> None:
    data = tflite_float.read_bytes()
    ranges = tensor_ranges(data, "tflite")
    assert_well_formed(ranges, data)
    held = {data[r.offset:r.offset + r.length]: r for r in ranges}
    for w in dense_weights():
        # The converter stores FullyConnected weights as [out, in].
        r = held.get(w.tobytes()) or held[np.ascontiguousarray(w.T).tobytes()]
        assert r.itemsize == 4 and not r.name.startswith("buffer:")


def test_tflite_ranges_agree_with_the_schema_reader(tflite_int8: Path) -> None:
    data = tflite_int8.read_bytes()
    model = tfl.Model.GetRootAs(data, 0)
    sizes = {tfl.TensorType.INT8: 1, tfl.TensorType.UINT8: 1, tfl.TensorType.INT16: 2,
             tfl.TensorType.INT32: 4, tfl.TensorType.FLOAT32: 4, tfl.TensorType.INT64: 8}
    owner: dict[int, tuple[str, int]] = {}
    sg = model.Subgraphs(0)
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        owner.setdefault(t.Buffer(), (t.Name().decode(), sizes.get(t.Type(), 1)))
    ours = {r.name: r for r in tensor_ranges(data, "tflite")}
    weights = 0
    for i in range(model.BuffersLength()):
        raw = model.Buffers(i).DataAsNumpy()
        if i not in owner or isinstance(raw, int) or raw.size == 0:
            continue
        name, itemsize = owner[i]
        r = ours[name]
        assert data[r.offset:r.offset + r.length] == raw.tobytes()
        assert r.itemsize == itemsize
        weights += 1
    assert weights >= 2


def test_tflite_data_stored_after_the_flatbuffer_is_mapped(tflite_float: Path) -> None:
    """The >2 GB layout (Buffer.offset/size), made small: the interpreter runs it, so the
    data really is where the offsets say."""
    model = tfl.ModelT.InitFromPackedBuf(bytearray(tflite_float.read_bytes()), 0)
    moved: dict[int, bytes] = {}
    for i, b in enumerate(model.buffers):
        if b.data is not None and len(b.data):
            moved[i] = np.asarray(b.data, np.uint8).tobytes()
            b.data, b.offset, b.size = None, 1 << 40, len(moved[i])

    def pack() -> bytes:
        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = len(pack())  # placeholder offsets have the width of the real ones
    tail = b""
    start = -(-head // 16) * 16
    for i, raw in moved.items():
        model.buffers[i].offset = start + len(tail)
        tail += raw + b"\0" * (-len(raw) % 16)
    packed = pack()
    data = packed + b"\0" * (start - len(packed)) + tail
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    scores = Interpreter(model_content=data).get_signature_runner()(features=x)["scores"]
    np.testing.assert_allclose(scores, _models.tflite_reference(x), rtol=1e-5, atol=1e-5)

    ranges = tensor_ranges(data, "tflite")
    assert_well_formed(ranges, data)
    assert sorted(data[r.offset:r.offset + r.length] for r in ranges) == sorted(moved.values())
    assert all(r.offset >= start for r in ranges)


# --- Hostile input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("tensors")
    model = weights_model()
    return {"onnx": model.SerializeToString(), "ort": to_ort(model, tmp)}


def with_tflite(real_files: dict[str, bytes], tflite_float: Path) -> dict[str, bytes]:
    return {**real_files, "tflite": tflite_float.read_bytes()}


def test_truncated_files_give_ranges_inside_what_is_left(
        real_files: dict[str, bytes], tflite_float: Path) -> None:
    for fmt, data in with_tflite(real_files, tflite_float).items():
        for cut in range(0, len(data), max(1, len(data) // 300)):
            assert_well_formed(tensor_ranges(data[:cut], fmt), data[:cut])


@pytest.mark.parametrize("fmt", ["onnx", "ort", "tflite"])
@given(data=st.binary(max_size=4096))
@settings(max_examples=400, **SETTINGS)  # type: ignore[arg-type]
def test_random_bytes_never_raise(fmt: str, data: bytes) -> None:
    assert_well_formed(tensor_ranges(data, fmt), data)


@given(fmt=st.sampled_from(["onnx", "ort"]), seed=st.integers(0, 2**32 - 1),
       flips=st.integers(1, 40))
@settings(max_examples=300, **SETTINGS)  # type: ignore[arg-type]
def test_corrupted_models_never_raise(real_files: dict[str, bytes], fmt: str, seed: int,
                                      flips: int) -> None:
    data = bytearray(real_files[fmt])
    rng = random.Random(seed)
    for _ in range(flips):
        data[rng.randrange(len(data))] = rng.randrange(256)
    assert_well_formed(tensor_ranges(bytes(data), fmt), bytes(data))


def test_corrupted_tflite_never_raises(tflite_float: Path) -> None:
    clean = tflite_float.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        assert_well_formed(tensor_ranges(bytes(data), "tflite"), bytes(data))


@pytest.mark.parametrize("fmt", ["ort", "tflite"])
def test_flatbuffer_offsets_pointing_outside_give_nothing(fmt: str) -> None:
    def u32(v: int) -> bytes:
        return v.to_bytes(4, "little")

    cases = [
        u32(0xFFFFFFF0) + b"TFL3" + bytes(32),  # root past the end
        u32(8) + b"TFL3" + u32(0x7FFFFFFF) + bytes(32),  # vtable before the start
        u32(8) + b"TFL3" + (-8).to_bytes(4, "little", signed=True)  # vtable past the end
        + bytes(4),
        # A table whose every field offset is 4, each field an offset of 0xFFFFFF00:
        u32(32) + b"TFL3" + b"\x18\x00\x08\x00" + b"\x04\x00" * 10 + u32(24)
        + u32(0xFFFFFF00) * 8,
        # Vectors claiming 2**32 - 1 elements:
        u32(32) + b"TFL3" + b"\x18\x00\x08\x00" + b"\x04\x00" * 10 + u32(24) + u32(4)
        + u32(0xFFFFFFFF) * 8,
    ]
    for data in cases:
        assert tensor_ranges(data, fmt) == []


def test_flatbuffer_offset_pointing_outside_loses_only_that_tensor(
        real_files: dict[str, bytes], tflite_float: Path) -> None:
    for fmt in ("ort", "tflite"):
        data = with_tflite(real_files, tflite_float)[fmt]
        ranges = tensor_ranges(data, fmt)
        victim = max(ranges, key=lambda r: r.length)
        # The uoffset field that points at the victim's vector (its length prefix).
        where = [p for p in range(victim.offset - 4)
                 if p + int.from_bytes(data[p:p + 4], "little") == victim.offset - 4]
        assert len(where) == 1, fmt
        bad = bytearray(data)
        bad[where[0]:where[0] + 4] = (len(data) - where[0]).to_bytes(4, "little")
        assert tensor_ranges(bytes(bad), fmt) == [r for r in ranges if r != victim], fmt


def encode_field(field: int, payload: bytes) -> bytes:
    def varint(v: int) -> bytes:
        out = b""
        while v >= 0x80:
            out += bytes([v & 0x7F | 0x80])
            v >>= 7
        return out + bytes([v])
    return varint(field << 3 | 2) + varint(len(payload)) + payload


@pytest.mark.timeout(60)
def test_deeply_nested_onnx_subgraphs_stop_at_a_bound() -> None:
    def nested(levels: int) -> bytes:
        graph = b""
        for level in reversed(range(levels)):
            init = encode_field(8, f"w{level}".encode()) + encode_field(9, b"\x01\x02\x03\x04")
            attr = encode_field(1, b"body") + encode_field(6, graph) if graph else b""
            node = encode_field(3, b"loop") + (encode_field(5, attr) if attr else b"")
            graph = encode_field(1, node) + encode_field(5, init)
        return encode_field(7, graph)

    shallow = tensor_ranges(nested(5), "onnx")
    assert {r.name for r in shallow} == {"w0", "loop/body/w1", "loop/body/loop/body/w2",
                                         "loop/body/loop/body/loop/body/w3",
                                         "loop/body/loop/body/loop/body/loop/body/w4"}
    deep = nested(3000)
    ranges = tensor_ranges(deep, "onnx")
    assert_well_formed(ranges, deep)
    assert 8 <= len(ranges) < 100


@pytest.mark.timeout(60)
def test_deeply_nested_unknown_messages_do_not_recurse() -> None:
    data = b""
    for _ in range(20_000):
        data = encode_field(1, data)  # node inside node inside ...: never a graph
    assert tensor_ranges(encode_field(7, data), "onnx") == []


@pytest.mark.timeout(120)
def test_millions_of_tiny_fields_are_bounded() -> None:
    # 6 M empty nodes are past the step budget: the walk stops inside them, with what it
    # found before (a well-formed graph of that size would hold ~400k real nodes).
    empty_nodes = b"\x0a\x00" * 6_000_000

    def init(name: bytes) -> bytes:
        return encode_field(5, encode_field(8, name) + encode_field(9, b"\x01\x02"))

    data = encode_field(7, init(b"early") + empty_nodes + init(b"late"))
    assert [r.name for r in tensor_ranges(data, "onnx")] == ["early"]


def ort_tensor(b: flatbuffers.Builder, name: str, raw: bytes) -> int:
    name_at, raw_at = b.CreateString(name), b.CreateByteVector(raw)
    fbs.Tensor.TensorStart(b)
    fbs.Tensor.TensorAddName(b, name_at)
    fbs.Tensor.TensorAddRawData(b, raw_at)
    fbs.Tensor.TensorAddDataType(b, TensorProto.FLOAT)
    return int(fbs.Tensor.TensorEnd(b))


def ort_node(b: flatbuffers.Builder, name: str, attr: str, *, graphs: Sequence[int] = (),
             tensor: int | None = None) -> int:
    if graphs:
        fbs.Attribute.AttributeStartGraphsVector(b, len(graphs))
        for g in graphs:
            b.PrependUOffsetTRelative(g)
        graphs_at = b.EndVector()
    attr_name = b.CreateString(attr)
    fbs.Attribute.AttributeStart(b)
    fbs.Attribute.AttributeAddName(b, attr_name)
    if graphs:
        fbs.Attribute.AttributeAddGraphs(b, graphs_at)
    if tensor is not None:
        fbs.Attribute.AttributeAddT(b, tensor)
    attr_at = fbs.Attribute.AttributeEnd(b)
    fbs.Node.NodeStartAttributesVector(b, 1)
    b.PrependUOffsetTRelative(attr_at)
    attrs = b.EndVector()
    node_name = b.CreateString(name)
    fbs.Node.NodeStart(b)
    fbs.Node.NodeAddName(b, node_name)
    fbs.Node.NodeAddAttributes(b, attrs)
    return int(fbs.Node.NodeEnd(b))


@pytest.mark.timeout(60)
def test_ort_subgraphs_shared_by_many_attributes_are_walked_once() -> None:
    """Each graph's node points 64 times at the next graph, 40 levels deep: walked as a
    tree that is 64**16 graphs, and the budget would end the walk before the node that
    follows; walked once per graph it is 40."""
    b = flatbuffers.Builder(0)
    graph = None
    for level in reversed(range(40)):
        tensor = ort_tensor(b, f"w{level}", bytes([level]) * 4)
        nodes = None
        if graph is not None:
            node_list = [ort_node(b, "loop", "body", graphs=[graph] * 64)]
            if level == 0:
                node_list.append(ort_node(b, "after", "value",
                                          tensor=ort_tensor(b, "", b"late")))
            fbs.Graph.GraphStartNodesVector(b, len(node_list))
            for node in reversed(node_list):
                b.PrependUOffsetTRelative(node)
            nodes = b.EndVector()
        fbs.Graph.GraphStartInitializersVector(b, 1)
        b.PrependUOffsetTRelative(tensor)
        inits = b.EndVector()
        fbs.Graph.GraphStart(b)
        fbs.Graph.GraphAddInitializers(b, inits)
        if nodes is not None:
            fbs.Graph.GraphAddNodes(b, nodes)
        graph = fbs.Graph.GraphEnd(b)
    fbs.Model.ModelStart(b)
    fbs.Model.ModelAddGraph(b, graph)
    model = fbs.Model.ModelEnd(b)
    fbs.InferenceSession.InferenceSessionStart(b)
    fbs.InferenceSession.InferenceSessionAddModel(b, model)
    b.Finish(fbs.InferenceSession.InferenceSessionEnd(b), file_identifier=b"ORTM")
    data = bytes(b.Output())
    ranges = tensor_ranges(data, "ort")
    assert_well_formed(ranges, data)
    found = by_name(ranges, data)
    assert found["w0"] == bytes(4) and found["loop/body/0/w1"] == b"\x01" * 4
    assert found["after/value"] == b"late" and 8 <= len(found) <= 41


def test_unknown_format_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="onnx, ort or tflite"):
        tensor_ranges(b"", "pt")
