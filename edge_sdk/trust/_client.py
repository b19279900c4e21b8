"""Device side: refresh TUF metadata over MQTT, cross-check a deployment, fetch an artifact.

::

    client = UpdateClient(
        trusted_root=Path("/etc/edge/root.json").read_bytes(),
        metadata_dir=state / "tuf", partial_dir=state / "partial",
        connection=conn, device_id="dev-1", fetch_config=FetchConfig())
    dep = verify_deployment(payload, deployment_key, device_id="dev-1", last_counter=n)
    path = client.fetch(dep, state / "staging" / "m")   # an artifact directory

:meth:`UpdateClient.fetch` runs python-tuf's ngclient refresh (root rotation,
rollback, freeze, mix-and-match and threshold checks are python-tuf's), checks
that the signed targets list the deployment's target with the same sha256 and
length, downloads the model (and its companion files) resumably into
``partial_dir``, verifies them against the signed targets metadata, and
writes the artifact directory atomically. Every failure raises a
:class:`~edge_sdk.errors.VerificationError` subclass (see
:mod:`edge_sdk.trust`), a :class:`~edge_sdk.errors.TransportError`, or an
:class:`~edge_sdk.errors.InstallError` for local disk failures, and leaves
nothing at ``dest_dir``. A partial download survives a failed transfer so
the next call resumes it; a partial that fails verification is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient import Updater, UpdaterConfig  # type: ignore[attr-defined]

from .._artifact import MANIFEST_NAME, Artifact, Manifest
from .._fs import atomic_write_text, staged_dir
from ..errors import ArtifactError, EdgeError, InstallError, TransportError, UsageError
from ..transport import (
    REPO_URL,
    ChunkClient,
    FetchConfig,
    FetchStats,
    MqttConnection,
    MqttFetcher,
    RepositoryFetcher,
)
from ..transport._errors import EndlessDataError, SlowRetrievalError
from ..transport._fetcher import _SlowRetrieval
from ._deployment import Deployment, compare_versions
from ._errors import (
    ExpiredError,
    MixAndMatchError,
    RepositoryError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
)
from ._targets import ReleasedTarget, released_target

Progress = Callable[[int, int], None]


def tuf_error(err: Exception, where: str) -> EdgeError:
    """Map a python-tuf exception to the edge-sdk class naming the attack it stopped."""
    msg = f"{where}: {err}"
    if isinstance(err, _SlowRetrieval):
        return SlowRetrievalError(msg)
    if isinstance(err, tuf_exc.UnsignedMetadataError):
        return SignatureError(f"{msg} (not signed by enough trusted keys)")
    if isinstance(err, tuf_exc.BadVersionNumberError):
        return RollbackError(f"{msg} (older metadata than already trusted: rollback refused)")
    if isinstance(err, tuf_exc.ExpiredMetadataError):
        return ExpiredError(f"{msg} (repository frozen or not refreshed)")
    if isinstance(err, tuf_exc.DownloadLengthMismatchError):
        return EndlessDataError(msg)
    if isinstance(err, tuf_exc.LengthOrHashMismatchError):
        return MixAndMatchError(f"{msg} (metadata does not match what the snapshot/timestamp "
                                "signed)")
    if isinstance(err, tuf_exc.DownloadError):
        return TransportError(msg)
    if isinstance(err, tuf_exc.RepositoryError):
        return RepositoryError(msg)
    return RepositoryError(f"{msg} ({type(err).__name__})")


class UpdateClient:
    """The device's view of the release repository, reached over ``connection`` (by a
    :class:`~edge_sdk.transport.ChunkClient` for ``device_id``), or through any other
    :class:`~edge_sdk.transport.RepositoryFetcher` given as ``fetcher``.

    ``trusted_root`` is the root metadata the device was provisioned with
    (bytes); newer roots found in ``metadata_dir`` or on the repository are
    followed by python-tuf. ``metadata_dir`` and ``partial_dir`` must be
    private to this device (the agent's state dir). One transfer at a time.
    """

    def __init__(self, *, trusted_root: bytes, metadata_dir: str | os.PathLike[str],
                 partial_dir: str | os.PathLike[str], connection: MqttConnection | None = None,
                 device_id: str | None = None, fetch_config: FetchConfig | None = None,
                 fetcher: RepositoryFetcher | None = None) -> None:
        self.trusted_root = trusted_root
        self.metadata_dir = Path(metadata_dir)
        self.partial_dir = Path(partial_dir)
        self.fetch_config = fetch_config or FetchConfig()
        if fetcher is None:
            if connection is None or device_id is None:
                raise UsageError("UpdateClient needs a connection and a device id, or a fetcher")
            fetcher = ChunkClient(connection, device_id, config=self.fetch_config)
        #: All network access goes through this one object.
        self.chunks: RepositoryFetcher = fetcher
        self.device_id = device_id
        try:
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InstallError(f"cannot create the update state directories: {err}") from err

    @property
    def stats(self) -> FetchStats:
        """Transfer counters."""
        return self.chunks.stats

    def close(self) -> None:
        self.chunks.close()

    # -- TUF --------------------------------------------------------------------------

    def refresh(self) -> Updater:
        """Run a full ngclient refresh; return the (refreshed) updater."""
        try:
            updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=REPO_URL + "metadata/",
                target_base_url=REPO_URL + "targets/",
                fetcher=MqttFetcher(self.chunks),
                config=UpdaterConfig(),
                bootstrap=self.trusted_root,
            )
            updater.refresh()
        except tuf_exc.RepositoryError as err:
            raise tuf_error(err, "release repository metadata refused") from err
        except tuf_exc.DownloadError as err:
            raise tuf_error(err, "could not download release metadata") from err
        except OSError as err:
            raise InstallError(f"{self.metadata_dir}: cannot store metadata: {err}") from err
        except ValueError as err:
            raise RepositoryError(f"trusted root is not valid TUF root metadata: {err}") from err
        return updater

    def releases(self) -> list[ReleasedTarget]:
        """Refresh, then list the releases the signed targets metadata names."""
        self.refresh()
        try:
            md = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        except Exception as err:
            raise RepositoryError(f"cannot read the verified targets metadata: {err}") from err
        return [rt for tf in md.signed.targets.values() if (rt := released_target(tf))]

    # -- fetching ------------------------------------------------------------------------

    def fetch(self, deployment: Deployment, dest_dir: str | os.PathLike[str], *,
              progress: Progress | None = None) -> Path:
        """Fetch the artifact ``deployment`` names into ``dest_dir`` (atomically: an
        existing ``dest_dir`` is replaced only once the new one is complete and verified).

        Raises :class:`TargetMismatchError` when the release repository does not
        list the same target path, sha256 and length (the two views disagree).
        """
        updater = self.refresh()
        tf = self._targetinfo(updater, deployment.target)
        if tf.hashes.get("sha256") != deployment.sha256 or tf.length != deployment.length:
            raise TargetMismatchError(
                f"deployment #{deployment.counter} names {deployment.target} with sha256 "
                f"{deployment.sha256[:16]}… and {deployment.length} bytes, but the release "
                f"repository signed sha256 {tf.hashes.get('sha256', '')[:16]}… and "
                f"{tf.length} bytes: refusing")
        rt = released_target(tf)
        if rt is None or rt.name != deployment.model or rt.version != deployment.version:
            raise TargetMismatchError(
                f"{deployment.target} is released as {rt.name if rt else '?'} "
                f"{rt.version if rt else '?'}, the deployment says {deployment.model} "
                f"{deployment.version}")
        return self._install(updater, tf, rt, Path(dest_dir), progress)

    def fetch_release(self, name: str, dest_dir: str | os.PathLike[str], *,
                      version: str | None = None, progress: Progress | None = None) -> Path:
        """Fetch release ``name`` (newest, or ``version``) without a deployment (``pull``)."""
        updater = self.refresh()
        md = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        best: tuple[TargetFile, ReleasedTarget] | None = None
        for tf in md.signed.targets.values():
            rt = released_target(tf)
            if rt is None or rt.name != name or (version is not None and rt.version != version):
                continue
            if best is None or compare_versions(rt.version, best[1].version) > 0:
                best = (tf, rt)
        if best is None:
            raise TargetMismatchError(
                f"the release repository lists no {name}{' ' + version if version else ''}")
        tf = self._targetinfo(updater, best[0].path)
        return self._install(updater, tf, best[1], Path(dest_dir), progress)

    def _targetinfo(self, updater: Updater, path: str) -> TargetFile:
        try:
            tf = updater.get_targetinfo(path)
        except tuf_exc.RepositoryError as err:
            raise tuf_error(err, "release repository metadata refused") from err
        except tuf_exc.DownloadError as err:
            raise tuf_error(err, "could not download release metadata") from err
        if tf is None:
            raise TargetMismatchError(f"the release repository does not list {path}")
        return tf

    def _install(self, updater: Updater, tf: TargetFile, rt: ReleasedTarget, dest: Path,
                 progress: Progress | None) -> Path:
        try:
            manifest = Manifest.from_json(rt.manifest, f"{rt.path} (signed manifest)")
        except ArtifactError as err:
            raise RepositoryError(str(err)) from err
        companions = [(fname, self._targetinfo(updater, p)) for fname, p in rt.files.items()]
        total = tf.length + sum(c.length for _, c in companions)
        done_before = 0

        def prog(n: int, _: int) -> None:
            if progress is not None:
                progress(done_before + n, total)

        model_part = self._download(tf, prog)
        done_before += tf.length
        parts = []
        for fname, ctf in companions:
            parts.append((fname, self._download(ctf, prog)))
            done_before += ctf.length
        try:
            with staged_dir(dest, overwrite=True) as tmp:
                os.replace(model_part, tmp / manifest.model)
                for fname, part in parts:
                    os.replace(part, tmp / fname)
                atomic_write_text(tmp / MANIFEST_NAME, manifest.dumps())
                try:
                    if manifest.sha256 != tf.hashes.get("sha256") or \
                            manifest.size_bytes != tf.length:
                        raise ArtifactError(
                            f"manifest says sha256 {manifest.sha256[:16]}… and "
                            f"{manifest.size_bytes} bytes")
                    # The model's bytes were just verified against the signed hash,
                    # which equals the manifest's: no need to hash them a third time.
                    Artifact.from_dir(tmp, verify_hash=False)
                except ArtifactError as err:
                    raise TargetMismatchError(
                        f"the signed manifest of {rt.path} does not match its signed model "
                        f"file: {err}") from err
        except OSError as err:
            raise InstallError(f"{dest}: cannot write the artifact: {err}") from err
        return dest

    def _download(self, tf: TargetFile, progress: Progress) -> Path:
        """Resumable download of one target into ``partial_dir``, verified by python-tuf."""
        sha = tf.hashes.get("sha256")
        if not sha:
            raise RepositoryError(f"{tf.path}: the signed target has no sha256")
        part = self.partial_dir / f"{sha}.part"
        start = part.stat().st_size if part.exists() else 0
        if start > tf.length:
            _unlink(part)
            start = 0
        dirname, sep, basename = tf.path.rpartition("/")
        remote = f"targets/{dirname}{sep}{sha}.{basename}"
        # Hash while writing (resumed downloads hash the kept prefix first), so the
        # bytes are read once; hashlib releases the GIL while the network thread runs.
        digest = hashlib.sha256()
        try:
            if start:
                with open(part, "rb") as kept:
                    while block := kept.read(1 << 20):
                        digest.update(block)

            with open(part, "ab") as out:
                def sink(data: bytes) -> None:
                    out.write(data)
                    digest.update(data)

                self.chunks.download(remote, sink, start=start, length=tf.length,
                                     progress=progress)
        except EndlessDataError:
            _unlink(part)
            raise
        except OSError as err:
            raise InstallError(f"{part}: cannot write the download: {err}") from err
        try:
            if set(tf.hashes) == {"sha256"}:
                # Same check as TargetFile.verify_length_and_hashes, on the streamed hash.
                size = part.stat().st_size
                if size != tf.length or digest.hexdigest() != sha:
                    raise tuf_exc.LengthOrHashMismatchError(
                        f"got {size} bytes with sha256 {digest.hexdigest()[:16]}…, signed "
                        f"{tf.length} bytes with sha256 {sha[:16]}…")
            else:
                with open(part, "rb") as f:
                    tf.verify_length_and_hashes(f)
        except tuf_exc.LengthOrHashMismatchError as err:
            _unlink(part)
            raise TargetHashError(
                f"{tf.path}: downloaded bytes do not match the signed length and sha256 "
                f"({err}); discarded") from err
        return part


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()

