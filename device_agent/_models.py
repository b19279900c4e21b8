"""The models this process holds open: a stored model opened into a :class:`Served`,
re-verified and smoke-tested with its sample; kept by record id (those served, those being
installed and, in a trial, the versions they replaced, for a quick rollback and to tell a
client's bad request from the new model's fault). A model nothing serves is let go.

Letting go of a model gives its memory back to the system: when the last reference to
a model opened here goes (the slots, this keeper, a trial, a request in flight, a caller's
local), the heap pages its weights and runtime arena occupied are returned (glibc's
``malloc_trim``, a moment later). Without that glibc keeps them for later allocations,
and a device that replaces or removes models grows by about the size of each one it
dropped (measured: 16-95 MB over 20 cycles of a 32 MB model; under 1 MB with it).
onnxruntime's CPU arena stays on (its default): it lives and dies with its session, and
turning it off made a serving model's heap grow 3x faster in the same measurement.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from edge_sdk._internal import load_npz, synthetic_inputs
from edge_sdk.errors import EdgeError

from ._config import AgentConfig
from ._interfaces import ModelLoader
from ._serving import Served, SmokeTestError, Trial, smoke_test
from ._state import ModelRecord, StateStore

log = logging.getLogger("device_agent")


class LoadedModels:
    def __init__(self, config: AgentConfig, store: StateStore, open_model: ModelLoader) -> None:
        self.config = config
        self.store = store
        self._open_model = open_model
        self._by_id: dict[str, Served] = {}

    def get(self, record: ModelRecord) -> Served | None:
        return self._by_id.get(record.id)

    def load(self, record: ModelRecord, *, smoke: bool = True,
             verify_hash: bool = True) -> Served:
        """Open (and, with ``smoke``, smoke-test) the stored model, and keep it. Its hash
        is checked again unless ``verify_hash`` is False (see
        :meth:`StateStore.open_model <device_agent._state.StateStore.open_model>`)."""
        art = self.store.open_model(record, verify_hash=verify_hash)
        threads = self.config.threads or None
        predictor = self._open_model(art.model_path, threads=threads, manifest=art.manifest)
        served = Served(predictor, record)
        weakref.finalize(served, _release_soon).atexit = False
        if smoke:
            self.smoke(served)
        self._by_id[record.id] = served
        return served

    def keep(self, ids: Iterable[str]) -> bool:
        """Let go of every model but these (a request still running on one keeps it until
        it answers; its memory is given back once it has); True when one was let go."""
        keep = set(ids)
        return self._let_go([k for k in self._by_id if k not in keep])

    def forget(self, records: Iterable[ModelRecord]) -> bool:
        """Let go of these models (removed from the device, or replaced and no longer
        needed for a rollback) and give their memory back; True when one was let go."""
        return self._let_go([r.id for r in records])

    def _let_go(self, ids: list[str]) -> bool:
        # Nothing here may name a dropped model: that would keep it alive. Its memory is
        # released as the last reference goes (see :func:`_release_soon`), here or when a
        # request still running on it ends. No gc.collect(): a full collection holds the
        # GIL, and so stalls every request, for 15-20 ms (measured); a model caught in a
        # reference cycle goes with the next automatic one.
        dropped = False
        for i in ids:
            dropped |= self._by_id.pop(i, None) is not None
        return dropped

    def __len__(self) -> int:
        return len(self._by_id)

    def smoke(self, served: Served) -> None:
        try:
            inputs = self.sample(served)
        except (EdgeError, OSError, ValueError) as err:
            raise SmokeTestError(f"cannot read the sample: {err}") from err
        smoke_test(served, inputs, warmup=self.config.limits.warmup_runs)

    def sample(self, served: Served) -> Mapping[str, Any]:
        """The inputs ``served`` is tested with: its artifact's sample, else synthetic."""
        art_dir = self.store.model_dir(served.record)
        manifest = served.predictor.manifest
        if manifest is not None and manifest.sample:
            data = load_npz(art_dir / manifest.sample)
            names = [s.name for s in served.predictor.inputs]
            missing = [n for n in names if n not in data]
            if missing:
                raise SmokeTestError(f"sample file lacks input(s) {', '.join(missing)}")
            return {n: data[n] for n in names}
        return synthetic_inputs(served.predictor.inputs)

    def start_trial(self, served: Served, previous: ModelRecord | None) -> None:
        """Keep the version ``served`` replaced at hand for its health window, loading it
        when a restart left it on disk only: a request both fail on is the client's."""
        if served.trial is not None or previous is None:
            return
        old = self.get(previous)
        if old is None:
            try:
                old = self.load(previous)
            except (EdgeError, SmokeTestError, OSError) as err:
                log.warning("previous model %s cannot be loaded to compare failed requests "
                            "with (none is counted against %s): %s", previous.label(),
                            served.record.label(), err)
                return
        served.trial = Trial(old, self.config.health)

    def end_trial(self, served: Served) -> None:
        trial, served.trial = served.trial, None
        if trial is not None:
            trial.close()
        if served.health.excused:
            log.info("%d failed request(s) in the health window of %s were not counted "
                     "against it (see edge_agent_trial_failures)", served.health.excused,
                     served.record.label())



#: Delay between a model's last reference going and the trim: its finalizer runs before
#: the model's runtime objects are freed, so the trim waits for them.
_TRIM_DELAY_S = 0.05
_released = 0
_released_lock = threading.Lock()
#: Whether a release is scheduled, and when the last model was let go of: models freed
#: together (a set, a fleet simulator's agents) share one release, made once the last
#: of them is freed.
_scheduled = False
_last_freed = 0.0


def _release_soon() -> None:
    global _scheduled, _last_freed
    with _released_lock:
        _last_freed = time.monotonic()
        if _scheduled:
            return
        _scheduled = True
    _release_in(_TRIM_DELAY_S)


def _release_in(seconds: float) -> None:
    timer = threading.Timer(seconds, _scheduled_release)
    timer.daemon = True
    timer.name = "agent-release-memory"
    timer.start()


def _scheduled_release() -> None:
    global _scheduled
    with _released_lock:
        wait = _last_freed + _TRIM_DELAY_S - time.monotonic()
        if wait > 0:  # another model was let go of meanwhile: wait for it too
            _release_in(wait)
            return
        _scheduled = False
    release_memory()


def release_memory() -> None:
    """Return the heap pages that are free to the system (glibc's ``malloc_trim``; a
    no-op elsewhere)."""
    global _released
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    with _released_lock:
        _released += 1


def releases() -> int:
    """How many times this process has released memory (a model it let go of is freed
    before the count grows)."""
    return _released


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``: returns free heap pages of every arena to the system (a
    model's freed weights included), which ``free`` alone does not. None off glibc."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, ValueError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn
