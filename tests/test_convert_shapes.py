"""Real input shapes: symbolic dims of ONNX sources get sizes the model runs on
(--input-shape, else tried sizes), and bench/predict run artifacts on their own sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from tests import _convert_models as M


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shapes")
    return {"yolo": M.yolo_neck(d / "yolo.onnx"), "stride3": M.stride3_concat(d / "s3.onnx"),
            "fixed": M.fixed_width_mlp(d / "fixed.onnx")}


def _convert(src: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(src), "-o", str(out), "--quantize", "none", "--json", *extra])


def _sample(art: Path) -> dict[str, np.ndarray]:
    path = edge_sdk.Artifact.from_dir(art).sample_path
    assert path is not None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _one_line_error(code: int, err: str) -> str:
    assert code != 0
    assert err.startswith("edge-sdk: error:") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err
    return err


def test_symbolic_hw_model_without_data_is_measured_on_a_tried_size_it_runs_on(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # On the old 16x16 inputs this neck's Concat fails; H = W = 224 is the first size tried.
    code = _convert(models["yolo"], tmp_path / "art")
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert _sample(tmp_path / "art")["images"].shape == (1, 3, 224, 224)
    assert any("(images 1x3x224x224)" in w for w in report["warnings"])
    art = edge_sdk.Artifact.from_dir(tmp_path / "art")
    assert art.manifest.inputs[0].shape == ("batch", 3, "H", "W")  # the signature stays


def test_input_shape_sets_the_shape_an_onnx_source_is_measured_on(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = _convert(models["yolo"], tmp_path / "art", "--input-shape", "images=1x3x320x320")
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert _sample(tmp_path / "art")["images"].shape == (1, 3, 320, 320)
    assert any("(images 1x3x320x320)" in w for w in report["warnings"])
    art = edge_sdk.Artifact.from_dir(tmp_path / "art")
    assert art.manifest.inputs[0].shape == ("batch", 3, "H", "W")


@pytest.mark.parametrize(("shape", "message"), [
    ("images=1x4x320x320", "dim 1 of 'images' is fixed at 3 in the model, not 4"),
    ("image=1x3x320x320", "the model has no input 'image'"),
    ("images=1x3x320", "3 dims, but 'images' has 4"),
])
def test_input_shape_contradicting_the_model_is_refused_in_one_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str,
    message: str,
) -> None:
    code = _convert(models["yolo"], tmp_path / "art", "--input-shape", shape)
    err = _one_line_error(code, capsys.readouterr().err)
    assert code == 2 and message in err
    assert not (tmp_path / "art").exists()


def test_model_running_on_no_tried_shape_gets_a_hint_naming_its_symbolic_dims(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = _convert(models["stride3"], tmp_path / "art")
    err = _one_line_error(code, capsys.readouterr().err)
    assert "pass --calibration CALIB.npz with real inputs or --input-shape " \
           "images=1x3xHxW (symbolic dims images: H, W;" in err
    assert not (tmp_path / "art").exists()


def test_input_shape_the_model_cannot_run_is_one_line_without_a_search(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = _convert(models["stride3"], tmp_path / "art", "--input-shape", "images=1x3x100x100")
    err = _one_line_error(code, capsys.readouterr().err)
    assert "pass --calibration CALIB.npz with real inputs or an --input-shape it accepts " \
           "(1x3x100x100: Concat:" in err


def test_a_size_the_runtime_error_names_is_tried(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # 16 fails with "... broadcast an axis by a dimension other than 1. 16 by 24".
    code = _convert(models["fixed"], tmp_path / "art")
    capsys.readouterr()
    assert code == 0
    assert _sample(tmp_path / "art")["x"].shape == (1, 24)


def test_bench_and_predict_run_an_artifact_with_symbolic_dims_on_its_sample(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # No tried size runs this model: without its sample, bench would have no input.
    art = tmp_path / "art"
    assert _convert(models["stride3"], art, "--input-shape", "images=1x3x96x96") == 0
    capsys.readouterr()
    assert main(["bench", str(art), "--runs", "2", "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 2
    assert main(["predict", str(art), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["outputs"]
    assert out["y"]["shape"] == [1, 8, 96, 96]


def test_bench_of_a_bare_model_runs_on_a_shape_it_accepts(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", str(models["yolo"]), "--runs", "2", "--warmup", "0"]) == 0
    assert "latency ms" in capsys.readouterr().out


def test_bench_without_sample_on_an_unguessable_model_asks_for_input(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["bench", str(models["stride3"]), "--runs", "2"])
    err = _one_line_error(code, capsys.readouterr().err)
    assert "symbolic dims images: H, W" in err and "pass --input FILE" in err


def test_inputs_the_model_cannot_run_are_a_one_line_error(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    np.savez(tmp_path / "in.npz", images=np.zeros((1, 3, 16, 16), np.float32))
    for cmd in ("bench", "predict"):
        code = main([cmd, str(models["yolo"]), "--input", str(tmp_path / "in.npz")])
        err = _one_line_error(code, capsys.readouterr().err)
        assert "images 1x3x16x16; symbolic dims images: H, W" in err, cmd
        assert "pass --input FILE with inputs it accepts" in err


def test_predict_without_input_on_a_bare_model_asks_for_one(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["predict", str(models["yolo"])])
    assert "has no sample.npz to run; pass --input FILE" in _one_line_error(
        code, capsys.readouterr().err)
