"""Models the converter was not written for: each gives a working artifact or one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_sdk
from edge_sdk.cli import main


def _save(path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto]) -> Path:
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _embedding(path: Path, vocab: int) -> Path:
    """Token ids [batch, seq] -> an embedding table of ``vocab`` rows -> [batch, seq, 4]."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((vocab, 16)).astype(np.float32), "E")
    proj = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "P")
    return _save(path, [helper.make_node("Gather", ["E", "ids"], ["e"]),
                        helper.make_node("MatMul", ["e", "P"], ["y"])],
                 [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
                 [table, proj])


def _one_line_error(code: int, err: str) -> str:
    assert code != 0
    assert err.startswith("edge-sdk: error:") and err.count("\n") == 1, err
    assert "internal error" not in err and "Traceback" not in err
    return err


def test_synthetic_token_ids_stay_inside_a_small_embedding_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # 5 rows: the old ids 0..7 fell off the table on every tried shape.
    src = _embedding(tmp_path / "tok.onnx", vocab=5)
    art = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(art), "--quantize", "none"]) == 0
    sample = edge_sdk.Artifact.from_dir(art).sample_path
    assert sample is not None
    with np.load(sample) as z:
        assert int(z["ids"].max()) < 5
    assert main(["bench", str(src), "--runs", "2", "--warmup", "0"]) == 0
    capsys.readouterr()


def test_input_shape_too_large_to_allocate_is_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    src = _embedding(tmp_path / "tok.onnx", vocab=50)
    code = main(["convert", str(src), "-o", str(tmp_path / "art"),
                 "--input-shape", "ids=100000x100000"])
    err = _one_line_error(code, capsys.readouterr().err)
    assert "ids=100000x100000" in err and "MiB" in err
    assert not (tmp_path / "art").exists()


def test_synthetic_evaluation_set_of_large_inputs_fits_its_memory_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from converters import _data

    monkeypatch.setattr(_data, "SYNTHETIC_BUDGET_BYTES", 1 << 20)  # scaled down: 1 MiB
    spec = edge_sdk.TensorSpec("x", "float32", ("N", "L"))
    shape = {"x": (1, (300 << 10) // 4)}  # 300 KiB per sample: 3 fit
    got = _data.synthetic_evalset(lambda f: None, [spec], n=16, given=shape)
    assert sum(a.nbytes for f in got.feeds for a in f.values()) <= 1 << 20
    assert len(got) == 3


def test_model_with_string_inputs_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    src = _save(tmp_path / "s.onnx", [helper.make_node("Identity", ["s"], ["t"])],
                [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])],
                [helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])], [])
    code = main(["convert", str(src), "-o", str(tmp_path / "art")])
    err = _one_line_error(code, capsys.readouterr().err)
    assert "'s' take strings" in err
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def edge_tflites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This module's TFLite sources, built in one child (one TensorFlow import)."""
    from tests._child import in_one_child

    dyn, two = in_one_child([
        ("tests._framework_models:tflite_dynamic_image",
         (tmp_path_factory.mktemp("dyn") / "dyn.tflite",), {}),
        ("tests._framework_models:tflite_two_signatures",
         (tmp_path_factory.mktemp("twosig") / "two.tflite",), {})])
    return {"dynamic": dyn, "two-signatures": two}


@pytest.fixture(scope="module")
def dynamic_tflite(edge_tflites: dict[str, Path]) -> Path:
    return edge_tflites["dynamic"]


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_input_shape_sets_the_shape_a_dynamic_tflite_is_measured_on(
    to: str, dynamic_tflite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: --input-shape was silently ignored for a .tflite source (224x224 was used).
    art = tmp_path / "art"
    name = edge_sdk.load(dynamic_tflite).inputs[0].name
    code = main(["convert", str(dynamic_tflite), "-o", str(art), "--to", to, "--quantize",
                 "none", "--input-shape", f"{name}=1x40x24x3"])
    capsys.readouterr()
    assert code == 0
    sample = edge_sdk.Artifact.from_dir(art).sample_path
    assert sample is not None
    with np.load(sample) as z:
        assert z[name].shape == (1, 40, 24, 3)
    assert edge_sdk.Artifact.from_dir(art).manifest.format == to
    assert main(["bench", str(art), "--runs", "2", "--warmup", "0"]) == 0
    assert main(["predict", str(art)]) == 0


@pytest.fixture(scope="module")
def two_signatures(edge_tflites: dict[str, Path]) -> Path:
    return edge_tflites["two-signatures"]


@pytest.mark.parametrize("to", ["tflite", "onnx"])
def test_tflite_with_two_signatures_is_refused_in_one_line(
    to: str, two_signatures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: the artifact silently ran signature 'a' only, 'b' dropped.
    src = two_signatures
    code = main(["convert", str(src), "-o", str(tmp_path / "art"), "--to", to])
    err = _one_line_error(code, capsys.readouterr().err)
    assert "2 signatures (a, b)" in err
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_opset_newer_than_onnxruntime_is_named_in_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    src = _embedding(tmp_path / "tok.onnx", vocab=5)
    model = onnx.load(str(src))
    model.opset_import[0].version = 99
    onnx.save(model, str(src))
    args = [command, str(src)] + (["-o", str(tmp_path / "art")] if command == "convert" else [])
    err = _one_line_error(main(args), capsys.readouterr().err)
    assert "opset 99 is newer than this onnxruntime supports" in err
    assert "onnxruntime_src" not in err


def test_synthetic_feeds_the_model_rejects_are_left_out_of_the_evaluation_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # TopK's k is an input: random k of 0..7 over 5 values runs on some feeds only. Before:
    # the search's one feed ran, the 16 evaluation feeds did not ("source model fails").
    src = _save(tmp_path / "topk.onnx", [helper.make_node("TopK", ["x", "k"], ["v", "i"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]),
                 helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", "K"]),
                 helper.make_tensor_value_info("i", TensorProto.INT64, ["N", "K"])], [])
    art = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(art), "--quantize", "none"]) == 0
    capsys.readouterr()
    sample = edge_sdk.Artifact.from_dir(art).sample_path
    assert sample is not None
    with np.load(sample) as z:
        assert int(z["k"][0]) <= 5
    assert main(["predict", str(art)]) == 0


def test_channel_index_input_keeps_every_synthetic_feed_inside_the_channels() -> None:
    # A scalar index into 3 channels: the feeds the search did not run name the range,
    # and all of them are drawn again inside it rather than dropped.
    import onnxruntime as ort

    from converters._data import synthetic_evalset

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["a", "k"], ["c"], axis=1)], "chan",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, 4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    specs = [edge_sdk.TensorSpec("a", "float32", ("N", 3, 4, 4)),
             edge_sdk.TensorSpec("k", "int64", ())]
    got = synthetic_evalset(lambda f: sess.run(None, f), specs, n=16)
    assert len(got) == 16
    assert max(int(f["k"]) for f in got.feeds) <= 2


def test_input_shape_given_twice_for_one_input_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: the last one won without a word.
    src = _embedding(tmp_path / "tok.onnx", vocab=50)
    code = main(["convert", str(src), "-o", str(tmp_path / "art"),
                 "--input-shape", "ids=1x8", "--input-shape", "ids=2x8"])
    err = _one_line_error(code, capsys.readouterr().err)
    assert "'ids' given twice" in err and "1x8 and 2x8" in err
