"""The release repository on the operator's host: TUF metadata written with python-tuf.

Layout (only ``metadata/`` and ``targets/`` are ever served)::

    REPO/repo.json                     settings: key directory, lifetime per role
    REPO/metadata/N.root.json          every root version (clients walk them on rotation)
    REPO/metadata/root.json            latest root (copy)
    REPO/metadata/timestamp.json
    REPO/metadata/N.snapshot.json      consistent snapshots: files never change once written
    REPO/metadata/N.targets.json
    REPO/targets/NAME/VERSION/HASH.FILE
    REPO/targets/NAME/VERSION/HASH.MODEL.from-BASEVERSION.delta   deltas from earlier versions
    REPO/deployment.pub.json           public deployment key (for devices and `pull`)
    REPO/deployments/                  counter and last signed deployment per device/group
    REPO/.profiling/ID.lock            held by the process running profiling request ID

Private keys stay in KEYDIR (see ``Repository.keys``, a ``trust._keys.KeyStore``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.metadata import (  # type: ignore[attr-defined]
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from .._artifact import Artifact, Manifest
from .._fs import atomic_write_bytes
from ..delta import DeltaConfig, build_delta
from ..errors import ArtifactError, ConfigError, MissingFileError, UsageError
from ..trust._deployment import compare_versions
from ..trust._keys import DEPLOYMENT_ROLE, KeyStore, check_outside, public_key_bytes
from ..trust._targets import DeltaRef, ReleasedTarget, released_target
from ._durations import refresh_due

SETTINGS = "repo.json"
# The four top-level TUF roles in the order people read them (TOP_LEVEL_ROLE_NAMES is a set).
ROLE_NAMES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_LIFETIMES = {Root.type: timedelta(days=365), Targets.type: timedelta(days=90),
                     Snapshot.type: timedelta(days=7), Timestamp.type: timedelta(days=1)}
#: Deltas are built from this many earlier versions of the same model by default.
DEFAULT_DELTA_BASES = 2
_SER = JSONSerializer(compact=False)
#: Owner locks of running profiling runs (never served: only metadata/ and targets/ are).
PROFILING_LOCKS = ".profiling"
_PROFILING_ID = re.compile(r"[0-9a-f]{16,64}")
log = logging.getLogger("edge_sdk.release")


def _manifest_text(m: Manifest) -> str:
    """The manifest as it travels in targets metadata: a JSON string.

    TUF signs canonical JSON, which has no floats; a converted artifact's manifest
    carries measured accuracy and latency figures, so it rides as one string.
    """
    return json.dumps(m.to_json(), sort_keys=True, separators=(",", ":"))


_T = TypeVar("_T")


def _exclusive(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Serialise changes to one repository across processes (``REPO/.lock``)."""

    @functools.wraps(fn)
    def wrapper(self: Repository, *args: Any, **kwargs: Any) -> _T:
        with open(self.path / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return fn(self, *args, **kwargs)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return wrapper


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Repository:
    """Open an existing repository; create one with :meth:`init`."""

    def __init__(self, path: str | os.PathLike[str], keydir: str | os.PathLike[str] | None = None,
                 ) -> None:
        self.path = Path(path)
        settings = self.path / SETTINGS
        try:
            self.settings: dict[str, Any] = json.loads(settings.read_text())
        except FileNotFoundError:
            raise UsageError(
                f"{self.path}: not a release repository (no {SETTINGS}; run "
                "'edge-sdk release init')") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{settings}: unreadable: {err}") from err
        kd = Path(keydir) if keydir is not None else Path(self.settings["keys"])
        check_outside(kd, self.path)
        self.keys = KeyStore(kd)
        self.meta = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        #: What the last :meth:`add_artifact` did about deltas, one line per earlier version.
        self.delta_notes: list[str] = []
        #: Profiling runs whose targets the last change removed (no live process owned them).
        self.orphans_removed: list[str] = []

    # -- creation ------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], keydir: str | os.PathLike[str], *,
             thresholds: Mapping[str, int] | None = None,
             expires: Mapping[str, timedelta | int] | None = None) -> Repository:
        """Create keys (``threshold`` keys per role, ed25519) and version 1 of every role.

        ``expires``: each role's lifetime (an int is days), default
        :data:`DEFAULT_LIFETIMES`; re-signing gives it that long again.

        Also creates the separate deployment key and writes its public half to
        ``REPO/deployment.pub.json`` and ``KEYDIR/deployment.pub.json``.
        """
        repo, kd = Path(path), Path(keydir)
        check_outside(kd, repo)
        th = {r: 1 for r in TOP_LEVEL_ROLE_NAMES} | dict(thresholds or {})
        ex = dict(DEFAULT_LIFETIMES) | {
            r: d if isinstance(d, timedelta) else timedelta(days=d)
            for r, d in (expires or {}).items()}
        for role in (*th, *ex):
            if role not in TOP_LEVEL_ROLE_NAMES:
                raise UsageError(f"unknown role {role!r} (roles: root, targets, snapshot, "
                                 "timestamp)")
        if any(n < 1 for n in th.values()):
            raise UsageError("thresholds must be >= 1")
        if any(d < timedelta(seconds=1) for d in ex.values()):
            raise UsageError("lifetimes (--expires) must be at least 1 second")
        if (repo / SETTINGS).exists() or (repo / "metadata").exists():
            raise UsageError(f"{repo}: a repository already exists there")
        if kd.exists() and any(kd.iterdir()):
            raise UsageError(f"{kd}: key directory is not empty; use a new one per repository")
        made = [p for p in (repo, kd) if not p.exists()]
        try:
            return cls._create(repo, kd, th, ex)
        except BaseException:
            # A failed init leaves neither a half-written repository nor orphan keys.
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            raise

    @classmethod
    def _create(cls, repo: Path, kd: Path, th: dict[str, int], ex: dict[str, timedelta],
                ) -> Repository:
        repo.mkdir(parents=True, exist_ok=True)
        (repo / "metadata").mkdir()
        (repo / "targets").mkdir()
        (repo / "deployments").mkdir()
        kd.mkdir(parents=True, exist_ok=True)
        store = KeyStore(kd)
        root = Root(expires=_now() + ex[Root.type], consistent_snapshot=True)
        for role in sorted(TOP_LEVEL_ROLE_NAMES):
            root.roles[role] = Role([], th[role])
            for _ in range(th[role]):
                root.add_key(store.generate(role).public_key, role)
        dep = store.generate(DEPLOYMENT_ROLE)
        pub = public_key_bytes(dep.public_key)
        atomic_write_bytes(store.public_key_path(DEPLOYMENT_ROLE), pub)
        atomic_write_bytes(repo / "deployment.pub.json", pub)
        atomic_write_bytes(repo / SETTINGS, json.dumps(
            {"spec": 1, "keys": str(kd.resolve()),
             "expires_s": {r: int(d.total_seconds()) for r, d in ex.items()}},
            indent=2).encode())
        self = cls(repo, kd)
        self._write_root(Metadata(root))
        targets = Metadata(Targets(expires=self._expiry(Targets.type)))
        self._sign_and_write(targets)
        self._publish_snapshot_and_timestamp(targets)
        return self

    # -- reading -------------------------------------------------------------------

    @property
    def root_path(self) -> Path:
        """The latest signed root: what a new device is provisioned with."""
        return self.meta / "root.json"

    @property
    def deployment_key_path(self) -> Path:
        return self.path / "deployment.pub.json"

    def load(self, role: str) -> Metadata[Any]:
        p = self.meta / f"{role}.json"
        if not p.is_file():
            raise UsageError(f"{p}: missing; the repository is incomplete")
        try:
            return Metadata.from_file(str(p))
        except Exception as err:
            raise ConfigError(f"{p}: unreadable metadata: {err}") from err

    def targets(self) -> list[ReleasedTarget]:
        """Released artifacts, oldest first."""
        out = []
        for tf in self.load(Targets.type).signed.targets.values():
            rt = released_target(tf)
            if rt is not None:
                out.append(rt)
        return out

    def find(self, name: str, version: str | None = None, *,
             allow_yanked: bool = False) -> ReleasedTarget:
        """The release ``name`` at ``version`` (default: the newest version not yanked).
        Raises :class:`UsageError` for an unknown release, and unless ``allow_yanked``
        for a yanked ``version`` (or when every version of ``name`` is yanked)."""
        everything = self.targets()
        cands = [t for t in everything if t.name == name and
                 (version is None or t.version == version)]
        if not cands:
            known = sorted({f"{t.name} {t.version}" for t in everything})
            raise UsageError(
                f"no release {name}{' ' + version if version else ''} in {self.path} "
                f"(released: {', '.join(known) or 'none'})")
        if not allow_yanked:
            if version is not None:
                cands[0].refuse_yanked()
            cands = [t for t in cands if not t.yanked]
            if not cands:
                raise UsageError(f"every release of {name} in {self.path} is yanked; name "
                                 "one with --version after 'edge-sdk release unyank'")
        best = cands[0]
        for t in cands[1:]:
            if compare_versions(t.version, best.version) > 0:
                best = t
        return best

    def versions(self) -> dict[str, int]:
        return {r: self.load(r).signed.version for r in ROLE_NAMES}

    def lifetimes(self) -> dict[str, timedelta]:
        """How long each role lives once signed (``release init --expires``)."""
        secs = self.settings.get("expires_s")
        days = self.settings.get("expires", {})  # repositories made before durations
        out = {}
        for r in ROLE_NAMES:
            if isinstance(secs, dict) and r in secs:
                out[r] = timedelta(seconds=int(secs[r]))
            elif r in days:
                out[r] = timedelta(days=int(days[r]))
            else:
                out[r] = DEFAULT_LIFETIMES[r]
        return out

    def expiries(self) -> dict[str, datetime]:
        """When each role's current metadata expires."""
        return {r: self.load(r).signed.expires for r in ROLE_NAMES}

    def online(self, role: str, root: Root | None = None) -> bool:
        """Whether the key directory holds enough of ``role``'s keys to re-sign it."""
        try:
            self._signers(role, root)
        except ConfigError:
            return False
        return True

    # -- changes ---------------------------------------------------------------------

    @_exclusive
    def add_artifact(self, artifact_dir: str | os.PathLike[str], *,
                     delta_bases: int = DEFAULT_DELTA_BASES,
                     delta_config: DeltaConfig | None = None) -> ReleasedTarget:
        """Release an artifact directory: model (+ sample) as targets, manifest as custom.

        Deltas from the ``delta_bases`` newest earlier versions of the same model are
        signed beside it (each one only when it is at most ``delta_config.max_ratio``
        of the model file). Re-adding the identical artifact is a no-op; a different
        file under an existing name/version is refused (release a new version instead).
        """
        if delta_bases < 0:
            raise UsageError("--delta-bases must be >= 0")
        art = Artifact.from_dir(artifact_dir)
        m = art.manifest
        base = f"{m.name}/{m.version}"
        md = self.load(Targets.type)
        tpath = f"{base}/{m.model}"
        existing = md.signed.targets.get(tpath)
        if existing is not None:
            if existing.hashes.get("sha256") == m.sha256:
                rt = released_target(existing)
                assert rt is not None
                return rt
            raise UsageError(
                f"{m.name} {m.version} is already released with a different model file "
                f"(sha256 {existing.hashes.get('sha256', '')[:16]}…); bump the version")
        files: dict[str, str] = {}
        new: list[TargetFile] = []
        if art.sample_path is not None:
            sp = f"{base}/{m.sample}"
            files[str(m.sample)] = sp
            new.append(self._stage_target(sp, art.sample_path, {"edge_sdk": {"companion_of":
                                                                          tpath}}))
        delta_tfs = self._stage_deltas(art, tpath, delta_bases, delta_config or DeltaConfig())
        new.extend(tf for tf, _ in delta_tfs)
        model_tf = self._stage_target(tpath, art.model_path, {"edge_sdk": {
            "manifest": _manifest_text(m), "files": files, "released": _now().isoformat(),
            "deltas": [ref.to_json() for _, ref in delta_tfs]}})
        if model_tf.hashes["sha256"] != m.sha256 or model_tf.length != m.size_bytes:
            raise ArtifactError(f"{art.path}: model file changed while it was being released")
        new.append(model_tf)
        for tf in new:
            md.signed.targets[tf.path] = tf
        orphans = self._unlist_orphaned_profiling(md)
        self._publish_targets(md)
        self._delete_profiling(orphans)
        rt = released_target(model_tf)
        assert rt is not None
        return rt

    @_exclusive
    def yank(self, name: str, version: str, reason: str | None = None) -> ReleasedTarget:
        """Retire release ``name`` ``version``: its target is marked yanked (with
        ``reason``) in newly signed targets metadata, snapshot and timestamp. The file
        stays: devices running it keep it, and deltas from it still apply. Yanking it
        again replaces the reason."""
        return self._mark_yanked(name, version, {"reason": reason or "", "at":
                                                 _now().isoformat()})

    @_exclusive
    def unyank(self, name: str, version: str) -> ReleasedTarget:
        """Undo :meth:`yank`. Raises :class:`UsageError` when it is not yanked."""
        return self._mark_yanked(name, version, None)

    def _mark_yanked(self, name: str, version: str,
                     mark: dict[str, str] | None) -> ReleasedTarget:
        md = self.load(Targets.type)
        found = [(tf, rt) for tf in md.signed.targets.values()
                 if (rt := released_target(tf)) and rt.name == name and rt.version == version]
        if not found:
            self.find(name, version, allow_yanked=True)  # the one-line diagnosis
            raise UsageError(f"no release {name} {version} in {self.path}")
        tf, rt = found[0]
        if mark is None and not rt.yanked:
            raise UsageError(f"{name} {version} is not yanked")
        info = tf.unrecognized_fields["custom"]["edge_sdk"]
        if mark is None:
            info.pop("yanked", None)
        else:
            info["yanked"] = mark
        self._publish_targets(md)
        out = released_target(tf)
        assert out is not None
        return out

    @contextlib.contextmanager
    def profiling_run(self, request_id: str) -> Iterator[ProfilingRun]:
        """Own profiling request ``request_id`` for the duration of the ``with`` block: its
        lock (``REPO/.profiling/ID.lock``) is held, so no other process takes its targets
        for orphans; on leaving, its targets are unlisted and deleted, whatever happened.
        A process that dies inside (even ``kill -9``) leaves the lock free, and the next
        change to the repository removes that run's targets."""
        if not _PROFILING_ID.fullmatch(request_id):
            raise UsageError(f"profiling request id {request_id!r} must be 16-64 hex digits")
        run = ProfilingRun(self, request_id)
        try:
            yield run
        finally:
            try:
                self.remove_profiling_files(request_id)
            finally:
                run.release()

    @_exclusive
    def add_profiling_files(self, request_id: str, files: Mapping[str, Path],
                            ) -> dict[str, TargetFile]:
        """Sign ``files`` (file name → local path) as targets ``profiling/REQUEST_ID/NAME``:
        fetched and verified by devices like any target, never a release (no manifest),
        so no agent installs one. Returns file name → the signed target. Call it inside
        :meth:`profiling_run`; targets of runs no live process owns are removed here."""
        from ..profiling._request import PROFILING_PREFIX

        md = self.load(Targets.type)
        orphans = self._unlist_orphaned_profiling(md, keep={request_id})
        out: dict[str, TargetFile] = {}
        for fname, src in files.items():
            tpath = f"{PROFILING_PREFIX}{request_id}/{fname}"
            out[fname] = self._stage_target(tpath, Path(src), {"edge_sdk": {"profiling": True}})
            md.signed.targets[tpath] = out[fname]
        self._publish_targets(md)
        self._delete_profiling(orphans)
        return out

    def _publish_targets(self, md: Metadata[Targets]) -> None:
        """Sign a changed targets role as its next version, then snapshot and timestamp."""
        md.signed.version += 1
        md.signed.expires = self._expiry(Targets.type)
        self._sign_and_write(md)
        self._publish_snapshot_and_timestamp(md)

    @_exclusive
    def remove_profiling_files(self, request_id: str) -> int:
        """Unlist and delete the targets :meth:`add_profiling_files` signed for
        ``request_id``; returns how many there were."""
        from ..profiling._request import PROFILING_PREFIX

        prefix = f"{PROFILING_PREFIX}{request_id}/"
        md = self.load(Targets.type)
        gone = [p for p in md.signed.targets if p.startswith(prefix)]
        if gone:
            for p in gone:
                del md.signed.targets[p]
            self._publish_targets(md)
        shutil.rmtree(self.targets_dir / prefix.rstrip("/"), ignore_errors=True)
        return len(gone)

    @_exclusive
    def remove_orphaned_profiling_files(self) -> list[str]:
        """Unlist and delete the targets of profiling runs no live process owns (one killed
        mid-run, or whose request expired); returns their request ids. ``add_artifact``,
        ``add_profiling_files`` and ``refresh`` do it as part of their change."""
        md = self.load(Targets.type)
        listed = len(md.signed.targets)
        orphans = self._unlist_orphaned_profiling(md)
        if len(md.signed.targets) < listed:
            self._publish_targets(md)
        self._delete_profiling(orphans)
        return orphans

    @_exclusive
    def refresh(self, *, force: bool = False) -> list[str]:
        """Re-sign what is close to expiry (timestamp and snapshot always). Returns roles."""
        done = []
        root = self.load(Root.type)
        if force or self._due(root, Root.type):
            root.signed.version += 1
            root.signed.expires = self._expiry(Root.type)
            self._write_root(root)
            done.append(Root.type)
        targets = self.load(Targets.type)
        listed = len(targets.signed.targets)
        orphans = self._unlist_orphaned_profiling(targets)
        if force or self._due(targets, Targets.type) or len(targets.signed.targets) < listed:
            targets.signed.version += 1
            targets.signed.expires = self._expiry(Targets.type)
            self._sign_and_write(targets)
            done.append(Targets.type)
        self._publish_snapshot_and_timestamp(targets)
        self._delete_profiling(orphans)
        return [*done, Snapshot.type, Timestamp.type]

    @_exclusive
    def keep_fresh(self, roles: Collection[str]) -> list[tuple[str, int, datetime]]:
        """Re-sign those of ``roles`` that are due (:func:`refresh_due`), and what must
        follow them (a new targets needs a new snapshot, which needs a new timestamp);
        nothing when a role that must follow is not in ``roles``. Returns (role, new
        version, new expiry) for each. What ``serve`` runs, with the online roles."""
        now, done = datetime.now(UTC), []
        lifetime = self.lifetimes()

        def due(md: Metadata[Any]) -> bool:
            return refresh_due(md.signed.expires, lifetime[md.signed.type], now)

        if Root.type in roles:
            root = self.load(Root.type)
            if due(root):
                root.signed.version += 1
                root.signed.expires = self._expiry(Root.type)
                self._write_root(root)
                done.append(root)
        if Timestamp.type not in roles:
            return [(md.signed.type, md.signed.version, md.signed.expires) for md in done]
        targets = self.load(Targets.type)
        snapshot, timestamp = self.load(Snapshot.type), self.load(Timestamp.type)
        chain = Snapshot.type in roles
        new_targets = chain and Targets.type in roles and due(targets)
        if new_targets:
            targets.signed.version += 1
            targets.signed.expires = self._expiry(Targets.type)
            self._sign_and_write(targets)
            done.append(targets)
        if chain and (new_targets or due(snapshot)):
            snapshot, timestamp = self._publish_snapshot_and_timestamp(targets)
            done += [snapshot, timestamp]
        elif due(timestamp):
            timestamp = self._publish_timestamp(snapshot)
            done.append(timestamp)
        return [(md.signed.type, md.signed.version, md.signed.expires) for md in done]

    @_exclusive
    def rotate_key(self, role: str) -> list[str]:
        """Replace every key of ``role`` with fresh ones in a new root signed by old and new
        root keys, so that clients holding the old root follow. Returns the new key ids."""
        if role not in TOP_LEVEL_ROLE_NAMES:
            raise UsageError(f"unknown role {role!r} (roles: root, targets, snapshot, timestamp)")
        root = self.load(Root.type)
        old_root_signers = self._signers(Root.type, root.signed)
        old_ids = list(root.signed.roles[role].keyids)
        fresh = [self.keys.generate(role) for _ in old_ids]
        for kid in old_ids:
            root.signed.revoke_key(kid, role)
        for s in fresh:
            root.signed.add_key(s.public_key, role)
        root.signed.version += 1
        root.signed.expires = self._expiry(Root.type)
        self._write_root(root, extra_signers=old_root_signers if role == Root.type else [])
        for kid in old_ids:
            self.keys.retire(role, kid)
        targets = self.load(Targets.type)
        if role == Targets.type:
            targets.signed.version += 1
            targets.signed.expires = self._expiry(Targets.type)
            self._sign_and_write(targets)
        self._publish_snapshot_and_timestamp(targets)
        return [s.public_key.keyid for s in fresh]

    # -- internals -------------------------------------------------------------------

    def _unlist_orphaned_profiling(self, md: Metadata[Any], keep: Collection[str] = (),
                                   ) -> list[str]:
        """Take the targets of profiling runs no live process owns out of ``md`` (the
        caller signs it) and return their ids, for :meth:`_delete_profiling` once it is
        signed. Runs under the repository lock, so no owner is between signing its
        targets and holding its lock: it takes the lock first and drops it last."""
        from ..profiling._request import PROFILING_PREFIX

        listed: dict[str, list[str]] = {}
        for p in md.signed.targets:
            if p.startswith(PROFILING_PREFIX):
                listed.setdefault(p[len(PROFILING_PREFIX):].split("/", 1)[0], []).append(p)
        found = set(listed)
        for parent, suffix in ((self.targets_dir / PROFILING_PREFIX.rstrip("/"), ""),
                               (self.path / PROFILING_LOCKS, ".lock")):
            with contextlib.suppress(OSError):
                found.update(e.name[:len(e.name) - len(suffix)] for e in parent.iterdir()
                             if e.name.endswith(suffix))
        orphans = sorted(r for r in found if r not in keep and _PROFILING_ID.fullmatch(r)
                         and not _profiling_owned(self.path / PROFILING_LOCKS / f"{r}.lock"))
        for rid in orphans:
            for p in listed.get(rid, ()):
                del md.signed.targets[p]
        self.orphans_removed = [r for r in orphans if r in listed]
        if self.orphans_removed:
            log.warning("removing the profiling targets of %d run(s) no live process owns "
                        "(killed, or their request expired): %s", len(self.orphans_removed),
                        ", ".join(r[:12] for r in self.orphans_removed))
        return orphans

    def _delete_profiling(self, request_ids: Collection[str]) -> None:
        """Delete the target files and owner locks of runs already unlisted and signed."""
        from ..profiling._request import PROFILING_PREFIX

        for rid in request_ids:
            shutil.rmtree(self.targets_dir / PROFILING_PREFIX / rid, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self.path / PROFILING_LOCKS / f"{rid}.lock")

    def _expiry(self, role: str) -> datetime:
        return _now() + self.lifetimes()[role]

    def _due(self, md: Metadata[Any], role: str) -> bool:
        return refresh_due(md.signed.expires, self.lifetimes()[role], _now())

    def _signers(self, role: str, root: Root | None = None) -> list[Any]:
        root = root or self.load(Root.type).signed
        keyids = set(root.roles[role].keyids)
        signers = [s for s in self.keys.signers(role) if s.public_key.keyid in keyids]
        if len(signers) < root.roles[role].threshold:
            raise ConfigError(
                f"{self.keys.dir}: only {len(signers)} of the {root.roles[role].threshold} "
                f"keys needed to sign {role} are available")
        return signers

    def _stage_target(self, tpath: str, src: Path, custom: dict[str, Any]) -> TargetFile:
        try:
            tf = TargetFile.from_file(tpath, str(src), ["sha256"])
        except FileNotFoundError as err:
            raise MissingFileError(f"{src}: no such file to sign as target {tpath}") from err
        tf.unrecognized_fields["custom"] = custom
        dirname, _, basename = tpath.rpartition("/")
        dest = self.targets_dir / dirname / f"{tf.hashes['sha256']}.{basename}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return tf

    def _stage_deltas(self, art: Artifact, tpath: str, bases: int, cfg: DeltaConfig,
                      ) -> list[tuple[TargetFile, DeltaRef]]:
        """Build, check and stage the deltas from the ``bases`` newest earlier versions."""
        m = art.manifest
        earlier = [t for t in self.targets()
                   if t.name == m.name and compare_versions(t.version, m.version) < 0]
        earlier.sort(key=functools.cmp_to_key(lambda a, b: compare_versions(b.version,
                                                                              a.version)))
        self.delta_notes = []
        if not earlier[:bases]:
            return []
        target = art.model_path.read_bytes()
        out = []
        for bt in earlier[:bases]:
            base_file = self._target_file(bt.path, bt.sha256)
            fmt = str(bt.manifest.get("format", "")) or None
            if fmt != m.format:
                # An ONNX model has no useful delta against a TFLite one.
                self.delta_notes.append(f"no delta from {bt.version}: it is {fmt}, this is "
                                        f"{m.format}")
                continue
            delta = build_delta(base_file.read_bytes(), target, fmt=fmt, config=cfg)
            if delta is None:
                self.delta_notes.append(
                    f"no delta from {bt.version}: no tensor matched and the base is over "
                    f"{cfg.max_prefix_base_bytes} bytes")
                continue
            if delta.ratio > cfg.max_ratio:
                self.delta_notes.append(
                    f"no delta from {bt.version}: {delta.ratio:.0%} of the full model, over "
                    f"the limit of {cfg.max_ratio:.0%}")
                continue
            self.delta_notes.append(
                f"delta from {bt.version}: {delta.size} bytes ({delta.ratio:.1%} of the full "
                f"model, {delta.method})")
            dpath = f"{tpath}.from-{bt.version}.delta"
            tmp = self.targets_dir / f".{m.name}.{bt.sha256[:16]}.delta.tmp"
            try:
                atomic_write_bytes(tmp, delta.data)
                tf = self._stage_target(dpath, tmp, {"edge_sdk": {
                    "delta_of": tpath, "base_path": bt.path, "base_sha256": bt.sha256,
                    "base_version": bt.version, "method": delta.method}})
            finally:
                tmp.unlink(missing_ok=True)
            out.append((tf, DeltaRef(bt.version, bt.sha256, dpath, tf.length)))
        return out

    def _target_file(self, tpath: str, sha256: str) -> Path:
        dirname, _, basename = tpath.rpartition("/")
        path = self.targets_dir / dirname / f"{sha256}.{basename}"
        if not path.is_file():
            raise UsageError(f"{path}: the released file is missing from the repository")
        return path

    def _sign_and_write(self, md: Metadata[Any]) -> bytes:
        role = md.signed.type
        md.signatures.clear()
        for s in self._signers(role):
            md.sign(s, append=True)
        data = md.to_bytes(_SER)
        if role != Timestamp.type:
            atomic_write_bytes(self.meta / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(self.meta / f"{role}.json", data)
        return data

    def _write_root(self, md: Metadata[Any], extra_signers: list[Any] | None = None) -> None:
        md.signatures.clear()
        for s in [*self._signers(Root.type, md.signed), *(extra_signers or [])]:
            md.sign(s, append=True)
        data = md.to_bytes(_SER)
        atomic_write_bytes(self.meta / f"{md.signed.version}.root.json", data)
        atomic_write_bytes(self.meta / "root.json", data)

    def _publish_snapshot_and_timestamp(self, targets: Metadata[Any],
                                        ) -> tuple[Metadata[Any], Metadata[Any]]:
        tdata = (self.meta / f"{targets.signed.version}.targets.json").read_bytes()
        try:
            snap = self.load(Snapshot.type)
            snap.signed.version += 1
        except UsageError:
            snap = Metadata(Snapshot())
        snap.signed.expires = self._expiry(Snapshot.type)
        snap.signed.meta["targets.json"] = MetaFile.from_data(
            targets.signed.version, tdata, ["sha256"])
        self._sign_and_write(snap)
        return snap, self._publish_timestamp(snap)

    def _publish_timestamp(self, snap: Metadata[Any]) -> Metadata[Any]:
        """Sign the next timestamp, naming the snapshot ``snap`` (already written)."""
        sdata = (self.meta / f"{snap.signed.version}.snapshot.json").read_bytes()
        try:
            ts = self.load(Timestamp.type)
            ts.signed.version += 1
        except UsageError:
            ts = Metadata(Timestamp())
        ts.signed.expires = self._expiry(Timestamp.type)
        ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, sdata, ["sha256"])
        self._sign_and_write(ts)
        return ts


class ProfilingRun:
    """A profiling run's hold on the repository (see :meth:`Repository.profiling_run`):
    an exclusive ``flock`` on ``REPO/.profiling/ID.lock`` that the kernel drops when the
    process dies, so a dead owner's lock can be taken and a live one's cannot (no pid
    that could be reused). The file also says who holds it and until when the request
    is valid."""

    def __init__(self, repo: Repository, request_id: str) -> None:
        self.repo = repo
        self.request_id = request_id
        locks = repo.path / PROFILING_LOCKS
        locks.mkdir(exist_ok=True)
        self.path = locks / f"{request_id}.lock"
        # Locked before it has its name: a cleaner that finds the name finds it held.
        tmp = locks / f".{request_id}.{os.getpid()}.tmp"
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.valid_until(None)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def add_files(self, files: Mapping[str, Path]) -> dict[str, TargetFile]:
        """:meth:`Repository.add_profiling_files` for this run."""
        return self.repo.add_profiling_files(self.request_id, files)

    def valid_until(self, expires: datetime | None) -> None:
        """Record when the run's request expires: after that no device accepts it, and a
        run still holding its lock is past its use (its targets count as orphaned)."""
        assert self._fd is not None
        doc = {"pid": os.getpid(), "host": socket.gethostname(),
               "expires": None if expires is None else expires.isoformat()}
        data = json.dumps(doc).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Delete the lock file (its targets are gone) and let go of the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _profiling_owned(lock: Path) -> bool:
    """Whether a live process holds ``lock`` for a request that has not expired."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False  # an owner takes its lock before it signs anything
    except OSError:
        return True  # cannot tell: leave it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: the owner lives
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        try:
            expires = json.loads(os.pread(fd, 4096, 0)).get("expires")
            when = datetime.fromisoformat(expires) if isinstance(expires, str) else None
        except (OSError, ValueError, AttributeError):
            when = None
        return when is None or when > datetime.now(UTC)
    finally:
        os.close(fd)
