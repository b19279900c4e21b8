"""Latency measurement shared by ``edge-sdk bench`` and the converters."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._artifact import TensorSpec


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], Any], *, runs: int = 100, warmup: int = 10) -> LatencyStats:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls one by one."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter
    for i in range(runs):
        t0 = clock()
        fn()
        times[i] = clock() - t0
    ms = times * 1e3
    mean = float(ms.mean())
    return LatencyStats(
        runs=runs,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=mean,
        min_ms=float(ms.min()),
        throughput_per_s=1e3 / mean if mean > 0 else float("inf"),
    )


def synthetic_inputs(
    specs: Sequence[TensorSpec], *, batch: int = 1, seed: int = 0,
    dims: Mapping[str, int] | None = None, other: int = 1,
) -> dict[str, np.ndarray]:
    """Random inputs matching ``specs``; symbolic dims become ``batch`` (axis 0) or
    ``other``, unless ``dims`` names their size.

    Float inputs are standard normal, integer inputs small non-negative values
    (valid token ids / indices for most models), string inputs short ASCII words,
    booleans random; every other dtype is zeros.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and dims and d in dims:
                shape.append(dims[d])
            else:
                shape.append(batch if i == 0 else other)
        if spec.dtype == "str":
            # onnxruntime takes string tensors as numpy object arrays of str.
            words = np.array(["a", "the", "edge", "model"], dtype=object)
            out[spec.name] = words[rng.integers(0, len(words), shape)]
            continue
        dt = np.dtype(spec.dtype)
        if dt.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(dt)
        elif dt.kind in "iu":
            out[spec.name] = rng.integers(0, 8, shape).astype(dt)
        else:
            out[spec.name] = np.zeros(shape, dtype=dt)
    return out
