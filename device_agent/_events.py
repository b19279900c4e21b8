"""What the install state machine (:mod:`device_agent._lifecycle`) is told and what it asks
for: events in (what happened: a model loaded, an artifact fetched, a health verdict) and
effects out (what to do next: save the state, load a model, swap, report), as plain
frozen values. The Installer turns the world into events and effects into I/O; the
machine only maps one to the other (the events/state split of sans-I/O protocol code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._interfaces import InstallRequest
from ._state import InstalledState, ModelRecord, ShadowRun

# -- events ----------------------------------------------------------------------------
# ``ts`` is the wall-clock time stamped into ``last_result``; the installer passes it,
# so the machine reads no clock.

@dataclass(frozen=True)
class Boot:
    """The state file as read. ``unreadable``: it could not be read (the reason), and
    ``stored`` is what the installer recovered from the models on disk instead.
    ``max_models_bytes`` and ``max_artifact_bytes``: the limits deployments are checked
    against before a download (0: none)."""
    stored: InstalledState
    max_restarts: int
    unreadable: str | None = None
    ts: float = field(default=0.0, kw_only=True)
    max_models_bytes: int = field(default=0, kw_only=True)
    #: The most models served at once (0: no limit).
    max_models: int = field(default=0, kw_only=True)
    max_artifact_bytes: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class ModelLoaded:
    """A :class:`LoadModel` succeeded (model opened, re-verified, smoke-tested)."""
    record: ModelRecord
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class ModelUnusable:
    """A :class:`LoadModel` failed."""
    record: ModelRecord
    reason: str
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Resume:
    """Serving has started: run the health window of a trial interrupted by a restart."""
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Refused:
    """A message refused before an install: ``deployment`` names it when known (the
    verified deployment, or the counter the network thread verified)."""
    digest: str
    size: int
    reason: str
    deployment: InstallRequest | int | None = None
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Accepted:
    """A deployment the source verified (``digest`` set to the message digest), from a
    message of ``size`` bytes, that came from ``scope`` (see
    :meth:`InstallRequest.scope_for`). ``served_bytes``: the file bytes of the models
    served now (for the memory budget). ``quiet``: a replay is passed over unreported
    (the device follows several desired topics, where older documents stay retained)."""
    deployment: InstallRequest
    size: int = 0
    ts: float = field(default=0.0, kw_only=True)
    scope: str = field(default="device", kw_only=True)
    served_bytes: int = field(default=0, kw_only=True)
    quiet: bool = field(default=False, kw_only=True)
    #: The running shadow run's figures (``ShadowFigures.to_json()``), for its result
    #: when this deployment ends it (None: no run).
    shadow_figures: Mapping[str, Any] | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Fetched:
    """The artifact of the install's next model is downloaded into staging;
    ``download`` says how, when the source tells (see :class:`~device_agent.FetchedArtifact`)."""
    download: Mapping[str, Any] | None = None
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Verified:
    """The next model's artifact matches the deployment. ``local``: found complete under
    ``models/`` (no fetch, nothing to adopt)."""
    local: ModelRecord | None = None
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Adopted:
    """The verified artifact is copied complete into ``models/``."""
    record: ModelRecord
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Loaded:
    """One more of the install's models is opened (in the order they were stored)."""
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class SmokeTested:
    """Every model of the install passed its smoke test."""
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Failed:
    """The install failed for good at its current stage (recorded, never retried)."""
    reason: str
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class NoSpace:
    """Before its first chunk: the download needs ``needed`` bytes on the state
    directory's filesystem, which has ``free`` (``reserve`` of them kept free). Refused
    and recorded like a :class:`Failed`, so it is not retried; a new deployment (or a
    restart of the same one, never) tries again."""
    needed: int
    free: int
    reserve: int
    ts: float = field(default=0.0, kw_only=True)

    @property
    def reason(self) -> str:
        return (f"not enough space in the state directory: the download needs {self.needed} "
                f"bytes, {self.free} are free and {self.reserve} must stay free "
                "(limits.reserve_bytes); free space and deploy again")


@dataclass(frozen=True)
class Unwritable:
    """A verified deployment arrived while the state directory cannot be written
    (``reason``). Nothing is recorded (that needs a write): the installer holds the
    deployment and offers it again once a write succeeds."""
    deployment: InstallRequest
    reason: str
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Retry:
    """The install was interrupted by something transient (broker or responder away)."""
    reason: str
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Healthy:
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class Unhealthy:
    reason: str
    ts: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class ShadowEnded:
    """The shadow run of deployment ``deployment`` ended: ``outcome`` is
    ``shadow_passed``, ``shadow_failed``, ``shadow_insufficient`` (judged) or ``failed``
    (its models could not be loaded again, or no longer have a served model to compare
    with); ``figures``: ``ShadowFigures.to_json()``."""
    deployment: int
    outcome: str
    reason: str
    figures: Mapping[str, Any] | None = None
    ts: float = field(default=0.0, kw_only=True)


Event = (Boot | ModelLoaded | ModelUnusable | Resume | Refused | Accepted | Fetched | Verified
         | Adopted | Loaded | SmokeTested | Failed | NoSpace | Unwritable | Retry | Healthy
         | Unhealthy | ShadowEnded)


# -- effects ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SaveState:
    """Replace ``installed.json`` atomically."""
    state: InstalledState


@dataclass(frozen=True)
class CrashPoint:
    name: str


@dataclass(frozen=True)
class Report:
    """An event report; field values are plain data, ModelRecords or Deployments."""
    kind: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class StateChanged:
    """The reported state changed without an event that says so."""


@dataclass(frozen=True)
class LoadModel:
    """Open, re-verify and smoke-test a model; answer ModelLoaded or ModelUnusable."""
    record: ModelRecord


@dataclass(frozen=True)
class Swap:
    """Serve these loaded models under their names at once (None: serve nothing under
    that name); the other names are left as they are."""
    changes: Mapping[str, ModelRecord | None]


@dataclass(frozen=True)
class CleanModels:
    """Delete model and staging dirs the saved state does not name, and let go of the
    loaded models nothing serves (their memory goes back)."""


@dataclass(frozen=True)
class CleanPartial:
    """Drop the release client's resumable partial downloads."""


@dataclass(frozen=True)
class WatchHealth:
    """Run one health window over these served models; answer Healthy or Unhealthy (or
    nothing, when the agent stops inside it: the trial resumes at the next boot)."""
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartShadow:
    """Load the run's candidates (those the install just loaded are at hand) and start
    comparing; answer nothing, or :class:`ShadowEnded` (``failed``) when a candidate
    cannot be loaded or its name does not serve."""
    run: ShadowRun


@dataclass(frozen=True)
class StopShadow:
    """Stop comparing and let go of the candidates (their files stay stored)."""


Effect = (SaveState | CrashPoint | Report | StateChanged | LoadModel | Swap | CleanModels
          | CleanPartial | WatchHealth | StartShadow | StopShadow)


def report(kind: str, **fields: Any) -> Report:
    return Report(kind, {k: v for k, v in fields.items() if v is not None})
