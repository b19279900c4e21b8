"""A repository with delta releases, served by the repository simulator: :class:`DeltaEnv`
releases versions of one model whose retrains keep the same 512 KiB of weights, so each
release carries a delta from the one before, and signs forged deltas with the real
targets key.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from tuf.api.metadata import TargetFile

import edge_sdk
from edge_sdk.delta import build_delta
from edge_sdk.delta._format import Header
from edge_sdk.trust import LocalModel, UpdateClient
from tests._models import weighted_offset_model
from tests._trust_env import SimEnv

RNG = np.random.default_rng(5)
W = RNG.standard_normal((4, 32768)).astype(np.float32)


class DeltaEnv(SimEnv):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.arts: dict[str, edge_sdk.Artifact] = {}

    def artifact(self, version: str, head_scale: float) -> edge_sdk.Artifact:
        src = weighted_offset_model(self.tmp / f"m-{version}.onnx", float(version), W,
                                    np.full(2048, head_scale, np.float32))
        art = edge_sdk.build_artifact(src, self.tmp / "arts" / version, name="m",
                                      version=version,
                                      sample={"x": np.ones((1, 4), np.float32)})
        self.arts[version] = art
        return art

    def release_version(self, version: str, head_scale: float) -> edge_sdk.Artifact:
        art = self.artifact(version, head_scale)
        self.repo.add_artifact(art.path)
        self.sim.publish()
        return art

    def held(self, version: str) -> LocalModel:
        art = self.arts[version]
        return LocalModel(art.model_path, art.manifest.sha256)

    def delta_path(self, version: str) -> str:
        (ref,) = self.repo.find("m", version).deltas
        return ref.path

    def remote(self, tpath: str, sha: str) -> str:
        dirname, _, base = tpath.rpartition("/")
        return f"targets/{dirname}/{sha}.{base}"

    def sign_delta(self, tpath: str, data: bytes) -> None:
        """Replace the delta target with ``data``, signed with the real targets key."""
        md = self.repo.load("targets")
        old = md.signed.targets[tpath]
        new = TargetFile.from_data(tpath, data, ["sha256"])
        new.unrecognized_fields.update(old.unrecognized_fields)
        md.signed.targets[tpath] = new
        md.signed.version += 1
        self.put(md, self.repo.keys.signers("targets"))
        self.sim.files[self.remote(tpath, new.hashes["sha256"])] = data
        self.put_snapshot_and_timestamp(md)

    def fetch(self, tmp: Path) -> tuple[UpdateClient, Path]:
        client = self.client()
        dest = client.fetch(self.deploy(version="2"), tmp / "installed",
                            have=[self.held("1")])
        return client, dest


def two_versions(tmp: Path) -> DeltaEnv:
    """A repository under ``tmp/env`` with versions 1 and 2 released (the delta tests'
    common start)."""
    env = DeltaEnv(tmp / "env")
    env.release_version("1", 1.0)
    env.release_version("2", 2.0)
    return env


def sign_delta_that_rebuilds_other_bytes(d: DeltaEnv, version: str) -> None:
    """A signed delta whose header names the signed target but which rebuilds another model
    of the same length: only the hash of what it writes can tell."""
    base = d.arts["1"].model_path.read_bytes()
    other = d.artifact("7", 7.0).model_path.read_bytes()
    target = d.arts[version].model_path.read_bytes()
    delta = build_delta(base, other, fmt="onnx")
    assert delta is not None and len(other) == len(target)
    h = Header.decode(delta.data[:16], io.BytesIO(delta.data[16:]).read,
                      max_header_bytes=1 << 22, max_ops=1 << 16, max_frames=1 << 16)
    lying = Header(h.base_sha256, h.base_length, hashlib.sha256(target).hexdigest(),
                   len(target), h.ops, h.frames, h.prefix)
    d.sign_delta(d.delta_path(version), lying.encode() + delta.data[len(h.encode()):])
