"""Judging a model on what a device really sees: shadow runs and their gates.

- :class:`Gate`: the condition a shadow run must meet before a device is promoted.
- :class:`ShadowFigures`: what a device reports of a shadow run.
"""

from ._gate import (
    FAILED,
    GATE_METRICS,
    INSUFFICIENT,
    PASSED,
    Gate,
    ShadowFigures,
    Verdict,
)

__all__ = ["FAILED", "GATE_METRICS", "INSUFFICIENT", "PASSED", "Gate", "ShadowFigures",
           "Verdict"]
