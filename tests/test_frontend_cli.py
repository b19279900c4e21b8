"""`edge-sdk convert` on framework sources: detection, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters._frontends import detect_kind
from edge_sdk.cli import main
from edge_sdk.errors import UsageError
from tests import _framework_models as fm

ROOT = Path(__file__).resolve().parents[1]
EDGE_SDK = ROOT / ".venv" / "bin" / "edge-sdk"


@pytest.fixture(scope="session")
def srcs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-src")
    models = fm.sklearn_models()
    x, y = fm.sklearn_inputs()
    return {
        "pickle": fm.save_pickle(models["pipeline"], d / "pipe.pkl"),
        "calib": fm.save_npz(d / "calib.npz", input=x, labels=y),
        "x": fm.save_npz(d / "x.npz", input=x[:3]),
    }


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in err
    return err


def _nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}")]


# -- detection ---------------------------------------------------------------------------


def test_detection_by_suffix_content_and_factory(tmp_path: Path) -> None:
    pkl = fm.save_pickle([1, 2], tmp_path / "model.bin")
    h5 = tmp_path / "weights.data"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 8)
    tfl = tmp_path / "m.bin2"
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 8)
    saved = tmp_path / "exported"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert detect_kind(str(pkl), None) == "sklearn"
    assert detect_kind(str(h5), None) == "keras"
    assert detect_kind(str(tfl), None) == "tflite"
    assert detect_kind(str(saved), None) == "keras"
    assert detect_kind("pkg.models:build", None) == "torch"
    assert detect_kind(str(pkl), "torch") == "torch"


def test_unknown_kinds_and_artifact_directories_are_usage_errors(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(UsageError, match=r"unknown model file kind.*--from"):
        detect_kind(str(txt), None)
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="already an edge-sdk artifact"):
        detect_kind(str(art), None)
    with pytest.raises(UsageError, match="unknown source kind"):
        detect_kind(str(txt), "caffe")


# -- CLI ---------------------------------------------------------------------------------


def test_cli_unknown_file_kind_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "notes.txt"
    src.write_text("not a model")
    out = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    assert "unknown model file kind" in _error_line(capsys)
    _nothing_left(tmp_path, out)


def test_cli_pickle_without_trust_pickle_says_why(
    srcs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    assert main(["convert", str(srcs["pickle"]), "-o", str(out)]) == 2
    line = _error_line(capsys)
    assert "--trust-pickle" in line and "runs any code" in line
    _nothing_left(tmp_path, out)


def test_cli_keras_file_that_is_not_a_model_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "model.keras"
    src.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(out), "--to", "tflite"]) == 1
    assert "not a Keras model" in _error_line(capsys)
    _nothing_left(tmp_path, out)


def test_cli_sklearn_pipeline_end_to_end_then_predict(
    srcs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    code = main(["convert", str(srcs["pickle"]), "-o", str(out), "--trust-pickle",
                 "--calibration", str(srcs["calib"]), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["format"] == "sklearn"
    assert main(["predict", str(out), "-i", str(srcs["x"]), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["outputs"]
    with np.load(srcs["x"]) as data:
        x = data["input"]
    import pickle

    est = pickle.loads(srcs["pickle"].read_bytes())
    assert pred["label"]["data"] == est.predict(x).tolist()


def _run(args: list[str], block: str | None = None, cwd: Path | None = None) -> Any:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if block is None:
        cmd = [str(EDGE_SDK), *args]
    else:
        # An absent framework, for real: the import machinery refuses the module.
        code = (f"import sys; sys.modules[{block!r}] = None; from edge_sdk.cli import main; "
                f"raise SystemExit(main({args!r}))")
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or ROOT,
                          timeout=300)


def test_subprocess_missing_torch_says_install_the_torch_extra(tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: detected as torch by suffix
    out = tmp_path / "art"
    proc = _run(["convert", str(src), "-o", str(out), "--input-shape", "x=1x4"], block="torch")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line
    assert "pip install 'edge-sdk[torch]'" in line
    _nothing_left(tmp_path, out)


def test_subprocess_missing_tensorflow_says_install_the_tensorflow_extra(tmp_path: Path) -> None:
    src = tmp_path / "model.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 8)
    out = tmp_path / "art"
    proc = _run(["convert", str(src), "-o", str(out), "--to", "tflite"], block="tensorflow")
    assert proc.returncode == 1, proc.stderr
    assert "pip install 'edge-sdk[tensorflow]'" in proc.stderr.strip().splitlines()[-1]
    _nothing_left(tmp_path, out)


def test_subprocess_sklearn_convert_writes_a_loadable_artifact(
    srcs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "art"
    proc = _run(["convert", str(srcs["pickle"]), "-o", str(out), "--trust-pickle",
                 "--calibration", str(srcs["calib"]), "--quantize", "none"])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == [0, 1, 2]
    assert manifest["sklearn"]["estimator"] == "Pipeline"


def test_cli_torch_factory_that_does_not_import_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    code = main(["convert", "no_such_pkg.models:build", "-o", str(out),
                 "--input-shape", "x=1x4"])
    assert code == 2
    line = _error_line(capsys)
    assert "cannot import module 'no_such_pkg.models'" in line
    _nothing_left(tmp_path, out)


def test_cli_torch_factory_with_input_shape_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    code = main(["convert", "tests._framework_models:torch_mlp", "-o", str(out),
                 "--input-shape", f"input=1x{fm.FEATURES}", "--quantize", "none"])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "NOT verified on real data" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "torch_mlp"
    assert manifest["inputs"][0]["shape"] == ["batch", fm.FEATURES]
