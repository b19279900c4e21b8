"""The ONNX conversion pipeline on models the tests build: every scheme, auto's
choice, normalization of broken exports, stateful models, budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge_sdk
from converters import ConversionResult, ConvertConfig, convert
from converters._candidates import CandidateConfig
from converters._measure import MeasureConfig, round_ratios
from tests import _convert_models as M

# Few timing runs: tests check behaviour, the bench measures speed.
FAST = ConvertConfig(
    measure=MeasureConfig(rounds=2, runs_per_round=3, warmup=1),
    candidates=CandidateConfig(static_methods=("minmax", "percentile")),
)


@pytest.fixture(scope="session")
def conv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def models(conv_dir: Path) -> dict[str, tuple[Path, Path]]:
    """name → (model, calibration .npz)."""
    d = conv_dir
    np.savez(d / "img.npz", input=M.images(24, 32))
    np.savez(d / "tok.npz", input_ids=M.token_ids(24, 12))
    np.savez(d / "tab.npz", features=M.tabular(24))
    stateful = M.stateful_if(d / "stateful.onnx")
    np.savez(d / "stateful.npz", **M.stateful_rollout(stateful, 24))
    return {
        "cnn": (M.mobilenet_like(d / "cnn.onnx"), d / "img.npz"),
        "transformer": (M.transformer_encoder(d / "transformer.onnx"), d / "tok.npz"),
        "mlp": (M.mlp_classifier(d / "mlp.onnx"), d / "tab.npz"),
        "constant": (M.constant_weights_mlp(d / "constant.onnx"), d / "tab.npz"),
        "dup-opset": (M.duplicate_opset_mlp(d / "dup.onnx"), d / "tab.npz"),
        "stateful": (stateful, d / "stateful.npz"),
    }


def _convert(models: dict[str, tuple[Path, Path]], name: str, out: Path,
             **kw: Any) -> ConversionResult:
    model, calib = models[name]
    kw.setdefault("calibration", calib)
    return convert(model, out, config=FAST, **kw)


def _source_outputs(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _eval_feeds(model: Path, calib: Path, n: int = 6) -> list[dict[str, np.ndarray]]:
    from converters._data import load_samples

    specs = edge_sdk.load(model).inputs
    return list(load_samples(calib, specs).feeds[-n:])


def _assert_reproduces_report(art: Path, model: Path, calib: Path, output: str) -> None:
    """The artifact, loaded as a device loads it, gives on the held-out samples the cosine
    score its manifest reports. Which calibration method or candidate wins depends on
    measured latency, so the figure varies between runs; the report must tell the truth."""
    feeds = _eval_feeds(model, calib)
    pred = edge_sdk.load(art)
    cos = [float(np.dot(g.ravel(), w[0].ravel()) / (np.linalg.norm(g) * np.linalg.norm(w[0])))
           for g, w in zip((pred.predict(f)[output] for f in feeds),
                           _source_outputs(model, feeds), strict=True)]
    accuracy = json.loads((art / "manifest.json").read_text())["accuracy"]
    assert accuracy["metric"] == "cosine"
    assert accuracy["evaluation"].endswith("(held out)")
    assert abs(float(np.mean(cos)) - accuracy["score"]) < 2e-3
    assert min(cos) > 0.95


@pytest.mark.parametrize(("name", "scheme"), [
    ("cnn", "none"), ("cnn", "fp16"), ("cnn", "int8-dynamic"), ("cnn", "int8-static"),
    ("transformer", "int8-dynamic"), ("transformer", "int8-static"), ("transformer", "fp16"),
    ("mlp", "int8-dynamic"), ("mlp", "int8-static"),
])
def test_explicit_scheme_gives_loadable_artifact_that_reproduces_reported_accuracy(
    models: dict[str, tuple[Path, Path]], tmp_path: Path, name: str, scheme: str,
) -> None:
    result = _convert(models, name, tmp_path / "art", quantize=scheme)
    art = edge_sdk.Artifact.from_dir(tmp_path / "art")
    assert art.manifest.quantization == scheme
    assert {p.name for p in art.path.iterdir()} >= {
        "manifest.json", "model.onnx", "report.json", "report.md", "report.png", "sample.npz"}
    chosen = next(c for c in result.report["candidates"] if c["name"] == result.chosen)
    assert chosen["status"] == "chosen" and chosen["scheme"] == scheme
    if scheme.startswith("int8"):
        assert chosen["quantized_weights"] > 0
    model, calib = models[name]
    pred = edge_sdk.load(tmp_path / "art")
    _assert_reproduces_report(tmp_path / "art", model, calib, pred.outputs[0].name)
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["accuracy"]["drop"] <= manifest["accuracy"]["max_drop"]
    assert manifest["latency_ms"]["p50"] > 0
    assert manifest["accuracy"]["verified_on_real_data"] is True


@pytest.mark.parametrize("name", ["cnn", "transformer", "mlp"])
def test_auto_choice_is_within_budget_and_not_slower_than_fp32(
    models: dict[str, tuple[Path, Path]], tmp_path: Path, name: str,
) -> None:
    result = _convert(models, name, tmp_path / "art")
    rows = {c["name"]: c for c in result.report["candidates"]}
    chosen = rows[result.chosen]
    budget = result.report["metric"]["max_drop"]
    assert chosen["accuracy"]["drop"] <= budget
    # Not slower than fp32 by the noise band of the per-round ratios.
    assert chosen["latency_ratio"]["status"] != "slower"
    # Every candidate within budget and not slower lost only to a faster one (by the
    # band) or to a smaller one: the rule, checked on the report's own per-round figures.
    for row in rows.values():
        if row["status"] == "ok":
            paired = round_ratios(row["latency_rounds_ms"], chosen["latency_rounds_ms"])
            assert paired.status(0.05) != "faster" or row["size_bytes"] >= chosen["size_bytes"]
    assert {"fp32", "fp16", "int8-dynamic", "int8-static-minmax"} <= set(rows)
    assert result.report["why"].startswith(result.chosen)
    assert result.artifact.manifest.extra["conversion"]["chosen"] == result.chosen


def test_constant_node_weights_become_initializers_and_get_quantized(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    result = _convert(models, "constant", tmp_path / "art", quantize="int8-dynamic")
    assert any("Constant nodes" in n for n in result.report["normalization"])
    chosen = next(c for c in result.report["candidates"] if c["name"] == result.chosen)
    assert chosen["quantized_weights"] == 3
    model = onnx.load(str(result.artifact.model_path))
    assert not any(n.op_type == "Constant" for n in model.graph.node)


def test_duplicate_opset_imports_are_merged_and_the_model_quantizes(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    # onnxruntime's quantizer alone crashes on this model ("Failed to find proper ai.onnx
    # domain"); the pipeline merges the imports first.
    result = _convert(models, "dup-opset", tmp_path / "art", quantize="int8-static")
    assert any("duplicate opset" in n for n in result.report["normalization"])
    model = onnx.load(str(result.artifact.model_path))
    domains = [imp.domain or "ai.onnx" for imp in model.opset_import]
    assert len(domains) == len(set(domains))
    assert result.artifact.manifest.quantization == "int8-static"


def test_noop_quantization_is_reported_not_passed_off_as_int8(tmp_path: Path) -> None:
    model = M.weightless(tmp_path / "weightless.onnx")
    result = convert(model, tmp_path / "auto", config=FAST)
    rows = {c["name"]: c for c in result.report["candidates"]}
    assert rows["int8-dynamic"]["status"] == "no-op"
    assert "quantized no weight" in rows["int8-dynamic"]["note"]
    assert result.chosen == "fp32"
    assert result.artifact.manifest.quantization == "none"
    assert any("no-op" in w for w in result.warnings)
    with pytest.raises(edge_sdk.ConversionError, match="quantized no weight"):
        convert(model, tmp_path / "explicit", config=FAST, quantize="int8-dynamic")
    assert not (tmp_path / "explicit").exists()


def test_stateful_model_with_if_subgraph_still_works_after_conversion(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    result = _convert(models, "stateful", tmp_path / "art")
    assert any("closed-loop" in n and "state_out → state" in n
               for n in result.report["normalization"])
    rows = result.report["candidates"]
    # Every candidate was run: it either works within budget, or the report says why not.
    for row in rows:
        assert row["status"] in ("chosen", "ok", "slower", "over-budget", "failed", "no-op")
        if row["status"] == "failed":
            assert row["error"]
        else:
            assert row["accuracy"]["samples"] > 0
    # Stream 20 steps through the artifact, feeding the state back, next to the source.
    model, _ = models["stateful"]
    pred = edge_sdk.load(tmp_path / "art")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    s_art = s_src = np.zeros((2, 1, 16), np.float32)
    sr = np.array(16000, np.int64)
    for _ in range(20):
        x = rng.standard_normal((1, 16)).astype(np.float32)
        out = pred.predict({"x": x, "state": s_art, "sr": sr})
        y_src, s_src = sess.run(None, {"x": x, "state": s_src, "sr": sr})
        s_art = out["state_out"]
        assert out["y"].shape == (1, 4)
        assert np.dot(out["y"].ravel(), y_src.ravel()) / (
            np.linalg.norm(out["y"]) * np.linalg.norm(y_src)) > 0.98
    assert np.allclose(s_art, s_src, atol=0.1)


def test_explicit_scheme_over_budget_fails_with_measured_figure_unless_forced(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    with pytest.raises(edge_sdk.ConversionError, match=r"drop \d.* > 0 on \d+ evaluation"):
        _convert(models, "mlp", tmp_path / "strict", quantize="int8-dynamic", max_drop=0.0)
    assert not (tmp_path / "strict").exists()
    result = _convert(models, "mlp", tmp_path / "forced", quantize="int8-dynamic",
                      max_drop=0.0, force=True)
    assert result.artifact.manifest.quantization == "int8-dynamic"
    assert any("breaks the accuracy budget" in w for w in result.warnings)


def test_auto_falls_back_to_fp32_when_nothing_else_is_within_budget(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    result = _convert(models, "mlp", tmp_path / "art", max_drop=0.0)
    assert result.chosen == "fp32"
    assert "no quantized candidate" in result.report["why"]
    statuses = {c["name"]: c["status"] for c in result.report["candidates"]}
    assert statuses["int8-dynamic"] in ("over-budget", "no-op")


def test_without_data_accuracy_is_checked_on_synthetic_inputs_and_flagged(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    model, _ = models["cnn"]
    result = convert(model, tmp_path / "art", config=FAST)
    assert any("NOT verified on real data" in w for w in result.warnings)
    assert result.report["data"]["verified_on_real_data"] is False
    rows = {c["name"]: c for c in result.report["candidates"]}
    assert rows["int8-static"]["status"] == "skipped"
    assert rows["int8-dynamic"]["latency_ms"] > 0
    assert result.artifact.manifest.extra["accuracy"]["verified_on_real_data"] is False
    assert "NOT verified on real data" in (tmp_path / "art" / "report.md").read_text()


def test_exclude_op_keeps_those_ops_float(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    result = _convert(models, "cnn", tmp_path / "art", quantize="int8-dynamic",
                      exclude_ops=("Conv",), force=True)
    model = onnx.load(str(result.artifact.model_path))
    ops = {n.op_type for n in model.graph.node}
    assert "ConvInteger" not in ops and "Conv" in ops
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


def test_to_ort_writes_an_ort_format_artifact_that_runs(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    result = _convert(models, "cnn", tmp_path / "art", quantize="int8-static", to="ort")
    art = result.artifact
    assert art.manifest.format == "ort" and art.manifest.model == "model.ort"
    model, calib = models["cnn"]
    _assert_reproduces_report(art.path, model, calib, "logits")
    assert any("ORT format verified" in n for n in result.report["normalization"])


def test_top1_with_labels_scores_accuracy_against_the_labels(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    model, _ = models["mlp"]
    x = M.tabular(40, seed=3)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"features": x})[0].argmax(-1)
    labels[:4] = (labels[:4] + 1) % 5  # the source gets 90% right
    np.savez(tmp_path / "eval.npz", features=x, labels=labels)
    result = _convert(models, "mlp", tmp_path / "art", eval=tmp_path / "eval.npz",
                      metric="top1", quantize="int8-static")
    acc = result.artifact.manifest.extra["accuracy"]
    assert acc["metric"] == "top1"
    assert acc["reference_score"] == pytest.approx(0.9)
    assert acc["score"] >= 0.88


def test_tflite_target_from_an_onnx_source_is_refused(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    with pytest.raises(edge_sdk.ConversionError, match="framework source"):
        _convert(models, "mlp", tmp_path / "art", to="tflite")
    assert not (tmp_path / "art").exists()


def test_old_opset_is_upgraded_for_per_channel_quantization(
    models: dict[str, tuple[Path, Path]], tmp_path: Path,
) -> None:
    old = M.mlp_classifier(tmp_path / "old.onnx", opsets=(("", 11),))
    _, calib = models["mlp"]
    result = convert(old, tmp_path / "art", config=FAST, calibration=calib,
                     quantize="int8-static")
    assert any("upgraded opset 11 → 17" in n for n in result.report["normalization"])
    assert result.artifact.manifest.runtime["opset"] == 17
    chosen = next(c for c in result.report["candidates"] if c["name"] == result.chosen)
    assert chosen["quantized_weights"] == 3


def test_loop_model_every_candidate_is_run_and_the_artifact_matches_the_source(
    tmp_path: Path,
) -> None:
    model = M.loop_rnn(tmp_path / "loop.onnx")
    np.savez(tmp_path / "x.npz", x=M.tabular(24, 16))
    result = convert(model, tmp_path / "art", config=FAST, calibration=tmp_path / "x.npz")
    for row in result.report["candidates"]:
        assert row["status"] == "failed" or row["accuracy"]["samples"] == 6
    _assert_reproduces_report(tmp_path / "art", model, tmp_path / "x.npz", "y")
    accuracy = json.loads((tmp_path / "art" / "manifest.json").read_text())["accuracy"]
    assert accuracy["drop"] <= accuracy["max_drop"]
