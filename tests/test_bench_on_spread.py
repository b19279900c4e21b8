"""`bench --on` judges a device's outputs of a quantized artifact with the rounding spread
its conversion measured: two correct CPUs (x86 without VNNI, ARM) round int8 sums apart,
and a device within that spread runs the model as this machine does."""

from __future__ import annotations

from pathlib import Path

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.cli._model import _conversion_spread
from tests import _convert_models


def test_a_quantized_artifact_carries_its_spread_and_bench_on_sends_it(tmp_path: Path) -> None:
    src = _convert_models.mlp_classifier(tmp_path / "mlp.onnx", features=64, hidden=256)
    out = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(out), "--quantize", "int8-dynamic",
                 "--force"]) == 0
    art = edge_sdk.load(out)
    spread = art.manifest.extra["conversion"]["spread"]
    assert isinstance(spread, float) and spread > 0
    assert _conversion_spread(art) == {"model": spread}


def test_a_float_artifact_claims_no_spread(tmp_path: Path) -> None:
    src = _convert_models.mlp_classifier(tmp_path / "mlp.onnx")
    out = tmp_path / "art"
    assert main(["convert", str(src), "-o", str(out), "--quantize", "none"]) == 0
    art = edge_sdk.load(out)
    assert "spread" not in art.manifest.extra["conversion"]
    assert _conversion_spread(art) is None
