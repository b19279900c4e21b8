"""Judging a model on what a device really sees: shadow runs and their gates.

- :class:`Gate`: the condition a shadow run must meet before a device is promoted.
- :class:`ShadowFigures`: what a device reports of a shadow run.
- :class:`Comparer` (built from a manifest with :meth:`Comparer.for_manifest`): a
  serving model's and a shadow model's outputs for one request compared in the task's
  terms, as a :class:`Comparison`; :class:`CompareConfig` holds the bounds.
"""

from ._compare import CompareConfig, Comparer, Comparison
from ._gate import (
    FAILED,
    GATE_METRICS,
    INSUFFICIENT,
    PASSED,
    Gate,
    ShadowFigures,
    Verdict,
)

__all__ = ["FAILED", "GATE_METRICS", "INSUFFICIENT", "PASSED", "CompareConfig", "Comparer",
           "Comparison", "Gate", "ShadowFigures", "Verdict"]
