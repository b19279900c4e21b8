"""Shared checks of the conversion tests: a fast measuring config and how a refused
conversion must look."""

from __future__ import annotations

from pathlib import Path

from converters import ConvertConfig
from converters._candidates import CandidateConfig
from converters._measure import MeasureConfig

FAST = ConvertConfig(
    measure=MeasureConfig(rounds=2, runs_per_round=3, warmup=1),
    candidates=CandidateConfig(static_methods=("minmax", "percentile")),
)


def assert_one_line_refusal(code: int, err: str, message: str, out: Path, case: str) -> None:
    """A refused conversion: non-zero exit, one line naming ``message``, nothing written."""
    assert code != 0, case
    assert err.startswith("edge-sdk: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists()
