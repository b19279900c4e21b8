"""Judging a model on what a device really sees (drift part; merged with main)."""

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

__all__ = ["DriftConfig", "InputAccumulator", "InputDrift", "Reference", "ReportedInput",
           "channel_rule", "chi2_two_sample", "judge_input", "psi", "reference_stats"]
