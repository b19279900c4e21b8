"""Judging a model on what a device really sees: shadow runs and their gates.

- :class:`Gate`: the condition a shadow run must meet before a device is promoted.
- :class:`ShadowFigures`: what a device reports of a shadow run.
- :class:`Comparer` (built from a manifest with :meth:`Comparer.for_manifest`): a
  serving model's and a shadow model's outputs for one request compared in the task's
  terms, as a :class:`Comparison`; :class:`CompareConfig` holds the bounds.
- Per-sample task arithmetic the converter's accuracy check shares with the comparer
  (one copy, so workstation and device judge alike): :class:`DetectConfig`,
  :func:`decode`, :func:`detections`, :func:`nms`, :func:`iou`, :func:`match_detections`,
  :func:`class_changes`, :func:`corners`, :func:`cosine`, :func:`softmax`,
  :func:`is_probabilities`, :func:`segment_layout`, :func:`segment_counts`,
  :func:`abs_error`.
- Input drift: :func:`reference_stats` (the evaluation set's per-channel statistics, in
  the manifest's ``input_stats``), :class:`InputAccumulator` (the same figures of live
  inputs), :func:`psi` and :func:`chi2_two_sample` over their histograms, and the
  host's judgement (:class:`DriftConfig`, :func:`judge_input`).
"""

from ._compare import CompareConfig, Comparer, Comparison
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
from ._taskmath import (
    DetectConfig,
    abs_error,
    class_changes,
    corners,
    cosine,
    decode,
    detections,
    iou,
    is_probabilities,
    match_detections,
    nms,
    segment_counts,
    segment_layout,
    softmax,
)

__all__ = [
    "FAILED",
    "GATE_METRICS",
    "INSUFFICIENT",
    "PASSED",
    "CompareConfig",
    "Comparer",
    "Comparison",
    "DetectConfig",
    "DriftConfig",
    "Gate",
    "InputAccumulator",
    "InputDrift",
    "Reference",
    "ReportedInput",
    "ShadowFigures",
    "Verdict",
    "abs_error",
    "channel_rule",
    "chi2_two_sample",
    "class_changes",
    "corners",
    "cosine",
    "decode",
    "detections",
    "iou",
    "is_probabilities",
    "judge_input",
    "match_detections",
    "nms",
    "psi",
    "reference_stats",
    "segment_counts",
    "segment_layout",
    "softmax",
]
