"""The production :class:`ArtifactSource`: signed deployments + the TUF release repository
over MQTT, both verified by :mod:`edge_sdk.trust` (nothing is re-implemented here)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.errors import ConfigError

from ._config import AgentConfig
from ._crash import crash_point
from ._interfaces import FetchedArtifact, InstallRequest, ModelChange, ShadowRequest

if TYPE_CHECKING:
    from edge_sdk.transport import MqttConnection, RepositoryFetcher


class ReleaseSource:
    """Verifies ``desired`` documents with the deployment key and fetches artifacts with
    python-tuf through the repository responder on the broker."""

    def __init__(self, config: AgentConfig, connection: MqttConnection | None, *,
                 fetcher: RepositoryFetcher | None = None) -> None:
        """Downloads go over ``connection``, or through ``fetcher`` when one is given (a
        repository simulator in tests; ``connection`` may then be None)."""
        from edge_sdk.transport import FetchConfig
        from edge_sdk.trust import UpdateClient, load_public_key

        trust = config.trust
        if trust.root is None or trust.deployment_key is None:
            raise ConfigError(
                "trust.root and trust.deployment_key must be set to receive deployments "
                "(copy root.json and the deployment public key from `edge-sdk release init`)"
            )
        self.config = config
        try:
            root = trust.root.read_bytes()
        except OSError as err:
            raise ConfigError(f"trust.root {trust.root}: cannot read: {err.strerror}") from err
        self._key = load_public_key(trust.deployment_key)
        #: The deployment key, which also signs profiling requests.
        self.key = self._key
        # One transfer at a time through the client: installs and profiling fetches share it.
        self._lock = threading.Lock()
        state = config.state_dir
        self.client = UpdateClient(
            trusted_root=root, metadata_dir=state / "tuf", partial_dir=state / "partial",
            connection=connection, device_id=config.device_id, fetcher=fetcher,
            fetch_config=FetchConfig(max_artifact_bytes=config.limits.max_artifact_bytes),
        )

    @property
    def fetcher(self) -> RepositoryFetcher:
        """The fetcher every download goes through (its ``transfer`` is the one running)."""
        return self.client.chunks

    def verify_deployment(self, payload: bytes, *, last_counter: int | None,
                          installed: Mapping[str, str] | None) -> InstallRequest:
        from edge_sdk.trust import verify_deployment

        dep = verify_deployment(
            payload, self._key, device_id=self.config.device_id, groups=self.config.groups,
            fleet=self.config.fleet, last_counter=last_counter, installed=installed,
        )
        shadow = None
        if dep.shadow is not None:
            spec = dep.shadow
            # The candidates are fetched as the members of a deployment of them: the same
            # signed document, its targets checked against the release repository.
            shadow = ShadowRequest(
                models=tuple(ModelChange(m.model, m.version, m.sha256, m.length)
                             for m in spec.models),
                sample_rate=spec.sample_rate, min_requests=spec.min_requests,
                time_limit_s=spec.time_limit_s,
                gate=None if spec.gate is None else spec.gate.to_json(),
                raw=dataclasses.replace(dep, models=spec.models, remove=(), shadow=None))
        return InstallRequest(
            digest="", counter=dep.counter, rollback=dep.rollback, raw=dep,
            models=tuple(ModelChange(m.model, m.version, m.sha256, m.length)
                         for m in dep.models),
            remove=dep.remove, devices=dep.devices, groups=dep.groups, shadow=shadow)

    def fetch(self, deployment: InstallRequest, dest_dir: Path, *, model: str | None = None,
              have: Sequence[tuple[Path, str]] = (),
              reserve: Callable[[int], None] | None = None) -> FetchedArtifact:
        from edge_sdk.trust import LocalModel

        with self._lock:
            path = self.client.fetch(deployment.raw, dest_dir, model=model, stage=crash_point,
                                     have=[LocalModel(p, sha) for p, sha in have],
                                     reserve=reserve)
            got = self.client.last_download
        if got is None:
            return FetchedArtifact(path)
        return FetchedArtifact(path, got.to_json(), verified_sha256=got.sha256)

    def fetch_file(self, target: str, dest: Path, *, sha256: str, length: int) -> Path:
        """A signed non-release target (profiling files), verified by the TUF client."""
        with self._lock:
            return self.client.fetch_file(target, dest, sha256=sha256, length=length)

    def drop_partial(self, sha256s: Sequence[str]) -> None:
        """Delete the resumable partial downloads of these files (a profiling request's,
        once it is over: nobody resumes them). Under the transfer lock, so never one that
        a fetch is writing."""
        with self._lock:
            for sha in sha256s:
                with contextlib.suppress(OSError):
                    (self.client.partial_dir / f"{sha}.part").unlink()

    def close(self) -> None:
        self.client.close()
