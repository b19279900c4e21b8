"""The install pipeline: a deployment in, a verified model serving (or the old one kept) out.

Everything that touches the network or signatures sits behind
:class:`ArtifactSource`; the pipeline itself is broker-free and is driven
directly by the tests with a source that serves local artifacts.

Order of durable steps (see ``_state``): the new model is copied complete into
``models/`` first, then ``installed.json`` is switched to ``phase="trial"``
(current = new, previous = old), then the in-memory swap happens. A restart
inside the trial resumes the health window once (``health.max_restarts``) and
rolls back after that, so a model that crashes the agent cannot crash-loop it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_sdk import Artifact
from edge_sdk._internal import load_model_file, load_npz, synthetic_inputs
from edge_sdk.errors import (
    ConfigError,
    EdgeError,
    InstallError,
    TransportError,
    VerificationError,
)

from ._config import AgentConfig
from ._events import (
    Accepted,
    Adopted,
    Boot,
    CleanModels,
    CleanPartial,
    CrashPoint,
    Effect,
    Event,
    Failed,
    Fetched,
    Healthy,
    Loaded,
    LoadModel,
    ModelLoaded,
    ModelUnusable,
    NoSpace,
    Refused,
    Report,
    Resume,
    Retry,
    SaveState,
    SmokeTested,
    StateChanged,
    Swap,
    Unhealthy,
    Unwritable,
    Verified,
    WatchHealth,
)
from ._intake import Unverified
from ._interfaces import ArtifactSource, InstallRequest, ModelLoader, Reporter
from ._lifecycle import (
    Life,
    Mode,
    handled,
    step,
)
from ._serving import ModelSlot, Served, SmokeTestError, Trial, smoke_test
from ._state import InstalledState, ModelRecord, StateStore

log = logging.getLogger("device_agent")

#: Test-only: kill the agent with SIGKILL when it reaches the named point; with a
#: ``:thread`` suffix (``install_started:thread``) end only the thread that reached it.
CRASH_ENV = "EDGE_SDK_AGENT_CRASH_AT"
#: Every crash point, in the order an install reaches them. The last two are reached
#: at boot, after a restart inside a trial: ``boot_trial_saved`` when the trial
#: resumes, ``rollback_saved`` when it has used up ``health.max_restarts`` (also
#: reached when a health window fails). The kill -9 test crashes at each one.
CRASH_POINTS = (
    "install_started", "fetched", "adopted", "loaded", "smoke_tested", "trial_saved",
    "swapped", "health_probe", "committed", "cleaned", "boot_trial_saved", "rollback_saved",
)
#: Crash points inside a fetch that applies a delta (before ``fetched``): the delta is
#: downloaded and verified; the first block of the rebuilt model is written.
DELTA_CRASH_POINTS = ("delta_fetched", "delta_applying")


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS or name in DELTA_CRASH_POINTS, \
        f"crash point {name!r} is missing from CRASH_POINTS"
    at = os.environ.get(CRASH_ENV)
    if at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif at == f"{name}:thread":
        raise ThreadCrash(f"test crash point {name}")


class ThreadCrash(BaseException):
    """Test-only: ends the thread that reached a ``:thread`` crash point. A BaseException,
    so that no ``except Exception`` on the way stops it, as with a real thread death."""


class NoSpaceError(InstallError):
    """A download does not fit in the state directory (raised by the space check)."""

    def __init__(self, needed: int, free: int, reserve: int) -> None:
        self.needed, self.free, self.reserve = needed, free, reserve
        super().__init__(NoSpace(needed, free, reserve).reason)


class Installer:
    """Boots into a verified model and applies deployments, one at a time.

    The transitions are :func:`~device_agent._lifecycle.step`'s; this class gathers
    the events (state file, downloads, model loads, the health window) and carries out
    the effects in order."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        slot: ModelSlot,
        source: ArtifactSource | None,
        reporter: Reporter,
        stop: threading.Event | None = None,
        *,
        load_model: ModelLoader | None = None,
        on_storage: Callable[[bool], None] | None = None,
    ) -> None:
        self.config = config
        self._open_model: ModelLoader = load_model or load_model_file
        self.store = store
        self.slot = slot
        self.source = source
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.life = Life()
        #: Loaded models by record id: the one served, the one being installed and, in a
        #: trial, the one it replaced (for a quick rollback).
        self._models: dict[str, Served] = {}
        #: Digests of unverifiable messages already reported by this process.
        self._unverified_seen: dict[str, None] = {}
        #: Why the state directory cannot be written (None while it can).
        self.storage_error: str | None = None
        #: Told True / False when the state directory becomes writable / unwritable.
        self.on_storage = on_storage
        #: The state as last read or written on disk, and a newer one a save failed on.
        self._durable: InstalledState | None = None
        self._unsaved: InstalledState | None = None
        self._probed = 0.0
        #: Deployments that arrived while the state directory could not be written, by
        #: digest: offered again (see :meth:`retry_storage`) once it can.
        self._waiting: dict[str, bytes] = {}

    @property
    def state(self) -> InstalledState:
        """The installed state, as ``installed.json`` holds it."""
        return self.life.installed

    def _feed(self, event: Event) -> None:
        """Step the machine and carry out its effects; an effect's answer is fed next."""
        queue: list[Event] = [event]
        while queue:
            self.life, effects = step(self.life, queue.pop(0))
            for effect in effects:
                answer = self._do(effect)
                if answer is not None:
                    queue.append(answer)
        if self._unsaved is not None:
            # The cleanup that followed a failed save may have made room: try at once.
            self.retry_storage(now=True)

    def _do(self, effect: Effect) -> Event | None:
        match effect:
            case SaveState(state):
                try:
                    self.store.save(state)
                except OSError as err:
                    # Serving goes on from memory; the save is tried again later.
                    self._unsaved = state
                    self.storage_failed(err)
                else:
                    self._durable, self._unsaved = state, None
            case CrashPoint(name):
                crash_point(name)
            case Report(kind, fields):
                self._event(kind, **fields)
            case StateChanged():
                self.reporter.state_changed()
            case LoadModel(record):
                if record.id in self._models:
                    return ModelLoaded(record, ts=time.time())
                try:
                    self._models[record.id] = self._load(record)
                except (EdgeError, SmokeTestError, OSError) as err:
                    log.error("model %s is unusable: %s", record.label(), err)
                    return ModelUnusable(record, str(err), ts=time.time())
                return ModelLoaded(record, ts=time.time())
            case Swap(record):
                served = None if record is None else self._models[record.id]
                if served is not None and self.life.mode is Mode.TRIAL:
                    # From the first request it serves, not from the window's start.
                    self._start_trial(served)
                self.slot.swap(served)
            case CleanModels():
                self.store.clean(self.state, *(s for s in (self._durable,) if s is not None))
                keep = {r.id for r in (self.life.serving,
                                       self.state.previous if self.state.phase == "trial"
                                       else None) if r is not None}
                self._models = {k: v for k, v in self._models.items() if k in keep}
            case CleanPartial():
                self.store.clean_partial()
            case WatchHealth():
                served = self.slot.current
                assert served is not None
                self._start_trial(served)  # after a restart: the previous is loaded now
                try:
                    reason = self._health_window(served)
                except _Interrupted:
                    return None
                finally:
                    self._end_trial(served)
                return Healthy(ts=time.time()) if reason is None else \
                    Unhealthy(reason, ts=time.time())
        return None

    # -- boot ----------------------------------------------------------------------------

    def boot(self) -> None:
        """Serve the best verified model on disk; settle an interrupted trial."""
        max_restarts = self.config.health.max_restarts
        try:
            stored = self.store.load()
            self._durable = stored
            event = Boot(stored, max_restarts, ts=time.time())
        except ConfigError as err:
            event = Boot(self._recover(), max_restarts, str(err), ts=time.time())
        self._feed(event)

    def _recover(self) -> InstalledState:
        """The state file is unreadable (disk damage; writes are atomic): start over from the
        newest complete model on disk rather than serve nothing."""
        dirs = sorted((d for d in self.store.models.iterdir() if not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        for d in dirs:
            try:
                record = ModelRecord.for_artifact(Artifact.from_dir(d), None)
            except EdgeError:
                continue
            if record.id == d.name:
                return InstalledState(current=record)
        return InstalledState()

    def resume(self) -> None:
        """Finish a health window interrupted by a restart (call once serving has started)."""
        self._feed(Resume(ts=time.time()))

    # -- storage -------------------------------------------------------------------------

    def storage_failed(self, err: OSError | str) -> None:
        """Note that the state directory cannot be written (``err``); serving goes on."""
        reason = err if isinstance(err, str) else (
            f"{self.store.root}: {err.strerror or err} ({_errno_name(err)})")
        first = self.storage_error is None
        self.storage_error = reason
        self._probed = time.monotonic()
        if not first:
            return
        log.error("state directory cannot be written: %s; serving goes on from the state as "
                  "read, installs wait until it can be written (tried again every %g s)",
                  reason, self.config.limits.storage_retry_s)
        self.reporter.event("storage", ok=False, reason=reason)
        self.reporter.state_changed()
        if self.on_storage is not None:
            self.on_storage(False)

    def retry_storage(self, *, now: bool = False) -> bool:
        """When the state directory was unwritable and a retry is due (or ``now``): try
        the write that failed (or a probe). True when the directory can be written."""
        if self.storage_error is None:
            return True
        if not now and time.monotonic() - self._probed < self.config.limits.storage_retry_s:
            return False
        self._probed = time.monotonic()
        try:
            if self._unsaved is not None:
                self.store.save(self._unsaved)
                self._durable, self._unsaved = self._unsaved, None
            else:
                self.store.probe()
        except OSError as err:
            self.storage_error = f"{self.store.root}: {err.strerror or err} ({_errno_name(err)})"
            return False
        log.warning("state directory %s can be written again (%d byte(s) free)",
                    self.store.root, self._free())
        self.storage_error = None
        self.reporter.event("storage", ok=True, free_bytes=self._free())
        self.reporter.state_changed()
        if self.on_storage is not None:
            self.on_storage(True)
        return True

    def take_waiting(self) -> list[bytes]:
        """The deployments that waited for the state directory, once it can be written."""
        if self.storage_error is not None:
            return []
        waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

    def _free(self) -> int:
        try:
            return self.store.free_bytes()
        except OSError:
            return 0

    def _reserve(self, needed: int) -> None:
        """The space check before a download's first chunk: ``needed`` more bytes must fit
        with ``limits.reserve_bytes`` left (the current and previous models stay)."""
        free, reserve = self._free(), self.config.limits.reserve_bytes
        if needed + reserve > free:
            raise NoSpaceError(needed, free, reserve)

    # -- deployments ---------------------------------------------------------------------

    def screen(self, payload: bytes) -> InstallRequest:
        """The checks of a raw ``desired`` message that need no state (signature, fleet,
        device, expiry), safe on the network thread. Raises :class:`VerificationError`
        with the reason to report for anything that does not pass, whatever the cause."""
        source = self.source
        if source is None:
            raise VerificationError("deployment not checked: no deployment source is set up")
        try:
            return source.verify_deployment(payload, last_counter=None, installed=None)
        except VerificationError as err:
            raise VerificationError(f"deployment failed verification: {err}") from err
        except EdgeError as err:
            raise VerificationError(f"deployment rejected: {err}") from err
        except Exception as err:  # a hostile message must not end the thread checking it
            raise VerificationError(f"deployment could not be checked: "
                                    f"{type(err).__name__}: {err}") from err

    def refuse_unverified(self, item: Unverified) -> None:
        """Report a message that failed :meth:`screen`, once per digest and process. It
        names no deployment (its counter is not authentic), only the digest and size;
        the installed state and the last deployment's outcome are left as they are."""
        if item.digest in self._unverified_seen or item.digest in self.state.failed:
            return  # a redelivery (retained message, reconnect)
        self._unverified_seen[item.digest] = None
        while len(self._unverified_seen) > 256:
            self._unverified_seen.pop(next(iter(self._unverified_seen)))
        log.warning("refused a desired message (sha256 %s…, %d bytes): %s", item.digest[:12],
                    item.size, item.reason)
        payload: dict[str, Any] = {"sha256": item.digest, "bytes": item.size}
        if item.claimed is not None:
            payload["claimed_counter"] = item.claimed
        self._event("refused", payload=payload, reason=item.reason)

    def apply(self, payload: bytes, *, counter: int | None = None) -> bool:
        """Handle one raw ``desired`` message (``counter``: its verified counter, when
        :meth:`screen` passed it). Never raises for a bad deployment: it is reported and
        the current model keeps serving. Returns True when the install failed for a
        transient reason (broker or responder away) and should be tried again."""
        if self.source is None:
            return False
        digest = hashlib.sha256(payload).hexdigest()[:32]
        size = len(payload)
        st = self.state
        if handled(st, digest):
            # A redelivery of what was already handled (retained message, reconnect), or the
            # controller sending it again because it never heard the answer: the state
            # report carrying that answer may be what was lost, so it goes out again.
            log.debug("deployment %s… already handled: its answer goes out again",
                      digest[:12])
            self.reporter.state_changed()
            return False
        cur = self.slot.current
        try:
            dep = self.source.verify_deployment(
                payload, last_counter=st.deployment_counter or None,
                installed=(cur.name, cur.version) if cur is not None else None)
        except VerificationError as err:
            self._refuse(Refused(digest, size, f"deployment failed verification: {err}", counter,
                                 ts=time.time()))
            return False
        except EdgeError as err:
            self._refuse(Refused(digest, size, f"deployment rejected: {err}", counter,
                                 ts=time.time()))
            return False
        dep = replace(dep, digest=digest)
        if self.storage_error is not None and not self.retry_storage(now=True):
            assert self.storage_error is not None
            if digest not in self._waiting:
                log.warning("deployment %s waits: %s", dep.label(), self.storage_error)
                self._feed(Unwritable(dep, self.storage_error, ts=time.time()))
            self._waiting[digest] = payload
            return False
        self._feed(Accepted(dep, size, ts=time.time()))
        if self.life.mode is not Mode.INSTALLING:
            return False
        return self._install(dep)

    def _refuse(self, event: Refused) -> None:
        log.warning("refused a deployment: %s", event.reason)
        self._feed(event)

    def _install(self, dep: InstallRequest) -> bool:
        """Fetch, verify, store, load and smoke-test the deployment's model, telling the
        machine each step; on the last it swaps the model in and runs the health window."""
        assert self.source is not None
        try:
            local = self.store.find(dep.sha256) if dep.sha256 else None
            if local is not None:
                self._feed(Verified(local, ts=time.time()))
            else:
                staging = self.store.staging_dir(dep.digest)
                got = self.source.fetch(dep, staging, have=self._bases(),
                                        reserve=self._reserve)
                self._feed(Fetched(got.download, ts=time.time()))
                art = Artifact.from_dir(got.path)
                self._check_artifact(dep, art)
                self._feed(Verified(ts=time.time()))
                self._feed(Adopted(self.store.adopt(art, dep.digest), ts=time.time()))
            record = self.life.candidate
            assert record is not None
            served = self._load(record, smoke=False)
            self._models[record.id] = served
            self._feed(Loaded(ts=time.time()))
            self._smoke(served)
            served.health.reset()
            # The trial is about to be saved: a disk that filled up meanwhile fails the
            # install here rather than swap in a model the state file cannot name.
            self.store.probe()
        except NoSpaceError as err:
            log.error("refused %s: %s", dep.label(), err)
            self._feed(NoSpace(err.needed, err.free, err.reserve, ts=time.time()))
            return False
        except TransportError as err:
            # Weather (broker or responder away, a stalled transfer): nothing installed,
            # partial download kept, tried again. A VerificationError is refused for good.
            log.warning("install of %s interrupted, will retry: %s", dep.label(), err)
            self._feed(Retry(str(err), ts=time.time()))
            return True
        except (EdgeError, SmokeTestError, OSError) as err:
            self._fail(dep, err)
            return False
        except Exception as err:
            # Unforeseen, but still this deployment's failure: recorded as failed (so not
            # retried on every reconnect) and reported with its stage, not as "internal".
            log.exception("install of %s failed unexpectedly at %s", dep.label(),
                          self.life.stage)
            self._fail(dep, RuntimeError(f"{type(err).__name__}: {err}"))
            return False
        self._feed(SmokeTested(ts=time.time()))
        return False

    def _fail(self, dep: InstallRequest, err: BaseException) -> None:
        log.error("install of %s failed at %s: %s", dep.label(), self.life.stage, err)
        self._feed(Failed(str(err), ts=time.time()))

    def _health_window(self, served: Served) -> str | None:
        """Probe and watch the new model; a reason to roll back, None when healthy.
        Raises :class:`_Interrupted` when the agent is stopping (the trial resumes at boot)."""
        hc = self.config.health
        sample = self._sample_inputs(served)
        deadline = time.monotonic() + hc.window_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self.stop.wait(min(hc.probe_interval_s, remaining)):
                raise _Interrupted
            try:
                served.predict(sample)
            except Exception as err:
                log.warning("health probe on %s failed: %s", served.record.label(), err)
            crash_point("health_probe")
            reason = self._judge(served, final=False)
            if reason is not None:
                return reason
        return self._judge(served, final=True)

    def _start_trial(self, served: Served) -> None:
        """Keep the version ``served`` replaced at hand for its health window, loading it
        when a restart left it on disk only: a request both fail on is the client's."""
        prev = self.state.previous
        if served.trial is not None or prev is None:
            return
        old = self._models.get(prev.id)
        if old is None:
            try:
                old = self._models[prev.id] = self._load(prev)
            except (EdgeError, SmokeTestError, OSError) as err:
                log.warning("previous model %s cannot be loaded to compare failed requests "
                            "with (none is counted against %s): %s", prev.label(),
                            served.record.label(), err)
                return
        served.trial = Trial(old, self.config.health)

    def _end_trial(self, served: Served) -> None:
        trial, served.trial = served.trial, None
        if trial is not None:
            trial.close()
        if served.health.excused:
            log.info("%d failed request(s) in the health window of %s were not counted "
                     "against it (see edge_agent_trial_failures)", served.health.excused,
                     served.record.label())

    def _judge(self, served: Served, *, final: bool) -> str | None:
        hc = self.config.health
        h = served.health
        total = h.ok + h.errors
        # Before the window ends, act on errors only once the rate means something.
        if total and (final or hc.max_error_rate == 0.0 or total >= 20) and \
                h.errors / total > hc.max_error_rate:
            return (f"{h.errors} of {total} inferences failed in the health window "
                    f"(limit {hc.max_error_rate:.0%}); last error: {h.last_error}")
        if final and hc.max_p99_ms > 0 and total:
            p99 = h.p99_ms()
            if p99 > hc.max_p99_ms:
                return (f"p99 latency {p99:.2f} ms in the health window is over the limit "
                        f"of {hc.max_p99_ms:.2f} ms")
        return None

    # -- helpers -------------------------------------------------------------------------

    def _bases(self) -> list[tuple[Path, str]]:
        """The model files a delta may start from: the served and the previous model."""
        out: list[tuple[Path, str]] = []
        for record in (self.life.serving, self.state.current, self.state.previous):
            if record is None or any(sha == record.sha256 for _, sha in out):
                continue
            path = self.store.model_file(record)
            if path is not None:
                out.append((path, record.sha256))
        return out

    def _check_artifact(self, dep: InstallRequest, art: Artifact) -> None:
        m = art.manifest
        if dep.sha256 is not None and m.sha256 != dep.sha256:
            raise VerificationError(
                f"fetched artifact has model sha256 {m.sha256[:16]}…, the deployment names "
                f"{dep.sha256[:16]}…"
            )
        if m.name != dep.name or m.version != dep.artifact_version:
            raise VerificationError(
                f"fetched artifact is {m.name} {m.version}, the deployment names "
                f"{dep.name} {dep.artifact_version}"
            )
        if m.size_bytes > self.config.limits.max_artifact_bytes:
            raise InstallError(
                f"{m.name} {m.version}: model is {m.size_bytes} bytes, over the limit of "
                f"{self.config.limits.max_artifact_bytes} (limits.max_artifact_bytes)"
            )

    def _load(self, record: ModelRecord, *, smoke: bool = True) -> Served:
        art = self.store.open_model(record)
        threads = self.config.threads or None
        predictor = self._open_model(art.model_path, threads=threads, manifest=art.manifest)
        served = Served(predictor, record)
        if smoke:
            self._smoke(served)
        return served

    def _smoke(self, served: Served) -> None:
        try:
            inputs = self._sample_inputs(served)
        except (EdgeError, OSError, ValueError) as err:
            raise SmokeTestError(f"cannot read the sample: {err}") from err
        smoke_test(served, inputs, warmup=self.config.limits.warmup_runs)

    def _sample_inputs(self, served: Served) -> Mapping[str, Any]:
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

    def _event(self, kind: str, **fields: Any) -> None:
        out: dict[str, Any] = {}
        for k, v in fields.items():
            if isinstance(v, ModelRecord):
                out[k] = {"name": v.name, "version": v.version, "sha256": v.sha256}
            elif isinstance(v, InstallRequest):
                out[k] = {"counter": v.counter, "name": v.name,
                          "artifact_version": v.artifact_version}
            elif v is not None:
                out[k] = v
        self.reporter.event(kind, **out)
        if kind in ("swapped", "committed", "rolled_back", "failed", "refused"):
            self.reporter.state_changed()


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, "I/O error")


class _Interrupted(Exception):
    """The agent is stopping inside a health window."""
