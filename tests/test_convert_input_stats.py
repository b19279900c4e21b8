"""The evaluation set's input statistics travel with the artifact (drift's reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import edge_sdk
from converters import ConvertConfig, convert
from converters._candidates import CandidateConfig
from converters._data import load_samples
from converters._measure import MeasureConfig
from edge_sdk.quality import reference_stats
from tests import _convert_models as M

FAST = ConvertConfig(measure=MeasureConfig(rounds=1, runs_per_round=2, warmup=1),
                     candidates=CandidateConfig(static_methods=("minmax",)))


def test_manifest_and_report_carry_the_evaluation_sets_input_statistics(
        tmp_path: Path) -> None:
    model = M.mlp_classifier(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "eval.npz", features=M.tabular(30, seed=3) * 4.0 + 2.0)
    result = convert(model, tmp_path / "art", quantize="none", eval=tmp_path / "eval.npz",
                     config=FAST)
    stats = result.artifact.manifest.extra["input_stats"]
    specs = edge_sdk.load(model).inputs
    want = reference_stats(load_samples(tmp_path / "eval.npz", specs).feeds)
    assert stats == json.loads(json.dumps(want))
    x = stats["features"]
    assert x["axis"] == 1 and x["channels_in"] == 20 and x["samples"] == 30
    assert len(x["channels"]) == 20 and len(x["edges"][0]) == 11
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["input_stats"] == stats
    # what a device reads back: the manifest of the loaded artifact
    loaded = edge_sdk.load(tmp_path / "art").manifest
    assert loaded is not None and loaded.extra["input_stats"] == stats


def test_synthetic_evaluation_data_gives_no_reference(tmp_path: Path) -> None:
    model = M.mlp_classifier(tmp_path / "mlp.onnx")
    result = convert(model, tmp_path / "art", quantize="none", config=FAST)
    assert "input_stats" not in result.artifact.manifest.extra
    assert "input_stats" not in result.report
