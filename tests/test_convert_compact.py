"""Compact auto: how ``--prefer`` weighs size against latency, and int8 embedding
tables (Gather) that make text encoders small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from converters import ConvertConfig, convert
from converters._candidates import (
    CandidateConfig,
    build_candidates,
    gather_tables,
    int8_gather_tables,
)
from converters._measure import Accuracy, MeasureConfig, Measurement, select
from edge_sdk.cli import main
from edge_sdk.errors import UsageError
from tests import _convert_models as M

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=3, warmup=1))


def _m(name: str, lat: float, size: int, drop: float = 0.001,
       scheme: str = "int8-dynamic") -> Measurement:
    acc = Accuracy("cosine", 1 - drop, drop, {"y": 1 - drop}, 10)
    return Measurement(name, scheme, name, size, latency_ms=lat, accuracy=acc)


# The MiniLM case: MatMul-only int8 is fastest but keeps the float embedding table;
# the Gather variant is a little slower and a third of the size.
ENCODER = [
    _m("fp32", 1.00, 100, 0.0, "none"),
    _m("matmul-pc", 0.28, 77),
    _m("matmul-pc-gather", 0.30, 25),
    _m("pc", 0.41, 24),
    _m("over-budget", 0.20, 20, drop=0.05),
    _m("slower-than-fp32", 1.20, 10),
]


def test_prefer_balanced_allowance_is_judged_at_the_lower_quartile_of_round_ratios() -> None:
    from dataclasses import replace

    base = replace(_m("fp32", 1.00, 100, 0.0, "none"), latency_rounds_ms=(1.0,) * 5)
    fast = replace(_m("matmul-pc", 0.28, 77), latency_rounds_ms=(0.28,) * 5)
    # Per round 1.00, 1.07, 1.18, 1.29, 1.36 × the fastest: the median (1.18×) is over
    # 10 %, the lower quartile (1.07×) is not: within the noise band.
    noisy = replace(_m("matmul-pc-gather", 0.33, 25),
                    latency_rounds_ms=(0.28, 0.30, 0.33, 0.36, 0.38))
    sel = select([base, fast, noisy], baseline="fp32", max_drop=0.01, prefer="balanced")
    assert sel.chosen.name == "matmul-pc-gather"
    assert "at most 10% slower than the fastest, matmul-pc (1.18× (IQR 1.07–1.29" in sel.why
    quiet = replace(noisy, latency_rounds_ms=(0.33,) * 5)
    sel = select([base, fast, quiet], baseline="fp32", max_drop=0.01, prefer="balanced")
    assert sel.chosen.name == "matmul-pc"


def test_prefer_latency_takes_the_fastest_even_when_a_near_one_is_much_smaller() -> None:
    sel = select(ENCODER, baseline="fp32", max_drop=0.01, prefer="latency")
    assert sel.chosen.name == "matmul-pc"
    assert sel.why.startswith("matmul-pc: fastest") and "0.28× fp32 latency" in sel.why
    assert "the fastest wins" in sel.rule and "unless" not in sel.rule


def test_prefer_balanced_trades_a_little_latency_for_less_than_half_the_size() -> None:
    sel = select(ENCODER, baseline="fp32", max_drop=0.01, prefer="balanced")
    assert sel.chosen.name == "matmul-pc-gather"
    assert "at most 10% slower than the fastest, matmul-pc (1.07×)" in sel.why
    assert "under 50% of its size (0.32×)" in sel.why
    assert "0.30× fp32 latency, 0.25× size" in sel.why
    assert ("unless one at most 10% slower than the fastest (the lower quartile of its "
            "per-round ratios to it at most 1.10) is less than 50% of its size") in sel.rule


def test_prefer_balanced_keeps_the_fastest_when_the_small_one_is_too_slow() -> None:
    ms = [_m("fp32", 1.0, 100, 0.0, "none"), _m("fast", 0.28, 77), _m("small", 0.35, 25)]
    sel = select(ms, baseline="fp32", max_drop=0.01, prefer="balanced")
    assert sel.chosen.name == "fast"
    assert "the nearest under 50% of its size, small at 0.32×, is 1.25× the latency of the " \
        "fastest, more than 1.10×" in sel.why


def test_prefer_balanced_keeps_the_fastest_when_the_near_one_is_not_half_its_size() -> None:
    ms = [_m("fp32", 1.0, 100, 0.0, "none"), _m("fast", 0.28, 40), _m("near", 0.30, 25)]
    assert select(ms, baseline="fp32", max_drop=0.01, prefer="balanced").chosen.name == "fast"


def test_balanced_tolerances_come_from_the_caller() -> None:
    ms = [_m("fp32", 1.0, 100, 0.0, "none"), _m("fast", 0.28, 77), _m("small", 0.35, 25)]
    sel = select(ms, baseline="fp32", max_drop=0.01, prefer="balanced",
                 balanced_max_slowdown=0.30, balanced_max_size_ratio=0.4)
    assert sel.chosen.name == "small"
    assert "at most 30% slower" in sel.rule and "less than 40% of its size" in sel.rule


def test_prefer_size_takes_the_smallest_within_budget_not_slower_than_fp32() -> None:
    sel = select(ENCODER, baseline="fp32", max_drop=0.01, prefer="size")
    assert sel.chosen.name == "pc"
    assert sel.why.startswith("pc: smallest (0.31× the size and 1.46× the latency of the "
                              "fastest, matmul-pc)")
    assert "the smallest wins" in sel.rule


def test_prefer_size_breaks_equal_sizes_by_latency() -> None:
    ms = [_m("fp32", 1.0, 100, 0.0, "none"), _m("a", 0.5, 25), _m("b", 0.4, 25)]
    assert select(ms, baseline="fp32", max_drop=0.01, prefer="size").chosen.name == "b"


@pytest.mark.parametrize("prefer", ["latency", "size", "balanced"])
def test_every_preference_keeps_fp32_when_nothing_else_qualifies(prefer: str) -> None:
    ms = [_m("fp32", 1.0, 100, 0.0, "none"), _m("bad", 0.5, 25, drop=0.2),
          _m("slow", 1.3, 25)]
    sel = select(ms, baseline="fp32", max_drop=0.01, prefer=prefer)
    assert sel.chosen.name == "fp32" and "bad over budget" in sel.why


def test_prefer_applies_among_the_variants_of_a_requested_scheme() -> None:
    sel = select(ENCODER, baseline="fp32", max_drop=0.01, requested="int8-dynamic",
                 prefer="size")
    # "slower-than-fp32" may be chosen: an explicit scheme is not held to fp32's latency.
    assert sel.chosen.name == "slower-than-fp32" and sel.warnings
    assert sel.rule.startswith("among the int8-dynamic variants within the accuracy budget")


def test_unknown_preference_is_refused() -> None:
    with pytest.raises(UsageError, match="--prefer 'tiny' is not one of"):
        convert(Path("unused.onnx"), Path("unused"), prefer="tiny")


def test_balanced_tolerances_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="balanced_max_size_ratio"):
        MeasureConfig(balanced_max_size_ratio=0.0)
    with pytest.raises(ValueError, match="balanced_max_slowdown"):
        MeasureConfig(balanced_max_slowdown=-0.1)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("compact-mlp")
    np.savez(d / "tab.npz", features=M.tabular(16))
    return M.mlp_classifier(d / "mlp.onnx", hidden=32), d / "tab.npz"


def test_report_md_states_the_choice_rule_of_the_preference(
    mlp: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, calib = mlp
    for prefer in ("size", "balanced"):
        res = convert(model, tmp_path / prefer, calibration=calib, quantize="int8-dynamic",
                      prefer=prefer, config=FAST)
        md = (res.artifact.path / "report.md").read_text()
        assert f"Choice rule (--prefer {prefer}): among the int8-dynamic variants" in md
        assert res.report["options"]["prefer"] == prefer


def test_cli_prefer_flag_reaches_the_report(
    mlp: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model, calib = mlp
    code = main(["convert", str(model), "-o", str(tmp_path / "art"), "--calibration",
                 str(calib), "--quantize", "int8-dynamic", "--prefer", "size", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["options"]["prefer"] == "size" and "the smallest wins" in data["rule"]


def test_cli_bad_prefer_value_is_a_one_line_usage_error(
    mlp: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "art"
    code = main(["convert", str(mlp[0]), "-o", str(out), "--prefer", "tiny"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edge-sdk: error:") and err.count("\n") == 1, err
    assert "'--prefer'" in err and "'tiny'" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A text encoder whose embedding table is most of its bytes (4000 × 64 floats)."""
    d = tmp_path_factory.mktemp("compact-encoder")
    np.savez(d / "tok.npz", input_ids=M.token_ids(16, 16, vocab=4000))
    return (M.transformer_encoder(d / "encoder.onnx", d=64, heads=2, ff=128, layers=1,
                                  vocab=4000), d / "tok.npz")


GATHER_VARIANTS = ("int8-dynamic-matmul-pc-gather", "int8-dynamic-matmul-pc-gather-row")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_auto_on_an_embedding_encoder_measures_int8_gather_variants_far_below_matmul_only(
    encoder: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, calib = encoder
    cfg = ConvertConfig(measure=FAST.measure, candidates=CandidateConfig(
        static_methods=("minmax",), static_per_tensor_methods=()))
    res = convert(model, tmp_path / "art", calibration=calib, config=cfg)
    rows = {r["name"]: r for r in res.report["candidates"]}
    matmul_only = rows["int8-dynamic-matmul-pc"]
    for name in GATHER_VARIANTS:
        row = rows[name]
        assert row["status"] not in ("failed", "no-op"), row
        assert row["accuracy"]["score"] >= 0.99
        assert row["size_bytes"] < 0.4 * matmul_only["size_bytes"]


def test_gather_variants_gather_int8_rows_and_reproduce_the_float_outputs(
    encoder: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, _ = encoder
    cands = {c.name: c for c in build_candidates(model, tmp_path, ["none", "int8-dynamic"],
                                                 calibration=None)}
    ids = M.token_ids(6, 16, vocab=4000, seed=1)
    feeds = [{"input_ids": ids[i:i + 1]} for i in range(6)]
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for name in GATHER_VARIANTS:
        c = cands[name]
        assert c.path is not None and c.error is None
        m = onnx.load(str(c.path))
        inits = {i.name: i for i in m.graph.initializer}
        gathers = [n for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and list(inits[n.input[0]].dims) == [4000, 64]]
        assert gathers and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8
                               for n in gathers)
        assert not any(i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [4000, 64]
                       for i in m.graph.initializer)
        sess = ort.InferenceSession(str(c.path), providers=["CPUExecutionProvider"])
        cos = [_cosine(sess.run(None, f)[0], ref.run(None, f)[0]) for f in feeds]
        assert min(cos) >= 0.99, (name, cos)


def test_models_without_a_float_embedding_table_get_no_gather_variant(
    mlp: tuple[Path, Path], encoder: tuple[Path, Path], tmp_path: Path,
) -> None:
    names = [c.name for c in build_candidates(mlp[0], tmp_path / "mlp", ["int8-dynamic"],
                                              calibration=None)]
    assert names and not any("gather" in n for n in names)
    names = [c.name for c in build_candidates(encoder[0], tmp_path / "enc", ["int8-dynamic"],
                                              calibration=None, exclude_ops=["Gather"])]
    assert not any("gather" in n for n in names)


def test_a_table_also_read_by_another_op_stays_float() -> None:
    """Tied embeddings: the table the Gather reads also projects back to the vocabulary."""
    emb = numpy_helper.from_array(np.ones((10, 4), np.float32), "emb")
    pos = numpy_helper.from_array(np.ones((8, 4), np.float32), "pos")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]),
             helper.make_node("Gather", ["pos", "ids"], ["p"], axis=0),
             helper.make_node("Add", ["x", "p"], ["h"]),
             helper.make_node("Transpose", ["emb"], ["embT"]),
             helper.make_node("MatMul", ["h", "embT"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [3, 10])],
        [emb, pos])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert gather_tables(model) == ["pos"]
    q = int8_gather_tables(model, ["pos"], per_row=True)
    kinds = {i.name: i.data_type for i in q.graph.initializer}
    assert kinds["emb"] == onnx.TensorProto.FLOAT and kinds["pos_int8"] == onnx.TensorProto.INT8
