"""Tensor-aware binary deltas between two versions of a model file.

Host side: :func:`build_delta` (base bytes, target bytes, model format) → :class:`Delta`,
configured by :class:`DeltaConfig`. Device side: :func:`apply_delta` streams a delta and
its base into the target with memory bounded by one frame, hashing as it writes, and
raises :class:`DeltaError` unless the result is the signed target; :class:`DeltaLimits`
bounds what a device accepts. The file format is described in :mod:`._format`'s notes
(and in the README, "Delta updates").
"""

from ._apply import DeltaLimits, apply_delta, read_header
from ._build import Delta, DeltaConfig, build_delta
from ._errors import DeltaError

__all__ = [
    "Delta",
    "DeltaConfig",
    "DeltaError",
    "DeltaLimits",
    "apply_delta",
    "build_delta",
    "read_header",
]
