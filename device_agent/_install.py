"""The install pipeline: a deployment in, its verified models serving (or the old ones kept)
out.

Everything that touches the network or signatures sits behind
:class:`ArtifactSource`; the pipeline itself is broker-free and is driven
directly by the tests with a source that serves local artifacts.

Order of durable steps (see ``_state``): every new model of the deployment is copied
complete into ``models/`` first, then ``installed.json`` is switched to
``phase="trial"`` (the set's names point at the new models; ``trial`` keeps what they
were), then one in-memory swap of all its names happens. A restart inside the trial
resumes the health window once (``health.max_restarts``) and rolls the whole set back
after that, so a model that crashes the agent cannot crash-loop it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_sdk import Artifact
from edge_sdk._internal import load_model_file
from edge_sdk.errors import (
    ConfigError,
    EdgeError,
    InstallError,
    TransportError,
    VerificationError,
)

from ._config import AgentConfig
from ._crash import crash_point
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
)
from ._health import HealthWindow, WindowInterrupted
from ._intake import Unverified
from ._interfaces import ArtifactSource, InstallRequest, ModelChange, ModelLoader, Reporter
from ._lifecycle import Life, Mode, handled, step
from ._models import LoadedModels, release_memory
from ._serving import ModelSlots, Served, SmokeTestError
from ._shadow import Shadowing
from ._state import InstalledState, ModelRecord, ShadowRun, StateStore
from ._storage import NoSpaceError, StateWriter

log = logging.getLogger("device_agent")


class Installer:
    """Boots into a verified model and applies deployments, one at a time.

    The transitions are :func:`~device_agent._lifecycle.step`'s; this class gathers
    the events (state file, downloads, model loads, the health window) and carries out
    the effects in order."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        slots: ModelSlots,
        source: ArtifactSource | None,
        reporter: Reporter,
        stop: threading.Event | None = None,
        *,
        load_model: ModelLoader | None = None,
        on_storage: Callable[[bool], None] | None = None,
        shadowing: Shadowing | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.slots = slots
        self.source = source
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.life = Life()
        self._models = LoadedModels(config, store, load_model or load_model_file)
        self._health = HealthWindow(config.health, self.stop, self._models.sample)
        #: Whether the state directory takes writes; saves go through it.
        self.storage = StateWriter(store, config.limits, reporter, on_storage)
        #: Digests of unverifiable messages already reported by this process.
        self._unverified_seen: dict[str, None] = {}
        #: Deployments that arrived while the state directory could not be written, by
        #: digest: offered again (see :meth:`take_waiting`) once it can.
        self._waiting: dict[str, bytes] = {}
        #: Runs shadow models beside the served ones (a request tap of the agent's).
        self.shadowing = shadowing or Shadowing(config)

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
        if self.storage.unsaved is not None:
            # The cleanup that followed a failed save may have made room: try at once.
            self.storage.retry(now=True)

    def _do(self, effect: Effect) -> Event | None:
        match effect:
            case SaveState(state):
                self.storage.save(state)
            case CrashPoint(name):
                crash_point(name)
            case Report(kind, fields):
                self._event(kind, **fields)
            case StateChanged():
                self.reporter.state_changed()
            case LoadModel(record):
                if self._models.get(record) is not None:
                    return ModelLoaded(record, ts=time.time())
                try:
                    self._models.load(record)
                except (EdgeError, SmokeTestError, OSError) as err:
                    log.error("model %s is unusable: %s", record.label(), err)
                    return ModelUnusable(record, str(err), ts=time.time())
                return ModelLoaded(record, ts=time.time())
            case Swap(changes):
                served = {n: None if r is None else self._models.get(r)
                          for n, r in changes.items()}
                assert all(s is not None for n, s in served.items() if changes[n] is not None)
                if self.life.mode is Mode.TRIAL:
                    for name, s in served.items():
                        if s is not None:
                            # From the first request it serves, not from the window's start.
                            self._models.start_trial(s, self.state.trial.get(name))
                self.slots.swap(served)
            case CleanModels():
                durable = self.storage.durable
                self.store.clean(self.state, *(s for s in (durable,) if s is not None))
                trial = self.state.trial.values() if self.state.phase == "trial" else ()
                shadow = self.state.shadow
                trial = (*trial, *(shadow.models if shadow is not None else ()))
                # What was let go of is given back now; a model a request still holds,
                # once that request is done (LoadedModels' finalizer).
                if self._models.keep(r.id for r in (*self.life.serving.values(), *trial)
                                     if r is not None):
                    release_memory()
            case CleanPartial():
                self.store.clean_partial()
            case StartShadow(run):
                return self._start_shadow(run)
            case StopShadow():
                self.shadowing.stop()
            case WatchHealth(names):
                watched = [s for n in names if (s := self.slots.get(n)) is not None]
                assert watched
                # After a restart: the versions they replaced are loaded now.
                for s in watched:
                    self._models.start_trial(s, self.state.trial.get(s.name))
                try:
                    reason = self._health.watch(*watched)
                except WindowInterrupted:
                    return None
                finally:
                    for s in watched:
                        self._models.end_trial(s)
                return Healthy(ts=time.time()) if reason is None else \
                    Unhealthy(reason, ts=time.time())
        return None

    def _start_shadow(self, run: ShadowRun) -> Event | None:
        """Start comparing: the candidates the install just loaded, or (after a restart)
        loaded again from their stored, re-verified files."""
        candidates: list[Served] = []
        for record in run.models:
            if self.slots.get(record.name) is None:
                why = f"serves no model {record.name} to compare with"
            else:
                got = self._models.get(record)
                if got is not None:
                    candidates.append(got)
                    continue
                try:
                    candidates.append(self._models.load(record))
                    continue
                except (EdgeError, SmokeTestError, OSError) as err:
                    why = f"shadow model {record.label()} cannot be loaded again: {err}"
            log.error("shadow run of deployment %d ends: %s", run.deployment, why)
            return ShadowEnded(run.deployment, "failed", why, ts=time.time())
        self.shadowing.start(run, candidates)
        return None

    def settle_shadow(self) -> None:
        """Record how the shadow run ended, once it has (call from the install thread
        while no install runs)."""
        self.shadowing.end_overdue()
        ended = self.shadowing.take_ended()
        if ended is not None and self.life.mode is Mode.IDLE:
            counter, outcome, reason, figures = ended
            self._feed(ShadowEnded(counter, outcome, reason, figures, ts=time.time()))

    # -- boot ----------------------------------------------------------------------------

    def boot(self) -> None:
        """Serve the verified models on disk; settle an interrupted trial."""
        max_restarts = self.config.health.max_restarts
        limits = self.config.limits
        unreadable = None
        try:
            stored = self.store.load()
            self.storage.durable = stored
        except ConfigError as err:
            stored, unreadable = self._recover(), str(err)
        self._feed(Boot(stored, max_restarts, unreadable, ts=time.time(),
                        max_models_bytes=limits.max_models_bytes,
                        max_models=limits.max_models,
                        max_artifact_bytes=limits.max_artifact_bytes))

    def _recover(self) -> InstalledState:
        """The state file is unreadable (disk damage; writes are atomic): start over from the
        newest complete model of each name on disk rather than serve nothing."""
        dirs = sorted((d for d in self.store.models.iterdir() if not d.name.startswith(".")),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        models: dict[str, ModelRecord] = {}
        for d in dirs:
            try:
                record = ModelRecord.for_artifact(Artifact.from_dir(d), None)
            except EdgeError:
                continue
            if d.name in (record.id, record.stored_apart().id):
                models.setdefault(record.name, replace(record, id=d.name))
        return InstalledState(models=models)

    def resume(self) -> None:
        """Finish a health window interrupted by a restart (call once serving has started)."""
        self._feed(Resume(ts=time.time()))

    # -- storage -------------------------------------------------------------------------

    def take_waiting(self) -> list[bytes]:
        """The deployments that waited for the state directory, once it can be written."""
        if self.storage.error is not None:
            return []
        waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

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

    def apply(self, payload: bytes, *, counter: int | None = None, quiet: bool = False,
              topic: str = "") -> bool:
        """Handle one raw ``desired`` message (``counter``: its verified counter, when
        :meth:`screen` passed it; ``quiet``: pass a replay over unreported; ``topic``:
        where it came from, for the log). Never raises
        for a bad deployment: it is reported and the models serving keep serving. Returns
        True when the install failed for a transient reason (broker or responder away)
        and should be tried again."""
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
        cfg = self.config
        try:
            # Counters are checked per scope and per model by the lifecycle; downgrades
            # only for the models the document would decide (see _decided).
            dep = self.source.verify_deployment(payload, last_counter=None, installed=None)
            scope = dep.scope_for(cfg.device_id, cfg.groups)
            if quiet and dep.counter <= st.scope_counter(scope):
                log.debug("deployment on %s superseded by #%d", topic,
                          max((st.counter_of(n) for n in dep.names), default=0))
                return False
            decided = self._decided(dep)
            if decided:
                dep = self.source.verify_deployment(payload, last_counter=None,
                                                    installed=decided)
        except VerificationError as err:
            self._refuse(Refused(digest, size, f"deployment failed verification: {err}", counter,
                                 ts=time.time()))
            return False
        except EdgeError as err:
            self._refuse(Refused(digest, size, f"deployment rejected: {err}", counter,
                                 ts=time.time()))
            return False
        dep = replace(dep, digest=digest)
        if self.storage.error is not None and not self.storage.retry(now=True):
            assert self.storage.error is not None
            if digest not in self._waiting:
                log.warning("deployment %s waits: %s", dep.label(), self.storage.error)
                self._feed(Unwritable(dep, self.storage.error, ts=time.time()))
            self._waiting[digest] = payload
            return False
        self._feed(Accepted(dep, size, ts=time.time(), quiet=quiet, scope=scope,
                            served_bytes=self._served_bytes(),
                            shadow_figures=self.shadowing.figures()))
        if self.life.mode is not Mode.INSTALLING:
            return False
        return self._install(dep)

    def _refuse(self, event: Refused) -> None:
        log.warning("refused a deployment: %s", event.reason)
        self._feed(event)

    def _install(self, dep: InstallRequest) -> bool:
        """Fetch, verify and store each model of the deployment, then load and smoke-test
        them all, telling the machine each step; on the last it swaps them in and runs
        the health window."""
        shadow = self.life.shadowing
        if shadow:
            # The candidates are fetched as a deployment of them (their signed targets).
            dep = dep.shadow_install()
        try:
            local: set[str] = set()
            for member in self.life.members:
                found = self.store.find(member.sha256) if member.sha256 else None
                if found is not None and found.name == member.name and (
                        not shadow or found.version == member.version):
                    local.add(found.id)
                    self._feed(Verified(found, ts=time.time()))
                else:
                    self._fetch(dep, member)
            served: list[Served] = []
            for record in self.life.candidates:
                # Just adopted: moved by this process from what was verified above. A local
                # copy (a rollback) was only found by name and is hashed as it is opened.
                served.append(self._models.load(record, smoke=False,
                                                verify_hash=record.id in local))
                self._feed(Loaded(ts=time.time()))
            for s in served:
                try:
                    self._models.smoke(s)
                except SmokeTestError as err:
                    if len(served) == 1:
                        raise
                    # One reason for the whole set: it says which member to fix.
                    raise SmokeTestError(f"{s.record.label()}: {err}") from err
                s.health.reset()
            # The trial is about to be saved: a disk that filled up meanwhile fails the
            # install here rather than swap in models the state file cannot name.
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

    def _fetch(self, dep: InstallRequest, member: ModelChange) -> None:
        """Download, check and store one model of the deployment."""
        assert self.source is not None
        staging = self.store.staging_dir(
            dep.digest if not dep.is_set else f"{dep.digest}-{member.name}")
        got = self.source.fetch(dep, staging, model=member.name, have=self._bases(member.name),
                                reserve=self.storage.reserve)
        self._feed(Fetched(got.download, ts=time.time()))
        # A source that checked the bytes against signed metadata as it wrote them says
        # which hash: compared below, the model is not read again (the file is in our
        # staging directory, written by this process a moment ago).
        art = Artifact.from_dir(got.path, verify_hash=got.verified_sha256 is None)
        self._check_artifact(member, art, got.verified_sha256)
        self._feed(Verified(ts=time.time()))
        self._feed(Adopted(self.store.adopt(art, dep.digest, verified=True), ts=time.time()))

    def _fail(self, dep: InstallRequest, err: BaseException) -> None:
        log.error("install of %s failed at %s: %s", dep.label(), self.life.stage, err)
        self._feed(Failed(str(err), ts=time.time()))

    # -- helpers -------------------------------------------------------------------------

    def _bases(self, name: str) -> list[tuple[Path, str]]:
        """The model files a delta of model ``name`` may start from: its served and its
        previous version."""
        out: list[tuple[Path, str]] = []
        for record in (self.life.serving.get(name), self.state.models.get(name),
                       self.state.previous.get(name)):
            if record is None or any(sha == record.sha256 for _, sha in out):
                continue
            path = self.store.model_file(record)
            if path is not None:
                out.append((path, record.sha256))
        return out

    def _decided(self, dep: InstallRequest) -> dict[str, str]:
        """The served versions of the models ``dep`` would decide (not those a newer
        deployment decided): what it must not downgrade without a signed rollback."""
        st = self.state
        return {n: r.version for n, r in self.life.serving.items()
                if n in dep.names and st.counter_of(n) < dep.counter}

    def _served_bytes(self) -> int:
        """The file bytes of the models served now (what the memory budget counts)."""
        total = 0
        for record in self.life.serving.values():
            path = self.store.model_file(record)
            with contextlib.suppress(OSError):
                total += path.stat().st_size if path is not None else 0
        return total

    def _check_artifact(self, member: ModelChange, art: Artifact,
                        verified_sha256: str | None) -> None:
        m = art.manifest
        if verified_sha256 is not None and verified_sha256 != m.sha256:
            raise VerificationError(
                f"fetched model file was verified as sha256 {verified_sha256[:16]}…, its "
                f"manifest names {m.sha256[:16]}…"
            )
        if member.sha256 is not None and m.sha256 != member.sha256:
            raise VerificationError(
                f"fetched artifact has model sha256 {m.sha256[:16]}…, the deployment names "
                f"{member.sha256[:16]}…"
            )
        if m.name != member.name or m.version != member.version:
            raise VerificationError(
                f"fetched artifact is {m.name} {m.version}, the deployment names "
                f"{member.name} {member.version}"
            )
        if m.size_bytes > self.config.limits.max_artifact_bytes:
            raise InstallError(
                f"{m.name} {m.version}: model is {m.size_bytes} bytes, over the limit of "
                f"{self.config.limits.max_artifact_bytes} (limits.max_artifact_bytes)"
            )

    def _event(self, kind: str, **fields: Any) -> None:
        out: dict[str, Any] = {}
        for k, v in fields.items():
            if isinstance(v, ModelRecord):
                out[k] = {"name": v.name, "version": v.version, "sha256": v.sha256}
            elif isinstance(v, InstallRequest):
                out[k] = describe(v)
            elif v is not None:
                out[k] = v
        self.reporter.event(kind, **out)
        if kind in ("swapped", "committed", "rolled_back", "failed", "refused"):
            self.reporter.state_changed()



def describe(dep: InstallRequest) -> dict[str, Any]:
    """How events and the state report name a deployment: by its model for one model,
    by its models and removals for a set."""
    if not dep.is_set and dep.models:
        return {"counter": dep.counter, "name": dep.name,
                "artifact_version": dep.artifact_version}
    return {"counter": dep.counter,
            "models": [{"name": m.name, "artifact_version": m.version} for m in dep.models],
            "remove": list(dep.remove)}
