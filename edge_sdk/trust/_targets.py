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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path,
                "sha256": self.sha256, "length": self.length, "files": dict(self.files)}


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
    return ReleasedTarget(str(m.get("name")), str(m.get("version")), tf.path,
                          tf.hashes.get("sha256", ""), tf.length, m, dict(files or {}))

