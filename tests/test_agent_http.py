"""The agent's KServe v2 endpoint: real agent, real HTTP, tritonclient unchanged."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from edge_sdk import build_artifact
from tests import _models
from tests._agent_local import LocalSource, config, deployment


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("agent-http")
    model = _models.multi_io_model(d / "multi.onnx")
    sample = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.int64)}
    art = build_artifact(model, d / "multi", name="multi", version="1", sample=sample)
    a = Agent(config(d / "state", http={"port": 0, "max_body_bytes": 4096}),
              source=LocalSource(), connect=False)
    a.start()
    a.submit(deployment(art, 1))
    deadline = time.monotonic() + 30
    while a.installer.state.phase != "committed" or a.slots.current is None:
        assert time.monotonic() < deadline, "install did not finish"
        time.sleep(0.02)
    yield a
    a.stop()


def request(agent: Agent, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | str]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.http.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json") and raw:
        return resp.status, json.loads(raw)
    return resp.status, raw.decode("latin-1")


def infer(agent: Agent, body: Any, name: str = "multi") -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(agent, "POST", f"/v2/models/{name}/infer", raw,
                   {"Content-Type": "application/json"})


GOOD = {"inputs": [
    {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
    {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": [[10], [20]]},
]}


def test_health_and_metadata_follow_the_open_inference_protocol(agent) -> None:
    assert request(agent, "GET", "/v2/health/live")[0] == 200
    assert request(agent, "GET", "/v2/health/ready")[0] == 200
    assert request(agent, "GET", "/v2/models/multi/ready")[0] == 200
    status, meta = request(agent, "GET", "/v2/models/multi")
    assert status == 200
    assert meta["name"] == "multi" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "b", "datatype": "INT64", "shape": [-1, 1]}]
    status, server = request(agent, "GET", "/v2")
    assert status == 200 and "binary_tensor_data" in server["extensions"]


def test_json_infer_returns_outputs_with_model_name_and_version(agent) -> None:
    status, res = infer(agent, {**GOOD, "id": "req-7"})
    assert status == 200, res
    assert res["model_name"] == "multi" and res["model_version"] == "1" and res["id"] == "req-7"
    outs = {o["name"]: o for o in res["outputs"]}
    assert outs["sum"]["datatype"] == "FP32" and outs["sum"]["shape"] == [2, 3]
    assert outs["sum"]["data"] == [11, 12, 13, 24, 25, 26]
    assert outs["double_b"]["data"] == [20, 40] and outs["double_b"]["datatype"] == "INT64"


def test_versioned_route_and_requested_outputs(agent) -> None:
    body = {**GOOD, "outputs": [{"name": "double_b"}]}
    status, res = request(agent, "POST", "/v2/models/multi/versions/1/infer",
                          json.dumps(body).encode())
    assert status == 200 and [o["name"] for o in res["outputs"]] == ["double_b"]


def test_tritonclient_http_infers_against_the_agent(agent) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.http.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("multi")
    meta = client.get_model_metadata("multi")
    assert meta["platform"] == "onnxruntime_onnx"
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1], [2]], dtype=np.int64)
    for binary in (True, False):
        ia = httpclient.InferInput("a", [2, 3], "FP32")
        ia.set_data_from_numpy(a, binary_data=binary)
        ib = httpclient.InferInput("b", [2, 1], "INT64")
        ib.set_data_from_numpy(b, binary_data=binary)
        outs = [httpclient.InferRequestedOutput("sum", binary_data=binary),
                httpclient.InferRequestedOutput("double_b", binary_data=not binary)]
        res = client.infer("multi", [ia, ib], outputs=outs)
        np.testing.assert_array_equal(res.as_numpy("sum"), a + b.astype(np.float32))
        np.testing.assert_array_equal(res.as_numpy("double_b"), b * 2)
    # no outputs named: tritonclient asks for every output in binary
    res = client.infer("multi", [ia, ib])
    np.testing.assert_array_equal(res.as_numpy("double_b"), b * 2)
    with pytest.raises(Exception, match="unknown model"):
        client.infer("nope", [ia, ib])
    client.close()


BAD_REQUESTS = [
    ("unknown model", "/v2/models/nope/infer", GOOD, 404, "unknown model 'nope'"),
    ("unknown input", None, {"inputs": [{**GOOD["inputs"][0], "name": "z"}, GOOD["inputs"][1]]},
     400, "unknown input 'z'"),
    ("missing input", None, {"inputs": [GOOD["inputs"][0]]}, 400, "missing input"),
    ("wrong datatype", None, {"inputs": [{**GOOD["inputs"][0], "datatype": "FP64"},
                                         GOOD["inputs"][1]]}, 400, "expects FP32"),
    ("wrong shape count", None, {"inputs": [{**GOOD["inputs"][0], "shape": [2, 2]},
                                            GOOD["inputs"][1]]}, 400, "shape"),
    ("wrong fixed dim", None, {"inputs": [{**GOOD["inputs"][0], "shape": [3, 2]},
                                          GOOD["inputs"][1]]}, 400, "dim 1 must be 3"),
    ("wrong rank", None, {"inputs": [{**GOOD["inputs"][0], "shape": [6]},
                                     GOOD["inputs"][1]]}, 400, "rank"),
    ("float in int input", None, {"inputs": [GOOD["inputs"][0],
                                             {**GOOD["inputs"][1], "data": [1.5, 2]}]},
     400, "numbers for INT64"),
    ("strings as numbers", None, {"inputs": [{**GOOD["inputs"][0], "data": ["a"] * 6},
                                             GOOD["inputs"][1]]}, 400, "got strings"),
    ("NaN literal", None, json.dumps(GOOD).replace("1, 2, 3", "NaN, 2, 3").encode(),
     400, "NaN"),
    ("broken JSON", None, b'{"inputs": [', 400, "invalid JSON"),
    ("not an object", None, b"[1, 2]", 400, "JSON object"),
    ("no inputs", None, {"inputs": []}, 400, "non-empty 'inputs'"),
    ("empty body", None, b"", 400, "empty request body"),
    ("binary size lies", None, {"inputs": [{**GOOD["inputs"][0], "data": None,
                                            "parameters": {"binary_data_size": 24}},
                                           GOOD["inputs"][1]]}, 400, "binary_data_size"),
    ("unknown output", None, {**GOOD, "outputs": [{"name": "zzz"}]}, 400, "unknown output"),
    ("wrong version", "/v2/models/multi/versions/9/infer", GOOD, 404, "version '9'"),
    ("unknown route", "/v2/models/multi/explain", GOOD, 404, "no route"),
    ("oversized body", None, {"inputs": [{**GOOD["inputs"][0], "data": [1.0] * 2000}]},
     413, "over the limit"),
]


@pytest.mark.parametrize(("what", "path", "body", "status", "message"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_clear_message_and_server_keeps_serving(
    agent, what, path, body, status, message
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, res = request(agent, "POST", path or "/v2/models/multi/infer", raw)
    assert got == status, res
    assert isinstance(res, dict) and message in res["error"], res
    assert infer(agent, GOOD)[0] == 200


def test_nan_in_binary_input_is_refused(agent) -> None:
    a = np.array([[np.nan, 1, 2]], np.float32).tobytes()
    b = np.array([[1]], np.int64).tobytes()
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [1, 3], "datatype": "FP32",
         "parameters": {"binary_data_size": len(a)}},
        {"name": "b", "shape": [1, 1], "datatype": "INT64",
         "parameters": {"binary_data_size": len(b)}}]}).encode()
    status, res = request(agent, "POST", "/v2/models/multi/infer", head + a + b,
                          {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "NaN" in res["error"]


def test_wrong_method_and_missing_length_are_4xx(agent) -> None:
    assert request(agent, "GET", "/v2/models/multi/infer")[0] == 405
    assert request(agent, "DELETE", "/v2/models/multi")[0] == 405
    with socket.create_connection(("127.0.0.1", agent.http.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: localhost\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", agent.http.port), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        assert s.recv(100).split(b" ")[1].startswith(b"4")
    assert infer(agent, GOOD)[0] == 200


def test_keep_alive_connection_serves_many_requests(agent) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", agent.http.port, timeout=10)
    body = json.dumps(GOOD).encode()
    for _ in range(50):
        conn.request("POST", "/v2/models/multi/infer", body=body)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.request("POST", "/v2/models/multi/infer", body=b"{bad")
    resp = conn.getresponse()
    assert resp.status == 400
    resp.read()
    conn.request("POST", "/v2/models/multi/infer", body=body)
    assert conn.getresponse().status == 200
    conn.close()


def test_metrics_expose_requests_latency_errors_model_and_updates(agent) -> None:
    infer(agent, GOOD)
    infer(agent, {"inputs": []})
    status, text = request(agent, "GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    assert 'edge_agent_requests_total{model="multi",outcome="ok"}' in text
    assert 'edge_agent_requests_total{model="multi",outcome="bad_request"}' in text
    assert "edge_agent_request_latency_seconds_bucket" in text
    assert 'edge_agent_errors_total{status="400"}' in text
    assert 'edge_agent_model_info{model="multi",name="multi",sha256="' in text
    assert 'edge_agent_update_events_total{event="committed"} 1.0' in text
    assert "edge_agent_ready 1.0" in text


def test_not_ready_without_a_model(tmp_path: Path) -> None:
    a = Agent(config(tmp_path / "state"), connect=False)
    a.start()
    try:
        assert request(a, "GET", "/v2/health/live")[0] == 200
        assert request(a, "GET", "/v2/health/ready")[0] == 503
        status, res = infer(a, GOOD)
        assert status == 404 and "no model installed" in res["error"]
    finally:
        a.stop()
