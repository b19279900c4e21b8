"""What the agent needs from the parts it is given or builds: where deployments come from
(:class:`ArtifactSource`, or a :class:`SourceFactory` over the broker link), the broker
link itself (:class:`BrokerLink`), the fetcher whose download is reported
(:class:`Transfers`), how a model file is opened (:class:`ModelLoader`) and where the
installer reports to (:class:`Reporter`).

Nothing here does I/O. The concrete classes (``edge_sdk.transport.MqttConnection``) are
imported for type checking only: importing ``device_agent`` stays light, and the modules
that build them import this one without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._telemetry import Link

if TYPE_CHECKING:
    from edge_sdk import Manifest, Predictor
    from edge_sdk.transport import LastWill, MqttConnection, TransferProgress

    from ._config import AgentConfig


@dataclass(frozen=True)
class ModelChange:
    """One model a deployment installs: its name, version and (when the deployment says)
    the model file's hash and length."""

    name: str
    version: str
    sha256: str | None = None
    length: int | None = None

    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ShadowRequest:
    """The ``shadow`` section of a verified deployment: candidate models to install beside
    the served ones of the same names and compare on live requests, never served.
    ``raw``: what :meth:`ArtifactSource.fetch` fetches them from (an
    :class:`InstallRequest` whose ``models`` are the candidates); ``gate``: the signed
    gate as JSON (None: none)."""

    models: tuple[ModelChange, ...]
    sample_rate: float = 1.0
    min_requests: int = 0
    time_limit_s: float = 3600.0
    gate: Mapping[str, Any] | None = None
    raw: Any = None


@dataclass(frozen=True)
class InstallRequest:
    """What the install pipeline is asked to do: a deployment that the
    :class:`~device_agent.ArtifactSource` verified, reduced to the models it installs
    (``models``) and removes (``remove``) and the fields that identify it (the signed
    :class:`edge_sdk.trust.Deployment` is ``raw``).

    A one-model deployment may be given by ``name``, ``artifact_version`` and ``sha256``
    alone (``models`` is then that one model); for a set, ``name`` and
    ``artifact_version`` are those of its first model."""

    #: Unique id of this deployment; the pipeline sets it to a digest of the raw message.
    digest: str
    #: The director's monotonic counter; older ones are replays and are refused.
    counter: int
    #: Target artifact name, version and model hash (of the first model).
    name: str = ""
    artifact_version: str = ""
    sha256: str | None = None
    #: Signed permission to go back to an older artifact.
    rollback: bool = False
    #: The source's own verified object (opaque to the pipeline).
    raw: Any = None
    #: Every model the deployment installs, and the names of those it removes.
    models: tuple[ModelChange, ...] = ()
    remove: tuple[str, ...] = ()
    #: Whom the document names (to tell its scope: see :meth:`scope_for`).
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    #: A shadow document: what to install beside the served models and compare.
    shadow: ShadowRequest | None = None

    def __post_init__(self) -> None:
        if not self.models and self.name:
            object.__setattr__(self, "models", (ModelChange(
                self.name, self.artifact_version, self.sha256),))
        elif self.models and not self.name:
            first = self.models[0]
            object.__setattr__(self, "name", first.name)
            object.__setattr__(self, "artifact_version", first.version)
            object.__setattr__(self, "sha256", first.sha256)

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name the deployment decides (installed or removed)."""
        return (*(m.name for m in self.models), *self.remove)

    @property
    def is_set(self) -> bool:
        return len(self.names) > 1

    def scope_for(self, device_id: str, groups: Sequence[str]) -> str:
        """``"device"`` when the document names this device, else ``"group:G"`` for the
        first (sorted) of its groups the device follows: replays are refused per scope."""
        if device_id in self.devices or not self.groups:
            return "device"
        mine = sorted(set(self.groups) & set(groups))
        return f"group:{mine[0]}" if mine else "device"

    def shadow_install(self) -> InstallRequest:
        """The install of the shadow section's candidates (what the pipeline fetches,
        verifies and stores, as it would a deployment of them)."""
        assert self.shadow is not None
        return InstallRequest(digest=self.digest, counter=self.counter,
                              raw=self.shadow.raw, models=self.shadow.models,
                              devices=self.devices, groups=self.groups)

    def label(self) -> str:
        if self.shadow is not None:
            parts = [m.label() for m in self.shadow.models]
            return f"shadow {', '.join(parts)} (deployment {self.counter})"
        if not self.is_set and self.models:
            return f"{self.name} {self.artifact_version} (deployment {self.counter})"
        parts = [m.label() for m in self.models] + [f"remove {n}" for n in self.remove]
        return f"{', '.join(parts)} (deployment {self.counter})"


@dataclass(frozen=True)
class FetchedArtifact:
    """What :meth:`ArtifactSource.fetch` got: the verified artifact directory and, when the
    source tells, how its model file came (``{"kind": "delta"|"full", "bytes": N,
    "message": ..., "from": VERSION, "fallback": REASON}``)."""

    path: Path
    download: Mapping[str, Any] | None = field(default=None)
    #: The sha256 the source checked the model file's bytes against (signed metadata) as
    #: it wrote them into ``path``: the installer compares it with the manifest and the
    #: deployment instead of hashing the file again. None: not told, the file is hashed.
    verified_sha256: str | None = None


@runtime_checkable
class ArtifactSource(Protocol):
    """Where deployments are checked and artifacts come from."""

    def verify_deployment(self, payload: bytes, *, last_counter: int | None,
                          installed: Mapping[str, str] | None) -> InstallRequest:
        """Check a raw ``desired`` message; raise :class:`VerificationError` unless it is
        authentic, unexpired, for this device, newer than ``last_counter`` (None: the
        installer checks counters itself) and, against ``installed`` (model name ->
        version), not an unsigned downgrade of any model."""
        ...

    def fetch(self, deployment: InstallRequest, dest_dir: Path, *, model: str | None = None,
              have: Sequence[tuple[Path, str]] = (),
              reserve: Callable[[int], None] | None = None) -> FetchedArtifact:
        """Download (resuming from what ``dest_dir`` holds) and verify the artifact of the
        deployment's model ``model`` (default: its only one). ``have``: (model file,
        sha256) of the verified models of that name the device holds, from which a delta
        may rebuild the new one. ``reserve``: call it with the bytes
        the download may write, before the first one (it raises when they do not fit).
        Raises VerificationError or TransportError."""
        ...


class SourceFactory(Protocol):
    """Builds the :class:`ArtifactSource` over the agent's broker link (the agent's
    default is the signed-release source)."""

    def __call__(self, config: AgentConfig, link: MqttConnection, /) -> ArtifactSource: ...


class Subscribed(Protocol):
    """A subscription of a :class:`BrokerLink` (an ``edge_sdk.transport.Subscription``)."""

    def cancel(self) -> None: ...


class BrokerLink(Link, Protocol):
    """What the agent needs from its broker connection (an
    ``edge_sdk.transport.MqttConnection``)."""

    def connect(self, timeout: float | None = None, *, wait: bool = True) -> None: ...

    def close(self) -> None: ...

    def arm_last_will(self, source: Callable[[], LastWill | None]) -> None: ...

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None: ...

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None], *,
                  qos: int = 1, wait: bool = True, timeout: float = 10.0) -> Subscribed: ...


class Transfers(Protocol):
    """A fetcher whose running download can be reported (an
    ``edge_sdk.transport.RepositoryFetcher``)."""

    @property
    def transfer(self) -> TransferProgress | None: ...


class ModelLoader(Protocol):
    """Opens a verified model file as a Predictor (default: edge_sdk's file loader)."""

    def __call__(self, path: Path, *, threads: int | None = None,
                 manifest: Manifest | None = None) -> Predictor: ...


class Reporter(Protocol):
    """Where the installer's events and state changes go (the agent's telemetry)."""

    def event(self, kind: str, **fields: Any) -> None: ...

    def state_changed(self) -> None: ...
