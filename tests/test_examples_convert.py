"""The examples/convert_*.py scripts run as a user would run them and do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, work: Path) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(work)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _manifest(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "manifest.json").read_text())
    return data


def test_example_convert_sklearn_labels_equal(tmp_path: Path) -> None:
    out = _run("convert_sklearn.py", tmp_path)
    assert "labels equal to scikit-learn on 100% of 150 samples" in out
    assert _manifest(tmp_path / "iris-artifact")["labels"] == [0, 1, 2]


def test_example_convert_torch_matches_torch(tmp_path: Path) -> None:
    out = _run("convert_torch.py", tmp_path)
    assert "top-1 equal: True" in out
    source = _manifest(tmp_path / "cnn-artifact")["source"]
    assert isinstance(source, dict)
    assert (source["format"], source["path"]) == ("torch", "cnn.pt2")


def test_example_convert_keras_writes_tflite_and_onnx(tmp_path: Path) -> None:
    out = _run("convert_keras.py", tmp_path)
    assert "--to tflite: chosen" in out and "--to onnx: chosen" in out
    assert _manifest(tmp_path / "cnn-tflite")["format"] == "tflite"
    assert _manifest(tmp_path / "cnn-onnx")["format"] == "onnx"


def test_example_convert_tflite_int8_is_float_in_float_out(tmp_path: Path) -> None:
    out = _run("convert_tflite.py", tmp_path)
    assert "quantization: int8-static" in out
    assert "float in, float out: float32" in out
