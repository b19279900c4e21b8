"""Every resource a client can hold on the agent's endpoint is capped (issue 11, item 6):
connections, the time to send a request, bodies held in memory, decoding memory."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from tests import _models
from tests._agent_local import config
from tests._http_agent import call, error_of, metric, read_until_closed, serving, wait_for

X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("limits")
    http = {"max_connections": 4, "request_timeout_s": 0.5, "max_body_bytes": 2 << 20,
            "max_buffered_bytes": (5 << 20) // 2, "max_decode_bytes": 8 << 20}
    with serving(d, _models.add_model(d / "add.onnx"), "adder", {"x": X}, http=http) as a:
        yield a


def body_of(n: int, pad_to: int = 0) -> bytes:
    raw = json.dumps({"inputs": [{"name": "x", "shape": [n, 4], "datatype": "FP32",
                                  "data": [0.5] * (4 * n)}]}).encode()
    return raw + b" " * max(0, pad_to - len(raw))  # JSON allows trailing blanks


def post_head(length: int) -> bytes:
    return (b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
            % length)


def connect(agent: Agent) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.http.port), timeout=10)


def test_connections_over_the_cap_are_refused_with_503_and_the_server_still_answers(
    tight: Agent
) -> None:
    assert tight.http is not None
    refused = metric(tight, "edge_agent_errors_total", status="503")
    idle = [connect(tight) for _ in range(4)]
    try:
        wait_for(lambda: tight.http.connections == 4, "4 connections to be admitted")
        with connect(tight) as extra:
            extra.sendall(b"GET /v2/health/ready HTTP/1.1\r\n\r\n")
            status, error = error_of(read_until_closed(extra))
        assert status == 503 and "http.max_connections" in error
        assert metric(tight, "edge_agent_errors_total", status="503") == refused + 1
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: tight.http.connections == 0, "idle connections to close")
    assert call(tight.http.port, "POST", "/v2/models/adder/infer", body_of(1))[0] == 200


@pytest.mark.parametrize("where", ["headers", "body"])
def test_slowloris_is_cut_at_the_request_deadline(tight: Agent, where: str) -> None:
    # One byte at a time, each well inside any per-read timeout; only a deadline on the
    # whole request ends it. The loop is bounded so a missing deadline fails, not hangs.
    body = body_of(1)
    start = b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: localhost\r\n"
    if where == "body":
        start += b"Content-Length: %d\r\n\r\n" % len(body)
    trickle = body if where == "body" else b"X-Slow: " + b"a" * 1000
    with connect(tight) as s:
        s.sendall(start)
        cut = False
        for byte in trickle:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            s.settimeout(0.05)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    cut = True
                    break
            except TimeoutError:
                pass
        assert cut, "the server kept reading a request trickled byte by byte"
        s.settimeout(10)
        status, error = error_of(read_until_closed(s))
    assert status == 408 and "http.request_timeout_s" in error
    assert call(tight.http.port, "POST", "/v2/models/adder/infer", body_of(1))[0] == 200


def test_buffer_cap_refuses_extra_large_bodies_with_503_while_others_proceed(
    tight: Agent
) -> None:
    assert tight.http is not None
    big = body_of(1, pad_to=1 << 20)
    held = [connect(tight) for _ in range(2)]
    try:
        for s in held:  # 2 MiB of the 2.5 MiB buffer: each declared and half sent
            s.sendall(post_head(len(big)) + big[:len(big) // 2])
        wait_for(lambda: tight.http.buffered.used == 2 << 20, "both bodies to be reserved")
        with connect(tight) as third:
            third.sendall(post_head(len(big)) + big[:1000])
            status, error = error_of(read_until_closed(third))
        assert status == 503 and "http.max_buffered_bytes" in error
        # A small request fits in what is left, while the big ones are still arriving.
        assert call(tight.http.port, "POST", "/v2/models/adder/infer", body_of(1))[0] == 200
        for s in held:  # and the held ones finish and are answered
            s.sendall(big[len(big) // 2:])
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: tight.http.buffered.used == 0, "the buffers to be released")


def test_json_body_that_decodes_past_the_memory_cap_is_413_and_binary_passes(
    tight: Agent
) -> None:
    n = 75_000  # about 1.4 MiB of JSON: 6x that is over this agent's 8 MiB decode cap
    status, res, _ = call(tight.http.port, "POST", "/v2/models/adder/infer", body_of(n))
    assert status == 413 and "http.max_decode_bytes" in res["error"], res
    raw = np.full((n, 4), 0.5, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [n, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, res, _ = call(tight.http.port, "POST", "/v2/models/adder/infer", head + raw,
                          {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, res
    assert tight.http.app.decoding.used == 0


def test_not_ready_503_is_counted_in_metrics(tmp_path: Path) -> None:
    a = Agent(config(tmp_path / "state"), connect=False)
    a.start()
    try:
        assert a.http is not None
        assert call(a.http.port, "GET", "/v2/health/ready")[0] == 503
        assert metric(a, "edge_agent_errors_total", status="503") == 1
    finally:
        a.stop()



def test_burst_of_new_connections_is_all_answered(tight: Agent) -> None:
    # 16 clients at once on an agent capped at 4 connections would see 503s if a closed
    # connection were still counted; without keep-alive every request is a new one.
    import threading

    assert tight.http is not None
    port, statuses = tight.http.port, []
    gate = threading.Barrier(4)

    def client() -> None:
        gate.wait()
        for _ in range(25):
            statuses.append(call(port, "POST", "/v2/models/adder/infer", body_of(1),
                                 {"Connection": "close"})[0])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 100
