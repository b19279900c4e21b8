"""Field samples in tests: a classifier whose top score the input sets, its artifact with
a drift reference, signed sample requests, and a listener on a device's sample status."""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

import edge_sdk
from edge_sdk.samples import SampleRequest, SampleStatus, sign_sample_request
from edge_sdk.transport import MqttConnection, Topics
from tests import _models

N = 4
#: The reference the artifact carries (``extra["input_stats"]``): each of the 4 features
#: has mean 0 and std 1 over the evaluation set.
INPUT_STATS = {"x": {"axis": 1, "channels": [
    {"mean": 0.0, "std": 1.0, "min": -3.0, "max": 3.0, "nan_share": 0.0, "count": 100}
    for _ in range(N)]}}


def softmax_model(path: Path) -> Path:
    """probs = softmax(x) over x float32 [batch, 4]: [s, 0, 0, 0] has top score
    e^s / (e^s + 3), 0.25 at s = 0."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", N])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["probs"], axis=1)],
                              "softmax", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _models.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def classifier(tmp: Path, version: str = "1", name: str = "cls") -> edge_sdk.Artifact:
    src = softmax_model(tmp / f"{name}-{version}.onnx")
    return edge_sdk.build_artifact(
        src, tmp / f"{name}-{version}", name=name, version=version, task="classify",
        sample={"x": np.zeros((1, N), np.float32)}, extra={"input_stats": INPUT_STATS})


def row(s: float, tag: float = 0.0) -> np.ndarray:
    """One input row: top score set by ``s``, told apart by ``tag`` (a tiny value in a
    feature that barely moves the scores)."""
    return np.array([[s, tag, 0.0, 0.0]], np.float32)


def request(device: str, *, fleet: str = "lab", rule: str = "low_confidence",
            count: int = 3, threshold: float = 0.5, max_bytes: int = 1 << 20,
            outputs: bool = False, ttl: timedelta = timedelta(minutes=10),
            now: datetime | None = None, model: str = "cls", **kw: Any) -> SampleRequest:
    t = (now or datetime.now(UTC)).replace(microsecond=0)
    base = SampleRequest(fleet=fleet, device=device, id=secrets.token_hex(16), issued=t,
                         expires=t + ttl, model=model, rule=rule, count=count,
                         max_bytes=max_bytes, outputs=outputs, threshold=threshold)
    return replace(base, **kw)


def signed(req: SampleRequest, signer: Any) -> bytes:
    return sign_sample_request(req, [signer])


class StatusListener:
    """Every status ``device`` publishes on ``samples/res``, by request id."""

    def __init__(self, conn: MqttConnection, topics: Topics, device: str) -> None:
        self.got: list[SampleStatus] = []
        self._lock = threading.Lock()
        self.sub = conn.subscribe(topics.samples_status(device), self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            st = SampleStatus.from_bytes(payload)
        except Exception:
            return
        with self._lock:
            self.got.append(st)

    def of(self, rid: str) -> list[SampleStatus]:
        with self._lock:
            return [s for s in self.got if s.id == rid]

    def last(self, rid: str) -> SampleStatus | None:
        mine = self.of(rid)
        return mine[-1] if mine else None

    def final(self, rid: str) -> SampleStatus | None:
        """The status once it is no longer collecting (None until then)."""
        st = self.last(rid)
        return st if st is not None and st.state != "collecting" else None


def describe(statuses: list[SampleStatus]) -> str:
    return json.dumps([s.to_json() for s in statuses])[-2000:]
