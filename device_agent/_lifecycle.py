"""The installer's transitions as a pure state machine: ``step(life, event) -> (life, effects)``.

A device serves a set of models by name. A deployment decides some of them (installs or
removes them); the others are never fetched, reloaded or watched. Its models are
fetched, verified and stored one after the other, then all loaded and smoke-tested,
then one trial save, one swap of all its names at once, one health window over its new
models, and one commit or one rollback of the whole set (removed models come back too).
A removal-only deployment is committed at once.

Combination of the device's and its groups' documents: a document's scope is
``"device"`` when it names this device, else ``"group:G"`` (the first of its groups the
device follows); a counter at or below the last one accepted from its scope is a
replay. Per model, the newest counter wins, from whichever scope: a member whose model
a newer deployment decided is skipped ("superseded by #N"), and the rest of the
document installs as one set.

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
from collections.abc import Mapping
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
    ShadowEnded,
    SmokeTested,
    StartShadow,
    StateChanged,
    StopShadow,
    Swap,
    Unhealthy,
    Unwritable,
    Verified,
    WatchHealth,
    report,
)
from ._interfaces import InstallRequest, ModelChange
from ._state import InstalledState, ModelRecord, ShadowRun


class LifecycleError(InstallError):
    """An event the machine does not accept in its current mode (a caller's bug)."""


class Mode(enum.Enum):
    BOOT = "boot"                        # nothing read yet; waits for Boot
    LOADING = "loading"                  # booting: the state's models being loaded
    IDLE = "idle"                        # serving (or not); takes deployments
    INSTALLING = "installing"            # a deployment being fetched, verified, loaded
    TRIAL = "trial"                      # health window of the swapped-in models running
    ROLLING_BACK = "rolling_back"        # health window failed; old versions loading


#: Install progress → the stage a failure at that point is reported under.
_STAGE = {"started": "fetch", "fetched": "verify", "verified": "verify", "adopted": "load",
          "local": "load", "loading": "load", "loaded": "smoke_test"}


@dataclass(frozen=True)
class Life:
    installed: InstalledState = field(default_factory=InstalledState)
    mode: Mode = Mode.BOOT
    #: The models the slots serve (this process), by name.
    serving: Mapping[str, ModelRecord] = field(default_factory=dict)
    #: The deployment being installed or watched by this process (None after a restart:
    #: a resumed trial knows its deployment by its counter only).
    deployment: InstallRequest | None = None
    #: INSTALLING: the scope it came from, the names it decides (superseded ones left
    #: out), the models it installs and removes.
    scope: str = "device"
    decides: tuple[str, ...] = ()
    members: tuple[ModelChange, ...] = ()
    removing: tuple[str, ...] = ()
    #: INSTALLING: how far the install got (a key of ``_STAGE``), the models it stored
    #: so far (in the order of ``members``) and how many of them are loaded.
    progress: str | None = None
    candidates: tuple[ModelRecord, ...] = ()
    loaded: int = 0
    #: A boot resumed a trial; its health window starts on :class:`Resume`.
    trial_pending: bool = False
    #: ROLLING_BACK: why the health window failed, and the old versions still to load.
    reason: str | None = None
    loading: tuple[ModelRecord, ...] = ()
    #: LOADING: the state changed while booting and must be saved.
    dirty: bool = False
    #: How this process fetched the deployment's models ("delta from 1.0.0 (N bytes)").
    download: str | None = None
    #: The limits a deployment is checked against before a download (0: none).
    max_models_bytes: int = 0
    max_models: int = 0
    max_artifact_bytes: int = 0
    #: INSTALLING: the members are a shadow document's candidates; smoke-tested, they
    #: start a shadow run instead of a swap.
    shadowing: bool = False

    @property
    def stage(self) -> str | None:
        return None if self.progress is None else _STAGE[self.progress]


def handled(state: InstalledState, digest: str) -> bool:
    """Whether the deployment with this digest was already acted on (a redelivery)."""
    return digest == state.deployment_digest or digest in state.failed or (
        state.shadow is not None and state.shadow.digest == digest)


def watched(state: InstalledState) -> tuple[str, ...]:
    """The models of the set under trial that serve (those its health window watches)."""
    if state.phase != "trial":
        return ()
    return tuple(sorted(n for n in state.trial if n in state.models))


# -- the machine -----------------------------------------------------------------------

def step(life: Life, event: Event) -> tuple[Life, list[Effect]]:
    """The next state and the effects to carry out, in order."""
    m = life.mode
    match event:
        case Boot() if m is Mode.BOOT:
            return _boot(life, event)
        case ModelLoaded() | ModelUnusable() if m is Mode.LOADING:
            return _boot_loaded(life, event)
        case ModelLoaded() | ModelUnusable() if m is Mode.ROLLING_BACK:
            return _rollback_loaded(life, event)
        case Resume() if m is Mode.IDLE:
            names = watched(life.installed)
            if life.trial_pending and names:
                return replace(life, mode=Mode.TRIAL, trial_pending=False), [
                    WatchHealth(names)]
            return replace(life, trial_pending=False), []
        case Refused() if m is Mode.IDLE:
            st = _refused(life.installed, event)
            return replace(life, installed=st), [
                SaveState(st),
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
            st = life.installed.with_result(_result(
                "retrying", dep, f"{life.stage}: {event.reason}", event.ts))
            return _idle(life, st), [
                SaveState(st),
                report("failed", stage=life.stage, deployment=dep, reason=event.reason,
                       retry=True)]
        case Healthy() | Unhealthy() if m is Mode.TRIAL:
            return _judged(life, event)
        case ShadowEnded() if m is Mode.IDLE:
            run = life.installed.shadow
            if run is None or run.deployment != event.deployment:
                return life, []  # already ended (a deployment replaced it)
            st, out = _end_shadow(life.installed, event.outcome, event.reason,
                                  event.figures, event.ts)
            return replace(life, installed=st), [SaveState(st), CrashPoint("shadow_ended"),
                                                 *out]
    raise LifecycleError(f"{type(event).__name__} is not expected in mode {m.value}")


def _idle(life: Life, installed: InstalledState, **changes: Any) -> Life:
    return replace(life, **{"installed": installed, "mode": Mode.IDLE, "deployment": None,
                            "scope": "device", "decides": (), "members": (), "removing": (),
                            "progress": None, "candidates": (), "loaded": 0, "reason": None,
                            "loading": (), "dirty": False, "download": None,
                            "shadowing": False, **changes})


# -- boot ------------------------------------------------------------------------------

def _boot(life: Life, ev: Boot) -> tuple[Life, list[Effect]]:
    state = ev.stored
    out: list[Effect] = []
    pending = False
    life = replace(life, max_models_bytes=ev.max_models_bytes, max_models=ev.max_models,
                   max_artifact_bytes=ev.max_artifact_bytes)
    if ev.unreadable is not None:
        found = ("recovered with the newest verified model on disk" if state.models
                 else "no verified model on disk")
        out += [SaveState(state), report("failed", stage="boot", model=state.current,
                                         reason=f"{ev.unreadable}; {found}")]
    if state.phase == "trial" and watched(state):
        # With nothing to go back to (the set added every model that serves): resume.
        if _can_roll_back(state) and state.trial_boots >= ev.max_restarts:
            reason = (f"the agent stopped {state.trial_boots + 1} time(s) during the health "
                      f"window of {_labels(_on_trial(state))}")
            state, effects = _roll_back(state, None, reason, ev.ts)
            out += [SaveState(state), CrashPoint("rollback_saved"), *effects]
        else:
            state = replace(state, trial_boots=state.trial_boots + 1)
            out += [SaveState(state), CrashPoint("boot_trial_saved")]
            pending = True
    life = replace(life, installed=state, trial_pending=pending, serving={})
    return _load_next(life, out)


def _to_load(life: Life) -> list[ModelRecord]:
    return [r for n, r in sorted(life.installed.models.items()) if life.serving.get(n) != r]


def _load_next(life: Life, out: list[Effect]) -> tuple[Life, list[Effect]]:
    state = life.installed
    serving = {n: r for n, r in life.serving.items() if state.models.get(n) == r}
    life = replace(life, serving=serving)
    todo = _to_load(life)
    if todo:
        return replace(life, mode=Mode.LOADING), [*out, LoadModel(todo[0])]
    if state.phase == "trial" and not watched(state):
        state = replace(state, phase="committed", trial={}, trial_boots=0)
        life = replace(life, dirty=True)
    if life.dirty:
        out = [*out, SaveState(state)]
    pending = life.trial_pending and bool(watched(state))
    # The most recently installed model goes in last: readers of one model are told it.
    last = state.current
    order = sorted(serving, key=lambda n: (last is not None and n == last.name, n))
    resume: list[Effect] = [] if state.shadow is None else [StartShadow(state.shadow)]
    return _idle(life, state, trial_pending=pending), [
        *out, CleanModels(), Swap({n: serving[n] for n in order}), *resume, StateChanged()]


def _boot_loaded(life: Life, ev: ModelLoaded | ModelUnusable) -> tuple[Life, list[Effect]]:
    todo = _to_load(life)
    if not todo or ev.record != todo[0]:
        raise LifecycleError(f"loaded {ev.record.label()}, expected "
                             f"{todo[0].label() if todo else 'nothing'}")
    if isinstance(ev, ModelLoaded):
        return _load_next(replace(life, serving={**life.serving, ev.record.name: ev.record}),
                          [])
    state, rec = life.installed, ev.record
    out: list[Effect] = [report("failed", stage="boot", model=rec, reason=ev.reason)]
    reason = f"current model {rec.label()} failed verification at boot"
    if rec.name in watched(state) and _can_roll_back(state):
        # A model of the set on trial is broken: the whole set goes back.
        state, effects = _roll_back(state, None, reason, ev.ts)
        out += [SaveState(state), *effects]
        life = replace(life, trial_pending=False)
    elif (prev := state.previous.get(rec.name)) is not None and prev != rec:
        previous = {n: r for n, r in state.previous.items() if n != rec.name}
        state = replace(state, models={**state.models, rec.name: prev}, previous=previous,
                        trial={n: r for n, r in state.trial.items() if n != rec.name})
        state = _mark_failed(state, [rec], reason).with_result(
            _result("rolled_back", None, reason, ev.ts, models=[rec]))
        out += [SaveState(state), report("rolled_back", model=rec, restored=prev,
                                         reason=reason)]
    else:
        # Nothing to go back to: that model is no longer served; the others are.
        state = replace(state, models={n: r for n, r in state.models.items()
                                       if n != rec.name},
                        previous={n: r for n, r in state.previous.items() if n != rec.name},
                        trial={n: r for n, r in state.trial.items() if n != rec.name})
        life = replace(life, dirty=True)
    return _load_next(replace(life, installed=state), out)


# -- deployments -----------------------------------------------------------------------

def _accepted(life: Life, ev: Accepted) -> tuple[Life, list[Effect]]:
    dep, st = ev.deployment, life.installed
    if handled(st, dep.digest):
        return life, []
    if _ended(st, dep.digest):
        # The same document again after a newer one: a controller that never heard its
        # answer sends it again. Its outcome stands (refusing it now as stale would tell a
        # rollout it failed); the state saying it goes out again.
        return life, [StateChanged()]
    last = st.scope_counter(ev.scope)
    if dep.counter <= last:
        if ev.quiet:
            return life, []
        reason = (f"deployment counter {dep.counter} is not newer than the installed "
                  f"{last} (replayed or stale)")
        return step(life, Refused(dep.digest, ev.size, reason, dep, ts=ev.ts))
    if dep.shadow is not None:
        return _shadow_accepted(life, ev)
    superseded = {n: st.counter_of(n) for n in dep.names if st.counter_of(n) >= dep.counter}
    decides = tuple(n for n in dep.names if n not in superseded)
    ending: list[Effect] = []
    if st.shadow is not None and set(decides) & {r.name for r in st.shadow.models}:
        # What the run compares with is being decided anew: its figures would no longer
        # say anything about what serves.
        st, ending = _end_shadow(st, "shadow_insufficient",
                                 f"replaced by deployment {dep.counter}",
                                 ev.shadow_figures, ev.ts)
        life = replace(life, installed=st)
    serving = life.serving
    members = tuple(m for m in dep.models if m.name in decides and not (
        (cur := serving.get(m.name)) is not None and m.sha256 is not None
        and cur.sha256 == m.sha256))
    removing = tuple(n for n in dep.remove if n in decides and n in serving)
    skipped = [{"name": n, "reason": f"superseded by #{c}"} for n, c in superseded.items()]
    refusal = _over_limits(life, members, removing, ev.served_bytes)
    if refusal is not None:
        life, refused = step(life, Refused(dep.digest, ev.size, refusal, dep, ts=ev.ts))
        return life, [*refused, *ending]
    if not members and not removing:
        # Nothing to install: the device already serves what it names (or a newer
        # deployment decided it). The state says so, so that nobody has to infer it.
        same = [m.name for m in dep.models if m.name in decides]
        absent = [n for n in dep.remove if n in decides]
        why = "; ".join([*([f"already serving {', '.join(same)}"] if same else []),
                         *([f"not serving {', '.join(absent)}"] if absent else []),
                         *(f"{s['name']} {s['reason']}" for s in skipped)])
        st = replace(st, deployment_digest=dep.digest).with_counters(
            ev.scope, dep.counter, decides).with_result(
                _result("committed", dep, why, ev.ts, models=_served(serving, dep.names)))
        return replace(life, installed=st), [SaveState(st), *ending, StateChanged()]
    life = replace(life, mode=Mode.INSTALLING, deployment=dep, scope=ev.scope,
                   decides=decides, members=members, removing=removing,
                   progress="started", candidates=(), loaded=0)
    # The run's end is saved before the install goes on (kill -9 after it: the run is
    # over, the deployment is not handled yet and is taken again).
    out: list[Effect] = [*([SaveState(st)] if ending else []), *ending,
                         report("install_started", deployment=dep, skipped=skipped or None),
                         CrashPoint("install_started")]
    if members:
        return life, out
    return _remove_now(life, out, ev.ts)


def _shadow_accepted(life: Life, ev: Accepted) -> tuple[Life, list[Effect]]:
    """A shadow document: its served ``models`` must be what serves (the baseline the
    candidates are compared with); its candidates are installed beside them."""
    dep, st = ev.deployment, life.installed
    assert dep.shadow is not None
    out: list[Effect] = []
    if st.shadow is not None:
        st, out = _end_shadow(st, "shadow_insufficient",
                              f"replaced by deployment {dep.counter}", ev.shadow_figures,
                              ev.ts)
        life = replace(life, installed=st)
        out = [SaveState(st), *out]
    serving = life.serving
    why = None
    for m in dep.models:
        cur = serving.get(m.name)
        if cur is None or cur.version != m.version or (
                m.sha256 is not None and cur.sha256 != m.sha256):
            have = f"serves {cur.label()}" if cur is not None else f"serves no {m.name}"
            why = (f"the device {have}, the shadow document compares with {m.label()} "
                   "(deploy it first)")
            break
    if why is None and dep.remove:
        why = "a shadow document removes nothing"
    candidates = dep.shadow.models
    if why is None:
        for c in candidates:
            if c.name not in serving:
                why = f"serves no model {c.name} to compare with"
                break
    if why is None:
        why = _over_limits(replace(life, max_models=0), candidates, (), ev.served_bytes)
    if why is not None:
        st = st.with_failed(dep.digest, why).with_counters(ev.scope, dep.counter, ()) \
            .with_result(_result("failed", dep, why, ev.ts))
        return replace(life, installed=st), [
            *out, SaveState(st), report("failed", stage="shadow", deployment=dep, reason=why)]
    life = replace(life, mode=Mode.INSTALLING, deployment=dep, scope=ev.scope, decides=(),
                   members=candidates, removing=(), progress="started", candidates=(),
                   loaded=0, shadowing=True)
    return life, [*out, report("install_started", deployment=dep, shadow=True),
                  CrashPoint("install_started")]


def _end_shadow(st: InstalledState, outcome: str, reason: str,
                figures: Mapping[str, Any] | None, ts: float,
                ) -> tuple[InstalledState, list[Effect]]:
    """The state without its shadow run, which ended with ``outcome``; its candidates
    stay stored (``shadow_kept``). The effects after the save: stop it, say so."""
    run = st.shadow
    assert run is not None
    result: dict[str, Any] = {"result": outcome, "ts": ts, "deployment": run.deployment,
                              "digest": run.digest, "reason": reason,
                              "models": [r.name for r in run.models],
                              "model": {"name": run.models[0].name,
                                        "version": run.models[0].version},
                              "shadow": dict(figures) if figures is not None else None}
    kept = {**st.shadow_kept, **{r.name: r for r in run.models}}
    st = replace(st, shadow=None, shadow_kept=kept).with_result(result)
    return st, [StopShadow(),
                report("shadow_ended", deployment={"counter": run.deployment},
                       result=outcome, reason=reason, models=_records(list(run.models)),
                       shadow=result["shadow"]),
                CleanModels(), StateChanged()]


def _start_shadow(life: Life, ts: float) -> tuple[Life, list[Effect]]:
    """The candidates passed their smoke test: the run is saved, then started."""
    dep, st = life.deployment, life.installed
    assert dep is not None and dep.shadow is not None
    spec = dep.shadow
    run = ShadowRun(deployment=dep.counter, digest=dep.digest, models=life.candidates,
                    sample_rate=spec.sample_rate, min_requests=spec.min_requests,
                    time_limit_s=spec.time_limit_s,
                    gate=None if spec.gate is None else dict(spec.gate), started=ts)
    kept = {n: r for n, r in st.shadow_kept.items()
            if n not in {c.name for c in life.candidates}}
    st = replace(st, shadow=run, shadow_kept=kept, deployment_digest=dep.digest
                 ).with_counters(life.scope, dep.counter, ())
    return _idle(life, st), [
        CrashPoint("smoke_tested"), SaveState(st), CrashPoint("shadow_saved"),
        StartShadow(run),
        report("shadow_started", deployment=dep, models=_records(list(life.candidates)),
               sample_rate=spec.sample_rate, min_requests=spec.min_requests,
               time_limit_s=spec.time_limit_s),
        CleanModels(), StateChanged()]


def _over_limits(life: Life, members: tuple[ModelChange, ...], removing: tuple[str, ...],
                 served: int) -> str | None:
    """Why the models would not fit the limits (checked before any download), or None."""
    most = life.max_models
    after = (set(life.serving) - set(removing)) | {m.name for m in members}
    # Growing past it only: a device over a limit lowered since may still replace or shed.
    if most and len(after) > most and len(after) > len(life.serving):
        return (f"the device would serve {len(after)} models, over the limit of {most} "
                "(limits.max_models)")
    cap = life.max_artifact_bytes
    for m in members:
        if cap and m.length is not None and m.length > cap:
            return (f"{m.label()}: model is {m.length} bytes, over the limit of {cap} "
                    "(limits.max_artifact_bytes)")
    budget = life.max_models_bytes
    new = sum(m.length or 0 for m in members)
    # Nothing new to load (a removal, what already serves) needs no memory: a device over
    # its budget (lowered since its models were installed) must still be able to shed one.
    if budget and new and served + new > budget:
        return (f"the models would need {served + new} bytes of memory ({served} served now, "
                f"{new} new, held together while the new ones load and are watched), over "
                f"the budget of {budget} (limits.max_models_bytes)")
    return None


def _remove_now(life: Life, out: list[Effect], ts: float) -> tuple[Life, list[Effect]]:
    """A deployment that only removes models: swapped out and committed at once."""
    dep, st = life.deployment, life.installed
    assert dep is not None
    gone = [st.models[n] for n in life.removing if n in st.models]
    keep = {n: r for n, r in st.models.items() if n not in life.removing}
    st = replace(st, models=keep,
                 previous={n: r for n, r in st.previous.items() if n not in life.removing},
                 trial={n: r for n, r in st.trial.items() if n not in life.removing},
                 deployment_digest=dep.digest).with_counters(
                     life.scope, dep.counter, life.decides).with_result(
                         _result("committed", dep, None, ts, models=[]))
    if st.phase == "trial" and not watched(st):
        st = replace(st, phase="committed", trial={}, trial_boots=0)
    serving = {n: r for n, r in life.serving.items() if n not in life.removing}
    return _idle(life, st, serving=serving), [
        *out, SaveState(st), CrashPoint("trial_saved"),
        Swap(dict.fromkeys(life.removing)), CrashPoint("swapped"),
        report("committed", deployment=dep, removed=_records(gone)),
        CleanModels(), CleanPartial(), CrashPoint("cleaned")]


#: Install progress: which event may come at which point, and where it leads.
_NEXT: dict[tuple[str, type], str] = {
    ("started", Fetched): "fetched", ("started", Verified): "local",
    ("fetched", Verified): "verified", ("verified", Adopted): "adopted",
    ("local", Loaded): "loading", ("adopted", Loaded): "loading",
    ("loading", Loaded): "loading", ("loaded", SmokeTested): "smoke_tested",
}


def _progress(life: Life, ev: Fetched | Verified | Adopted | Loaded | SmokeTested,
              ) -> tuple[Life, list[Effect]]:
    assert life.progress is not None and life.deployment is not None
    nxt = _NEXT.get((life.progress, type(ev)))
    if nxt is None or (nxt == "local") != (isinstance(ev, Verified) and ev.local is not None):
        raise LifecycleError(f"{type(ev).__name__} is not expected after {life.progress}")
    dep = life.deployment
    many = len(life.members) > 1
    member = life.members[min(len(life.candidates), len(life.members) - 1)]
    named = {"model": member.name} if many else {}
    match ev:
        case Fetched(download=got):
            points: list[Effect] = [CrashPoint("fetched")]
            if many:
                points.append(CrashPoint(f"fetched:{member.name}"))
            if got is None:
                return replace(life, progress=nxt), points
            message = str(got.get("message", "")) or None
            if message is not None and many:
                message = f"{member.name}: {message}"
            if message is not None and life.download:
                message = f"{life.download}; {message}"
            return (replace(life, progress=nxt, download=message),
                    [report("downloaded", deployment=dep, download=dict(got), **named),
                     *points])
        case Verified(local=None):
            return replace(life, progress=nxt), [report("verified", deployment=dep, **named)]
        case Verified(local=ModelRecord() as local):
            _check_member(member, local)
            stored = replace(local, deployment=dep.digest)
            return (_stored(life, stored, "local"),
                    [report("verified", deployment=dep, source="local copy", **named)])
        case Adopted():
            _check_member(member, ev.record)
            return _stored(life, ev.record, "adopted"), [CrashPoint("adopted")]
        case Loaded():
            loaded = life.loaded + 1
            return (replace(life, loaded=loaded,
                            progress="loaded" if loaded == len(life.candidates) else nxt),
                    [CrashPoint("loaded")])
    if life.shadowing:
        return _start_shadow(life, ev.ts)
    return _start_trial(life)


def _check_member(member: ModelChange, record: ModelRecord) -> None:
    if record.name != member.name:
        raise LifecycleError(f"stored {record.label()}, expected a version of {member.name}")


def _stored(life: Life, record: ModelRecord, last: str) -> Life:
    """``record`` stored for the install's next model: on to the one after, or to loading."""
    candidates = (*life.candidates, record)
    done = len(candidates) == len(life.members)
    return replace(life, candidates=candidates, progress=last if done else "started")


def _start_trial(life: Life) -> tuple[Life, list[Effect]]:
    """Smoke-tested: the durable switch to the trial, then one swap of the set's names."""
    dep, st = life.deployment, life.installed
    assert dep is not None
    new = {r.name: r for r in life.candidates}
    before: dict[str, ModelRecord | None] = {n: st.models.get(n) for n in new}
    before.update({n: st.models[n] for n in life.removing if n in st.models})
    models = {**{n: r for n, r in st.models.items() if n not in life.removing}, **new}
    previous = {**st.previous, **{n: r for n, r in before.items() if r is not None and n in new}}
    st = replace(st, models=models, previous=previous, phase="trial", trial=before,
                 trial_boots=0, deployment_digest=dep.digest,
                 shadow_kept={n: r for n, r in st.shadow_kept.items() if n not in new},
                 ).with_counters(
                     life.scope, dep.counter, life.decides)
    serving = {**{n: r for n, r in life.serving.items() if n not in life.removing}, **new}
    changes: dict[str, ModelRecord | None] = {**new, **dict.fromkeys(life.removing)}
    return (replace(life, installed=st, mode=Mode.TRIAL, serving=serving, progress=None,
                    candidates=(), loaded=0),
            [CrashPoint("smoke_tested"), SaveState(st), CrashPoint("trial_saved"),
             Swap(changes), CrashPoint("swapped"),
             report("swapped", deployment=dep, **_change_fields(before, new)),
             CleanModels(), WatchHealth(tuple(sorted(new)))])


def _failed(life: Life, ev: Failed | NoSpace) -> tuple[Life, list[Effect]]:
    dep = life.deployment
    assert dep is not None
    stage = "space" if isinstance(ev, NoSpace) else life.stage
    reason = f"{stage}: {ev.reason}"
    st = life.installed.with_failed(dep.digest, reason).with_counters(
        life.scope, dep.counter, life.decides).with_result(
            _result("failed", dep, reason, ev.ts, life.download))
    extra = {"needed_bytes": ev.needed, "free_bytes": ev.free,
             "reserve_bytes": ev.reserve} if isinstance(ev, NoSpace) else {}
    # Cleanup before the report: it frees what this install wrote (staging, the partial
    # download), and the save above may have failed for want of that space.
    return _idle(life, st), [
        SaveState(st), CleanModels(), CleanPartial(),
        report("failed", stage=stage, deployment=dep, reason=ev.reason, **extra)]


# -- the health window -----------------------------------------------------------------

def _judged(life: Life, ev: Healthy | Unhealthy) -> tuple[Life, list[Effect]]:
    st = life.installed
    # After a restart inside the trial the deployment is known by its counter only.
    which: InstallRequest | int | None = life.deployment or _trial_counter(st)
    bad = _on_trial(st)
    if isinstance(ev, Healthy):
        st = replace(st, phase="committed", trial={}, trial_boots=0,
                     previous={n: r for n, r in st.previous.items() if n in st.models},
                     ).with_result(_result("committed", which, None, ev.ts, life.download,
                                           models=bad))
        return _idle(life, st), [
            SaveState(st), CrashPoint("committed"),
            report("committed", deployment=_named(which), **_model_fields(bad)),
            CleanModels(), CleanPartial(), CrashPoint("cleaned")]
    if not _can_roll_back(st):
        # Nothing to go back to: keep serving rather than serve nothing.
        st = replace(st, phase="committed", trial={}, trial_boots=0).with_result(
            _result("failed", which, ev.reason, ev.ts, models=bad))
        return _idle(life, st), [
            SaveState(st),
            report("failed", stage="health", deployment=_named(which), **_model_fields(bad),
                   reason=f"{ev.reason}; no previous model to restore, keeping it")]
    loading = tuple(r for _, r in sorted(st.trial.items()) if r is not None)
    life = replace(life, mode=Mode.ROLLING_BACK, reason=ev.reason, loading=loading)
    if not loading:
        return _rolled_back(life, ev.ts)
    return life, [LoadModel(loading[0])]


def _rollback_loaded(life: Life, ev: ModelLoaded | ModelUnusable,
                     ) -> tuple[Life, list[Effect]]:
    if not life.loading or ev.record != life.loading[0]:
        raise LifecycleError(f"loaded {ev.record.label()}, expected the previous model")
    if isinstance(ev, ModelUnusable):
        # Nothing loadable to go back to: the trial set keeps serving, still on trial.
        return _idle(life, life.installed), [
            report("failed", stage="rollback", model=ev.record, reason=ev.reason)]
    life = replace(life, loading=life.loading[1:])
    if life.loading:
        return life, [LoadModel(life.loading[0])]
    return _rolled_back(life, ev.ts)


def _rolled_back(life: Life, ts: float) -> tuple[Life, list[Effect]]:
    st = life.installed
    assert life.reason is not None
    restore = dict(st.trial)
    st, effects = _roll_back(st, life.deployment, life.reason, ts)
    serving = {**{n: r for n, r in life.serving.items() if n not in restore},
               **{n: r for n, r in restore.items() if r is not None}}
    return _idle(life, st, serving=serving), [
        Swap(restore), SaveState(st), CrashPoint("rollback_saved"), *effects,
        CleanModels(), CleanPartial()]


def _roll_back(state: InstalledState, dep: InstallRequest | None, reason: str,
               ts: float) -> tuple[InstalledState, list[Effect]]:
    """The set on trial goes back to what it replaced (models it added go, models it
    removed come back); ``last_result`` names the trial's deployment, so the state itself
    says that deployment was rolled back (the event may come later)."""
    which: InstallRequest | int | None = dep or _trial_counter(state)
    bad = _on_trial(state)
    models = dict(state.models)
    for name, before in state.trial.items():
        if before is None:
            models.pop(name, None)
        else:
            models[name] = before
    restored = [r for _, r in sorted(state.trial.items()) if r is not None]
    new = replace(state, models=models,
                  previous={n: r for n, r in state.previous.items() if n not in state.trial},
                  phase="committed", trial={}, trial_boots=0)
    new = _mark_failed(new, bad, reason).with_result(
        _result("rolled_back", which, reason, ts, models=bad))
    fields = _model_fields(bad)
    fields["restored"] = restored[0] if len(restored) == 1 and len(bad) <= 1 \
        else _records(restored)
    return new, [report("rolled_back", deployment=_named(which), reason=reason, **fields)]


# -- helpers ---------------------------------------------------------------------------

def _can_roll_back(state: InstalledState) -> bool:
    """Whether going back leaves the device serving something."""
    return any(r is not None for r in state.trial.values()) or \
        any(n not in state.trial for n in state.models)


def _on_trial(state: InstalledState) -> list[ModelRecord]:
    return [state.models[n] for n in watched(state)]


def _mark_failed(state: InstalledState, bad: list[ModelRecord], reason: str,
                 ) -> InstalledState:
    for digest in dict.fromkeys(r.deployment for r in bad if r.deployment is not None):
        state = state.with_failed(digest, reason)
    return state


def _refused(st: InstalledState, ev: Refused) -> InstalledState:
    st = st.with_failed(ev.digest, ev.reason)
    if ev.deployment is not None:
        st = st.with_result(_result("refused", ev.deployment, ev.reason, ev.ts))
    return st


def _ended(state: InstalledState, digest: str) -> bool:
    """Whether the state's ``results`` say how the deployment with this digest ended (a
    retry pending is no end)."""
    return any(r.get("digest") == digest and r.get("result") != "retrying"
               for r in state.results)


def _trial_counter(state: InstalledState) -> int | None:
    """The counter of the deployment under trial (the trial state records it), if any."""
    names = watched(state) or tuple(state.trial)
    if state.phase != "trial" or not names:
        return None
    return max(state.counter_of(n) for n in names) or None


def _named(dep: InstallRequest | int | None) -> InstallRequest | dict[str, int] | None:
    """How an event names a deployment known only by its counter."""
    return {"counter": dep} if isinstance(dep, int) else dep


def _labels(records: list[ModelRecord]) -> str:
    return ", ".join(r.label() for r in records) or "nothing"


def _records(records: list[ModelRecord]) -> list[dict[str, str]]:
    return [{"name": r.name, "version": r.version, "sha256": r.sha256} for r in records]


def _served(serving: Mapping[str, ModelRecord], names: tuple[str, ...]) -> list[ModelRecord]:
    return [serving[n] for n in names if n in serving]


def _model_fields(models: list[ModelRecord]) -> dict[str, Any]:
    """How an event names the models it is about: ``model`` when one, else ``models``."""
    if len(models) == 1:
        return {"model": models[0]}
    return {"models": _records(models)} if models else {}


def _change_fields(before: Mapping[str, ModelRecord | None],
                   new: Mapping[str, ModelRecord]) -> dict[str, Any]:
    """The fields of a ``swapped`` event: the new models, those they replaced, and the
    models removed."""
    removed = [r for n, r in sorted(before.items()) if n not in new and r is not None]
    if len(new) == 1 and not removed:
        ((name, rec),) = new.items()
        return {"model": rec, "previous": before.get(name)}
    return {"models": _records([new[n] for n in sorted(new)]),
            "previous": _records([r for n, r in sorted(before.items())
                                  if n in new and r is not None]),
            "removed": _records(removed) or None}


def _result(outcome: str, dep: InstallRequest | int | None, reason: str | None, ts: float,
            download: str | None = None, *, models: list[ModelRecord] | None = None,
            ) -> dict[str, Any]:
    """An entry of ``results`` (and ``last_update`` of the state): what happened
    (``outcome``) to which deployment, the models it names, and how they were downloaded
    when this process did it."""
    out: dict[str, Any] = {"result": outcome, "ts": ts}
    if download is not None:
        out["download"] = download
    if models:
        # For readers of one model: the first of them.
        out["model"] = {"name": models[0].name, "version": models[0].version}
    if isinstance(dep, InstallRequest):
        out["deployment"] = dep.counter
        # A shadow document is about its candidates (what it served stays as it was).
        out["models"] = list(dep.names) if dep.shadow is None else \
            [m.name for m in dep.shadow.models]
        if dep.digest:
            # Which document: one delivered again later is known by it (see _ended).
            out["digest"] = dep.digest
    elif dep is not None:
        out["deployment"] = dep
        out["models"] = [m.name for m in models or ()]
    if reason is not None:
        out["reason"] = reason
    return out
