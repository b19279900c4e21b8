"""``edge-sdk convert`` from the command line: summaries, JSON, and every bad input
giving one line, a non-zero exit and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from tests import _convert_models as M
from tests._convert_checks import assert_one_line_refusal


@pytest.fixture(scope="session")
def cli_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("convert-cli")
    cnn = M.mobilenet_like(d / "cnn.onnx", size=16)
    np.savez(d / "calib.npz", input=M.images(12, 16))
    np.savez(d / "empty.npz", input=np.zeros((0, 3, 16, 16), np.float32))
    np.savez(d / "wrong_key.npz", image=M.images(4, 16))
    np.savez(d / "wrong_shape.npz", input=M.images(4, 20))
    np.savez(d / "wrong_rank.npz", input=np.zeros((4, 16, 16), np.float32))
    (d / "notes.onnx").write_text("these are not the weights you are looking for\n")
    data = cnn.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return {"cnn": cnn, "dir": d}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_convert_prints_candidate_table_choice_and_writes_artifact(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "art"
    code = main(["convert", str(cli_models["cnn"]), "-o", str(out), "--calibration",
                 str(cli_models["dir"] / "calib.npz"), "--threads", "1", "--name", "cnn",
                 "--version", "2.0.0"])
    text = capsys.readouterr().out
    assert code == 0
    assert "candidate" in text and "fp32" in text and "int8-static-minmax" in text
    assert "chosen:" in text and f"wrote {out}" in text
    assert "NOT verified" not in text
    art = edge_sdk.Artifact.from_dir(out)
    assert (art.manifest.name, art.manifest.version) == ("cnn", "2.0.0")
    assert art.manifest.runtime["threads"] == 1


def test_convert_json_output_is_the_report(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "art"
    code = main(["convert", str(cli_models["cnn"]), "-o", str(out), "--quantize", "fp16",
                 "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen"] == "fp16" and data["artifact"] == str(out)
    assert data["data"]["verified_on_real_data"] is False
    assert any("NOT verified on real data" in w for w in data["warnings"])


def test_without_calibration_the_summary_says_accuracy_not_verified(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["convert", str(cli_models["cnn"]), "-o", str(tmp_path / "art")])
    assert code == 0
    assert "WARNING: accuracy NOT verified on real data" in capsys.readouterr().out


@pytest.mark.parametrize(("case", "args", "message"), [
    ("missing file", ["{dir}/nope.onnx"], "no such file"),
    ("not onnx", ["{dir}/notes.onnx"], "not an ONNX model"),
    ("truncated", ["{dir}/truncated.onnx"], "not an ONNX model"),
    ("calibration keys", ["{cnn}", "--calibration", "{dir}/wrong_key.npz"],
     "missing input(s) 'input' and unknown key(s) 'image'"),
    ("calibration shape", ["{cnn}", "--calibration", "{dir}/wrong_shape.npz"],
     "input 'input' has shape [4, 3, 20, 20]"),
    ("calibration rank", ["{cnn}", "--calibration", "{dir}/wrong_rank.npz"],
     "expected rank 4"),
    ("empty calibration", ["{cnn}", "--calibration", "{dir}/empty.npz"], "empty (0 samples)"),
    ("missing calibration", ["{cnn}", "--calibration", "{dir}/nope.npz"],
     "no such calibration file"),
    ("static without data", ["{cnn}", "--quantize", "int8-static"], "needs calibration"),
    ("tflite from onnx", ["{cnn}", "--to", "tflite"], "pass the Keras/TF model"),
    ("bad input shape", ["{cnn}", "--input-shape", "input:1x3"], "expected NAME=DIMxDIM"),
])
def test_bad_input_gives_one_line_error_and_writes_nothing(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    case: str, args: list[str], message: str,
) -> None:
    out = tmp_path / "art"
    argv = ["convert"] + [a.format(dir=cli_models["dir"], cnn=cli_models["cnn"]) for a in args]
    code = main([*argv, "-o", str(out)])
    assert_one_line_refusal(code, capsys.readouterr().err, message, out, case)
    assert _leftovers(tmp_path) == []


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["convert", str(cli_models["cnn"]), "-o", str(out), "--quantize", "none"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    code = main(["convert", str(cli_models["cnn"]), "-o", str(out), "--quantize", "none",
                 "--overwrite"])
    assert code == 0
    assert not (out / "precious.txt").exists()
    edge_sdk.Artifact.from_dir(out)
    assert _leftovers(tmp_path) == []


def test_convert_runs_as_a_subprocess(cli_models: dict[str, Path], tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "edge-sdk"
    out = tmp_path / "art"
    proc = subprocess.run(
        [str(exe), "convert", str(cli_models["cnn"]), "-o", str(out), "--to", "ort",
         "--calibration", str(cli_models["dir"] / "calib.npz"), "--metric", "max-abs"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "chosen:" in proc.stdout
    assert edge_sdk.load(out).format == "ort"
    bad = subprocess.run([str(exe), "convert", str(tmp_path / "nope.onnx"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr


def test_error_with_a_huge_text_prints_one_bounded_line_and_debug_prints_all(
    cli_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # 5,000 stray keys: the data error lists every one of them (~90,000 characters).
    calib = tmp_path / "keys.npz"
    np.savez(calib, input=M.images(4, 16),
             **{f"stray_key_{i:05d}": np.zeros(1, np.float32) for i in range(5000)})
    out = tmp_path / "art"
    args = ["convert", str(cli_models["cnn"]), "-o", str(out), "--calibration", str(calib)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert len(err) < 420, len(err)
    assert err.startswith("edge-sdk: error: ")
    assert "calibration data does not match the model: unknown key(s)" in err
    assert "more characters; --debug shows them" in err
    assert not out.exists()
    assert main(["--debug", *args]) == 2
    full = capsys.readouterr().err
    assert "Traceback" in full and "stray_key_04999" in full
