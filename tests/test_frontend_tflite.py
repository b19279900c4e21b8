"""TFLite in: packaged as is after LiteRT loads and runs it; ONNX → TFLite refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from converters._frontends import convert_source
from converters._measure import MeasureConfig
from converters._pipeline import ConvertConfig, ConvertOptions
from edge_sdk._fs import sha256_file
from edge_sdk.errors import ConversionError, UsageError
from tests._child import in_child
from tests._models import tflite_reference

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=5, warmup=2))


@pytest.fixture(scope="session")
def extra_tflite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("tflite-in")
    fp16, w = in_child("tests._framework_models:tflite_fp16_weights", d / "fp16.tflite")
    return {"fp16": fp16, "w": w,
            "resource": in_child("tests._framework_models:tflite_resource_variable",
                                 d / "acc.tflite")}


def _convert(src: Path, out: Path, **opts: Any) -> Any:
    return convert_source(src, out, ConvertOptions(**opts), source_kind=None,
                          input_shapes=None, trust_pickle=False, config=FAST)


def test_float_tflite_is_packaged_unchanged_with_its_signature(
    tflite_float: Path, tmp_path: Path
) -> None:
    res = _convert(tflite_float, tmp_path / "art")
    art = res.artifact
    assert art.manifest.format == "tflite"
    assert art.manifest.sha256 == sha256_file(tflite_float)
    assert art.manifest.quantization == "none"
    assert [s.describe() for s in art.manifest.inputs] == ["features float32 [batch, 4]"]
    assert [s.name for s in art.manifest.outputs] == ["scores"]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    out = edge_sdk.load(art.path).predict({"features": x})["scores"]
    np.testing.assert_allclose(out, tflite_reference(x), rtol=1e-5, atol=1e-5)
    report = json.loads((art.path / "report.json").read_text())
    assert report["chosen"] == "tflite"
    assert report["candidates"][0]["latency_ms"] > 0


def test_int8_tflite_predictor_presents_float_in_and_out(
    tflite_int8: Path, tmp_path: Path
) -> None:
    res = _convert(tflite_int8, tmp_path / "art")
    assert res.artifact.manifest.quantization == "int8-static"
    model = edge_sdk.load(res.artifact.path)
    assert model.inputs[0].dtype == "float32" and model.outputs[0].dtype == "float32"
    x = np.random.default_rng(1).normal(size=(1, 4)).astype(np.float32)
    out = model.predict({"features": x})["scores"]
    ref = tflite_reference(x)
    # full-integer int8: error within a few quantization steps of the output range
    assert np.max(np.abs(out - ref)) < 0.1 * np.max(np.abs(ref)) + 0.1


def test_float16_weight_tflite_loads_and_matches_float_weights(
    extra_tflite: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(extra_tflite["fp16"], tmp_path / "art")
    assert res.artifact.manifest.quantization == "fp16"
    x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    out = edge_sdk.load(res.artifact.path).predict(x)["scores"]
    np.testing.assert_allclose(out, x @ extra_tflite["w"], atol=1e-2)


def test_resource_variable_tflite_keeps_its_state_between_calls(
    extra_tflite: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(extra_tflite["resource"], tmp_path / "art")
    assert "resource variables" in res.artifact.manifest.extra["tflite"]["quantization_detail"]
    model = edge_sdk.load(res.artifact.path)
    ones = np.ones((1, 4), np.float32)
    model.predict({"x": ones})
    np.testing.assert_array_equal(model.predict({"x": ones})["running_sum"], 2 * ones)


def test_requantizing_a_tflite_source_is_out_of_scope(
    tflite_float: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="re-quantizing a TFLite model is out of scope"):
        _convert(tflite_float, tmp_path / "art", quantize="int8-dynamic")
    assert not (tmp_path / "art").exists()


def test_corrupt_tflite_is_refused_and_nothing_written(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 40)
    with pytest.raises(ConversionError, match="not a TFLite model LiteRT can run"):
        _convert(bad, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_onnx_source_to_tflite_is_a_clear_error(cnn_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="from the framework source"):
        _convert(cnn_onnx, tmp_path / "art", to="tflite")
    assert not (tmp_path / "art").exists()
