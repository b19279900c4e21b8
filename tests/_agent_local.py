"""A local :class:`device_agent.ArtifactSource` for broker-free pipeline tests.

It implements the real interface (like python-tuf's repository simulator): a
deployment is a JSON document authenticated with an HMAC key the "device"
trusts, and fetch copies the artifact directory named in it. Tests that need
the real signed-release client over MQTT use ``edge_sdk``'s own source.

The fixtures of those tests, taken by assignment (``arts = _agent_local.arts``): ``arts``
(artifacts v1, v2, v3 and two that fail on the device) and ``make_agent`` (in-process
agents on this source, stopped after the test).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig, FetchedArtifact, InstallRequest, ModelChange
from edge_sdk import Artifact, build_artifact
from edge_sdk._internal import sha256_file
from edge_sdk.errors import TransportError, VerificationError
from tests import _models

KEY = b"test-director-key"


class LocalSource:
    """``tell_sha256``: hash the model as it is copied and tell the installer that digest,
    as the signed-release source tells the hash it checked the bytes against, leaving the
    comparison with the manifest to the installer (else the source checks the manifest's
    hash itself and tells nothing)."""

    def __init__(self, key: bytes = KEY, *, tell_sha256: bool = False) -> None:
        self.key = key
        self.fetches = 0
        #: The model name of every fetch, in order.
        self.fetched: list[str] = []
        self.tell_sha256 = tell_sha256

    def verify_deployment(self, payload: bytes, *, last_counter: int | None,
                          installed: Mapping[str, str] | None) -> InstallRequest:
        try:
            doc = json.loads(payload)
            body, sig = doc["body"], doc["sig"]
        except (ValueError, KeyError, TypeError) as err:
            raise VerificationError(f"deployment is not a signed document: {err}") from err
        want = hmac.new(self.key, json.dumps(body, sort_keys=True).encode(),
                        hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            raise VerificationError("deployment signature does not match the trusted key")
        if "models" in body:
            names = [m["name"] for m in body["models"]] + list(body.get("remove", []))
            if len(set(names)) != len(names):
                raise VerificationError("deployment names a model twice")
            return InstallRequest(
                digest="", counter=body["counter"], raw=body,
                models=tuple(ModelChange(m["name"], m["artifact_version"], m["sha256"],
                                         m.get("length")) for m in body["models"]),
                remove=tuple(body.get("remove", [])), groups=tuple(body.get("groups", [])),
                devices=tuple(body.get("devices", [])))
        return InstallRequest(digest="", counter=body["counter"],
                              name=body["name"], artifact_version=body["artifact_version"],
                              sha256=body["sha256"], raw=body)

    def fetch(self, deployment: InstallRequest, dest_dir: Path, *, model: str | None = None,
              have: Sequence[tuple[Path, str]] = (),
              reserve: Callable[[int], None] | None = None) -> FetchedArtifact:
        self.fetches += 1
        self.fetched.append(model or deployment.name)
        raw = deployment.raw
        if "models" in raw:
            raw = next(m for m in raw["models"] if m["name"] == model)
        src = Path(raw["dir"])
        if not src.is_dir():
            raise TransportError(f"{src}: artifact not available")
        if reserve is not None:
            reserve(sum(f.stat().st_size for f in src.iterdir() if f.is_file()))
        out = dest_dir / "artifact"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
        if self.tell_sha256:
            model = Artifact.from_dir(out, verify_hash=False).model_path
            return FetchedArtifact(out, verified_sha256=sha256_file(model))
        Artifact.from_dir(out)  # hash checked as the real client would
        return FetchedArtifact(out)


def deployment(art: Artifact, counter: int, *, key: bytes = KEY, **extra: Any) -> bytes:
    body = {"counter": counter, "name": art.manifest.name,
            "artifact_version": art.manifest.version, "sha256": art.manifest.sha256,
            "dir": str(art.path), **extra}
    sig = hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"body": body, "sig": sig}).encode()


def deployment_set(arts: Sequence[Artifact], counter: int, *, remove: Sequence[str] = (),
                   key: bytes = KEY, **extra: Any) -> bytes:
    """A deployment of several models (and removals) at once."""
    body = {"counter": counter, "remove": list(remove), **extra, "models": [
        {"name": a.manifest.name, "artifact_version": a.manifest.version,
         "sha256": a.manifest.sha256, "dir": str(a.path), "length": a.manifest.size_bytes}
        for a in arts]}
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


X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
SAMPLE = {"x": X}


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    d = tmp_path_factory.mktemp("agent-arts")
    out = {}
    for tag, offset in (("v1", 1.0), ("v2", 2.0), ("v3", 3.0)):
        m = _models.offset_model(d / f"{tag}.onnx", offset)
        out[tag] = build_artifact(m, d / tag, name="adder", version=tag, sample=SAMPLE)
    nan = _models.offset_model(d / "nan.onnx", float("nan"))
    out["nan"] = build_artifact(nan, d / "nan", name="adder", version="nan", sample=SAMPLE)
    b1 = _models.batch1_only_model(d / "b1.onnx")
    out["batch1"] = build_artifact(b1, d / "batch1", name="adder", version="b1", sample=SAMPLE)
    # A second model, "rec", for sets: adds 10 (r1) or 20 (r2); rnan fails its smoke test.
    for tag, offset in (("r1", 10.0), ("r2", 20.0), ("rnan", float("nan"))):
        m = _models.offset_model(d / f"{tag}.onnx", offset)
        out[tag] = build_artifact(m, d / tag, name="rec", version=tag, sample=SAMPLE)
    rb1 = _models.batch1_only_model(d / "rb1.onnx")
    out["rbatch1"] = build_artifact(rb1, d / "rbatch1", name="rec", version="rb1",
                                    sample=SAMPLE)
    return out


def events(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(agent.store.outbox.glob("[0-9]*.json"))]


@pytest.fixture()
def make_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(cfg: AgentConfig | None = None, source: LocalSource | None = None) -> Agent:
        agent = Agent(cfg or config(tmp_path / "state"), source=source or LocalSource(),
                      connect=False)
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop()
