"""Keras/TensorFlow front-end: .keras, .h5 and SavedModel → ONNX (tf2onnx) or TFLite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from converters._frontends import convert_source
from converters._measure import MeasureConfig
from converters._pipeline import ConvertConfig, ConvertOptions
from edge_sdk.errors import ConversionError, UsageError
from tests import _framework_models as fm
from tests._child import in_one_child

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=5, warmup=2))
FLOAT_ATOL = 1e-5  # softmax outputs in [0, 1]
INT8_ATOL = 0.05  # full-integer int8: a few quantization steps of the output


@pytest.fixture(scope="session")
def km(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Keras sources, the Lambda-layer model and the two-input model (with Keras's
    outputs on ``zeta`` and ``alpha``), built in one child: one TensorFlow import."""
    d = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    a = rng.normal(size=(6, 2)).astype(np.float32)
    fixture, lambda_model, two_inputs_out = in_one_child([
        ("tests._framework_models:keras_fixture", (d,), {}),
        ("tests._framework_models:keras_lambda_model", (d / "lambda.keras",), {}),
        ("tests._framework_models:keras_two_inputs", (d / "two.keras", z, a), {})])
    return {**fixture, "lambda": lambda_model, "two": d / "two.keras", "zeta": z,
            "alpha": a, "two_out": two_inputs_out}


def _convert(src: Path, out: Path, **opts: Any) -> Any:
    return convert_source(src, out, ConvertOptions(**opts), source_kind=None,
                          input_shapes=None, trust_pickle=False, config=FAST)


@pytest.mark.parametrize("source", ["keras", "h5", "saved"])
def test_keras_to_onnx_artifact_matches_keras(km: dict[str, Any], tmp_path: Path,
                                              source: str) -> None:
    res = _convert(km[source], tmp_path / "art", calibration=km["calib"], quantize="none")
    model = edge_sdk.load(res.artifact.path)
    assert model.format == "onnx"
    assert model.inputs[0].name == "image"
    assert model.inputs[0].shape == ("batch", *fm.KERAS_IMAGE)
    out = next(iter(model.predict({"image": km["x"]}).values()))
    np.testing.assert_allclose(out, km["expected"], atol=FLOAT_ATOL)
    if source != "saved":  # model.export names its output output_0; .keras keeps "probs"
        assert [o.name for o in model.outputs] == ["probs"]


def test_keras_to_tflite_auto_measures_all_four_variants_and_picks_by_the_rule(
    km: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(km["keras"], tmp_path / "art", calibration=km["calib"], to="tflite")
    rows = {c["name"]: c for c in res.report["candidates"]}
    assert set(rows) == {"float32", "float16", "dynamic-range", "int8"}
    assert all(r["latency_ms"] and r["accuracy"] for r in rows.values())
    chosen = rows[res.chosen]
    base = rows["float32"]
    assert chosen["accuracy"]["drop"] <= res.report["metric"]["max_drop"]
    # Not slower than float32 by the noise band of the per-round ratios.
    assert chosen["latency_ratio"]["status"] != "slower"
    assert base["latency_ratio"]["median"] == 1.0
    model = edge_sdk.load(res.artifact.path)
    assert model.format == "tflite"
    out = model.predict({"image": km["x"][:1]})["probs"]
    np.testing.assert_allclose(out, km["expected"][:1], atol=INT8_ATOL)
    assert (tmp_path / "art" / "report.md").is_file()
    assert (tmp_path / "art" / "report.png").is_file()


def test_tflite_full_int8_runs_float_in_float_out_with_labels_equal(
    km: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(km["keras"], tmp_path / "art", calibration=km["calib"], to="tflite",
                   quantize="int8-static")
    assert res.chosen == "int8"
    assert res.artifact.manifest.quantization == "int8-static"
    model = edge_sdk.load(res.artifact.path)
    assert model.inputs[0].dtype == "float32" and model.outputs[0].dtype == "float32"
    raw = _raw_io_dtypes(res.artifact.model_path)
    assert raw == ("int8", "int8")
    probs = np.concatenate([model.predict({"image": km["x"][i:i + 1]})["probs"]
                            for i in range(len(km["x"]))])
    np.testing.assert_allclose(probs, km["expected"], atol=INT8_ATOL)
    np.testing.assert_array_equal(probs.argmax(1), km["expected"].argmax(1))


def test_tflite_float16_variant_on_request(km: dict[str, Any], tmp_path: Path) -> None:
    res = _convert(km["h5"], tmp_path / "art", calibration=km["calib"], to="tflite",
                   quantize="fp16")
    assert res.artifact.manifest.quantization == "fp16"
    out = edge_sdk.load(res.artifact.path).predict({"image": km["x"]})["probs"]
    np.testing.assert_allclose(out, km["expected"], atol=1e-3)


def test_file_that_is_not_a_keras_model_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.keras"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ConversionError, match="not a Keras model") as info:
        _convert(bad, tmp_path / "art")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "art").exists()


def test_h5_weights_only_file_is_not_a_model(km: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a Keras model"):
        _convert(km["weights"], tmp_path / "art")


def _raw_io_dtypes(path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return (np.dtype(interp.get_input_details()[0]["dtype"]).name,
            np.dtype(interp.get_output_details()[0]["dtype"]).name)


def test_keras_to_onnx_without_tf2onnx_suggests_to_tflite(
    km: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "art"
    args = ["convert", str(km["keras"]), "-o", str(out)]
    code = ("import sys; sys.modules['tf2onnx'] = None; from edge_sdk.cli import main; "
            f"raise SystemExit(main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "needs tf2onnx" in line and "--to tflite" in line
    assert not out.exists()


def test_keras_lambda_layer_needs_trust_pickle_then_converts(
    km: dict[str, Any], tmp_path: Path
) -> None:
    src = km["lambda"]
    with pytest.raises(UsageError, match=r"Lambda layer.*--trust-pickle"):
        _convert(src, tmp_path / "a", to="tflite")
    assert not (tmp_path / "a").exists()
    res = convert_source(src, tmp_path / "b", ConvertOptions(to="tflite", quantize="none"),
                         source_kind=None, input_shapes=None, trust_pickle=True, config=FAST)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = edge_sdk.load(res.artifact.path).predict({"x": x})
    np.testing.assert_allclose(next(iter(got.values())), x * 2 + 1)


def test_multi_input_keras_model_binds_inputs_by_name(
    km: dict[str, Any], tmp_path: Path
) -> None:
    z, a = km["zeta"], km["alpha"]
    src = km["two"]
    want = km["two_out"]
    calib = fm.save_npz(tmp_path / "c.npz", zeta=z, alpha=a)
    for to in ("onnx", "tflite"):
        res = _convert(src, tmp_path / to, calibration=calib, to=to, quantize="none")
        got = edge_sdk.load(res.artifact.path).predict({"zeta": z, "alpha": a})
        np.testing.assert_allclose(got["out"], want[0], atol=1e-4)
        np.testing.assert_allclose(got["aux"], want[1], atol=1e-4)
