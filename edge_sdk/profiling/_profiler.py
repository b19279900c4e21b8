"""The seam between a conversion and the devices that time its candidates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ._result import ProfilingResult


class DeviceProfiler(Protocol):
    """Times candidate models on devices (``convert --profile-on``, ``bench --on``).

    Called with ``candidates`` (name, model file), the first evaluation sample and each
    candidate's outputs on it here (name → output name → array), and ``spread``: per
    candidate, how far its outputs may differ between correct runtimes (a quantized
    candidate's distance from the float model on the sample); returns device → its
    result, whose :meth:`~ProfilingResult.timing` gives a candidate's figures. The
    implementation over a release repository and a broker is
    :class:`edge_sdk.release.RepositoryProfiler`; a test may pass any callable of this
    shape. Raises :class:`~edge_sdk.errors.EdgeError` when a device gives no figures.
    """

    def __call__(self, candidates: Sequence[tuple[str, Path]],
                 sample: Mapping[str, np.ndarray],
                 expected: Mapping[str, Mapping[str, np.ndarray]], *,
                 spread: Mapping[str, float] | None = None,
                 ) -> Mapping[str, ProfilingResult]: ...
