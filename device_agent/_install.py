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

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from edge_sdk import Artifact
from edge_sdk._internal import load_model_file, load_npz, synthetic_inputs
from edge_sdk.errors import (
    ConfigError,
    EdgeError,
    InstallError,
    TransportError,
    VerificationError,
)
from edge_sdk.transport import SlowRetrievalError

from ._config import AgentConfig
from ._intake import Unverified
from ._serving import ModelSlot, Served, SmokeTestError, smoke_test
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


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS, f"crash point {name!r} is missing from CRASH_POINTS"
    at = os.environ.get(CRASH_ENV)
    if at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif at == f"{name}:thread":
        raise ThreadCrash(f"test crash point {name}")


class ThreadCrash(BaseException):
    """Test-only: ends the thread that reached a ``:thread`` crash point. A BaseException,
    so that no ``except Exception`` on the way stops it, as with a real thread death."""


@dataclass(frozen=True)
class Deployment:
    """A deployment that passed signature verification, as the pipeline needs it."""

    #: Unique id of this deployment; the pipeline sets it to a digest of the raw message.
    key: str
    #: The director's monotonic counter; older ones are replays and are refused.
    version: int
    #: Target artifact name, version and model hash.
    name: str
    artifact_version: str
    sha256: str | None = None
    #: Signed permission to go back to an older artifact.
    rollback: bool = False
    #: The source's own verified object (opaque to the pipeline).
    raw: Any = None

    def label(self) -> str:
        return f"{self.name} {self.artifact_version} (deployment {self.version})"


class ArtifactSource(Protocol):
    """Where deployments are checked and artifacts come from."""

    def verify_deployment(self, payload: bytes, *, last_version: int | None,
                          installed: tuple[str, str] | None) -> Deployment:
        """Check a raw ``desired`` message; raise :class:`VerificationError` unless it is
        authentic, unexpired, for this device, newer than ``last_version`` (the last
        accepted deployment version) and, against ``installed`` = (model, version), not an
        unsigned downgrade."""
        ...

    def fetch(self, deployment: Deployment, dest_dir: Path) -> Path:
        """Download (resuming from what ``dest_dir`` holds) and verify the deployment's
        artifact; return the verified artifact directory. Raises VerificationError or
        TransportError."""
        ...


class Reporter(Protocol):
    def event(self, kind: str, **fields: Any) -> None: ...

    def state_changed(self) -> None: ...


class Installer:
    """Boots into a verified model and applies deployments, one at a time."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        slot: ModelSlot,
        source: ArtifactSource | None,
        reporter: Reporter,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.slot = slot
        self.source = source
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.state = InstalledState()
        self._trial_pending = False
        #: Digests of unverifiable messages already reported by this process.
        self._unverified_seen: dict[str, None] = {}

    # -- boot ----------------------------------------------------------------------------

    def boot(self) -> None:
        """Serve the best verified model on disk; settle an interrupted trial."""
        try:
            state = self.store.load()
        except ConfigError as err:
            state = self._recover(err)
        if state.phase == "trial" and state.current is not None:
            # With no previous model there is nothing to go back to: resume the trial.
            if state.previous is not None and \
                    state.trial_boots >= self.config.health.max_restarts:
                reason = (f"the agent stopped {state.trial_boots + 1} time(s) during the health "
                          f"window of {state.current.label()}")
                bad, counter = state.current, _trial_counter(state)
                state = self._rolled_back_state(state, reason)
                self.store.save(state)
                crash_point("rollback_saved")
                self._event("rolled_back", deployment=_named(counter), model=bad,
                            restored=state.current, reason=reason)
            else:
                state = replace(state, trial_boots=state.trial_boots + 1)
                self.store.save(state)
                crash_point("boot_trial_saved")
                self._trial_pending = True
        served: Served | None = None
        for which in ("current", "previous"):
            rec: ModelRecord | None = getattr(state, which)
            if rec is None:
                continue
            try:
                served = self._load(rec)
            except (EdgeError, SmokeTestError, OSError) as err:
                log.error("installed %s model %s is unusable: %s", which, rec.label(), err)
                self._event("failed", stage="boot", model=rec, reason=str(err))
                continue
            if which == "previous":
                reason = f"current model {state.current.label() if state.current else '?'} " \
                         "failed verification at boot"
                broken, counter = state.current, _trial_counter(state)
                state = self._rolled_back_state(state, reason)
                self.store.save(state)
                self._trial_pending = False
                self._event("rolled_back", deployment=_named(counter), model=broken,
                            restored=rec, reason=reason)
            break
        if served is None and (state.current or state.previous):
            state = replace(state, current=None, previous=None, phase="committed")
            self.store.save(state)
        self.state = state
        self.store.clean(state)
        self.slot.swap(served)
        self.reporter.state_changed()

    def _recover(self, err: ConfigError) -> InstalledState:
        """The state file is unreadable (disk damage; writes are atomic): start over from the
        newest complete model on disk rather than serve nothing."""
        dirs = sorted((d for d in self.store.models.iterdir() if not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        for d in dirs:
            try:
                record = ModelRecord.for_artifact(Artifact.from_dir(d), None)
            except EdgeError:
                continue
            if record.id != d.name:
                continue
            state = InstalledState(current=record)
            self.store.save(state)
            self._event("failed", stage="boot", model=record,
                        reason=f"{err}; recovered with the newest verified model on disk")
            return state
        state = InstalledState()
        self.store.save(state)
        self._event("failed", stage="boot", reason=f"{err}; no verified model on disk")
        return state

    def resume(self) -> None:
        """Finish a health window interrupted by a restart (call once serving has started)."""
        if self._trial_pending and self.slot.current is not None:
            self._trial_pending = False
            self._health_and_commit(self.slot.current, None)

    # -- deployments ---------------------------------------------------------------------

    def screen(self, payload: bytes) -> Deployment:
        """The checks of a raw ``desired`` message that need no state (signature, fleet,
        device, expiry), safe on the network thread. Raises :class:`VerificationError`
        with the reason to report for anything that does not pass, whatever the cause."""
        source = self.source
        if source is None:
            raise VerificationError("deployment not checked: no deployment source is set up")
        try:
            return source.verify_deployment(payload, last_version=None, installed=None)
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
        key = hashlib.sha256(payload).hexdigest()[:32]
        size = len(payload)
        st = self.state
        if key == st.deployment_key or key in st.failed:
            return False  # a redelivery of what was already handled (retained message, reconnect)
        cur = self.slot.current
        try:
            dep = self.source.verify_deployment(
                payload, last_version=st.deployment_version or None,
                installed=(cur.name, cur.version) if cur is not None else None)
        except VerificationError as err:
            self._refuse(key, size, counter, f"deployment failed verification: {err}")
            return False
        except EdgeError as err:
            self._refuse(key, size, counter, f"deployment rejected: {err}")
            return False
        dep = replace(dep, key=key)
        if dep.version <= st.deployment_version:
            self._refuse(key, size, dep, f"deployment version {dep.version} is not newer than "
                                         f"the installed {st.deployment_version} (replayed or "
                                         "stale)")
            return False
        cur = self.slot.current
        if cur is not None and dep.sha256 is not None and cur.record.sha256 == dep.sha256:
            # Accepted without an install: the device already serves that model. The state
            # says so for this deployment, so that nobody has to infer it.
            self.state = replace(st, deployment_version=dep.version, deployment_key=dep.key,
                                 last_result=_result("committed", cur.record, dep,
                                                     "already serving this model"))
            self.store.save(self.state)
            self.reporter.state_changed()
            return False
        return self._install(dep)

    def _install(self, dep: Deployment) -> bool:
        assert self.source is not None
        self._event("install_started", deployment=dep)
        crash_point("install_started")
        stage = "fetch"
        try:
            local = self.store.find(dep.sha256) if dep.sha256 else None
            if local is not None:
                record = replace(local, deployment=dep.key)
                self._event("verified", deployment=dep, source="local copy")
            else:
                staging = self.store.staging_dir(dep.key)
                path = self.source.fetch(dep, staging)
                crash_point("fetched")
                stage = "verify"
                art = Artifact.from_dir(path)
                self._check_artifact(dep, art)
                self._event("verified", deployment=dep)
                record = self.store.adopt(art, dep.key)
                crash_point("adopted")
            stage = "load"
            served = self._load(record, smoke=False)
            crash_point("loaded")
            stage = "smoke_test"
            self._smoke(served)
            crash_point("smoke_tested")
        except TransportError as err:
            # Endless data is an attack, not weather. A responder that stopped answering
            # (SlowRetrievalError: nothing installed, partial download kept) is tried again.
            if isinstance(err, VerificationError) and not isinstance(err, SlowRetrievalError):
                self._fail(dep, stage, err)
                return False
            reason = f"{stage}: {err}"
            log.warning("install of %s interrupted, will retry: %s", dep.label(), err)
            self.state = replace(self.state, last_result=_result("retrying", None, dep, reason))
            self.store.save(self.state)
            self._event("failed", stage=stage, deployment=dep, reason=str(err), retry=True)
            return True
        except (EdgeError, SmokeTestError, OSError) as err:
            self._fail(dep, stage, err)
            return False
        except Exception as err:
            # Unforeseen, but still this deployment's failure: recorded as failed (so not
            # retried on every reconnect) and reported with its stage, not as "internal".
            log.exception("install of %s failed unexpectedly at %s", dep.label(), stage)
            self._fail(dep, stage, RuntimeError(f"{type(err).__name__}: {err}"))
            return False
        old = self.slot.current
        st = self.state
        self.state = replace(
            st, current=record, previous=old.record if old else st.current, phase="trial",
            trial_boots=0, deployment_version=dep.version, deployment_key=dep.key,
        )
        self.store.save(self.state)
        crash_point("trial_saved")
        served.health.reset()
        self.slot.swap(served)
        crash_point("swapped")
        self._event("swapped", deployment=dep, model=record,
                    previous=old.record if old else None)
        self.store.clean(self.state)
        self._health_and_commit(served, old, dep)
        return False

    def _health_and_commit(self, served: Served, old: Served | None,
                           dep: Deployment | None = None) -> None:
        try:
            reason = self._health_window(served)
        except _Interrupted:
            return
        # After a restart inside the trial the deployment is known by its counter only.
        which: Deployment | int | None = dep if dep is not None else _trial_counter(self.state)
        named = _named(which)
        if reason is None:
            self.state = replace(self.state, phase="committed", trial_boots=0,
                                 last_result=_result("committed", served.record, which))
            self.store.save(self.state)
            crash_point("committed")
            self._event("committed", deployment=named, model=served.record)
            self.store.clean(self.state)
            self.store.clean_partial()
            crash_point("cleaned")
            return
        prev = self.state.previous
        if prev is None:
            # Nothing to go back to: keep serving rather than serve nothing.
            self.state = replace(self.state, phase="committed", trial_boots=0,
                                 last_result=_result("failed", served.record, which, reason))
            self.store.save(self.state)
            self._event("failed", stage="health", deployment=named, model=served.record,
                        reason=f"{reason}; no previous model to restore, keeping it")
            return
        restore = old
        if restore is None or restore.record.id != prev.id:
            try:
                restore = self._load(prev)
            except (EdgeError, SmokeTestError, OSError) as err:
                self._event("failed", stage="rollback", model=prev, reason=str(err))
                restore = None
        if restore is None:
            return
        self.slot.swap(restore)
        self.state = self._rolled_back_state(self.state, reason)
        self.store.save(self.state)
        crash_point("rollback_saved")
        self._event("rolled_back", deployment=named, model=served.record, restored=prev,
                    reason=reason)
        self.store.clean(self.state)
        self.store.clean_partial()

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

    def _check_artifact(self, dep: Deployment, art: Artifact) -> None:
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
        predictor = load_model_file(art.model_path, threads=threads, manifest=art.manifest)
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

    def _rolled_back_state(self, state: InstalledState, reason: str) -> InstalledState:
        """Back to the previous model; ``last_result`` names the trial's deployment, so the
        state itself says that deployment was rolled back (the event may come later)."""
        bad = state.current
        new = replace(state, current=state.previous, previous=None, phase="committed",
                      trial_boots=0,
                      last_result=_result("rolled_back", bad, _trial_counter(state), reason))
        if bad is not None and bad.deployment is not None:
            new = new.with_failed(bad.deployment, reason)
        return new

    def _fail(self, dep: Deployment, stage: str, err: BaseException) -> None:
        reason = f"{stage}: {err}"
        log.error("install of %s failed at %s: %s", dep.label(), stage, err)
        st = self.state.with_failed(dep.key, reason)
        self.state = replace(st, deployment_version=max(st.deployment_version, dep.version),
                             last_result=_result("failed", None, dep, reason))
        self.store.save(self.state)
        self.store.clean(self.state)
        self.store.clean_partial()
        self._event("failed", stage=stage, deployment=dep, reason=str(err))

    def _refuse(self, key: str, size: int, dep: Deployment | int | None, reason: str) -> None:
        """Refuse a message, naming the deployment when it is known (``dep``: the verified
        deployment or its counter), and always its digest and size."""
        log.warning("refused a deployment: %s", reason)
        counter = dep.version if isinstance(dep, Deployment) else dep
        st = self.state.with_failed(key, reason)
        if counter is not None:
            st = replace(st, last_result=_result("refused", None, counter, reason))
        self.state = st
        self.store.save(self.state)
        self._event("refused", deployment=_named(dep), payload={"sha256": key, "bytes": size},
                    reason=reason)

    def _event(self, kind: str, **fields: Any) -> None:
        out: dict[str, Any] = {}
        for k, v in fields.items():
            if isinstance(v, ModelRecord):
                out[k] = {"name": v.name, "version": v.version, "sha256": v.sha256}
            elif isinstance(v, Deployment):
                out[k] = {"version": v.version, "name": v.name,
                          "artifact_version": v.artifact_version}
            elif v is not None:
                out[k] = v
        self.reporter.event(kind, **out)
        if kind in ("swapped", "committed", "rolled_back", "failed", "refused"):
            self.reporter.state_changed()


def _trial_counter(state: InstalledState) -> int | None:
    """The counter of the deployment under trial (the trial state records it), if any."""
    return state.deployment_version or None if state.phase == "trial" else None


def _named(dep: Deployment | int | None) -> Deployment | dict[str, int] | None:
    """How an event names a deployment known only by its counter."""
    return {"version": dep} if isinstance(dep, int) else dep


class _Interrupted(Exception):
    """The agent is stopping inside a health window."""


def _result(outcome: str, model: ModelRecord | None, dep: Deployment | int | None,
            reason: str | None = None) -> dict[str, Any]:
    """``last_update`` of the state: what happened (``outcome``) to which deployment."""
    out: dict[str, Any] = {"result": outcome, "ts": time.time()}
    if model is not None:
        out["model"] = {"name": model.name, "version": model.version}
    if dep is not None:
        out["deployment"] = dep.version if isinstance(dep, Deployment) else dep
    if reason is not None:
        out["reason"] = reason
    return out

