"""PyTorch front-end: TorchScript, exported programs and factories → verified ONNX artifacts."""

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
from edge_sdk.errors import ConversionError, UsageError
from tests import _framework_models as fm
from tests._child import in_one_child

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=5, warmup=2))
# float32 everywhere; ORT and torch kernels differ only in summation order.
ATOL = 1e-4


@pytest.fixture(scope="session")
def tm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The torch sources, with torch.save pickles, the two-input module's outputs on
    ``feats`` and ``scale`` and a fixed-batch program, built in one child: one torch
    import."""
    d = tmp_path_factory.mktemp("torch")
    (d / "pickles").mkdir()
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(12, fm.FEATURES)).astype(np.float32)
    scale = rng.uniform(0.5, 2, (12, 1)).astype(np.float32)
    fixture, pickles, two_out, fixed_out = in_one_child([
        ("tests._framework_models:torch_fixture", (d,), {}),
        ("tests._framework_models:torch_pickles", (d / "pickles",), {}),
        ("tests._framework_models:torch_two_inputs_outputs", (feats, scale), {}),
        ("tests._framework_models:torch_fixed_batch_program",
         (d / "fixed.pt2", fm.torch_images()[:1]), {})])
    return {**fixture, "pickles": pickles, "feats": feats, "scale": scale,
            "two_out": two_out, "fixed": d / "fixed.pt2", "fixed_out": fixed_out}


def _convert(src: Any, out: Path, *, shapes: Any = None, **opts: Any) -> Any:
    return convert_source(src, out, ConvertOptions(**opts), source_kind=None,
                          input_shapes=shapes, trust_pickle=False, config=FAST)


@pytest.mark.parametrize("source", ["cnn_ts", "cnn_pt2", "factory"])
def test_torch_cnn_artifact_matches_torch_on_any_batch(
    tm: dict[str, Any], tmp_path: Path, source: str
) -> None:
    src = "tests._framework_models:torch_cnn" if source == "factory" else tm[source]
    res = _convert(src, tmp_path / "art", calibration=tm["images_npz"])
    model = edge_sdk.load(res.artifact.path)
    assert model.inputs[0].name == "image"
    assert model.inputs[0].shape == ("batch", 3, 16, 16)
    acc = json.loads((res.artifact.path / "manifest.json").read_text())["accuracy"]
    for batch in (1, 5):
        x = tm["images"][:batch]
        out = model.predict({"image": x})["output"]
        ref = tm["cnn_out"][batch]
        if res.artifact.manifest.quantization == "none":
            np.testing.assert_allclose(out, ref, atol=ATOL * 10)
        else:
            # Auto may keep a quantized candidate when it measured faster: then the
            # promise is the report's accuracy budget, checked against torch itself.
            assert acc["metric"] == "cosine"
            cos = float(np.dot(out.ravel(), ref.ravel())
                        / (np.linalg.norm(out) * np.linalg.norm(ref)))
            assert 1.0 - cos <= acc["max_drop"], (res.chosen, cos)
    check = res.artifact.manifest.extra["export_check"]
    assert check["origin"].endswith("images.npz")
    assert check["output.max_abs_err"] < ATOL
    assert res.artifact.manifest.source["format"] == "torch"


def test_torch_mlp_float_artifact_matches_torch_within_1e4(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(tm["mlp_ts"], tmp_path / "art", calibration=tm["mlp_npz"], quantize="none")
    assert res.chosen == "fp32"
    out = edge_sdk.load(res.artifact.path).predict({"input": tm["x"]})["output"]
    np.testing.assert_allclose(out, tm["mlp_out"], atol=ATOL)
    np.testing.assert_array_equal(out.argmax(1), tm["mlp_out"].argmax(1))


def test_factory_with_input_shape_and_no_data_is_verified_on_synthetic_inputs(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert("tests._framework_models:torch_mlp", tmp_path / "art",
                   shapes={"input": (1, fm.FEATURES)}, quantize="none")
    manifest = res.artifact.manifest
    assert manifest.name == "torch_mlp"
    assert manifest.inputs[0].shape == ("batch", fm.FEATURES)
    assert manifest.extra["export_check"]["origin"] == "synthetic"
    assert any("NOT verified on real data" in w for w in res.warnings)


def test_torch_int8_static_candidate_stays_within_the_accuracy_budget(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    res = _convert(tm["cnn_ts"], tmp_path / "art", calibration=tm["images_npz"],
                   quantize="int8-static")
    assert res.artifact.manifest.quantization == "int8-static"
    acc = res.artifact.manifest.extra["accuracy"]
    assert acc["drop"] <= acc["max_drop"]
    assert acc["reference"] == "the torch source model"


def test_factory_that_does_not_import_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot import module 'no_such_pkg\.models'") as info:
        _convert("no_such_pkg.models:build", tmp_path / "art", shapes={"x": (1, 4)})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "art").exists()


def test_factory_missing_attribute_or_not_a_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no attribute 'nope'"):
        _convert("tests._framework_models:nope", tmp_path / "a", shapes={"x": (1, 4)})
    with pytest.raises(ConversionError, match=r"returned tuple, not a torch\.nn\.Module"):
        _convert("tests._framework_models:blobs", tmp_path / "b", shapes={"x": (1, 4)})


def test_torchscript_without_shapes_asks_for_input_shape(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        _convert(tm["cnn_ts"], tmp_path / "art")


def test_torch_save_pickle_needs_trust_and_a_state_dict_is_explained(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    pickles = tm["pickles"]
    whole = pickles["whole"]
    with pytest.raises(UsageError, match="--trust-pickle"):
        _convert(whole, tmp_path / "a", shapes={"input": (1, fm.FEATURES)})
    res = convert_source(whole, tmp_path / "b", ConvertOptions(quantize="none"),
                         source_kind=None, input_shapes={"input": (1, fm.FEATURES)},
                         trust_pickle=True, config=FAST)
    out = edge_sdk.load(res.artifact.path).predict(tm["x"])["output"]
    np.testing.assert_allclose(out, tm["mlp_out"], atol=ATOL)
    with pytest.raises(ConversionError, match="not a model"):
        convert_source(pickles["weights"], tmp_path / "c", ConvertOptions(), source_kind=None,
                       input_shapes={"input": (1, fm.FEATURES)}, trust_pickle=True)


def test_torch_to_tflite_is_refused_with_the_reason(tm: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Keras/TensorFlow sources only"):
        _convert(tm["cnn_ts"], tmp_path / "art", to="tflite",
                 calibration=tm["images_npz"])


def test_export_that_differs_from_torch_is_refused_before_quantization(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0.1, 1, (4, 4)), -rng.uniform(0.1, 1, (4, 4))])
    calib = fm.save_npz(tmp_path / "signs.npz", x=x.astype(np.float32))
    with pytest.raises(ConversionError, match="differs from the framework") as info:
        _convert("tests._framework_models:torch_branchy", tmp_path / "art", calibration=calib)
    assert "ONNX export check" in str(info.value)
    assert not (tmp_path / "art").exists()


def test_two_input_module_binds_calibration_keys_by_forward_parameter_name(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    feats, scale = tm["feats"], tm["scale"]
    # keys deliberately in the opposite order of forward(features, scale)
    calib = fm.save_npz(tmp_path / "two.npz", scale=scale, features=feats)
    res = _convert("tests._framework_models:torch_two_inputs", tmp_path / "art",
                   calibration=calib, quantize="none")
    model = edge_sdk.load(res.artifact.path)
    assert [s.name for s in model.inputs] == ["features", "scale"]
    assert [s.name for s in model.outputs] == ["scaled", "raw"]
    out = model.predict({"features": feats, "scale": scale})
    want = tm["two_out"]
    np.testing.assert_allclose(out["scaled"], want["scaled"], atol=ATOL)
    np.testing.assert_allclose(out["raw"], want["raw"], atol=ATOL)


def test_exported_program_with_fixed_batch_converts_with_a_warning(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    src = tm["fixed"]
    want = tm["fixed_out"]
    res = _convert(src, tmp_path / "art", calibration=tm["images_npz"], quantize="none")
    assert res.artifact.manifest.inputs[0].shape == (1, 3, 16, 16)
    assert any("fixed batch of 1" in w for w in res.warnings)
    assert any("fixed batch of 1" in w for w in res.report["warnings"])
    assert res.artifact.manifest.extra["export_warnings"] == [
        w for w in res.warnings if "fixed batch" in w]
    out = edge_sdk.load(res.artifact.path).predict({"image": tm["images"][:1]})["output"]
    np.testing.assert_allclose(out, want, atol=ATOL)


def test_torch_to_ort_format_runs_and_matches(tm: dict[str, Any], tmp_path: Path) -> None:
    res = _convert(tm["mlp_ts"], tmp_path / "art", calibration=tm["mlp_npz"], to="ort",
                   quantize="none")
    model = edge_sdk.load(res.artifact.path)
    assert model.format == "ort"
    np.testing.assert_allclose(model.predict(tm["x"])["output"], tm["mlp_out"], atol=ATOL)


def test_torch_factory_that_segfaults_is_a_one_line_error_and_writes_nothing(
    tmp_path: Path
) -> None:
    out = tmp_path / "art"
    with pytest.raises(ConversionError) as info:
        _convert("tests._framework_models:torch_segfault", out, shapes={"x": (1, 4)})
    msg = str(info.value)
    assert "\n" not in msg
    assert "PyTorch child process was killed by SIGSEGV while loading the model" in msg
    assert "'building the model, then crashing'" in msg  # the last line the child printed
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def test_framework_step_past_its_time_limit_is_stopped_with_the_config_key(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    slow = ConvertConfig(measure=FAST.measure, framework_timeout_s=0.01)
    with pytest.raises(ConversionError, match=r"took longer than 0\.01 s .*"
                                              r"ConvertConfig\.framework_timeout_s"):
        convert_source(tm["mlp_ts"], tmp_path / "art", ConvertOptions(quantize="none"),
                       source_kind=None, input_shapes={"input": (1, fm.FEATURES)},
                       trust_pickle=False, config=slow)
    assert not (tmp_path / "art").exists()


def test_converting_process_never_imports_torch_or_tensorflow(
    tm: dict[str, Any], tmp_path: Path
) -> None:
    # In a fresh interpreter, so that nothing else this test session did can mask it.
    code = (
        "import sys\n"
        "from converters import convert\n"
        f"convert({str(tm['mlp_ts'])!r}, {str(tmp_path / 'art')!r}, quantize='none',\n"
        f"        calibration={str(tm['mlp_npz'])!r})\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'sklearn') "
        "if m in sys.modules))\n"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert edge_sdk.load(tmp_path / "art").predict(tm["x"])["output"].shape == (40, 3)
