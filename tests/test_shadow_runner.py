"""The shadow runner in-process, with real onnxruntime models: what it samples, what it
drops, how it judges, and the limits of its config."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from device_agent import AgentConfig
from device_agent._metrics import Metrics
from device_agent._serving import Served
from device_agent._shadow import Shadowing, _Run, judge
from device_agent._state import ModelRecord, ShadowRun
from edge_sdk.errors import ConfigError
from edge_sdk.quality import Gate, ShadowFigures
from tests import _models

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def config(tmp: Path, **shadow: Any) -> AgentConfig:
    return AgentConfig.from_dict({"device_id": "d", "fleet": "f", "state_dir": str(tmp),
                                  "shadow": shadow})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    d = tmp_path_factory.mktemp("runner")
    art = edge_sdk.build_artifact(_models.offset_model(d / "m.onnx", 1.0), d / "adder",
                                  name="adder", version="1", sample={"x": X})
    record = ModelRecord("adder-1", "adder", "1", art.manifest.sha256)
    return Served(edge_sdk.load(art.path, threads=1), record)


def run(*, started: float | None = None, rate: float = 1.0, min_requests: int = 1000,
        time_limit_s: float = 3600.0, gate: str | None = None) -> ShadowRun:
    return ShadowRun(7, "k7", (ModelRecord("adder-1s", "adder", "1s", "0" * 64),), rate,
                     min_requests, time_limit_s,
                     None if gate is None else Gate.parse(gate).to_json(),
                     time.time() if started is None else started)


@pytest.fixture()
def shadowing(tmp_path: Path) -> Iterator[list[Shadowing]]:
    made: list[Shadowing] = []
    yield made
    for s in made:
        s.stop()


def ended(s: Shadowing) -> tuple[int, str, str, dict[str, Any]]:
    for _ in range(400):
        got = s.take_ended()
        if got is not None:
            return got
        time.sleep(0.025)
    raise AssertionError("the run never ended")


def test_sampling_takes_every_nth_request_by_count_not_at_random(served: Served) -> None:
    r = _Run(run(rate=0.25), [served], 4)
    assert [r.sampled() for _ in range(8)] == [False, False, False, True] * 2
    every = _Run(run(rate=1.0), [served], 4)
    assert all(every.sampled() for _ in range(10))


def test_input_over_max_input_bytes_is_dropped_not_queued(
        tmp_path: Path, served: Served, shadowing: list[Shadowing]) -> None:
    metrics = Metrics()
    s = Shadowing(config(tmp_path, max_input_bytes=8), metrics)
    shadowing.append(s)
    s.start(run(), [served])
    s.served(served, {"x": X}, {"y": X + 1}, 0.001)  # 16 bytes
    figures = s.figures()
    assert figures is not None and figures["dropped"] == 1 and figures["compared"] == 0
    assert metrics.registry.get_sample_value(
        "edge_agent_shadow_dropped_total", {"model": "adder", "why": "size"}) == 1


def test_request_to_another_model_or_without_a_run_is_left_alone(
        tmp_path: Path, served: Served, shadowing: list[Shadowing]) -> None:
    s = Shadowing(config(tmp_path))
    shadowing.append(s)
    s.served(served, {"x": X}, {"y": X + 1}, 0.001)  # no run: nothing happens
    other = Served(served.predictor, ModelRecord("rec-1", "rec", "1", "1" * 64))
    s.start(run(), [served])
    s.served(other, {"x": X}, {"y": X}, 0.001)
    assert s.figures() == ShadowFigures().to_json()


def test_run_past_its_deadline_ends_insufficient_without_traffic(
        tmp_path: Path, served: Served, shadowing: list[Shadowing]) -> None:
    s = Shadowing(config(tmp_path))
    shadowing.append(s)
    s.start(run(started=time.time() - 100, time_limit_s=10, min_requests=5), [served])
    counter, outcome, reason, figures = ended(s)
    assert (counter, outcome) == (7, "shadow_insufficient")
    assert reason == "0 of 5 requests compared within 10 s"
    assert figures["compared"] == 0


def test_compared_requests_end_the_run_with_the_gate_verdict(
        tmp_path: Path, served: Served, shadowing: list[Shadowing]) -> None:
    s = Shadowing(config(tmp_path))
    shadowing.append(s)
    kept: list[tuple[str, float]] = []
    s.on_disagree = lambda name, feed, outputs, score: kept.append((name, score))
    s.start(run(min_requests=3, gate="agreement>=0.99 over 3 requests"), [served])
    for i in range(3):
        # The "served" answers: right, right, wrong (the candidate computes x + 1).
        s.served(served, {"x": X}, {"y": X + (1.0 if i < 2 else 5.0)}, 0.001)
        while s.figures()["compared"] < i + 1:  # type: ignore[index]
            time.sleep(0.01)
    _, outcome, reason, figures = ended(s)
    assert outcome == "shadow_failed" and "agreement" in reason
    assert figures["compared"] == 3 and figures["agreed"] == 2
    # The one disagreement goes to field samples, with its score.
    assert [name for name, _ in kept] == ["adder"] and kept[0][1] < 1.0


@pytest.mark.parametrize(("errors", "compared", "outcome"), [
    (0, 5, "shadow_passed"), (1, 4, "shadow_failed"), (0, 2, "shadow_insufficient")])
def test_without_a_gate_a_shadow_error_fails_the_run(errors: int, compared: int,
                                                     outcome: str) -> None:
    figures = ShadowFigures(compared=compared, agreed=compared, errors=errors)
    got, _ = judge(run(min_requests=5), figures, "RuntimeError: boom", deadline=True)
    assert got == outcome


@pytest.mark.parametrize(("shadow", "key"), [
    ({"queue": 0}, "shadow.queue"), ({"cpu_share": 0.0}, "shadow.cpu_share"),
    ({"cpu_share": 1.5}, "shadow.cpu_share"), ({"max_rss_bytes": -1}, "shadow.max_rss_bytes"),
    ({"max_input_bytes": 0}, "shadow.max_input_bytes"), ({"queu": 3}, "shadow.queu")])
def test_config_refuses_bad_shadow_limits_naming_the_key(tmp_path: Path,
                                                         shadow: dict[str, Any],
                                                         key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(tmp_path, **shadow)


class _Hanging:
    """A predictor (the interface :class:`Served` runs) whose model never returns until
    released: a candidate stuck in its runtime."""

    format = "onnx"

    def __init__(self, manifest: Any) -> None:
        import threading

        self.manifest = manifest
        self.release = threading.Event()
        self.entered = threading.Event()

    def predict(self, inputs: Any) -> dict[str, np.ndarray]:
        self.entered.set()
        self.release.wait(30)
        return {"y": np.zeros((1, 4), np.float32)}


def test_a_candidate_that_hangs_is_ended_at_its_deadline_from_outside_the_worker(
        tmp_path: Path, served: Served, shadowing: list[Shadowing]) -> None:
    hanging = _Hanging(served.predictor.manifest)
    candidate = Served(hanging, ModelRecord("adder-1s", "adder", "1s", "0" * 64))  # type: ignore[arg-type]
    s = Shadowing(config(tmp_path))
    shadowing.append(s)
    s.start(run(started=time.time() - 3599.0), [candidate])  # its deadline: a second away
    try:
        s.served(served, {"x": X}, {"y": X + 1}, 0.001)
        assert hanging.entered.wait(10), "the worker never ran the candidate"
        assert not s.end_overdue()  # not past its deadline (and grace) yet
        for _ in range(200):
            if s.end_overdue():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("a run stuck past its deadline was never ended")
        counter, outcome, reason, _ = ended(s)
        assert (counter, outcome) == (7, "shadow_insufficient"), reason
        assert not s.end_overdue()  # one verdict
    finally:
        hanging.release.set()
