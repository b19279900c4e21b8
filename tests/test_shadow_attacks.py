"""Attacks on the shadow runner: what a sampled request may hold in the queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from device_agent import AgentConfig
from device_agent._metrics import Metrics
from device_agent._serving import Served
from device_agent._shadow import Shadowing
from device_agent._state import ModelRecord, ShadowRun
from tests import _models

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    d = tmp_path_factory.mktemp("shadow-attacks")
    art = edge_sdk.build_artifact(_models.offset_model(d / "m.onnx", 1.0), d / "adder",
                                  name="adder", version="1", sample={"x": X})
    return Served(edge_sdk.load(art.path, threads=1),
                  ModelRecord("adder-1", "adder", "1", art.manifest.sha256))


@pytest.fixture()
def shadowing(tmp_path: Path) -> Iterator[Shadowing]:
    cfg = AgentConfig.from_dict({"device_id": "d", "fleet": "f", "state_dir": str(tmp_path),
                                 "shadow": {"max_input_bytes": 1024}})
    s = Shadowing(cfg, Metrics())
    yield s
    s.stop()


def test_huge_served_outputs_of_a_small_request_are_dropped_not_queued(
        served: Served, shadowing: Shadowing) -> None:
    shadowing.start(ShadowRun(7, "k7", (ModelRecord("adder-1s", "adder", "1s", "0" * 64),),
                              1.0, 1000, 3600.0, None, time.time()), [served])
    big = {"y": np.zeros((1, 21, 128, 128), np.float32)}  # a segmentation map: 1.3 MB
    shadowing.served(served, {"x": X}, big, 0.001)  # a 16-byte input
    figures = shadowing.figures()
    assert figures is not None and figures["dropped"] == 1
