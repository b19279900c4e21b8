"""Client mistakes are the client's: 4xx with a diagnosis, never a 500, never counted
against the model's health (issue 11, items 4 and 5), against a real agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from tests import _models
from tests._http_agent import call, error_of, exchange, metric, serving, wait_for


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("faults-multi")
    sample = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.int64)}
    with serving(d, _models.multi_io_model(d / "multi.onnx"), "multi", sample,
                 http={"allowed_hosts": ["Cam-1.local"]}) as a:
        yield a


def binary_body(inputs: list[tuple[str, list[int], str, bytes]]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [
        {"name": n, "shape": s, "datatype": dt, "parameters": {"binary_data_size": len(raw)}}
        for n, s, dt, raw in inputs]}).encode()
    return head + b"".join(raw for *_, raw in inputs), {
        "Inference-Header-Content-Length": str(len(head))}


def pack(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def test_lone_surrogate_in_bytes_is_400_and_does_not_roll_back_a_good_model(
    tmp_path: Path
) -> None:
    sample = {"text": np.array(["hi"])}
    # Health window with zero tolerance: one request counted as a model fault rolls back.
    with serving(tmp_path, _models.string_identity_model(tmp_path / "echo.onnx"), "echo",
                 sample, wait_commit=False,
                 health={"window_s": 1.0, "max_error_rate": 0.0}) as a:
        port = a.http.port
        bad = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}'
        status, res, _ = call(port, "POST", "/v2/models/echo/infer", bad)
        assert status == 400 and "surrogate" in res["error"], res
        body, hdrs = binary_body([("text", [1], "BYTES", pack(b"\xff\x00\x80"))])
        status, res, _ = call(port, "POST", "/v2/models/echo/infer", body, hdrs)
        assert status == 400 and "UTF-8" in res["error"], res
        wait_for(lambda: a.installer.state.phase == "committed", "the health window")
        assert a.installer.state.current is not None
        assert a.installer.state.current.version == "1"
        assert a.slots.current is not None and a.slots.current.health.errors == 0
        assert metric(a, "edge_agent_requests_total", model="echo", outcome="error") == 0


def test_binary_bytes_round_trip_exactly(tmp_path: Path) -> None:
    sample = {"text": np.array(["hi"])}
    with serving(tmp_path, _models.string_identity_model(tmp_path / "echo.onnx"), "echo",
                 sample) as a:
        items = [b"\x00", "é\x00€".encode(), b"", b"plain"]
        body, hdrs = binary_body([("text", [4], "BYTES", pack(*items))])
        req = json.loads(body[:int(hdrs["Inference-Header-Content-Length"])])
        req["outputs"] = [{"name": "out", "parameters": {"binary_data": True}}]
        head = json.dumps(req).encode()
        status, raw, rh = call(a.http.port, "POST", "/v2/models/echo/infer",
                               head + body[len(body) - len(pack(*items)):],
                               {"Inference-Header-Content-Length": str(len(head))})
        assert status == 200, raw
        n = int(rh["inference-header-content-length"])
        assert raw[n:] == pack(*items)
        status, res, _ = call(a.http.port, "POST", "/v2/models/echo/infer", json.dumps(
            {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                         "data": ["é\x00€", "\U0001f600"]}]}).encode())
        assert status == 200 and res["outputs"][0]["data"] == ["é\x00€", "\U0001f600"]


A = {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
B = {"name": "b", "shape": [1, 1], "datatype": "INT64", "data": [1]}
SHAPE_ATTACKS: list[tuple[str, Any, str]] = [
    ("65 dims", {"inputs": [{**A, "shape": [1] * 65}, B]}, "at most 64"),
    ("zero dim next to a huge one", {"inputs": [
        {"name": "features", "shape": [0, 10**20], "datatype": "FP32", "data": []}]},
     "unknown input"),
    ("zero dim next to a huge one, known input", {"inputs": [
        {**A, "shape": [0, 10**20], "data": []}, B]}, "too large"),
    ("dim beyond int64", {"inputs": [{**A, "shape": [2**70, 0], "data": []}, B]},
     "too large"),
    ("bool dim", {"inputs": [{**A, "shape": [True, 3]}, B]}, "non-negative ints"),
    ("ragged nested data", {"inputs": [{**A, "shape": [2, 3], "data": [[1, 2, 3], [4, 5]]},
                                       {**B, "shape": [2, 1], "data": [1, 2]}]},
     "does not follow shape"),
    ("ragged nesting that flattens to the right count",
     {"inputs": [{**A, "shape": [2, 3], "data": [[1, 2], [3, 4, 5, 6]]},
                 {**B, "shape": [2, 1], "data": [1, 2]}]}, "does not follow shape"),
    ("bool and float mix", {"inputs": [{**A, "data": [True, 1.5, 2]}, B]}, "got booleans"),
    ("bool in an int input", {"inputs": [A, {**B, "data": [True]}]}, "got booleans"),
    ("float in an int input", {"inputs": [A, {**B, "data": [1.0]}]}, "got floats"),
    ("null in data", {"inputs": [{**A, "data": [1, None, 3]}, B]}, "got nulls"),
    ("int beyond int64", {"inputs": [A, {**B, "data": [2**64]}]}, "outside the INT64"),
    ("int beyond float", {"inputs": [{**A, "data": [10**400, 1, 2]}, B]}, "too large"),
    ("batch dims disagree", {"inputs": [{**A, "shape": [1, 3]},
                                        {**B, "shape": [2, 1], "data": [1, 2]}]},
     "disagree on dim 'batch'"),
]


@pytest.mark.parametrize(("what", "body", "message"), SHAPE_ATTACKS,
                         ids=[s[0] for s in SHAPE_ATTACKS])
def test_shape_and_data_attacks_are_400_not_500(multi: Agent, what: str, body: Any,
                                                message: str) -> None:
    before = metric(multi, "edge_agent_errors_total", status="500")
    status, res, _ = call(multi.http.port, "POST", "/v2/models/multi/infer",
                          json.dumps(body).encode())
    assert status == 400, res
    assert message in res["error"], res
    assert metric(multi, "edge_agent_errors_total", status="500") == before
    assert multi.slots.current is not None and multi.slots.current.health.errors == 0


BINARY_ATTACKS: list[tuple[str, list[tuple[str, list[int], str, bytes]], str]] = [
    ("65 dims", [("a", [1] * 65, "FP32", b""), ("b", [1, 1], "INT64", bytes(8))],
     "at most 64"),
    ("zero dim next to a huge one", [("a", [0, 10**20], "FP32", b""),
                                     ("b", [1, 1], "INT64", bytes(8))], "too large"),
    ("bool bytes other than 0 or 1", [("a", [1, 3], "FP32", bytes(12)),
                                      ("b", [1, 1], "INT64", bytes(8))], ""),
]


@pytest.mark.parametrize(("what", "inputs", "message"), BINARY_ATTACKS[:2],
                         ids=[s[0] for s in BINARY_ATTACKS[:2]])
def test_binary_shape_attacks_are_400_not_500(multi: Agent, what: str,
                                              inputs: list[Any], message: str) -> None:
    body, hdrs = binary_body(inputs)
    status, res, _ = call(multi.http.port, "POST", "/v2/models/multi/infer", body, hdrs)
    assert status == 400 and message in res["error"], res


GOOD = json.dumps({"inputs": [A, B]}).encode()
INFER = b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: localhost\r\n"
HTTP_ATTACKS: list[tuple[str, bytes, int, str]] = [
    ("duplicate Content-Length", INFER + b"Content-Length: %d\r\nContent-Length: 2\r\n\r\n"
     % len(GOOD) + GOOD, 400, "duplicate Content-Length"),
    ("Content-Length with an underscore", INFER + b"Content-Length: 1_0\r\n\r\n" + GOOD[:10],
     400, "invalid Content-Length"),
    ("Content-Length with a sign", INFER + b"Content-Length: +10\r\n\r\n" + GOOD[:10],
     400, "invalid Content-Length"),
    ("Content-Length in other digits", INFER + "Content-Length: ١٠\r\n\r\n".encode()
     + GOOD[:10], 400, "invalid Content-Length"),
    ("space before the colon", INFER + b"Content-Length : 10\r\n\r\n" + GOOD[:10], 400,
     "malformed header"),
    ("folded header", INFER + b"X-A: 1\r\n  folded\r\n\r\n", 400, "malformed header"),
    ("HTTP/1.9", b"GET /v2/health/live HTTP/1.9\r\n\r\n", 505, "HTTP/1.9 is not supported"),
    ("HTTP/2.0 line", b"GET /v2/health/live HTTP/2.0\r\n\r\n", 505, "not supported"),
    ("HTTP/0.9 line", b"GET /v2/health/live\r\n\r\n", 400, "bad request line"),
    ("absolute target", b"GET http://x/v2 HTTP/1.1\r\n\r\n", 400, "bad request line"),
    ("request line over the header limit", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
     414, "http.max_header_bytes"),
    ("headers over the header limit", b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 9000 + b"\r\n",
     431, "http.max_header_bytes"),
    ("chunked body", INFER + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", 411, "chunked"),
    ("body over the limit", INFER + b"Content-Length: 999999999999\r\n\r\n", 413,
     "http.max_body_bytes"),
]


@pytest.mark.parametrize(("what", "raw", "status", "message"), HTTP_ATTACKS,
                         ids=[h[0] for h in HTTP_ATTACKS])
def test_ambiguous_http_is_refused_with_a_diagnosis(multi: Agent, what: str, raw: bytes,
                                                    status: int, message: str) -> None:
    got = exchange(multi.http.port, raw)
    code, error = error_of(got)
    assert code == status and message in error, got
    assert got.count(b"HTTP/1.1 ") == 1, got  # and nothing after it was read as a request
    assert call(multi.http.port, "POST", "/v2/models/multi/infer", GOOD)[0] == 200


def test_get_body_is_not_parsed_as_the_next_request(multi: Agent) -> None:
    smuggled = b"GET /v2/models/nope HTTP/1.1\r\nHost: localhost\r\n\r\n"
    got = exchange(multi.http.port,
                   b"GET /v2/health/live HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                   + smuggled + b"GET /v2/models/multi HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1 ") == 2, got
    assert got.startswith(b"HTTP/1.1 200") and b"nope" not in got and b'"multi"' in got


@pytest.mark.parametrize(("host", "status"), [
    (b"evil.example", 421),            # a web page's name re-pointed at the device
    (b"evil.example:8080", 421),
    (b"localhost.evil.example", 421),
    (b"127.0.0.1:8080", 200),
    (b"[::1]", 200),
    (b"localhost:8080", 200),
    (b"cam-1.local", 200),             # http.allowed_hosts, any case
    (b"a b", 400),
])
def test_a_dns_rebinding_host_is_refused(multi: Agent, host: bytes, status: int) -> None:
    got = exchange(multi.http.port, b"GET /v2/models/multi HTTP/1.1\r\nHost: " + host
                   + b"\r\nConnection: close\r\n\r\n")
    code, error = error_of(got) if status != 200 else (int(got[9:12]), "")
    assert code == status, got
    if status == 421:
        assert "http.allowed_hosts" in error
    # Local tools may leave Host out; what they send is still served.
    assert exchange(multi.http.port, b"GET /v2/health/live HTTP/1.1\r\n"
                                     b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_allowed_hosts_takes_names_only(tmp_path: Path) -> None:
    from edge_sdk.errors import ConfigError
    from tests._agent_local import config

    with pytest.raises(ConfigError, match=r"http.allowed_hosts\[0\].*host name"):
        config(tmp_path / "state", http={"allowed_hosts": ["http://cam-1.local:8080"]})
