"""A local :class:`device_agent.ArtifactSource` for broker-free pipeline tests.

It implements the real interface (like python-tuf's repository simulator): a
deployment is a JSON document authenticated with an HMAC key the "device"
trusts, and fetch copies the artifact directory named in it. Tests that need
the real signed-release client over MQTT use ``edge_sdk``'s own source.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agent import AgentConfig, FetchedArtifact, InstallRequest
from edge_sdk import Artifact
from edge_sdk.errors import TransportError, VerificationError

KEY = b"test-director-key"


class LocalSource:
    def __init__(self, key: bytes = KEY) -> None:
        self.key = key
        self.fetches = 0

    def verify_deployment(self, payload: bytes, *, last_counter: int | None,
                          installed: tuple[str, str] | None) -> InstallRequest:
        try:
            doc = json.loads(payload)
            body, sig = doc["body"], doc["sig"]
        except (ValueError, KeyError, TypeError) as err:
            raise VerificationError(f"deployment is not a signed document: {err}") from err
        want = hmac.new(self.key, json.dumps(body, sort_keys=True).encode(),
                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            raise VerificationError("deployment signature does not match the trusted key")
        return InstallRequest(digest="", counter=body["counter"],
                              name=body["name"], artifact_version=body["artifact_version"],
                              sha256=body["sha256"], raw=body)

    def fetch(self, deployment: InstallRequest, dest_dir: Path, *,
              have: Sequence[tuple[Path, str]] = (),
              reserve: Callable[[int], None] | None = None) -> FetchedArtifact:
        self.fetches += 1
        src = Path(deployment.raw["dir"])
        if not src.is_dir():
            raise TransportError(f"{src}: artifact not available")
        if reserve is not None:
            reserve(sum(f.stat().st_size for f in src.iterdir() if f.is_file()))
        out = dest_dir / "artifact"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
        Artifact.from_dir(out)  # hash checked as the real client would
        return FetchedArtifact(out)


def deployment(art: Artifact, counter: int, *, key: bytes = KEY, **extra: Any) -> bytes:
    body = {"counter": counter, "name": art.manifest.name,
            "artifact_version": art.manifest.version, "sha256": art.manifest.sha256,
            "dir": str(art.path), **extra}
    sig = hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"body": body, "sig": sig}).encode()


def config(state_dir: Path, **sections: Any) -> AgentConfig:
    data: dict[str, Any] = {"device_id": "dev-1", "fleet": "lab", "state_dir": str(state_dir),
                            "http": {"port": 0},
                            "health": {"window_s": 0.5, "probe_interval_s": 0.05}}
    for k, v in sections.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return AgentConfig.from_dict(data)
