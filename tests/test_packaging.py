"""What each role installs, resolved by pip itself (metadata only, nothing installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "tensorflow", "tensorflow-cpu", "keras", "jax", "onnx", "scikit-learn",
         "skl2onnx", "matplotlib"}


def _resolve(spec: str, tmp_path: Path) -> set[str]:
    report = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), spec],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-") for item in data["install"]}


def test_device_install_never_pulls_torch_tensorflow_or_converters(tmp_path: Path) -> None:
    names = _resolve(".[agent]", tmp_path)
    assert {"onnxruntime", "paho-mqtt", "tuf", "ai-edge-litert"} <= names
    assert not names & HEAVY, sorted(names & HEAVY)


def test_base_install_is_numpy_click_onnxruntime(tmp_path: Path) -> None:
    names = _resolve(".", tmp_path)
    assert {"numpy", "click", "onnxruntime", "edge-sdk"} <= names
    assert not names & (HEAVY | {"paho-mqtt", "ai-edge-litert"})


def test_loading_an_onnx_model_imports_no_litert_onnx_or_frameworks(add_onnx: Path) -> None:
    code = (
        "import sys, numpy as np, edge_sdk\n"
        f"m = edge_sdk.load({str(add_onnx)!r})\n"
        "m.predict(np.zeros((1, 4), np.float32))\n"
        "heavy = [n for n in ('ai_edge_litert', 'onnx', 'torch', 'tensorflow', 'converters',"
        " 'paho', 'tuf', 'PIL') if n in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
