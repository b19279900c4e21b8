"""TFLite in: kept as is after LiteRT loads and runs it, or converted to ONNX/ORT (tf2onnx)
and measured against the TFLite model; ONNX → TFLite refused."""

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
from tests._child import in_one_child
from tests._models import tflite_reference

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=5, warmup=2))


@pytest.fixture(scope="session")
def extra_tflite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("tflite-in")
    (fp16, w), resource = in_one_child([  # one TensorFlow import for both
        ("tests._framework_models:tflite_fp16_weights", (d / "fp16.tflite",), {}),
        ("tests._framework_models:tflite_resource_variable", (d / "acc.tflite",), {})])
    return {"fp16": fp16, "w": w, "resource": resource}


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


def _calib(path: Path) -> Path:
    x = np.random.default_rng(7).normal(size=(24, 4)).astype(np.float32)
    np.savez(path, features=x)
    return path


@pytest.mark.parametrize("which", ["float32", "fp16"])
def test_tflite_to_onnx_writes_onnx_with_candidates_measured_against_the_tflite(
    which: str, tflite_float: Path, extra_tflite: dict[str, Any], tmp_path: Path
) -> None:
    src = tflite_float if which == "float32" else extra_tflite["fp16"]
    res = _convert(src, tmp_path / "art", to="onnx", calibration=_calib(tmp_path / "c.npz"))
    art = res.artifact
    assert art.manifest.format == "onnx" and art.manifest.model.endswith(".onnx")
    assert not list(art.path.glob("*.tflite"))
    assert art.manifest.source["format"] == "tflite"
    report = json.loads((art.path / "report.json").read_text())
    assert report["metric"]["reference"] == "the tflite source model"
    measured = [r for r in report["candidates"] if r["accuracy"] is not None]
    assert {"none", "fp16", "int8-dynamic", "int8-static"} <= {r["scheme"] for r in measured}
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    want = edge_sdk.load(src).predict({"features": x})["scores"]
    got = edge_sdk.load(art.path).predict({"features": x})["scores"]
    cosine = float(np.dot(got.ravel(), want.ravel())
                   / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine >= 1 - report["metric"]["max_drop"] - 1e-3
    # fp32 is the TFLite graph in ONNX: it matches its source exactly (to float rounding).
    fp32 = next(r for r in report["candidates"] if r["name"] == "fp32")
    assert fp32["accuracy"]["drop"] < 1e-5


def test_tflite_to_ort_writes_the_ort_format_verified_against_the_tflite(
    tflite_float: Path, tmp_path: Path
) -> None:
    res = _convert(tflite_float, tmp_path / "art", to="ort", quantize="none")
    assert res.artifact.manifest.format == "ort"
    report = json.loads((res.artifact.path / "report.json").read_text())
    assert report["metric"]["reference"] == "the tflite source model"
    assert any(n.startswith("ORT format verified") for n in report["normalization"])
    x = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(edge_sdk.load(res.artifact.path).predict(x)["scores"],
                               tflite_reference(x), rtol=1e-4, atol=1e-4)


def test_full_int8_tflite_to_onnx_takes_and_returns_float(
    tflite_int8: Path, tmp_path: Path
) -> None:
    res = _convert(tflite_int8, tmp_path / "art", to="onnx", quantize="none")
    model = edge_sdk.load(res.artifact.path)
    assert [s.dtype for s in (*model.inputs, *model.outputs)] == ["float32", "float32"]
    x = np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32)
    want = edge_sdk.load(tflite_int8).predict({"features": x})["scores"]
    got = model.predict({"features": x})["scores"]
    # The ONNX is the dequantized graph: within a few int8 steps of the int8 source.
    assert np.max(np.abs(got - want)) < 0.1 * np.max(np.abs(want)) + 0.1
    assert "skipped" in res.artifact.manifest.extra["export_check"]


def test_fp16_candidate_of_a_dequantized_int8_tflite_loads_and_runs(
    tflite_int8: Path, tmp_path: Path
) -> None:
    # The ONNX of a full-integer TFLite keeps its Quantize/DequantizeLinear wrappers on the
    # inputs and outputs; fp16 must leave their float32 scales alone or the model is invalid.
    res = _convert(tflite_int8, tmp_path / "art", to="onnx", quantize="fp16")
    rows = {r["name"]: r for r in json.loads(
        (res.artifact.path / "report.json").read_text())["candidates"]}
    assert rows["fp16"]["status"] not in ("failed", "skipped"), rows["fp16"]
    assert res.artifact.manifest.quantization == "fp16"


@pytest.mark.parametrize("which", ["float32", "fp16"])
def test_float_tflite_to_tflite_is_kept_and_the_report_says_why(
    which: str, tflite_float: Path, extra_tflite: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edge_sdk.cli import main

    src = tflite_float if which == "float32" else extra_tflite["fp16"]
    out = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(out), "--to", "tflite"]) == 0
    text = capsys.readouterr().out
    assert "--quantize auto built no candidate from this TFLite; kept as is" in text
    report = json.loads((out / "report.json").read_text())
    assert "not re-quantized without its float source" in report["why"]
    assert json.loads((out / "manifest.json").read_text())["sha256"] == sha256_file(src)


def test_base_with_to_tflite_is_refused_in_one_line(
    tflite_float: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_sdk.cli import main

    out = tmp_path / "art"
    assert main(["convert", str(tflite_float), "-o", str(out), "--to", "tflite", "--base",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "TFLite converter cannot take" in err
    assert not out.exists()
