"""``convert --base V1``: v2 quantized with v1's int8 parameters, so that unchanged weights
keep v1's bytes and a fine-tune changes few of them; what no longer fits gets its own
scale and the report says so; bad bases are refused in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edge_sdk
from converters import ConversionResult, ConvertConfig, convert
from converters._candidates import CandidateConfig
from converters._measure import MeasureConfig
from edge_sdk.cli import main
from tests import _convert_models as M
from tests._convert_checks import assert_one_line_refusal

_MEASURE = MeasureConfig(rounds=2, runs_per_round=3, warmup=1)
# One candidate per scheme, so that v1's choice does not depend on timing.
STATIC = ConvertConfig(measure=_MEASURE, candidates=CandidateConfig(
    static_methods=("minmax",), static_per_tensor_methods=()))
DYNAMIC = ConvertConfig(measure=_MEASURE, candidates=CandidateConfig(
    dynamic_variants=(("-pc", False, True),), gather_variants=()))
GATHER = ConvertConfig(measure=_MEASURE, candidates=CandidateConfig(
    dynamic_variants=(), gather_variants=(("-matmul-pc-gather-row", "row"),)))


def _edit(src: Path, dst: Path, change: Callable[[str, np.ndarray], np.ndarray | None]) -> Path:
    """A copy of ``src`` with each float initializer replaced by ``change(name, value)``
    (None keeps it)."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        new = change(init.name, numpy_helper.to_array(init))
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    onnx.save(model, str(dst))
    return dst


def fine_tuned(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fine-tune's change to a [out, in] weight: every weight moves by noise of 0.3% of the
    tensor's std, and the largest weight of each output channel, which sets its range,
    shrinks by 2%. (Grown past v1's range, a channel would get its own scale.)"""
    out = w + rng.normal(0, 0.003 * float(w.std()), w.shape)
    rows = np.arange(w.shape[0])
    top = np.abs(w).argmax(axis=1)
    out[rows, top] = w[rows, top] * 0.98
    return out


def _int8(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: list[str]) -> float:
    same = sum(int((a[n] == b[n]).sum()) for n in names)
    return same / sum(a[n].size for n in names)


def _weights(path: Path) -> list[str]:
    """The 2-D float initializers of a model, in graph order."""
    return [i.name for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 (an MLP, int8 static per-channel) and its fine-tune v2: the first layer
    unchanged, the second fine-tuned, the head grown 1.3× (beyond v1's range)."""
    d = tmp_path_factory.mktemp("base-mlp")
    v1 = M.mlp_classifier(d / "v1.onnx", features=32, hidden=128, classes=8)
    np.savez(d / "calib.npz", features=M.tabular(40, 32))
    first, middle, head = _weights(v1)
    rng = np.random.default_rng(3)

    def change(name: str, w: np.ndarray) -> np.ndarray | None:
        if name == middle:
            return fine_tuned(w, rng)
        return w * 1.3 if name == head else None

    v2 = _edit(v1, d / "v2.onnx", change)
    art1 = convert(v1, d / "v1-art", config=STATIC, quantize="int8-static",
                   calibration=d / "calib.npz", version="1.0.0").artifact
    return {"dir": d, "v1": v1, "v2": v2, "art1": art1, "first": first, "middle": middle,
            "head": head}


def _v2(mlp: dict[str, Any], out: Path, **kw: Any) -> ConversionResult:
    return convert(mlp["v2"], out, config=STATIC, quantize="int8-static",
                   calibration=mlp["dir"] / "calib.npz", version="1.1.0", **kw)


def test_unchanged_weights_keep_v1s_bytes_and_a_fine_tune_changes_far_fewer(
    mlp: dict[str, Any], tmp_path: Path,
) -> None:
    with_base = _v2(mlp, tmp_path / "with", base=mlp["art1"].path)
    without = _v2(mlp, tmp_path / "without")
    assert with_base.chosen == "int8-static-minmax-base"
    assert with_base.artifact.manifest.quantization == "int8-static"
    q1 = _int8(mlp["art1"].model_path)
    qb, qo = _int8(with_base.artifact.model_path), _int8(without.artifact.model_path)
    first, middle = mlp["first"] + "_quantized", mlp["middle"] + "_quantized"
    assert qb[first].tobytes() == q1[first].tobytes()
    v1_init = {i.name: i for i in onnx.load(str(mlp["art1"].model_path)).graph.initializer}
    v2_init = {i.name: i for i in onnx.load(str(with_base.artifact.model_path)).graph.initializer}
    assert v2_init[mlp["first"] + "_scale"].SerializeToString() == \
        v1_init[mlp["first"] + "_scale"].SerializeToString()
    diff = np.abs(qb[middle].astype(np.int32) - q1[middle].astype(np.int32))
    print(f"|v2 - v1| steps: max {diff.max()}, {np.mean(diff <= 1):.2%} within 1")
    # Within a step but for the moved maxima (2% of 127 steps).
    assert np.mean(diff <= 1) >= 0.99 and diff.max() <= 3, diff.max()
    # The whole model's int8 bytes (weights and zero points) against v1's.
    names = [n for n in q1 if n in qb and n in qo and q1[n].shape == qb[n].shape == qo[n].shape]
    fine_with, fine_without = (_identical(q1, q, [middle]) for q in (qb, qo))
    all_with, all_without = (_identical(q1, q, names) for q in (qb, qo))
    print(f"identical int8 bytes vs v1, fine-tuned layer: {fine_with:.1%} with --base, "
          f"{fine_without:.1%} without; whole model: {all_with:.1%} / {all_without:.1%}")
    assert fine_with >= 0.6 and fine_with - fine_without >= 0.25
    assert all_with - all_without >= 0.2
    base = with_base.report["base"]
    assert base["used"] is True and base["version"] == "1.0.0"
    own = {r["tensor"] for r in base["weights"]["own_scale"]}
    assert mlp["first"] not in own
    assert with_base.artifact.manifest.extra["conversion"]["base"]["sha256"] == \
        mlp["art1"].manifest.sha256


def test_weight_moved_beyond_v1s_range_gets_its_own_scale_and_the_report_says_why(
    mlp: dict[str, Any], tmp_path: Path,
) -> None:
    result = _v2(mlp, tmp_path / "art", base=mlp["art1"].path)
    rows = {r["tensor"]: r["why"] for r in result.report["base"]["weights"]["own_scale"]}
    assert "8 of 8 channels: values pass the base's range by up to" in rows[mlp["head"]]
    # The logits grew with the head: their calibrated range outgrew v1's activation scale.
    acts = {r["tensor"]: r["why"] for r in result.report["base"]["activations"]["own_scale"]}
    assert "passes the base's" in acts["logits"]
    assert result.report["base"]["activations"]["reused"] >= 1
    v1_scale = numpy_helper.to_array(next(i for i in onnx.load(str(
        mlp["art1"].model_path)).graph.initializer if i.name == mlp["head"] + "_scale"))
    v2_scale = numpy_helper.to_array(next(i for i in onnx.load(str(
        result.artifact.model_path)).graph.initializer if i.name == mlp["head"] + "_scale"))
    np.testing.assert_allclose(v2_scale, v1_scale * 1.3, rtol=0.02)
    saved = json.loads((result.artifact.path / "report.json").read_text())
    assert saved["base"]["weights"]["own_scale"] == result.report["base"]["weights"]["own_scale"]
    md = (result.artifact.path / "report.md").read_text()
    assert f"own scale for {mlp['head']}: 8 of 8 channels" in md


def test_without_base_the_conversion_is_unchanged(mlp: dict[str, Any], tmp_path: Path) -> None:
    result = _v2(mlp, tmp_path / "art")
    assert "base" not in result.report and "base" not in result.report["options"]
    assert "base" not in result.artifact.manifest.extra["conversion"]
    assert not any(c["name"].endswith("-base") for c in result.report["candidates"])
    assert "Base" not in (result.artifact.path / "report.md").read_text()


def test_dynamic_int8_reuses_v1s_weight_scales(mlp: dict[str, Any], tmp_path: Path) -> None:
    def dyn(src: Path, out: Path, **kw: Any) -> ConversionResult:
        return convert(src, out, config=DYNAMIC, quantize="int8-dynamic",
                       calibration=mlp["dir"] / "calib.npz", **kw)

    v1 = dyn(mlp["v1"], tmp_path / "v1")
    with_base = dyn(mlp["v2"], tmp_path / "v2", base=v1.artifact.path)
    without = dyn(mlp["v2"], tmp_path / "v2-own")
    assert with_base.chosen == "int8-dynamic-pc-base"
    q1, qb, qo = (_int8(r.artifact.model_path) for r in (v1, with_base, without))
    first, middle = mlp["first"] + "_matmul_quantized", mlp["middle"] + "_matmul_quantized"
    assert qb[first].tobytes() == q1[first].tobytes()
    assert np.abs(qb[middle].astype(np.int32) - q1[middle].astype(np.int32)).max() <= 3
    assert _identical(q1, qb, [middle]) - _identical(q1, qo, [middle]) >= 0.25
    base = with_base.report["base"]
    assert base["activations"] is None  # dynamic: activations are quantized at run time
    own = {r["tensor"] for r in base["weights"]["own_scale"]}
    assert mlp["head"] + "_matmul" in own
    out = _run_cli_summary(mlp, tmp_path / "cli", "--quantize", "int8-dynamic", "--base",
                           str(v1.artifact.path))
    assert "base activations: quantized at run time (dynamic)" in out


def test_int8_gather_table_rows_keep_v1s_scales_unless_they_outgrew_them(
    tmp_path: Path,
) -> None:
    v1 = M.transformer_encoder(tmp_path / "v1.onnx", d=32, ff=64, vocab=1000)
    np.savez(tmp_path / "tok.npz", input_ids=M.token_ids(24, 12, vocab=1000))
    table = _weights(v1)[0]
    v2 = _edit(v1, tmp_path / "v2.onnx",
               lambda n, w: np.concatenate([w[:10] * 1.5, w[10:]]) if n == table else None)

    def gat(src: Path, out: Path, **kw: Any) -> ConversionResult:
        return convert(src, out, config=GATHER, quantize="int8-dynamic",
                       calibration=tmp_path / "tok.npz", **kw)

    r1 = gat(v1, tmp_path / "a1")
    assert r1.chosen == "int8-dynamic-matmul-pc-gather-row"
    r2 = gat(v2, tmp_path / "a2", base=r1.artifact.path)
    assert r2.chosen == "int8-dynamic-matmul-pc-gather-row-base"
    q1, q2 = _int8(r1.artifact.model_path), _int8(r2.artifact.model_path)
    # A row that grew 1.5× gets a 1.5× scale of its own: the same int8 values.
    assert q2[table + "_int8"].tobytes() == q1[table + "_int8"].tobytes()
    s1, s2 = (numpy_helper.to_array(next(i for i in onnx.load(str(r.artifact.model_path))
                                         .graph.initializer if i.name == table + "_scale"))
              for r in (r1, r2))
    assert s2[10:].tobytes() == s1[10:].tobytes()
    np.testing.assert_allclose(s2[:10], s1[:10] * 1.5, rtol=1e-6)
    others = [n for n in q1 if n.endswith("_quantized")]
    assert others and all(q2[n].tobytes() == q1[n].tobytes() for n in others)
    own = {r["tensor"]: r["why"] for r in r2.report["base"]["weights"]["own_scale"]}
    assert own[table].startswith("10 of 1000 rows: values pass the base's range")


def test_partly_matching_base_reuses_what_matches_and_says_what_does_not(
    mlp: dict[str, Any], tmp_path: Path,
) -> None:
    model = onnx.load(str(mlp["v1"]))
    for init in model.graph.initializer:
        if init.name == mlp["head"]:
            init.name = "new_head"
    for node in model.graph.node:
        node.input[:] = ["new_head" if i == mlp["head"] else i for i in node.input]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    result = convert(tmp_path / "renamed.onnx", tmp_path / "art", config=STATIC,
                     quantize="int8-static", calibration=mlp["dir"] / "calib.npz",
                     base=mlp["art1"].path)
    assert any("has no parameters for 1 of 3 weights (new_head)" in w for w in result.warnings)
    weights = result.report["base"]["weights"]
    assert weights["new"] == ["new_head"] and weights["base_only"] == [mlp["head"]]
    q1, q2 = _int8(mlp["art1"].model_path), _int8(result.artifact.model_path)
    for name in (mlp["first"], mlp["middle"]):
        assert q2[name + "_quantized"].tobytes() == q1[name + "_quantized"].tobytes()


def test_an_update_converted_with_base_serves_as_the_next_base(
    mlp: dict[str, Any], tmp_path: Path,
) -> None:
    v2 = _v2(mlp, tmp_path / "v2", base=mlp["art1"].path)
    v3 = convert(mlp["v2"], tmp_path / "v3", config=STATIC, quantize="int8-static",
                 calibration=mlp["dir"] / "calib.npz", base=v2.artifact.path)
    assert v3.chosen == "int8-static-minmax-base"
    q2, q3 = _int8(v2.artifact.model_path), _int8(v3.artifact.model_path)
    assert all(q3[n].tobytes() == q2[n].tobytes() for n in q2)


def _run_cli_summary(mlp: dict[str, Any], out: Path, *args: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["convert", str(mlp["v2"]), "-o", str(out), "--calibration",
                     str(mlp["dir"] / "calib.npz"), *args])
    assert code == 0
    return buf.getvalue()


def test_cli_base_summary_names_the_tensors_with_their_own_scale(
    mlp: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["convert", str(mlp["v2"]), "-o", str(tmp_path / "art"), "--quantize",
                 "int8-static", "--calibration", str(mlp["dir"] / "calib.npz"), "--base",
                 str(mlp["art1"].path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "base: v1 1.0.0 (int8-static-" in out
    assert f"base weights: own scale for {mlp['head']}:" in out
    assert "base activations: own scale for logits:" in out


@pytest.fixture(scope="module")
def bad_bases(mlp: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-bases")
    (d / "empty").mkdir()
    (d / "notes.txt").write_text("not an artifact\n")
    calib = mlp["dir"] / "calib.npz"
    convert(mlp["v1"], d / "float", config=STATIC, quantize="none", calibration=calib)
    convert(mlp["v1"], d / "ort", config=STATIC, quantize="int8-static", calibration=calib,
            to="ort")
    cnn = M.mobilenet_like(d / "cnn.onnx", size=16)
    np.savez(d / "img.npz", input=M.images(12, 16))
    convert(cnn, d / "cnn", config=STATIC, quantize="int8-static", calibration=d / "img.npz")
    shutil.copytree(mlp["art1"].path, d / "tampered")
    (d / "tampered" / "model.onnx").write_bytes(b"x" * mlp["art1"].manifest.size_bytes)
    return {"dir": d, "v1": mlp["art1"].path, "calib": calib}


@pytest.mark.parametrize(("case", "args", "message"), [
    ("missing", ["--base", "{dir}/nope"], "not an artifact directory"),
    ("a file", ["--base", "{dir}/notes.txt"], "not an artifact directory"),
    ("no manifest", ["--base", "{dir}/empty"], "no manifest.json"),
    ("tampered", ["--base", "{dir}/tampered"], "does not match the manifest"),
    ("float", ["--base", "{dir}/float"], "is not int8 (quantization none)"),
    ("ort", ["--base", "{dir}/ort"], "is in ort format; --base reads"),
    ("other model", ["--base", "{dir}/cnn"], "has no tensor named like the new model's weights "
     "(with their shapes); was it converted from the same architecture?"),
    ("other scheme", ["--base", "{v1}", "--quantize", "int8-dynamic"],
     "--quantize int8-dynamic cannot reuse its parameters"),
    ("to ort", ["--base", "{v1}", "--to", "ort"], "--base needs --to onnx"),
    ("no calibration", ["--base", "{v1}", "--no-calibration"], "pass --calibration too"),
])
def test_bad_base_gives_one_line_error_and_writes_nothing(
    mlp: dict[str, Any], bad_bases: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], case: str, args: list[str], message: str,
) -> None:
    out = tmp_path / "art"
    argv = [a.format(dir=bad_bases["dir"], v1=bad_bases["v1"]) for a in args]
    calib = [] if "--no-calibration" in argv else ["--calibration", str(bad_bases["calib"])]
    argv = [a for a in argv if a != "--no-calibration"]
    code = main(["convert", str(mlp["v2"]), "-o", str(out), *calib, *argv])
    assert_one_line_refusal(code, capsys.readouterr().err, message, out, case)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_base_option_is_checked_before_a_framework_export(tmp_path: Path) -> None:
    with pytest.raises(edge_sdk.UsageError, match="not an artifact directory"):
        convert("pkg.module:factory", tmp_path / "art", base=tmp_path / "nope")
    assert not (tmp_path / "art").exists()
