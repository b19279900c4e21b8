"""How a released artifact is described in signed targets metadata.

Both sides need it: the repository (host, :mod:`edge_sdk.release`) writes these
entries and the update client (device, :class:`edge_sdk.trust.UpdateClient`)
reads them back. It lives here, below both, so that the device-side trust code
never imports the host-side release package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from ..errors import UsageError


@dataclass(frozen=True)
class DeltaRef:
    """A delta target that rebuilds a release's model file from an earlier release's."""

    #: The earlier release's version and model sha256 (what the device must hold).
    base_version: str
    base_sha256: str
    #: The delta's own target path and signed length.
    path: str
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"from": self.base_version, "base_sha256": self.base_sha256, "path": self.path,
                "size_bytes": self.length}

    @classmethod
    def from_json(cls, doc: Any) -> DeltaRef | None:
        """The reference ``doc`` describes, or None when it is not one (unknown fields of
        newer releases are ignored, not fatal)."""
        if not isinstance(doc, dict):
            return None
        v, sha, path, n = (doc.get(k) for k in ("from", "base_sha256", "path", "size_bytes"))
        if not (isinstance(v, str) and isinstance(sha, str) and isinstance(path, str) and
                isinstance(n, int) and not isinstance(n, bool) and n > 0):
            return None
        return cls(v, sha, path, n)


@dataclass(frozen=True)
class ReleasedTarget:
    """One released artifact as the signed targets metadata lists it."""

    name: str
    version: str
    path: str
    sha256: str
    length: int
    manifest: Mapping[str, Any]
    files: Mapping[str, str]
    #: Deltas from earlier releases, newest base first.
    deltas: tuple[DeltaRef, ...] = ()
    #: Retired by ``edge-sdk release yank``: no newest-version default picks it and no
    #: one names it explicitly, but devices that run it keep it (and deltas from it).
    yanked: bool = False
    yank_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path,
                "sha256": self.sha256, "length": self.length, "size_bytes": self.length,
                "files": dict(self.files), "deltas": [d.to_json() for d in self.deltas],
                "yanked": self.yanked, "yank_reason": self.yank_reason}

    def refuse_yanked(self) -> None:
        """Raise :class:`~edge_sdk.errors.UsageError` when this release is yanked."""
        if self.yanked:
            why = f": {self.yank_reason}" if self.yank_reason else ""
            raise UsageError(f"{self.name} {self.version} was yanked{why} (a yanked release "
                             "is not deployed or pulled; 'edge-sdk release unyank' undoes it)")


def released_target(tf: TargetFile) -> ReleasedTarget | None:
    """The :class:`ReleasedTarget` a model target describes (None for companion files)."""
    custom = tf.unrecognized_fields.get("custom")
    info = custom.get("edge_sdk") if isinstance(custom, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("manifest"), str):
        return None
    try:
        m = json.loads(info["manifest"])
    except ValueError:
        return None
    if not isinstance(m, dict):
        return None
    files = info.get("files") if isinstance(info.get("files"), dict) else {}
    raw = info.get("deltas") if isinstance(info.get("deltas"), list) else []
    deltas = tuple(d for d in map(DeltaRef.from_json, raw or []) if d is not None)
    yank = info.get("yanked")
    reason = yank.get("reason") if isinstance(yank, dict) else None
    return ReleasedTarget(str(m.get("name")), str(m.get("version")), tf.path,
                          tf.hashes.get("sha256", ""), tf.length, m, dict(files or {}), deltas,
                          yanked=yank is not None and yank is not False,
                          yank_reason=reason if isinstance(reason, str) and reason else None)


def delta_of(tf: TargetFile) -> str | None:
    """The model target path a delta target rebuilds (None when ``tf`` is no delta)."""
    custom = tf.unrecognized_fields.get("custom")
    info = custom.get("edge_sdk") if isinstance(custom, dict) else None
    target = info.get("delta_of") if isinstance(info, dict) else None
    return target if isinstance(target, str) else None

