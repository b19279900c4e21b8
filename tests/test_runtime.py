"""Loading and predicting with real onnxruntime and LiteRT on models the tests build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk import InputError, ModelLoadError
from tests import _models


def test_onnx_file_predicts_and_describes_symbolic_batch(add_onnx: Path) -> None:
    model = edge_sdk.load(add_onnx)
    assert [s.name for s in model.inputs] == ["x"]
    assert model.inputs[0].dtype == "float32"
    assert model.inputs[0].shape == ("batch", 4)
    for batch in (1, 5):
        x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
        out = model.predict(x)
        np.testing.assert_array_equal(out["y"], x + np.arange(4, dtype=np.float32))


def test_multi_input_multi_output_by_name(multi_onnx: Path) -> None:
    model = edge_sdk.load(multi_onnx)
    a = np.ones((2, 3), np.float32)
    b = np.array([[3], [4]], np.int64)
    out = model.predict({"b": b, "a": a})
    assert list(out) == ["sum", "double_b"]
    np.testing.assert_array_equal(out["sum"], a + b.astype(np.float32))
    np.testing.assert_array_equal(out["double_b"], b * 2)


def test_ort_format_predicts_like_onnx(add_onnx: Path, tmp_path: Path) -> None:
    ort_path = _models.ort_format(add_onnx, tmp_path / "add.ort")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    got = edge_sdk.load(ort_path).predict(x)["y"]
    want = edge_sdk.load(add_onnx).predict(x)["y"]
    np.testing.assert_allclose(got, want)
    assert edge_sdk.load(ort_path).format == "ort"


def test_tflite_float_matches_reference_and_has_dynamic_batch(tflite_float: Path) -> None:
    model = edge_sdk.load(tflite_float)
    assert model.format == "tflite"
    assert [s.name for s in model.inputs] == ["features"]
    assert model.inputs[0].shape == ("batch", 4)
    for batch in (1, 7, 2):
        x = np.random.default_rng(batch).normal(size=(batch, 4)).astype(np.float32)
        np.testing.assert_allclose(
            model.predict({"features": x})["scores"], _models.tflite_reference(x), rtol=1e-5,
            atol=1e-5,
        )


def test_tflite_int8_takes_and_returns_float_with_scale_applied(tflite_int8: Path) -> None:
    model = edge_sdk.load(tflite_int8)
    assert model.inputs[0].dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    x = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)
    got = model.predict(x)["scores"]
    assert got.dtype == np.float32

    # The same computation done by hand on the raw int8 interpreter.
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(tflite_int8))
    runner = interp.get_signature_runner()
    (in_scale, in_zp) = runner.get_input_details()["features"]["quantization"]
    (out_scale, out_zp) = runner.get_output_details()["scores"]["quantization"]
    q = np.clip(np.round(x / in_scale + in_zp), -128, 127).astype(np.int8)
    raw = runner(features=q)["scores"]
    np.testing.assert_allclose(got, (raw.astype(np.float32) - out_zp) * out_scale, rtol=1e-6)

    # And it still computes the float model, up to int8 error.
    want = _models.tflite_reference(x)
    cos = np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cos > 0.97


def test_list_input_is_converted_to_the_model_dtype(add_onnx: Path) -> None:
    out = edge_sdk.load(add_onnx).predict({"x": [[1, 2, 3, 4]]})
    np.testing.assert_array_equal(out["y"], [[1, 3, 5, 7]])


def test_safe_cast_is_accepted(multi_onnx: Path) -> None:
    model = edge_sdk.load(multi_onnx)
    out = model.predict({"a": np.ones((1, 3), np.float16), "b": np.array([[2]], np.int32)})
    np.testing.assert_array_equal(out["double_b"], [[4]])


@pytest.mark.parametrize(
    ("feed", "needle"),
    [
        ({"a": np.ones((1, 3), np.float32)}, "missing input(s) 'b'"),
        ({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.int64), "c": 1},
         "unknown input(s) 'c'"),
        ({"a": np.ones((1, 3), np.float32), "z": np.ones((1, 1), np.int64)},
         "unknown input(s) 'z'"),
        ({"a": np.ones((1, 3), np.float64), "b": np.ones((1, 1), np.int64)},
         "dtype float64 cannot be cast safely to float32"),
        ({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.float32)},
         "dtype float32 cannot be cast safely to int64"),
        ({"a": np.ones((3,), np.float32), "b": np.ones((1, 1), np.int64)}, "expected rank 2"),
        ({"a": np.ones((1, 4), np.float32), "b": np.ones((1, 1), np.int64)}, "dim 1 must be 3"),
        ({"a": [["x", "y", "z"]], "b": [[1]]}, "cannot convert list to float32"),
    ],
)
def test_bad_inputs_raise_input_error_naming_expected_and_got(
    multi_onnx: Path, feed: dict[str, object], needle: str
) -> None:
    model = edge_sdk.load(multi_onnx)
    with pytest.raises(InputError) as info:
        model.predict(feed)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_single_array_for_multi_input_model_is_refused(multi_onnx: Path) -> None:
    with pytest.raises(InputError, match="2 inputs; pass a dict with 'a', 'b'"):
        edge_sdk.load(multi_onnx).predict(np.ones((1, 3), np.float32))


def test_tflite_bad_fixed_dim_raises_input_error(tflite_float: Path) -> None:
    with pytest.raises(InputError, match="dim 1 must be 4"):
        edge_sdk.load(tflite_float).predict(np.ones((1, 5), np.float32))


def test_corrupt_onnx_file_gives_model_load_error(tmp_path: Path, add_onnx: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(add_onnx.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load this model"):
        edge_sdk.load(bad)


def test_corrupt_tflite_file_gives_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(ModelLoadError, match="LiteRT cannot load this model"):
        edge_sdk.load(bad)


def test_unknown_suffix_and_missing_path_are_clear(tmp_path: Path) -> None:
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(edge_sdk.ArtifactError, match="unknown model file kind"):
        edge_sdk.load(weird)
    with pytest.raises(ModelLoadError, match="no such file"):
        edge_sdk.load(tmp_path / "nope.onnx")


def test_threads_option_is_accepted(add_onnx: Path) -> None:
    out = edge_sdk.load(add_onnx, threads=1).predict(np.zeros((1, 4), np.float32))
    np.testing.assert_array_equal(out["y"], [[0, 1, 2, 3]])
