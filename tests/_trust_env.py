"""A release repository, a broker, a responder and device clients for trust/transfer tests.

Misbehaving responders are real MQTT clients on the test broker (subclasses of
the real responder), never mocks. :class:`SimEnv` is the same repository served from
memory by the repository simulator (tests/_repository_simulator.py), no broker.

Both offer what an attack needs (:func:`attack_env` builds either): ``release``,
``deploy``, ``client``; ``misbehave(mode)`` (a misbehaving responder or repository);
``put`` (sign metadata and serve it) and ``resign_online`` (what a compromise of the
online keys allows: snapshot and timestamp re-signed over it); ``served`` and
``serve_file`` (the bytes served at a repository path); ``desired_payload_after``; and
``requested`` (every repository path the device asked for).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer

import edge_sdk
from edge_sdk.release import Repository, create_deployment, publish_deployment
from edge_sdk.transport import (
    ChunkClient,
    FetchConfig,
    MqttConfig,
    MqttConnection,
    RepoResponder,
    ResponderConfig,
    Topics,
)
from edge_sdk.transport import _chunks as proto
from edge_sdk.trust import Deployment, UpdateClient, load_public_key, verify_deployment
from tests._broker import Mosquitto
from tests._repository_simulator import EvilRepository, RepositorySimulator, misbehave

FLEET = "lab"


def sized_model(path: Path, n: int, seed: int = 0) -> Path:
    """y = x + c with c float32[n]: an ONNX model of about 4*n bytes."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    c = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "add", [x], [y], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def signed_by(md: Metadata, signers: list) -> bytes:  # type: ignore[type-arg]
    """``md`` signed by ``signers`` only (its other signatures dropped), as served."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(JSONSerializer(compact=False))


def make_artifact(workdir: Path, name: str, version: str, n: int = 16,
                  seed: int = 0, sample: bool = True) -> edge_sdk.Artifact:
    """An artifact with a ~4*n byte model and (with ``sample``) a same-sized sample.npz."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = sized_model(workdir / f"{name}-{version}.onnx", n, seed)
    return edge_sdk.build_artifact(
        model, workdir / f"{name}-{version}", name=name, version=version,
        sample={"x": np.ones((1, n), np.float32)} if sample else None)


class Env:
    """Repository + broker + honest responder + device connection."""

    def __init__(self, tmp: Path, broker: Mosquitto, *, thresholds: dict[str, int] | None = None,
                 responder: bool = True) -> None:
        self.tmp = tmp
        self.broker = broker
        self.repo = Repository.init(tmp / "repo", tmp / "keys", thresholds=thresholds)
        self.config = MqttConfig(url=broker.url, fleet=FLEET)
        self.topics = Topics(FLEET)
        self.host = MqttConnection(self.config, name="host")
        self.host.connect()
        self.responders: list[RepoResponder] = []
        if responder:
            self.add_responder(RepoResponder(self.host, self.repo.path))
        self.device = MqttConnection(self.config, name="d1")
        self.device.connect()
        self.state = tmp / "device"
        self.key = load_public_key(self.repo.deployment_key_path)

    def add_responder(self, responder: RepoResponder) -> RepoResponder:
        responder.start()
        self.responders.append(responder)
        return responder

    def misbehave(self, mode: str) -> EvilResponder:
        """Serve through a responder that misbehaves as ``mode`` (see :class:`EvilResponder`)."""
        evil = EvilResponder(self.host, self.repo.path, mode)
        self.add_responder(evil)
        return evil

    def put(self, md: Metadata, signers: list) -> bytes:  # type: ignore[type-arg]
        """Sign ``md`` with ``signers`` and serve it in place of the repository's own."""
        data = signed_by(md, signers)
        role = md.signed.type
        if role != "timestamp":
            (self.repo.meta / f"{md.signed.version}.{role}.json").write_bytes(data)
        (self.repo.meta / f"{role}.json").write_bytes(data)
        return data

    def resign_online(self, targets: Metadata) -> None:  # type: ignore[type-arg]
        """Snapshot and timestamp re-signed over what is served (online keys compromised)."""
        self.repo.refresh()

    def served(self, path: str) -> bytes:
        return (self.repo.path / path).read_bytes()

    def serve_file(self, path: str, data: bytes) -> None:
        (self.repo.path / path).write_bytes(data)

    def requested(self) -> list[str]:
        """Every repository path a device asked a chunk of, in order."""
        return [p for r in self.responders if isinstance(r, RecordingResponder)
                for p in r.paths]

    def release(self, name: str = "m", version: str = "1.0", n: int = 16,
                seed: int = 0) -> edge_sdk.Artifact:
        art = make_artifact(self.tmp / "arts", name, version, n, seed)
        self.repo.add_artifact(art.path)
        return art

    def client(self, config: FetchConfig | None = None) -> UpdateClient:
        return UpdateClient(
            trusted_root=(self.repo.meta / "1.root.json").read_bytes(),
            metadata_dir=self.state / "tuf", partial_dir=self.state / "partial",
            connection=self.device, device_id="d1", fetch_config=config)

    def deploy(self, model: str = "m", version: str | None = None, **kw: object) -> Deployment:
        sd = create_deployment(self.repo, model=model, fleet=FLEET, version=version,
                               devices=["d1"], **kw)  # type: ignore[arg-type]
        publish_deployment(self.host, sd)
        return self.receive_desired()

    def receive_desired(self, last_counter: int | None = None) -> Deployment:
        return verify_deployment(self.desired_payload(), self.key, device_id="d1", fleet=FLEET,
                                 last_counter=last_counter)

    def desired_payload_after(self, fn: object, **kw: object) -> bytes:
        fn(**kw)  # type: ignore[operator]
        return self.desired_payload()

    def desired_payload(self) -> bytes:
        got: list[bytes] = []
        sub = self.device.subscribe(self.topics.desired("d1"), lambda t, p: got.append(p))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        sub.cancel()
        assert got, "no retained deployment arrived"
        return got[-1]

    def close(self) -> None:
        for r in self.responders:
            r.stop()
        self.device.close()
        self.host.close()


@contextlib.contextmanager
def env(tmp: Path, broker: Mosquitto, **kw: object) -> Iterator[Env]:
    e = Env(tmp, broker, **kw)  # type: ignore[arg-type]
    try:
        yield e
    finally:
        e.close()


class RecordingResponder(RepoResponder):
    """The real responder, noting the path of every chunk it is asked for."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.paths: list[str] = []

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        self.paths.append(req.path)
        return super().answer(req)


class EvilResponder(RecordingResponder):
    """A responder that misbehaves on target files: ``mode`` is tamper, endless, silent, or
    cut (answers only below byte ``cut_at``, like a link that dies mid-transfer); or
    endless-metadata (an endless timestamp.json)."""

    def __init__(self, connection: MqttConnection, repo: Path, mode: str,
                 cut_at: int = 0) -> None:
        super().__init__(connection, repo, config=ResponderConfig(shared=False))
        self.mode = mode
        self.cut_at = cut_at

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        return misbehave(self.mode, req, super().answer(req))

    def _on_request(self, topic: str, payload: bytes) -> None:
        if self.mode in ("silent", "cut"):
            req = proto.ChunkRequest.decode(payload)
            if req.path.startswith("targets/") and req.offset >= self.cut_at:
                return
        super()._on_request(topic, payload)


def fresh_chunk_client(e: Env, config: FetchConfig | None = None) -> ChunkClient:
    return ChunkClient(e.device, "d1", config=config)


FAST = FetchConfig(chunk_size=4096, window=4, chunk_timeout=0.5, stall_timeout=1.5)


class SimEnv:
    """A real repository on disk, served to the device from memory by a simulator."""

    def __init__(self, tmp: Path, *, thresholds: dict[str, int] | None = None) -> None:
        self.tmp = tmp
        self.repo = Repository.init(tmp / "repo", tmp / "keys", thresholds=thresholds)
        self.sim: RepositorySimulator = RepositorySimulator(self.repo)
        self.state = tmp / "device"
        self.key = load_public_key(self.repo.deployment_key_path)
        self.last: bytes | None = None

    def serve(self, sim: RepositorySimulator) -> RepositorySimulator:
        self.sim = sim
        return sim

    def release(self, name: str = "m", version: str = "1.0", n: int = 16,
                seed: int = 0) -> edge_sdk.Artifact:
        art = make_artifact(self.tmp / "arts", name, version, n, seed)
        self.repo.add_artifact(art.path)
        self.sim.publish()
        return art

    def deploy(self, model: str = "m", version: str | None = None, **kw: object) -> Deployment:
        sd = create_deployment(self.repo, model=model, fleet=FLEET, version=version,
                               devices=["d1"], **kw)  # type: ignore[arg-type]
        self.last = sd.document
        return self.receive_desired()

    def receive_desired(self, last_counter: int | None = None) -> Deployment:
        assert self.last is not None
        return verify_deployment(self.last, self.key, device_id="d1", fleet=FLEET,
                                 last_counter=last_counter)

    def client(self, config: FetchConfig | None = None) -> UpdateClient:
        self.sim.config = config or FetchConfig()
        return UpdateClient(
            trusted_root=(self.repo.meta / "1.root.json").read_bytes(),
            metadata_dir=self.state / "tuf", partial_dir=self.state / "partial",
            fetcher=self.sim)

    def put(self, md: Metadata, signers: list) -> bytes:  # type: ignore[type-arg]
        """Sign ``md`` with ``signers`` and serve it in place of the repository's own."""
        data = signed_by(md, signers)
        role = md.signed.type
        if role != "timestamp":
            self.sim.files[f"metadata/{md.signed.version}.{role}.json"] = data
        self.sim.files[f"metadata/{role}.json"] = data
        return data

    def put_snapshot_and_timestamp(self, targets: Metadata) -> None:  # type: ignore[type-arg]
        """What a compromise of the online keys allows: re-sign snapshot and timestamp
        over ``targets`` (already served with :meth:`put`)."""
        v = targets.signed.version
        snap = self.repo.load("snapshot")
        snap.signed.version += 1
        snap.signed.meta["targets.json"] = MetaFile.from_data(
            v, self.sim.files[f"metadata/{v}.targets.json"], ["sha256"])
        sdata = self.put(snap, self.repo.keys.signers("snapshot"))
        ts = self.repo.load("timestamp")
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, sdata, ["sha256"])
        self.put(ts, self.repo.keys.signers("timestamp"))

    def misbehave(self, mode: str) -> EvilRepository:
        """Serve from a repository that misbehaves as ``mode`` (see :func:`misbehave`)."""
        evil = EvilRepository(self.repo, mode)
        self.serve(evil)
        return evil

    def resign_online(self, targets: Metadata) -> None:  # type: ignore[type-arg]
        self.put_snapshot_and_timestamp(targets)

    def served(self, path: str) -> bytes:
        return self.sim.files[path]

    def serve_file(self, path: str, data: bytes) -> None:
        self.sim.files[path] = data

    def desired_payload(self) -> bytes:
        assert self.last is not None
        return self.last

    def desired_payload_after(self, fn: object, **kw: object) -> bytes:
        fn(**kw)  # type: ignore[operator]
        return self.desired_payload()

    def requested(self) -> list[str]:
        """Every repository path a transfer was started for, in order."""
        return list(self.sim.fetched)

    def close(self) -> None:
        pass


#: The two ways an attack reaches the device: a real Mosquitto and responder, or the
#: repository simulator behind the real fetcher interface.
TRANSPORTS = ("mqtt", "simulator")


@contextlib.contextmanager
def attack_env(transport: str, tmp: Path, broker: Callable[[], Mosquitto], *,
               misbehave: str | None = None,
               thresholds: dict[str, int] | None = None) -> Iterator[Env | SimEnv]:
    """An empty repository served to device ``d1`` over ``transport`` (``broker`` is called
    only for ``mqtt``), honestly or misbehaving as ``misbehave``."""
    e: Env | SimEnv
    if transport == "mqtt":
        e = Env(tmp, broker(), thresholds=thresholds, responder=False)
        if misbehave is None:
            e.add_responder(RecordingResponder(e.host, e.repo.path))
    else:
        assert transport == "simulator", transport
        e = SimEnv(tmp, thresholds=thresholds)
    try:
        if misbehave is not None:
            e.misbehave(misbehave)
        yield e
    finally:
        e.close()
