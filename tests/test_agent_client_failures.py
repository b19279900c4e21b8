"""A request the model cannot run is the client's unless the new version introduced the
failure (issue 24, item 3): real agent subprocesses, a real Mosquitto, the responder and a
signed repository, ``deploy --wait`` as an operator runs it, while a client keeps sending.

The models declare ``x: float32 [batch, 3, height, width]`` and only run sizes that are
multiples of their stride (32, or 64 for version 3): a 1x3x80x48 request passes the
signature check and fails inside onnxruntime on every version."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from device_agent import Agent
from device_agent._config import HealthConfig
from device_agent._serving import Served, Trial, Verdict
from device_agent._state import ModelRecord
from tests import _models
from tests._agent_local import LocalSource, config, deployment
from tests._broker import Mosquitto
from tests._e2e import AgentProc, Fleet, cli_args, new_agent
from tests._http_agent import call, wait_for

MODEL = "detector"
SAMPLE = np.linspace(0, 1, 3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)
#: Version → (offset, stride): 1 and 2 both fail on 80x48; 3 also fails on 32x32,
#: which 1 runs.
VERSIONS = {"1": (1.0, 32), "2": (2.0, 32), "3": (3.0, 64)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("client-failures")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        f.arts.mkdir()
        for version, (offset, stride) in VERSIONS.items():
            src = _models.stride_model(f.arts / f"{MODEL}-{version}.onnx", offset, stride)
            art = edge_sdk.build_artifact(src, f.arts / f"{MODEL}-{version}", name=MODEL,
                                          version=version, sample={"x": SAMPLE})
            f.repo.add_artifact(art.path)
        yield f
        f.close()


def infer(port: int, shape: tuple[int, ...], datatype: str = "FP32") -> tuple[int, Any]:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype,
                                   "data": [0.5] * int(np.prod(shape))}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def served_version(agent: AgentProc) -> str | None:
    status, meta = agent.get(f"/v2/models/{MODEL}")
    return meta["versions"][0] if status == 200 else None


def deploy(fleet: Fleet, device: str, version: str) -> int:
    from edge_sdk.cli import main

    return main(cli_args(fleet, "deploy", "--model", MODEL, "--version", version, "--device",
                     device, "--wait", "--timeout", "90"))


class Client(threading.Thread):
    """Sends one request shape every 0.2 s (as the issue's client did) until stopped, at
    most ``limit`` times; keeps every answer."""

    def __init__(self, port: int, shape: tuple[int, ...], limit: int = 1500) -> None:
        super().__init__(daemon=True)
        self.port, self.shape, self.limit = port, shape, limit
        self.answers: list[tuple[int, str]] = []
        self.invalid: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        for i in range(self.limit):
            status, doc = infer(self.port, self.shape)
            self.answers.append((status, doc.get("error", "")))
            if i % 5 == 0:
                # A request that does not fit the signature at all: 400, never counted.
                self.invalid.append(infer(self.port, self.shape[1:])[0])
            if self.halt.wait(0.2):
                return

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(60)


def test_request_both_versions_fail_on_is_a_client_error_and_v2_commits(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc],
        capsys: pytest.CaptureFixture[str]) -> None:
    agent = new_agent(fleet, tmp_path, agents, "cam-a", window_s=3.0).start()
    assert deploy(fleet, "cam-a", "1") == 0
    # Outside a health window there is nothing to compare with: the input's failure.
    status, doc = infer(agent.port, (1, 3, 80, 48))
    assert status == 422, doc
    assert doc["error"].startswith("the model cannot run this input: ")
    assert "multiple of block_size" in doc["error"] and "\n" not in doc["error"]
    capsys.readouterr()

    with Client(agent.port, (1, 3, 80, 48)) as client:
        code = deploy(fleet, "cam-a", "2")
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "committed on all 1 device(s)" in out
        # The client's requests met version 2 inside its health window, and version 1
        # showed the same failure.
        assert any("version 1 fails on it too" in e for _, e in client.answers), \
            client.answers
    assert {s for s, _ in client.answers} == {422}, client.answers[:5]
    assert set(client.invalid) == {400}
    assert served_version(agent) == "2"
    status, doc = infer(agent.port, (1, 3, 64, 64))
    assert status == 200 and doc["outputs"][0]["data"][0] == 2.5
    metrics = agent_metrics(agent)
    assert metrics.get('edge_agent_trial_failures_total{verdict="client"}', 0) >= 1
    assert 'edge_agent_trial_failures_total{verdict="model"}' not in metrics
    assert "rolled_back" not in fleet.kinds("cam-a")


def test_request_only_the_new_version_fails_on_rolls_it_back(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc],
        capsys: pytest.CaptureFixture[str]) -> None:
    agent = new_agent(fleet, tmp_path, agents, "cam-b", window_s=30.0).start()
    assert deploy(fleet, "cam-b", "1") == 0
    assert infer(agent.port, (1, 3, 32, 32))[0] == 200
    capsys.readouterr()

    with Client(agent.port, (1, 3, 32, 32)) as client:
        code = deploy(fleet, "cam-b", "3")
        out, err = capsys.readouterr()
    assert code == 3, out + err
    assert "cam-b rolled_back" in err
    fleet.wait_event("cam-b", "rolled_back", "3")  # the CLI may have read it first
    reason = fleet.last("cam-b", "rolled_back")["reason"]
    assert "inferences failed in the health window" in reason and "block_size" in reason
    failed = [e for s, e in client.answers if s == 500]
    assert failed and "version 1 runs this input" in failed[0], client.answers
    assert failed[0].startswith(f"model '{MODEL}' version 3 failed: ")
    assert served_version(agent) == "1"
    assert infer(agent.port, (1, 3, 32, 32))[0] == 200


def agent_metrics(agent: AgentProc) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


# -- the bounds of the re-runs, on real onnxruntime sessions in this process --------------

class Gated:
    """A real predictor that runs only while ``open`` is set (the interface
    :class:`~device_agent._serving.Served` uses), to hold the previous version busy."""

    def __init__(self, path: Path) -> None:
        self.inner = edge_sdk.load(path)
        self.format, self.manifest = self.inner.format, self.inner.manifest
        self.inputs, self.outputs = self.inner.inputs, self.inner.outputs
        self.open = threading.Event()
        self.runs = 0
        self._lock = threading.Lock()

    def predict(self, inputs: Any) -> dict[str, np.ndarray]:
        with self._lock:
            self.runs += 1
        assert self.open.wait(60)
        return self.inner.predict(inputs)


def on_trial(tmp: Path, **health: float) -> tuple[Served, Gated, list[float]]:
    """Version 2 on trial against version 1 (gated), with a clock the test moves."""
    def served(pred: Any, version: str) -> Served:
        return Served(pred, ModelRecord(f"{MODEL}-{version}", MODEL, version, "0" * 64))

    old = Gated(_models.stride_model(tmp / "v1.onnx", 1.0))
    new = served(edge_sdk.load(_models.stride_model(tmp / "v2.onnx", 2.0)), "2")
    now = [0.0]
    new.trial = Trial(served(old, "1"), HealthConfig(**health), clock=lambda: now[0])
    return new, old, now


def fail(served: Served, width: int) -> Verdict:
    """A request of height 80 (no version runs it), a distinct input per ``width``."""
    x = {"x": np.zeros((1, 3, 80, width), np.float32)}
    with pytest.raises(Exception, match="block_size") as info:
        served.predict(x, count_failure=False)
    return served.blame(x, info.value)


def test_failed_requests_past_recheck_per_s_are_not_rerun_and_not_counted(
        tmp_path: Path) -> None:
    new, old, now = on_trial(tmp_path, recheck_per_s=2.0, recheck_timeout_s=60.0)
    old.open.set()
    assert [fail(new, w).kind for w in (48, 40)] == ["client", "client"]
    over = fail(new, 56)
    assert over.kind == "unjudged" and "health.recheck_per_s (2)" in over.note
    # A request sent again gets the verdict already found, without a re-run.
    assert fail(new, 48) == Verdict("client", "version 1 fails on it too")
    assert old.runs == 2
    now[0] += 0.5  # one more re-run allowed
    assert fail(new, 56).kind == "client" and old.runs == 3
    assert (new.health.errors, new.health.excused) == (0, 5)
    assert new.trial is not None
    new.trial.close()


def test_reruns_go_one_at_a_time_through_a_bounded_queue_and_waits_are_bounded(
        tmp_path: Path) -> None:
    new, old, _ = on_trial(tmp_path, recheck_per_s=100.0, recheck_queue=2,
                           recheck_timeout_s=0.05)
    # Version 1 is held busy: one re-run runs, two wait, and each request stops waiting
    # after recheck_timeout_s; the next one finds the queue full and is not re-run.
    verdicts = [fail(new, w) for w in (48, 40, 56, 72)]
    assert [v.kind for v in verdicts] == ["unjudged"] * 4
    assert all("health.recheck_timeout_s (0.05 s)" in v.note for v in verdicts[:3])
    assert "health.recheck_queue (2) is full" in verdicts[3].note
    assert old.runs == 1
    assert (new.health.errors, new.health.excused) == (0, 4)
    old.open.set()
    # The re-runs that waited still finish; what they found is kept for the next request.
    wait_for(lambda: fail(new, 56).kind == "client", "the queued re-runs")
    runs = old.runs
    assert fail(new, 56).kind == "client" and old.runs == runs
    assert new.trial is not None
    new.trial.close()
    assert fail(new, 88) == Verdict("unjudged", "not compared: the health window is over")


def test_a_trial_resumed_after_a_restart_loads_the_previous_version_to_compare(
        tmp_path: Path) -> None:
    arts = {}
    for v in ("1", "3"):
        offset, stride = VERSIONS[v]
        src = _models.stride_model(tmp_path / f"{v}.onnx", offset, stride)
        arts[v] = edge_sdk.build_artifact(src, tmp_path / v, name=MODEL, version=v,
                                          sample={"x": SAMPLE})
    state = tmp_path / "state"
    long = {"window_s": 120.0, "probe_interval_s": 0.05}

    def start(**health: Any) -> Agent:
        a = Agent(config(state, health=health), source=LocalSource(), connect=False)
        a.start()
        return a

    a = start()
    a.submit(deployment(arts["1"], 1))
    wait_for(lambda: (cur := a.installer.state.current) is not None and cur.version == "1"
             and a.installer.state.phase == "committed", "version 1 to commit")
    a.stop()
    a = start(**long)
    a.submit(deployment(arts["3"], 2))
    wait_for(lambda: a.slots.current is not None and a.slots.current.version == "3",
             "version 3 to be swapped in")
    a.stop()  # inside the window: the next start resumes it, with version 1 on disk only
    a = start(**long)
    try:
        def answer(shape: tuple[int, ...]) -> tuple[int, str]:
            assert a.http is not None
            status, doc, _ = call(a.http.port, "POST", f"/v2/models/{MODEL}/infer",
                                  json.dumps({"inputs": [{
                                      "name": "x", "shape": list(shape), "datatype": "FP32",
                                      "data": [0.5] * int(np.prod(shape))}]}).encode())
            return status, doc["error"]

        wait_for(lambda: answer((1, 3, 80, 48)) == (422, (
            "the model cannot run this input: InvalidArgument: [ONNXRuntimeError] : 2 : "
            "INVALID_ARGUMENT : Non-zero status code returned while running SpaceToDepth "
            "node. Name:'' Status Message: SpaceToDepth requires input height to be a "
            "multiple of block_size (version 1 fails on it too)")), "the resumed trial")
        status, error = answer((1, 3, 32, 32))
        assert status == 500 and "(version 1 runs this input; counted against version 3" \
            in error
        wait_for(lambda: a.slots.current is not None and a.slots.current.version == "1",
                 "the rollback to version 1")
    finally:
        a.stop()
