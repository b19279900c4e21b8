"""The served model and the slot that swaps it without dropping a request.

A request reads its model from :class:`ModelSlots` once and keeps that reference until
it has answered, so a swap (one attribute assignment, atomic in Python) sends
new requests to the new model while in-flight ones finish on the old one,
which is freed when its last request drops the reference.

Whose fault a runtime failure is: a request that fits the signature can still fail in
the runtime (a model that only runs sizes divisible by 32). Outside a health window that
is the input's doing and is never counted. Inside one, :class:`Trial` runs the input on
the version the new model replaced: a failure both show is the client's; only a failure
the new version introduced counts against it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from edge_sdk import Predictor
from edge_sdk._internal import one_line
from edge_sdk.errors import InputError, InstallError

from ._config import HealthConfig
from ._state import ModelRecord


class HealthStats:
    """Outcomes of real inferences on one served model (for its health window)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.ok = 0
        self.errors = 0
        #: Failed requests not counted in :attr:`errors`: the previous version fails on
        #: them too, or they were not compared (see :class:`Trial`).
        self.excused = 0
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

    def excuse(self) -> None:
        with self._lock:
            self.excused += 1

    def reset(self) -> None:
        with self._lock:
            self.ok = self.errors = self.excused = 0
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
        #: While this model is in its health window: the version it replaced, to tell
        #: whose fault a failed request is (set and cleared by the installer).
        self.trial: Trial | None = None
        # LiteRT interpreters are not thread-safe; onnxruntime sessions are.
        self._lock: threading.Lock | None = (
            threading.Lock() if predictor.format == "tflite" else None
        )

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model and record nothing; InputError when ``inputs`` do not fit the
        signature."""
        if self._lock is None:
            return self.predictor.predict(inputs)
        with self._lock:
            return self.predictor.predict(inputs)

    def predict(self, inputs: Mapping[str, Any], *,
                count_failure: bool = True) -> dict[str, np.ndarray]:
        """Run the model, recording the outcome in :attr:`health`; InputError for bad
        inputs (never counted). Any other exception is counted as a failure of the model
        unless ``count_failure`` is False: a client's request, whose failure the caller
        hands to :meth:`blame`."""
        t0 = time.perf_counter()
        try:
            out = self.run(inputs)
        except InputError:
            raise
        except Exception as err:
            if count_failure:
                self.health.record(time.perf_counter() - t0, f"{type(err).__name__}: {err}")
            raise
        self.health.record(time.perf_counter() - t0, None)
        return out

    def blame(self, inputs: Mapping[str, Any], err: BaseException) -> Verdict:
        """Whose fault it is that this model failed with ``err`` on a client's ``inputs``
        (which fit its signature); counted against the model when it is the model's."""
        trial = self.trial
        verdict = trial.judge(inputs) if trial is not None else NO_TRIAL
        if verdict.counted:
            self.health.record(0.0, f"{type(err).__name__}: {err}")
        else:
            self.health.excuse()
        return verdict


@dataclass(frozen=True)
class Verdict:
    """Whose fault a runtime failure on a client's request is."""

    #: ``model``: the previous version runs this input, so the new one introduced the
    #: failure (counted against it); ``client``: the previous version fails on it too;
    #: ``unjudged``: not compared (a bound of ``[health]`` was reached, or the previous
    #: version takes other inputs); ``no_trial``: no health window, nothing to compare.
    kind: str
    #: Said to the client after the runtime's message (empty for ``no_trial``).
    note: str = ""

    @property
    def counted(self) -> bool:
        return self.kind == "model"


NO_TRIAL = Verdict("no_trial")
#: Verdicts remembered per trial, so that a request sent again is not run again.
_KNOWN = 256


class Trial:
    """The version a model on trial replaced, kept loaded for the health window to re-run
    the requests the new model fails on.

    Bounded, so that a flood of failing requests cannot multiply the device's work: at
    most ``health.recheck_per_s`` re-runs a second (a burst of as many), one at a time
    on one thread, ``health.recheck_queue`` waiting behind it; a request waits
    ``health.recheck_timeout_s`` for the answer. Identical inputs are re-run once (the
    verdict is kept). A failure that is not re-run is not counted."""

    def __init__(self, previous: Served, config: HealthConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.previous = previous
        self._cfg = config
        self._clock = clock
        self._lock = threading.Lock()
        self._burst = max(1.0, config.recheck_per_s)
        self._tokens = self._burst
        self._stamp = clock()
        self._waiting = threading.BoundedSemaphore(config.recheck_queue + 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="agent-recheck")
        self._known: OrderedDict[bytes, Verdict] = OrderedDict()
        self._closed = False

    def judge(self, inputs: Mapping[str, Any]) -> Verdict:
        """The verdict on a failure of the new model on ``inputs``."""
        key = _digest(inputs)
        was = f"version {self.previous.version}"
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
                return known
            if self._closed:
                return Verdict("unjudged", "not compared: the health window is over")
            if not self._take():
                return Verdict("unjudged", f"not compared with {was}: over "
                                           f"health.recheck_per_s ({self._cfg.recheck_per_s:g})")
        if not self._waiting.acquire(blocking=False):
            return Verdict("unjudged", f"not compared with {was}: health.recheck_queue "
                                       f"({self._cfg.recheck_queue}) is full")
        try:
            future = self._pool.submit(self._recheck, key, inputs)
        except RuntimeError:  # closed meanwhile
            self._waiting.release()
            return Verdict("unjudged", "not compared: the health window is over")
        try:
            return future.result(timeout=self._cfg.recheck_timeout_s)
        except TimeoutError:
            return Verdict("unjudged", f"not compared: {was} did not answer within "
                                       f"health.recheck_timeout_s "
                                       f"({self._cfg.recheck_timeout_s:g} s)")
        except concurrent.futures.CancelledError:
            return Verdict("unjudged", "not compared: the health window is over")

    def close(self) -> None:
        """End the trial: no more re-runs (one running finishes on its thread)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst,
                           self._tokens + (now - self._stamp) * self._cfg.recheck_per_s)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _recheck(self, key: bytes, inputs: Mapping[str, Any]) -> Verdict:
        was = f"version {self.previous.version}"
        try:
            try:
                self.previous.run(inputs)
            except InputError:
                verdict = Verdict("unjudged", f"not compared: {was} takes other inputs")
            except Exception:
                verdict = Verdict("client", f"{was} fails on it too")
            else:
                verdict = Verdict("model", f"{was} runs this input")
            with self._lock:
                self._known[key] = verdict
                while len(self._known) > _KNOWN:
                    self._known.popitem(last=False)
            return verdict
        finally:
            self._waiting.release()


def _digest(inputs: Mapping[str, Any]) -> bytes:
    """Identifies a request's inputs: names, dtypes, shapes and every value."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        arr = np.asarray(inputs[name])
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        if arr.dtype.kind == "O":
            h.update(json.dumps([str(v) for v in arr.reshape(-1).tolist()]).encode())
        else:
            h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    return h.digest()


@dataclass(frozen=True)
class Wanted:
    """A model the device should serve (its installed state names it), given to the
    endpoint by the agent: one that does not serve is listed UNAVAILABLE, and the
    device is not ready."""

    name: str
    version: str
    #: Why it does not serve, when the agent knows (said with UNAVAILABLE).
    reason: str = ""


#: States of the repository index (Triton's names).
READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelState:
    """One model of the repository index: serving (READY), or wanted and not serving."""

    name: str
    version: str
    state: str
    reason: str = ""


def model_states(served: Mapping[str, Served], wanted: Iterable[Wanted]) -> list[ModelState]:
    """Every model that serves or should, sorted by name: READY with the version that
    serves, else UNAVAILABLE with the wanted version and why."""
    out = {name: ModelState(name, s.version, READY) for name, s in served.items()}
    for w in wanted:
        if w.name not in out:
            out[w.name] = ModelState(w.name, w.version, UNAVAILABLE,
                                     w.reason or f"version {w.version} is installed but not "
                                                 "loaded")
    return [out[name] for name in sorted(out)]


class ModelSlots:
    """The served models by name. A request reads :meth:`get` once and keeps that
    :class:`Served` until it has answered; :meth:`swap` replaces the whole name → model
    mapping in one assignment, so a set of models changes for new requests at once and a
    swap of one model never touches a request to another."""

    def __init__(self, on_change: Callable[[str, Served | None], None] | None = None) -> None:
        self._models: Mapping[str, Served] = MappingProxyType({})
        self._on_change = on_change
        self._swap_lock = threading.Lock()

    def get(self, name: str) -> Served | None:
        return self._models.get(name)

    def all(self) -> Mapping[str, Served]:
        """A snapshot of every served model by name (never changed afterwards)."""
        return self._models

    @property
    def current(self) -> Served | None:
        """The model swapped in last that still serves (None when none does): what the
        state report's ``model`` names for readers that know one model per device."""
        served = list(self._models.values())  # in the order swapped in
        return served[-1] if served else None

    def swap(self, changes: Mapping[str, Served | None]) -> dict[str, Served | None]:
        """Serve ``changes`` (a name → model, or None to stop serving that name) at once;
        returns what each changed name served before."""
        with self._swap_lock:
            new = dict(self._models)
            old = {name: new.pop(name, None) for name in changes}
            new.update({n: s for n, s in changes.items() if s is not None})
            self._models = MappingProxyType(new)
        if self._on_change is not None:
            for name, served in changes.items():
                self._on_change(name, served)
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
                                 f"{one_line(err)}") from err
    try:
        out = served.predictor.predict(inputs)
    except Exception as err:
        raise SmokeTestError(f"running the sample failed: {one_line(err)}") from err
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


class SmokeTestError(InstallError):
    """The new model's sample run did not give finite outputs of the right shape."""

