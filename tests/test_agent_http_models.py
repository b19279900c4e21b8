"""Several models behind one endpoint: every served model answers under its name, the
repository index and readiness cover each model the device should serve, metrics are
per model, and a swap of one model never fails a request to another. Real agent, real
HTTP; the second model is put in and out of the agent's slots in-process."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest

import edge_sdk
from device_agent import Agent
from device_agent._config import HttpConfig
from device_agent._metrics import Metrics
from device_agent._protocol import InferenceApp
from device_agent._serving import ModelSlots, Served, Wanted
from device_agent._state import ModelRecord
from tests import _models
from tests._http_agent import call, metric, serving

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": X.reshape(-1).tolist()}]}).encode()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent whose installed state names ``bee`` 1 (y = x + 100)."""
    d = tmp_path_factory.mktemp("models")
    with serving(d, _models.offset_model(d / "bee.onnx", 100.0), "bee", {"x": X}) as a:
        yield a


@pytest.fixture(scope="module")
def ants(tmp_path_factory: pytest.TempPathFactory) -> list[edge_sdk.Artifact]:
    """``ant`` 1 and 2 (y = x + 1, y = x + 2)."""
    d = tmp_path_factory.mktemp("ants")
    return [edge_sdk.build_artifact(_models.offset_model(d / f"ant{v}.onnx", float(v)),
                                    d / f"ant{v}", name="ant", version=str(v),
                                    sample={"x": X}) for v in (1, 2)]


def served(art: edge_sdk.Artifact) -> Served:
    return Served(edge_sdk.load(art.path), ModelRecord.for_artifact(art, None))


@pytest.fixture()
def ant(agent: Agent, ants: list[edge_sdk.Artifact]) -> Iterator[Served]:
    """``ant`` 1 serving next to ``bee`` for one test."""
    a = served(ants[0])
    agent.slots.swap({"ant": a})
    yield a
    agent.slots.swap({"ant": None})


def port(agent: Agent) -> int:
    assert agent.http is not None
    return agent.http.port


def infer(agent: Agent, name: str) -> tuple[int, dict[str, object]]:
    status, res, _ = call(port(agent), "POST", f"/v2/models/{name}/infer", BODY)
    return status, res


def test_each_served_model_answers_under_its_own_name(agent: Agent, ant: Served) -> None:
    for name, offset in (("ant", 1.0), ("bee", 100.0)):
        status, res = infer(agent, name)
        assert status == 200, res
        assert res["model_name"] == name and res["model_version"] == "1"
        out = res["outputs"]
        assert isinstance(out, list)
        np.testing.assert_allclose(out[0]["data"], (X + offset).reshape(-1))
        assert call(port(agent), "GET", f"/v2/models/{name}/ready")[0] == 200
        status, meta, _ = call(port(agent), "GET", f"/v2/models/{name}/versions/1")
        assert status == 200 and meta["name"] == name and meta["versions"] == ["1"]
        status, cfg, _ = call(port(agent), "GET", f"/v2/models/{name}/config")
        assert status == 200 and cfg["name"] == name
        status, stats, _ = call(port(agent), "GET", f"/v2/models/{name}/stats")
        assert status == 200 and [s["name"] for s in stats["model_stats"]] == [name]
        assert stats["model_stats"][0]["inference_count"] >= 1
    status, every, _ = call(port(agent), "GET", "/v2/models/stats")
    assert status == 200 and [s["name"] for s in every["model_stats"]] == ["ant", "bee"]
    assert call(port(agent), "GET", "/v2/health/ready")[0] == 200


def test_repository_index_lists_every_model_with_its_version_and_state(
        agent: Agent, ant: Served, ants: list[edge_sdk.Artifact]) -> None:
    status, index, _ = call(port(agent), "POST", "/v2/repository/index")
    assert status == 200
    assert index == [{"name": "ant", "version": "1", "state": "READY"},
                     {"name": "bee", "version": "1", "state": "READY"}]
    agent.slots.swap({"ant": served(ants[1])})
    assert call(port(agent), "POST", "/v2/repository/index")[1][0] == {
        "name": "ant", "version": "2", "state": "READY"}


def test_unknown_model_is_404_naming_the_served_models(agent: Agent, ant: Served) -> None:
    status, res = infer(agent, "nope")
    assert status == 404 and res["error"] == "unknown model 'nope'; this agent serves " \
                                             "'ant', 'bee'"
    status, res, _ = call(port(agent), "GET", "/v2/models/ant/versions/7")
    assert status == 404 and "version '7' is not served" in res["error"]


def test_installed_model_that_does_not_serve_is_unavailable_and_device_not_ready(
        agent: Agent, ant: Served) -> None:
    bee = agent.slots.get("bee")
    assert bee is not None
    agent.slots.swap({"bee": None})  # the state still names bee 1
    try:
        status, index, _ = call(port(agent), "POST", "/v2/repository/index")
        assert status == 200 and index == [
            {"name": "ant", "version": "1", "state": "READY"},
            {"name": "bee", "version": "1", "state": "UNAVAILABLE",
             "reason": "version 1 is installed but not loaded"}]
        status, res, _ = call(port(agent), "GET", "/v2/health/ready")
        assert status == 503 and "model 'bee' version 1" in res["error"]
        status, res = infer(agent, "bee")
        assert status == 503 and res["error"] == ("model 'bee' version 1 is not available: "
                                                  "version 1 is installed but not loaded")
        assert call(port(agent), "GET", "/v2/models/bee/ready")[0] == 503
        assert infer(agent, "ant")[0] == 200
        assert metric(agent, "edge_agent_ready") == 0
        assert metric(agent, "edge_agent_model_ready", model="bee") == 0
        assert metric(agent, "edge_agent_model_ready", model="ant") == 1
    finally:
        agent.slots.swap({"bee": bee})
    assert call(port(agent), "GET", "/v2/health/ready")[0] == 200
    assert metric(agent, "edge_agent_ready") == 1


def test_metrics_are_per_model_and_a_removed_model_leaves_none(agent: Agent,
                                                               ants: list[edge_sdk.Artifact]
                                                               ) -> None:
    agent.slots.swap({"ant": served(ants[0])})
    for _ in range(3):
        assert infer(agent, "ant")[0] == 200
    before = metric(agent, "edge_agent_requests_total", model="bee", outcome="ok")
    assert infer(agent, "bee")[0] == 200
    assert metric(agent, "edge_agent_requests_total", model="ant", outcome="ok") == 3
    assert metric(agent, "edge_agent_requests_total", model="bee", outcome="ok") == before + 1
    assert metric(agent, "edge_agent_request_latency_seconds_count", model="ant") == 3
    _, text, _ = call(port(agent), "GET", "/metrics")
    info = sorted(line.split("{", 1)[1].split(",", 1)[0] for line in text.decode().splitlines()
                  if line.startswith("edge_agent_model_info{"))
    assert info == ['model="ant"', 'model="bee"']
    agent.slots.swap({"ant": None})
    _, text, _ = call(port(agent), "GET", "/metrics")
    assert 'model="ant"' not in text.decode()
    assert metric(agent, "edge_agent_requests_total", model="bee", outcome="ok") == before + 1


def test_swapping_one_model_never_fails_a_request_to_another(
        agent: Agent, ants: list[edge_sdk.Artifact]) -> None:
    versions = [served(a) for a in ants]
    stop = threading.Event()
    answers: list[str] = []
    failures: list[str] = []

    def hammer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port(agent), timeout=30)
        try:
            while not stop.is_set():
                try:
                    conn.request("POST", "/v2/models/bee/infer", body=BODY)
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException) as err:
                    failures.append(repr(err))
                    conn.close()
                    continue
                if resp.status != 200:
                    failures.append(f"{resp.status} {raw[:200]!r}")
                else:
                    answers.append(json.loads(raw)["model_name"])
        finally:
            conn.close()

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        swaps = 0
        while swaps < 300 or len(answers) < 200:
            # A new version, then none, then the other: every kind of change to ant.
            agent.slots.swap({"ant": versions[swaps % 2] if swaps % 3 else None})
            swaps += 1
            stop.wait(0.001)
            assert swaps < 100_000, "bee answered no request"
    finally:
        stop.set()
        thread.join()
        agent.slots.swap({"ant": None})
    assert failures == []
    assert set(answers) == {"bee"}


def test_index_says_why_the_agent_cannot_serve_a_model(ants: list[edge_sdk.Artifact]) -> None:
    slots = ModelSlots()
    slots.swap({"ant": served(ants[0])})
    reason = "smoke test failed: output 'y' has 4 non-finite value(s)"
    app = InferenceApp(slots, Metrics(), HttpConfig(),
                       lambda: [Wanted("ant", "1"), Wanted("cat", "3", reason)])
    status, _, body, _ = app.handle("POST", "/v2/repository/index", {}, b"")
    assert status == 200 and json.loads(body) == [
        {"name": "ant", "version": "1", "state": "READY"},
        {"name": "cat", "version": "3", "state": "UNAVAILABLE", "reason": reason}]
    status, _, body, _ = app.handle("GET", "/v2/health/ready", {}, b"")
    assert status == 503 and json.loads(body)["error"] == f"not serving model 'cat' " \
                                                          f"version 3: {reason}"
    status, _, body, _ = app.handle("GET", "/v2/models/cat", {}, b"")
    assert status == 503 and reason in json.loads(body)["error"]
