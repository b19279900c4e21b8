"""The installer's transitions as a pure state machine: ``step(life, event) -> (life, effects)``.

No I/O, no clock, no threads: :class:`~device_agent._install.Installer` gathers the
events (loads a model, fetches an artifact, runs the health window) and carries out
the effects in the order given. Every durable change is one :class:`SaveState`, and a
:class:`CrashPoint` follows the save it tests, so the kill -9 tests see the same
sequence as before. ``installed`` is the state as ``installed.json`` holds it; the rest
of :class:`Life` is what this process knows (what it serves, what it is doing).

Illegal events (an event the current mode does not expect, like ``Healthy`` while
idle) raise :class:`LifecycleError`: they are bugs in the caller, never a deployment's
fault. Two events are documented no-ops instead: :class:`Accepted` for a deployment
already handled (a redelivery), and :class:`Resume` with no trial to resume.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from edge_sdk.errors import InstallError

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
    report,
)
from ._interfaces import InstallRequest
from ._state import InstalledState, ModelRecord


class LifecycleError(InstallError):
    """An event the machine does not accept in its current mode (a caller's bug)."""


class Mode(enum.Enum):
    BOOT = "boot"                        # nothing read yet; waits for Boot
    LOAD_CURRENT = "load_current"        # booting: current model being loaded
    LOAD_PREVIOUS = "load_previous"      # booting: previous model being loaded
    IDLE = "idle"                        # serving (or not); takes deployments
    INSTALLING = "installing"            # a deployment being fetched, verified, loaded
    TRIAL = "trial"                      # health window of the swapped-in model running
    ROLLING_BACK = "rolling_back"        # health window failed; previous model loading


#: Install progress → the stage a failure at that point is reported under.
_STAGE = {"started": "fetch", "fetched": "verify", "verified": "verify", "adopted": "load",
          "local": "load", "loaded": "smoke_test"}


@dataclass(frozen=True)
class Life:
    installed: InstalledState = field(default_factory=InstalledState)
    mode: Mode = Mode.BOOT
    #: The model the slot serves (this process).
    serving: ModelRecord | None = None
    #: The deployment being installed or watched by this process (None after a restart:
    #: a resumed trial knows its deployment by its counter only).
    deployment: InstallRequest | None = None
    #: INSTALLING: how far the install got (a key of ``_STAGE``) and the model it stored.
    progress: str | None = None
    candidate: ModelRecord | None = None
    #: A boot resumed a trial; its health window starts on :class:`Resume`.
    trial_pending: bool = False
    #: ROLLING_BACK: why the health window failed.
    reason: str | None = None
    #: How this process fetched the deployment's model ("delta from 1.0.0 (N bytes)").
    download: str | None = None

    @property
    def stage(self) -> str | None:
        return None if self.progress is None else _STAGE[self.progress]


def handled(state: InstalledState, digest: str) -> bool:
    """Whether the deployment with this digest was already acted on (a redelivery)."""
    return digest == state.deployment_digest or digest in state.failed


# -- the machine -----------------------------------------------------------------------

def step(life: Life, event: Event) -> tuple[Life, list[Effect]]:
    """The next state and the effects to carry out, in order."""
    m = life.mode
    match event:
        case Boot() if m is Mode.BOOT:
            return _boot(life, event)
        case ModelLoaded() | ModelUnusable() if m in (Mode.LOAD_CURRENT, Mode.LOAD_PREVIOUS):
            return _boot_loaded(life, event)
        case ModelLoaded() | ModelUnusable() if m is Mode.ROLLING_BACK:
            return _rolled_back(life, event)
        case Resume() if m is Mode.IDLE:
            if life.trial_pending and life.serving is not None:
                return replace(life, mode=Mode.TRIAL, trial_pending=False), [WatchHealth()]
            return life, []
        case Refused() if m is Mode.IDLE:
            return replace(life, installed=_refused(life.installed, event)), [
                SaveState(_refused(life.installed, event)),
                report("refused", deployment=_named(event.deployment),
                       payload={"sha256": event.digest, "bytes": event.size}, reason=event.reason)]
        case Accepted() if m is Mode.IDLE:
            return _accepted(life, event)
        case Fetched() | Verified() | Adopted() | Loaded() | SmokeTested() \
                if m is Mode.INSTALLING:
            return _progress(life, event)
        case Failed() if m is Mode.INSTALLING:
            return _failed(life, event)
        case NoSpace() if m is Mode.INSTALLING and life.progress == "started":
            return _failed(life, event)
        case Unwritable() if m is Mode.IDLE:
            if handled(life.installed, event.deployment.digest):
                return life, []
            return life, [report("failed", stage="storage", deployment=event.deployment,
                                 reason=f"installs wait until the state directory can be "
                                        f"written: {event.reason}", retry=True)]
        case Retry() if m is Mode.INSTALLING:
            dep = life.deployment
            assert dep is not None
            st = replace(life.installed, last_result=_result(
                "retrying", None, dep, f"{life.stage}: {event.reason}", event.ts))
            return _idle(life, st), [
                SaveState(st),
                report("failed", stage=life.stage, deployment=dep, reason=event.reason,
                       retry=True)]
        case Healthy() | Unhealthy() if m is Mode.TRIAL:
            return _judged(life, event)
    raise LifecycleError(f"{type(event).__name__} is not expected in mode {m.value}")


def _idle(life: Life, installed: InstalledState, **changes: Any) -> Life:
    return replace(life, **{"installed": installed, "mode": Mode.IDLE, "deployment": None,
                            "progress": None, "candidate": None, "reason": None,
                            "download": None, **changes})


def _boot(life: Life, ev: Boot) -> tuple[Life, list[Effect]]:
    state = ev.stored
    out: list[Effect] = []
    pending = False
    if ev.unreadable is not None:
        found = ("recovered with the newest verified model on disk" if state.current
                 else "no verified model on disk")
        out += [SaveState(state), report("failed", stage="boot", model=state.current,
                                         reason=f"{ev.unreadable}; {found}")]
    if state.phase == "trial" and state.current is not None:
        # With no previous model there is nothing to go back to: resume the trial.
        if state.previous is not None and state.trial_boots >= ev.max_restarts:
            reason = (f"the agent stopped {state.trial_boots + 1} time(s) during the health "
                      f"window of {state.current.label()}")
            bad, counter = state.current, _trial_counter(state)
            state = _rolled_back_state(state, reason, ev.ts)
            out += [SaveState(state), CrashPoint("rollback_saved"),
                    report("rolled_back", deployment=_named(counter), model=bad,
                           restored=state.current, reason=reason)]
        else:
            state = replace(state, trial_boots=state.trial_boots + 1)
            out += [SaveState(state), CrashPoint("boot_trial_saved")]
            pending = True
    life = replace(life, installed=state, trial_pending=pending)
    if state.current is not None:
        return replace(life, mode=Mode.LOAD_CURRENT), [*out, LoadModel(state.current)]
    if state.previous is not None:
        return replace(life, mode=Mode.LOAD_PREVIOUS), [*out, LoadModel(state.previous)]
    return _boot_done(life, None, out)


def _boot_loaded(life: Life, ev: ModelLoaded | ModelUnusable) -> tuple[Life, list[Effect]]:
    state = life.installed
    which = state.current if life.mode is Mode.LOAD_CURRENT else state.previous
    if ev.record != which:
        raise LifecycleError(f"loaded {ev.record.label()}, expected "
                             f"{which.label() if which else 'nothing'}")
    if isinstance(ev, ModelUnusable):
        out: list[Effect] = [report("failed", stage="boot", model=ev.record, reason=ev.reason)]
        if life.mode is Mode.LOAD_CURRENT and state.previous is not None:
            return replace(life, mode=Mode.LOAD_PREVIOUS), [*out, LoadModel(state.previous)]
        return _boot_done(life, None, out)
    if life.mode is Mode.LOAD_CURRENT:
        return _boot_done(life, ev.record, [])
    reason = (f"current model {state.current.label() if state.current else '?'} "
              "failed verification at boot")
    broken, counter = state.current, _trial_counter(state)
    state = _rolled_back_state(state, reason, ev.ts)
    out = [SaveState(state), report("rolled_back", deployment=_named(counter), model=broken,
                                    restored=ev.record, reason=reason)]
    return _boot_done(replace(life, installed=state, trial_pending=False), ev.record, out)


def _boot_done(life: Life, served: ModelRecord | None,
               out: list[Effect]) -> tuple[Life, list[Effect]]:
    state = life.installed
    if served is None and (state.current or state.previous):
        state = replace(state, current=None, previous=None, phase="committed")
        out = [*out, SaveState(state)]
    return _idle(life, state, serving=served), [*out, CleanModels(), Swap(served),
                                                 StateChanged()]


def _accepted(life: Life, ev: Accepted) -> tuple[Life, list[Effect]]:
    dep, st = ev.deployment, life.installed
    if handled(st, dep.digest):
        return life, []
    if dep.counter <= st.deployment_counter:
        reason = (f"deployment counter {dep.counter} is not newer than the installed "
                  f"{st.deployment_counter} (replayed or stale)")
        return step(life, Refused(dep.digest, ev.size, reason, dep, ts=ev.ts))
    cur = life.serving
    if cur is not None and dep.sha256 is not None and cur.sha256 == dep.sha256:
        # Accepted without an install: the device already serves that model. The state
        # says so for this deployment, so that nobody has to infer it.
        st = replace(st, deployment_counter=dep.counter, deployment_digest=dep.digest,
                     last_result=_result("committed", cur, dep, "already serving this model",
                                         ev.ts))
        return replace(life, installed=st), [SaveState(st), StateChanged()]
    return (replace(life, mode=Mode.INSTALLING, deployment=dep, progress="started"),
            [report("install_started", deployment=dep), CrashPoint("install_started")])


#: Install progress: which event may come at which point, and where it leads.
_NEXT: dict[tuple[str, type], str] = {
    ("started", Fetched): "fetched", ("started", Verified): "local",
    ("fetched", Verified): "verified", ("verified", Adopted): "adopted",
    ("local", Loaded): "loaded", ("adopted", Loaded): "loaded",
    ("loaded", SmokeTested): "smoke_tested",
}


def _progress(life: Life, ev: Fetched | Verified | Adopted | Loaded | SmokeTested,
              ) -> tuple[Life, list[Effect]]:
    assert life.progress is not None and life.deployment is not None
    nxt = _NEXT.get((life.progress, type(ev)))
    if nxt is None or (nxt == "local") != (isinstance(ev, Verified) and ev.local is not None):
        raise LifecycleError(f"{type(ev).__name__} is not expected after {life.progress}")
    dep = life.deployment
    match ev:
        case Fetched(download=got):
            if got is None:
                return replace(life, progress=nxt), [CrashPoint("fetched")]
            message = str(got.get("message", "")) or None
            return (replace(life, progress=nxt, download=message),
                    [report("downloaded", deployment=dep, download=dict(got)),
                     CrashPoint("fetched")])
        case Verified(local=None):
            return replace(life, progress=nxt), [report("verified", deployment=dep)]
        case Verified(local=ModelRecord() as local):
            return (replace(life, progress=nxt, candidate=replace(local, deployment=dep.digest)),
                    [report("verified", deployment=dep, source="local copy")])
        case Adopted():
            return replace(life, progress=nxt, candidate=ev.record), [CrashPoint("adopted")]
        case Loaded():
            return replace(life, progress=nxt), [CrashPoint("loaded")]
    # Smoke-tested: the durable switch to the trial, then the in-memory swap.
    new, old, st = life.candidate, life.serving, life.installed
    assert new is not None
    st = replace(st, current=new, previous=old if old else st.current, phase="trial",
                 trial_boots=0, deployment_counter=dep.counter, deployment_digest=dep.digest)
    return (replace(life, installed=st, mode=Mode.TRIAL, serving=new, progress=None,
                    candidate=None),
            [CrashPoint("smoke_tested"), SaveState(st), CrashPoint("trial_saved"), Swap(new),
             CrashPoint("swapped"), report("swapped", deployment=dep, model=new, previous=old),
             CleanModels(), WatchHealth()])


def _failed(life: Life, ev: Failed | NoSpace) -> tuple[Life, list[Effect]]:
    dep = life.deployment
    assert dep is not None
    stage = "space" if isinstance(ev, NoSpace) else life.stage
    reason = f"{stage}: {ev.reason}"
    st = life.installed.with_failed(dep.digest, reason)
    st = replace(st, deployment_counter=max(st.deployment_counter, dep.counter),
                 last_result=_result("failed", None, dep, reason, ev.ts, life.download))
    extra = {"needed_bytes": ev.needed, "free_bytes": ev.free,
             "reserve_bytes": ev.reserve} if isinstance(ev, NoSpace) else {}
    # Cleanup before the report: it frees what this install wrote (staging, the partial
    # download), and the save above may have failed for want of that space.
    return _idle(life, st), [
        SaveState(st), CleanModels(), CleanPartial(),
        report("failed", stage=stage, deployment=dep, reason=ev.reason, **extra)]


def _judged(life: Life, ev: Healthy | Unhealthy) -> tuple[Life, list[Effect]]:
    st, served = life.installed, life.serving
    assert served is not None
    # After a restart inside the trial the deployment is known by its counter only.
    which: InstallRequest | int | None = life.deployment or _trial_counter(st)
    if isinstance(ev, Healthy):
        st = replace(st, phase="committed", trial_boots=0,
                     last_result=_result("committed", served, which, None, ev.ts,
                                         life.download))
        return _idle(life, st), [
            SaveState(st), CrashPoint("committed"),
            report("committed", deployment=_named(which), model=served),
            CleanModels(), CleanPartial(), CrashPoint("cleaned")]
    if st.previous is None:
        # Nothing to go back to: keep serving rather than serve nothing.
        st = replace(st, phase="committed", trial_boots=0,
                     last_result=_result("failed", served, which, ev.reason, ev.ts))
        return _idle(life, st), [
            SaveState(st),
            report("failed", stage="health", deployment=_named(which), model=served,
                   reason=f"{ev.reason}; no previous model to restore, keeping it")]
    return (replace(life, mode=Mode.ROLLING_BACK, reason=ev.reason),
            [LoadModel(st.previous)])


def _rolled_back(life: Life, ev: ModelLoaded | ModelUnusable) -> tuple[Life, list[Effect]]:
    st, bad = life.installed, life.serving
    prev = st.previous
    if ev.record != prev:
        raise LifecycleError(f"loaded {ev.record.label()}, expected the previous model")
    if isinstance(ev, ModelUnusable):
        # Nothing loadable to go back to: the trial model keeps serving, still on trial.
        return _idle(life, st), [
            report("failed", stage="rollback", model=prev, reason=ev.reason)]
    assert life.reason is not None
    named = _named(life.deployment or _trial_counter(st))
    st = _rolled_back_state(st, life.reason, ev.ts)
    return _idle(life, st, serving=prev), [
        Swap(prev), SaveState(st), CrashPoint("rollback_saved"),
        report("rolled_back", deployment=named, model=bad, restored=prev, reason=life.reason),
        CleanModels(), CleanPartial()]


def _refused(st: InstalledState, ev: Refused) -> InstalledState:
    counter = ev.deployment.counter if isinstance(ev.deployment, InstallRequest) \
        else ev.deployment
    st = st.with_failed(ev.digest, ev.reason)
    if counter is not None:
        st = replace(st, last_result=_result("refused", None, counter, ev.reason, ev.ts))
    return st


def _rolled_back_state(state: InstalledState, reason: str, ts: float) -> InstalledState:
    """Back to the previous model; ``last_result`` names the trial's deployment, so the
    state itself says that deployment was rolled back (the event may come later)."""
    bad = state.current
    new = replace(state, current=state.previous, previous=None, phase="committed",
                  trial_boots=0,
                  last_result=_result("rolled_back", bad, _trial_counter(state), reason, ts))
    if bad is not None and bad.deployment is not None:
        new = new.with_failed(bad.deployment, reason)
    return new


def _trial_counter(state: InstalledState) -> int | None:
    """The counter of the deployment under trial (the trial state records it), if any."""
    return state.deployment_counter or None if state.phase == "trial" else None


def _named(dep: InstallRequest | int | None) -> InstallRequest | dict[str, int] | None:
    """How an event names a deployment known only by its counter."""
    return {"counter": dep} if isinstance(dep, int) else dep


def _result(outcome: str, model: ModelRecord | None, dep: InstallRequest | int | None,
            reason: str | None, ts: float, download: str | None = None) -> dict[str, Any]:
    """``last_update`` of the state: what happened (``outcome``) to which deployment, and
    how its model was downloaded when this process did it."""
    out: dict[str, Any] = {"result": outcome, "ts": ts}
    if download is not None:
        out["download"] = download
    if model is not None:
        out["model"] = {"name": model.name, "version": model.version}
    if dep is not None:
        out["deployment"] = dep.counter if isinstance(dep, InstallRequest) else dep
    if reason is not None:
        out["reason"] = reason
    return out
