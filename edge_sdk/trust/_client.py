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
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient import Updater, UpdaterConfig  # type: ignore[attr-defined]

from .._artifact import MANIFEST_NAME, Artifact, Manifest
from .._fs import atomic_write_text, staged_dir
from ..delta import DeltaError, DeltaLimits, apply_delta
from ..errors import (
    ArtifactError,
    EdgeError,
    InstallError,
    TransportError,
    UsageError,
    VerificationError,
)
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
from ._deployment import Deployment, ModelTarget, compare_versions
from ._errors import (
    ExpiredError,
    MixAndMatchError,
    RepositoryError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
)
from ._targets import DeltaRef, ReleasedTarget, delta_of, released_target

Progress = Callable[[int, int], None]
#: Told where a fetch is: ``delta_fetched`` (the delta is downloaded and verified) and
#: ``delta_applying`` (the first block of the target is written). The agent's kill -9
#: tests crash there.
Stage = Callable[[str], None]
#: Told the bytes a fetch is about to write under ``partial_dir`` and ``dest_dir`` (at
#: most: a delta counts its own size plus the model it rebuilds), once the signed
#: metadata is verified and before the first chunk. Raising refuses the fetch with
#: nothing downloaded; the agent checks free space with it.
Reserve = Callable[[int], None]
log = logging.getLogger("edge_sdk.trust")


@dataclass(frozen=True)
class LocalModel:
    """A model file the device holds and verified when it installed it: a delta base."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class Download:
    """How the last :meth:`UpdateClient.fetch` got the model file."""

    #: "delta" or "full".
    kind: str
    #: Bytes received for the model file (the delta's, or the full file's) by this fetch.
    bytes: int
    #: The version the delta was applied to (a delta, or a delta that failed).
    base_version: str | None = None
    #: Why the delta was given up for the full file (None when it was not).
    fallback: str | None = None
    #: The full model file's signed length: what a full download costs.
    full_bytes: int | None = None
    #: The signed sha256 the model file's bytes were checked against as they were written
    #: (hashed once, while downloaded or rebuilt): a caller compares it, never re-hashes.
    sha256: str | None = None

    def describe(self) -> str:
        if self.kind == "delta":
            return f"delta from {self.base_version} ({self.bytes} bytes)"
        text = f"full artifact ({self.bytes} bytes)"
        return f"{text}; the delta from {self.base_version} failed: {self.fallback}" \
            if self.fallback else text

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "bytes": self.bytes,
                                  "message": self.describe()}
        if self.base_version is not None:
            out["from"] = self.base_version
        if self.fallback is not None:
            out["fallback"] = self.fallback
        if self.full_bytes is not None:
            out["full_bytes"] = self.full_bytes
        return out


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


#: How long the members of one set share a metadata refresh (a set on a slow link whose
#: first models took longer refreshes again for the next one).
_SET_REFRESH_REUSE_S = 600.0


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
                 fetcher: RepositoryFetcher | None = None,
                 delta_limits: DeltaLimits | None = None) -> None:
        self.trusted_root = trusted_root
        self.delta_limits = delta_limits or DeltaLimits()
        #: How the last fetch got its model file (None before the first).
        self.last_download: Download | None = None
        #: The refresh the members of the set being fetched share: (which deployment,
        #: when, the updater).
        self._set_refresh: tuple[tuple[int, str, tuple[str, ...]], float, Updater] | None \
            = None
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
              model: str | None = None, progress: Progress | None = None,
              have: Sequence[LocalModel] = (), stage: Stage | None = None,
              reserve: Reserve | None = None) -> Path:
        """Fetch the artifact of model ``model`` of ``deployment`` (by default its only
        model) into ``dest_dir`` (atomically: an existing ``dest_dir`` is replaced only
        once the new one is complete and verified).

        When ``have`` holds a model that a signed delta of the release starts from, the
        delta is fetched and applied instead of the full model file; any delta failure
        falls back to the full file in the same call (see :attr:`last_download`).
        Raises :class:`TargetMismatchError` when the release repository does not
        list the same target path, sha256 and length (the two views disagree).
        ``reserve`` is called once with the bytes the fetch may write (see :data:`Reserve`).
        """
        try:
            member = deployment.only if model is None else deployment.target_for(model)
        except (KeyError, ValueError) as err:
            raise TargetMismatchError(f"{deployment.title} installs no model "
                                      f"{model or '(one model expected)'}") from err
        updater = self._refreshed_for(deployment)
        # Every member against the same signed metadata, before any byte of one is
        # fetched: a set naming one target the repository does not sign downloads nothing.
        checked = {m.model: self._check_member(updater, deployment, m)
                   for m in deployment.models}
        tf, rt = checked[member.model]
        return self._install(updater, tf, rt, Path(dest_dir), progress, have, stage, reserve)

    def _refreshed_for(self, deployment: Deployment) -> Updater:
        """A refreshed updater; the members of one set after the first reuse its refresh
        (one metadata round per install, not one per model)."""
        key = (deployment.counter, deployment.keyid, deployment.names)
        kept = self._set_refresh
        if kept is not None and kept[0] == key and \
                time.monotonic() - kept[1] < _SET_REFRESH_REUSE_S:
            return kept[2]
        updater = self.refresh()
        self._set_refresh = (key, time.monotonic(), updater) if deployment.is_set else None
        return updater

    def _check_member(self, updater: Updater, deployment: Deployment, member: ModelTarget,
                      ) -> tuple[TargetFile, ReleasedTarget]:
        """The signed target and release of one member; TargetMismatchError unless the
        release repository signs the same path, sha256, length, name and version."""
        if member.target.startswith("profiling/"):
            raise TargetMismatchError(
                f"deployment #{deployment.counter} names {member.target}, a profiling "
                "file: those are measured, never installed")
        tf = self._targetinfo(updater, member.target)
        if tf.hashes.get("sha256") != member.sha256 or tf.length != member.length:
            raise TargetMismatchError(
                f"deployment #{deployment.counter} names {member.target} with sha256 "
                f"{member.sha256[:16]}… and {member.length} bytes, but the release "
                f"repository signed sha256 {tf.hashes.get('sha256', '')[:16]}… and "
                f"{tf.length} bytes: refusing")
        rt = released_target(tf)
        if rt is None or rt.name != member.model or rt.version != member.version:
            raise TargetMismatchError(
                f"{member.target} is released as {rt.name if rt else '?'} "
                f"{rt.version if rt else '?'}, the deployment says {member.model} "
                f"{member.version}")
        return tf, rt

    def fetch_release(self, name: str, dest_dir: str | os.PathLike[str], *,
                      version: str | None = None, progress: Progress | None = None,
                      have: Sequence[LocalModel] = (), reserve: Reserve | None = None) -> Path:
        """Fetch release ``name`` (the newest not yanked, or ``version``) without a
        deployment (``pull``); ``have`` and ``reserve`` as for :meth:`fetch`. A yanked
        ``version`` is refused (:class:`~edge_sdk.errors.UsageError`)."""
        updater = self.refresh()
        md = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        best: tuple[TargetFile, ReleasedTarget] | None = None
        for tf in md.signed.targets.values():
            rt = released_target(tf)
            if rt is None or rt.name != name or (version is not None and rt.version != version):
                continue
            if version is not None:
                rt.refuse_yanked()
            elif rt.yanked:
                continue
            if best is None or compare_versions(rt.version, best[1].version) > 0:
                best = (tf, rt)
        if best is None:
            raise TargetMismatchError(
                f"the release repository lists no {name}{' ' + version if version else ''}"
                f"{'' if version else ' that is not yanked'}")
        tf = self._targetinfo(updater, best[0].path)
        return self._install(updater, tf, best[1], Path(dest_dir), progress, have, None, reserve)

    def fetch_file(self, target: str, dest: str | os.PathLike[str], *, sha256: str,
                   length: int) -> Path:
        """Fetch one signed target that is not a release (a ``profiling/`` file) to ``dest``,
        verified against the repository's signed hash and length, which must equal
        ``sha256`` and ``length`` (what a signed request said): else
        :class:`TargetMismatchError`."""
        updater = self.refresh()
        tf = self._targetinfo(updater, target)
        if tf.hashes.get("sha256") != sha256 or tf.length != length:
            raise TargetMismatchError(
                f"{target}: the request says sha256 {sha256[:16]}… and {length} bytes, the "
                f"release repository signed sha256 {tf.hashes.get('sha256', '')[:16]}… and "
                f"{tf.length} bytes: refusing")
        if length > self.fetch_config.max_artifact_bytes:
            raise TargetMismatchError(
                f"{target} is {length} bytes, over the limit of "
                f"{self.fetch_config.max_artifact_bytes}")
        part, _ = self._download(tf, lambda done, total: None)
        out = Path(dest)
        try:
            os.replace(part, out)
        except OSError as err:
            _unlink(part)
            raise InstallError(f"{out}: cannot store {target}: {err}") from err
        return out

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
                 progress: Progress | None, have: Sequence[LocalModel],
                 stage: Stage | None, reserve: Reserve | None = None) -> Path:
        try:
            manifest = Manifest.from_json(rt.manifest, f"{rt.path} (signed manifest)")
        except ArtifactError as err:
            raise RepositoryError(str(err)) from err
        companions = [(fname, self._targetinfo(updater, p)) for fname, p in rt.files.items()]
        total = tf.length + sum(c.length for _, c in companions)
        if reserve is not None:
            reserve(self.space_needed(tf, rt, [c for _, c in companions], have))
        done_before = 0

        def prog(n: int, _: int) -> None:
            if progress is not None:
                progress(done_before + n, total)

        model_part = self._model_file(updater, tf, rt, have, prog, stage)
        done_before += tf.length
        parts = []
        for fname, ctf in companions:
            parts.append((fname, self._download(ctf, prog)[0]))
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

    def space_needed(self, tf: TargetFile, rt: ReleasedTarget, companions: Sequence[TargetFile],
                     have: Sequence[LocalModel]) -> int:
        """The most bytes fetching ``tf`` (and its companion files) may still write: what
        is not yet in ``partial_dir``; with a usable delta, the delta plus the whole model
        it rebuilds (the delta is deleted only once the model is written)."""
        held = {m.sha256 for m in have}
        usable = [d for d in rt.deltas if d.base_sha256 in held]
        ref = min(usable, key=lambda d: d.length) if usable else None
        files = sum(self._missing(c.hashes.get("sha256"), c.length) for c in companions)
        if ref is None:
            return self._missing(tf.hashes.get("sha256"), tf.length) + files
        return ref.length + tf.length + files

    def _missing(self, sha: str | None, length: int) -> int:
        """Bytes of a target not yet in its resumable partial file."""
        try:
            have = (self.partial_dir / f"{sha}.part").stat().st_size if sha else 0
        except OSError:
            have = 0
        return length - have if 0 <= have <= length else length

    def _model_file(self, updater: Updater, tf: TargetFile, rt: ReleasedTarget,
                    have: Sequence[LocalModel], progress: Progress, stage: Stage | None,
                    ) -> Path:
        """The verified model file in ``partial_dir``: rebuilt from a delta when one starts
        from a model in ``have``, else (or when the delta fails) downloaded whole."""
        held = {m.sha256: m for m in have}
        usable = [d for d in rt.deltas if d.base_sha256 in held]
        ref = min(usable, key=lambda d: d.length) if usable else None
        fallback = None
        # Both ways below check the bytes against this signed hash as they write them
        # (a target signed without one is checked on its other hashes: None, the
        # installer hashes the file itself).
        signed = tf.hashes.get("sha256")
        sha = signed if isinstance(signed, str) else None
        if ref is not None:
            try:
                part, n = self._via_delta(updater, tf, ref, held[ref.base_sha256], progress,
                                          stage)
            except VerificationError as err:  # TransportError: retried, the delta resumed
                fallback = str(err)
                log.warning("delta from %s for %s failed, fetching the full file: %s",
                            ref.base_version, tf.path, fallback)
            else:
                self.last_download = Download("delta", n, ref.base_version,
                                              full_bytes=tf.length, sha256=sha)
                return part
        part, n = self._download(tf, progress)
        self.last_download = Download("full", n, ref.base_version if ref else None, fallback,
                                      full_bytes=tf.length, sha256=sha)
        return part

    def _via_delta(self, updater: Updater, tf: TargetFile, ref: DeltaRef, base: LocalModel,
                   progress: Progress, stage: Stage | None) -> tuple[Path, int]:
        """Fetch the delta ``ref`` (resumable, verified like any target) and rebuild the
        model file from ``base`` with it; raises a VerificationError for any delta fault."""
        dtf = self._targetinfo(updater, ref.path)
        custom = dtf.unrecognized_fields.get("custom")
        info = custom.get("edge_sdk", {}) if isinstance(custom, dict) else {}
        if delta_of(dtf) != tf.path or not isinstance(info, dict) or \
                info.get("base_sha256") != base.sha256:
            raise DeltaError(f"{ref.path} is not signed as a delta of {tf.path} from base "
                             f"{base.sha256[:16]}…")
        delta_part, n = self._download(dtf, lambda done, _: progress(0, tf.length))
        if stage is not None:
            stage("delta_fetched")
        sha = str(tf.hashes.get("sha256"))
        out_path = self.partial_dir / f"{sha}.applied"
        staged = False

        def on_block(written: int) -> None:
            nonlocal staged
            progress(written, tf.length)
            if not staged and stage is not None:
                staged = True
                stage("delta_applying")

        try:
            with open(delta_part, "rb") as delta, open(base.path, "rb") as base_file, \
                    open(out_path, "wb") as out:
                apply_delta(delta, base_file, out, base_sha256=base.sha256, target_sha256=sha,
                            target_length=tf.length, limits=self.delta_limits,
                            progress=on_block)
        except DeltaError:
            _unlink(out_path)
            _unlink(delta_part)
            raise
        except OSError as err:
            _unlink(out_path)
            if err.filename == str(base.path):
                raise DeltaError(f"cannot read the delta's base {base.path}: {err}") from err
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                _unlink(delta_part)
            raise InstallError(f"{out_path}: cannot write the rebuilt model: {err}") from err
        _unlink(delta_part)
        return out_path, n

    def _download(self, tf: TargetFile, progress: Progress) -> tuple[Path, int]:
        """Resumable download of one target into ``partial_dir``, verified by python-tuf.
        Returns the file and the bytes this call received."""
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
                flusher = _Flusher(out.fileno())

                def sink(data: bytes) -> None:
                    out.write(data)
                    digest.update(data)
                    flusher.wrote(len(data))

                try:
                    self.chunks.download(remote, sink, start=start, length=tf.length,
                                         progress=progress)
                finally:
                    flusher.join()
                received = out.tell() - start
        except EndlessDataError:
            _unlink(part)
            raise
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                # Resuming is for broken links: a partial file kept on a full disk keeps
                # it full. The next attempt starts from zero.
                _unlink(part)
                raise InstallError(f"{part}: cannot write the download: {err}; the partial "
                                   "download is deleted") from err
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
        return part, received


class _Flusher:
    """Starts writing a download to disk while it arrives, on a thread of its own, so
    that the fsync that makes the artifact durable at the end waits for the last few
    MiB only (on loopback that fsync was 60 ms of a 0.3 s fetch of 128 MiB; with this
    7 ms). Errors are left to that fsync, which reports them."""

    EVERY = 16 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = 0
        self.thread: threading.Thread | None = None

    def wrote(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.EVERY and (self.thread is None or not self.thread.is_alive()):
            self.pending = 0
            self.thread = threading.Thread(target=self._sync, name="edge-fetch-flush",
                                           daemon=True)
            self.thread.start()

    def _sync(self) -> None:
        with contextlib.suppress(OSError):
            getattr(os, "fdatasync", os.fsync)(self.fd)

    def join(self) -> None:
        """Wait for the flush under way (before the file is closed)."""
        if self.thread is not None:
            self.thread.join()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()

