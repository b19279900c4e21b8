"""Input drift rig: an agent serving a model whose manifest carries the evaluation set's
input statistics, and requests like the evaluation set or shifted from it (used by the
agent's and the fleet's drift tests and by bench/agent.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import Agent
from edge_sdk import Artifact, build_artifact
from edge_sdk.quality import reference_stats
from tests import _models
from tests._agent_local import LocalSource, config, deployment
from tests._http_agent import call, wait_for

FEATURES = 4
#: Per-feature scale of the evaluation set (features differ, as real ones do).
SCALES = np.array([1.0, 2.0, 0.5, 10.0], dtype=np.float32)


def evaluation_like(n: int, seed: int, shift: float = 0.0) -> list[dict[str, np.ndarray]]:
    """``n`` feeds ``x`` [1, 4] drawn as the evaluation set was; ``shift`` moves every
    feature by that many of its standard deviations."""
    rng = np.random.default_rng(seed)
    return [{"x": ((rng.normal(size=(1, FEATURES)) + shift) * SCALES).astype(np.float32)}
            for _ in range(n)]


def drift_artifact(tmp: Path, name: str = "adder", version: str = "1",
                   samples: int = 400) -> Artifact:
    """The add model (x float32 [batch, 4]) with its evaluation set's ``input_stats``."""
    model = _models.add_model(tmp / f"{name}-{version}.onnx")
    stats = json.loads(json.dumps(reference_stats(evaluation_like(samples, seed=1))))
    return build_artifact(model, tmp / f"{name}-{version}", name=name, version=version,
                          sample={"x": np.zeros((1, FEATURES), np.float32)},
                          extra={"input_stats": stats})


@contextmanager
def drift_agent(tmp: Path, art: Artifact, *, connect: bool = False,
                **sections: Any) -> Iterator[Agent]:
    """A started agent serving ``art`` (installed from a local source; ``connect``: its
    reports go to the broker of ``sections["broker"]``); ``sections`` override the
    config."""
    sections.setdefault("drift", {"max_per_s": 10_000, "queue": 1024})
    a = Agent(config(tmp / "state", **sections), source=LocalSource(), connect=connect)
    a.start()
    try:
        a.submit(deployment(art, 1))
        wait_for(lambda: a.slots.current is not None, "the model to be swapped in")
        yield a
    finally:
        a.stop()


def infer(agent: Agent, feed: dict[str, np.ndarray], model: str = "adder") -> None:
    assert agent.http is not None
    x = feed["x"]
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    status, got, _ = call(agent.http.port, "POST", f"/v2/models/{model}/infer", body,
                          {"content-type": "application/json"})
    assert status == 200, got


def analysed(agent: Agent, model: str = "adder") -> int:
    assert agent.drift is not None
    return int(agent.drift.counts().get(model, {}).get("analysed", 0))
