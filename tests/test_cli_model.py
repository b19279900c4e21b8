"""``edge-sdk inspect / predict / bench`` in-process via main([...]) and once as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from tests._process import edge_sdk_cli


@pytest.fixture()
def art_dir(add_onnx: Path, tmp_path: Path) -> Path:
    edge_sdk.build_artifact(add_onnx, tmp_path / "art", name="adder", version="3")
    return tmp_path / "art"


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_inspect_prints_signature_and_ops(
    art_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(art_dir)]) == 0
    out = capsys.readouterr().out
    assert "adder 3  [onnx]" in out
    assert "x float32 [batch, 4]" in out and "y float32 [batch, 4]" in out
    assert "quantization: none" in out
    assert "ops (1): Add×1" in out


def test_inspect_json_of_bare_tflite_file(tflite_int8: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tflite_int8), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tflite"
    assert info["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 4]}]
    assert info["quantization"] == "int8"
    assert "FULLY_CONNECTED" in info["ops"]


def test_predict_npz_writes_outputs(art_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float32))
    out_file = tmp_path / "out.npz"
    assert main(["predict", str(art_dir), "--input", str(tmp_path / "in.npz"),
                 "-o", str(out_file)]) == 0
    np.testing.assert_array_equal(np.load(out_file)["y"], [[1, 2, 3, 4]] * 2)
    assert "y float32 [2, 4]" in capsys.readouterr().out


def test_predict_json_input_and_output(multi_onnx: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.json").write_text(json.dumps({"a": [[0.5, 1, 2]], "b": [[4]]}))
    assert main(["predict", str(multi_onnx), "--input", str(tmp_path / "in.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outputs"]["sum"]["data"] == [[4.5, 5, 6]]
    assert result["outputs"]["double_b"] == {"dtype": "int64", "shape": [1, 1], "data": [[8]]}


def test_predict_npy_for_single_input_model(add_onnx: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    assert main(["predict", str(add_onnx), "-i", str(tmp_path / "x.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["y"]["data"] == [[0, 1, 2, 3]]


def test_bench_reports_percentiles(add_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(add_onnx), "--runs", "30", "--warmup", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["runs"] == 30
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["throughput_per_s"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inspect", "{tmp}/missing"], "no such file or directory"),
        (["inspect", "{tmp}/model.bin"], "unknown model file kind"),
        (["predict", "{multi}", "-i", "{tmp}/x.npy"], "a .npy file holds one array"),
        (["predict", "{multi}", "-i", "{tmp}/bad.json"], "invalid JSON"),
        (["predict", "{multi}", "-i", "{tmp}/wrong.json"], "missing input(s) 'b'"),
        (["predict", "{multi}", "-i", "{tmp}/x.txt"], "unsupported input file kind '.txt'"),
        (["predict", "{multi}", "-i", "{tmp}/x.npy", "-o", "{tmp}/out.csv"], "must end in .npz"),
        (["bench", "{multi}", "--runs", "0"], "Invalid value for '--runs'"),
        (["inspect", "{tmp}/corrupt.onnx"], "onnxruntime cannot load this model"),
    ],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(
    args: list[str], needle: str, multi_onnx: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    np.save(tmp_path / "x.npy", np.zeros((1, 3), np.float32))
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "wrong.json").write_text(json.dumps({"a": [[1, 2, 3]]}))
    (tmp_path / "x.txt").write_text("1 2 3")
    (tmp_path / "corrupt.onnx").write_bytes(multi_onnx.read_bytes()[:50])
    argv = [a.format(tmp=tmp_path, multi=multi_onnx) for a in args]
    assert main(argv) != 0
    line = _err_line(capsys)
    assert line.startswith("edge-sdk: error: ")
    assert needle in line
    assert not (tmp_path / "out.csv").exists()


def test_debug_flag_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"junk")
    assert main(["--debug", "inspect", str(tmp_path / "m.onnx")]) != 0
    assert "Traceback" in capsys.readouterr().err


def test_cli_as_subprocess_predicts_and_fails_cleanly(art_dir: Path, tmp_path: Path) -> None:
    cmd = edge_sdk_cli()
    np.savez(tmp_path / "in.npz", x=np.full((1, 4), 2, np.float32))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([*cmd, "predict", str(art_dir), "-i", str(tmp_path / "in.npz"), "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["outputs"]["y"]["data"] == [[2, 3, 4, 5]]
    (art_dir / "model.onnx").write_bytes(b"tampered")
    bad = subprocess.run([*cmd, "inspect", str(art_dir)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "does not match the manifest" in bad.stderr
