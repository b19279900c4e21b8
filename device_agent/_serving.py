"""The served model and the slot that swaps it without dropping a request.

A request reads :attr:`ModelSlot.current` once and keeps that reference until
it has answered, so a swap (one attribute assignment, atomic in Python) sends
new requests to the new model while in-flight ones finish on the old one,
which is freed when its last request drops the reference.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_sdk import Predictor
from edge_sdk.errors import InputError

from ._state import ModelRecord


class HealthStats:
    """Outcomes of real inferences on one served model (for its health window)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.ok = 0
        self.errors = 0
        self.last_error: str | None = None
        self._latencies: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.ok += 1
                self._latencies.append(seconds)
            else:
                self.errors += 1
                self.last_error = error

    def reset(self) -> None:
        with self._lock:
            self.ok = self.errors = 0
            self.last_error = None
            self._latencies.clear()

    def p99_ms(self) -> float:
        with self._lock:
            if not self._latencies:
                return 0.0
            return float(np.percentile(np.fromiter(self._latencies, float), 99)) * 1e3


class Served:
    """One loaded model ready to answer requests."""

    def __init__(self, predictor: Predictor, record: ModelRecord) -> None:
        self.predictor = predictor
        self.record = record
        self.name = record.name
        self.version = record.version
        self.health = HealthStats()
        # LiteRT interpreters are not thread-safe; onnxruntime sessions are.
        self._lock: threading.Lock | None = (
            threading.Lock() if predictor.format == "tflite" else None
        )

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model; InputError for bad inputs, any other exception is a model fault
        and is counted against the model's health."""
        t0 = time.perf_counter()
        try:
            if self._lock is None:
                out = self.predictor.predict(inputs)
            else:
                with self._lock:
                    out = self.predictor.predict(inputs)
        except InputError:
            raise
        except Exception as err:
            self.health.record(time.perf_counter() - t0, f"{type(err).__name__}: {err}")
            raise
        self.health.record(time.perf_counter() - t0, None)
        return out


class ModelSlot:
    """Holds the current :class:`Served`; readers take one reference per request."""

    def __init__(self, on_change: Callable[[Served | None], None] | None = None) -> None:
        self.current: Served | None = None
        self._on_change = on_change
        self._swap_lock = threading.Lock()

    def swap(self, new: Served | None) -> Served | None:
        """Make ``new`` current and return the previous one."""
        with self._swap_lock:
            old, self.current = self.current, new
        if self._on_change is not None:
            self._on_change(new)
        return old


def smoke_test(served: Served, inputs: Mapping[str, Any], *, warmup: int = 0) -> None:
    """Run ``inputs`` through the model; raise :class:`SmokeTestError` unless every
    output is finite and has the rank and fixed dims of its signature."""
    # Warm-up is part of the test: a model that cannot run its own sample fails here,
    # reported against its deployment, whatever the runtime raised.
    for i in range(warmup):
        try:
            served.predictor.predict(inputs)
        except Exception as err:
            raise SmokeTestError(f"warm-up run {i + 1} of {warmup} on the sample failed: "
                                 f"{_first_line(err)}") from err
    try:
        out = served.predictor.predict(inputs)
    except Exception as err:
        raise SmokeTestError(f"running the sample failed: {_first_line(err)}") from err
    for spec in served.predictor.outputs:
        arr = out.get(spec.name)
        if arr is None:
            raise SmokeTestError(f"output '{spec.name}' missing from the result")
        arr = np.asarray(arr)
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and arr.shape[i] != d for i, d in enumerate(spec.shape)
        ):
            raise SmokeTestError(
                f"output '{spec.name}' has shape {list(arr.shape)}, the signature says "
                f"{spec.describe()}"
            )
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise SmokeTestError(
                f"output '{spec.name}' has {bad} non-finite value(s) (NaN or Inf) of {arr.size}"
            )
    manifest = served.predictor.manifest
    if manifest is not None:
        declared = {o.name: o for o in manifest.outputs}
        for spec in served.predictor.outputs:
            want = declared.get(spec.name)
            if want is not None and want.dtype != spec.dtype:
                raise SmokeTestError(
                    f"output '{spec.name}' is {spec.dtype}, the manifest says {want.dtype}"
                )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class SmokeTestError(Exception):
    """The new model's sample run did not give finite outputs of the right shape."""

