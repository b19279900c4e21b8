"""Judging a model on what a device really sees: shadow runs and their gates.

- :class:`Gate`: the condition a shadow run must meet before a device is promoted.
- :class:`ShadowFigures`: what a device reports of a shadow run.
- input drift: :func:`reference_stats` (the evaluation set's per-channel statistics, in
  the manifest's ``input_stats``), :class:`InputAccumulator` (the same figures of live
  inputs), :func:`psi` and :func:`chi2_two_sample` over their histograms, and the
  host's judgement (:class:`DriftConfig`, :func:`judge_input`).
"""

from ._drift import (
    DriftConfig,
    InputAccumulator,
    InputDrift,
    Reference,
    ReportedInput,
    channel_rule,
    chi2_two_sample,
    judge_input,
    psi,
    reference_stats,
)
from ._gate import (
    FAILED,
    GATE_METRICS,
    INSUFFICIENT,
    PASSED,
    Gate,
    ShadowFigures,
    Verdict,
)

__all__ = ["FAILED", "GATE_METRICS", "INSUFFICIENT", "PASSED", "DriftConfig", "Gate",
           "InputAccumulator", "InputDrift", "Reference", "ReportedInput", "ShadowFigures",
           "Verdict", "channel_rule", "chi2_two_sample", "judge_input", "psi",
           "reference_stats"]
