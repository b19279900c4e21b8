"""A release repository, a broker, a responder and device clients for trust/transfer tests.

Misbehaving responders are real MQTT clients on the test broker (subclasses of
the real responder), never mocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
from tests._repository_simulator import misbehave

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


class EvilResponder(RepoResponder):
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
