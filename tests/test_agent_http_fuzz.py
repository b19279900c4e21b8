"""Generated requests against a real agent: never a 5xx, the server stays up, memory stays
bounded (issue 11, item 5). Most go through the protocol's pure ``handle``; a portion is
raw HTTP over sockets, through the strict reader."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import Agent
from tests import _models
from tests._http_agent import call, metric, read_until_closed, serving

HANDLER_EXAMPLES = 1700
SOCKET_EXAMPLES = 400
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture]}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("fuzz")
    sample = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.int64)}
    with serving(d, _models.multi_io_model(d / "multi.onnx"), "multi", sample,
                 http={"max_body_bytes": 1 << 20, "request_timeout_s": 2.0}) as a:
        yield a


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


SEGMENTS = st.sampled_from(["v2", "models", "multi", "nope", "versions", "1", "2", "infer",
                            "ready", "config", "stats", "health", "live", "repository",
                            "index", "metrics", "", "..", "%00", "multi?x=1"])
INFER = st.tuples(st.just("POST"), st.sampled_from(["/v2/models/multi/infer",
                                                   "/v2/models/multi/versions/1/infer"]))
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=6).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(["/v2/models/multi/infer", "/v2/models/multi/versions/1/infer"]),
    st.text(max_size=40).map(lambda t: "/" + t),
)
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
                    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8))
DTYPES = st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "FP16", "UINT64", "INT8", "fp32",
                          "FP64", "nope"])
SCALARS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
                    st.booleans(), st.text(max_size=4), st.none())
DATA = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=8), max_leaves=40)
SHAPES = st.one_of(
    st.lists(st.integers(min_value=-2, max_value=8), max_size=4),
    st.lists(st.sampled_from([0, 1, 2, 3, 10**20, 2**63, -1]), max_size=70),
    st.sampled_from([[2, 3], [1, 3], [2, 1], [1, 1], [0, 3]]),
    SCALARS,
)


@st.composite
def tensors(draw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {}
    if draw(st.booleans()):
        t["name"] = draw(st.sampled_from(["a", "b", "x"]))
    if draw(st.booleans()):
        t["shape"] = draw(SHAPES)
    if draw(st.booleans()):
        t["datatype"] = draw(DTYPES)
    if draw(st.integers(0, 3)):
        t["data"] = draw(DATA)
    if draw(st.integers(0, 3)) == 0:
        t["parameters"] = draw(st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64)}),
            st.dictionaries(st.text(max_size=4), SCALARS, max_size=2), SCALARS))
    return t


@st.composite
def valid_ish(draw: Any) -> dict[str, Any]:
    # Close to a good request, so generation reaches deep into decoding and predict.
    n = draw(st.integers(0, 3))
    a = draw(st.lists(st.floats(width=32, allow_nan=draw(st.integers(0, 4)) == 0,
                                allow_infinity=False), min_size=3 * n, max_size=3 * n))
    b = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
    req: dict[str, Any] = {"inputs": [
        {"name": "a", "shape": [n, 3], "datatype": draw(st.sampled_from(["FP32"] * 5 + ["FP16"])),
         "data": a},
        {"name": "b", "shape": draw(st.sampled_from([[n, 1]] * 5 + [[n], [1, n]])),
         "datatype": "INT64", "data": b}]}
    if draw(st.booleans()):
        req["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["sum", "double_b", "zz"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}),
            max_size=3))
    if draw(st.booleans()):
        req["parameters"] = {"binary_data_output": draw(st.booleans())}
    return req


REQUESTS = st.one_of(
    valid_ish(),
    st.fixed_dictionaries({"inputs": st.lists(tensors(), max_size=3)},
                          optional={"outputs": st.lists(tensors(), max_size=2),
                                    "parameters": SCALARS, "id": SCALARS}),
    DATA,
)


@st.composite
def bodies(draw: Any) -> tuple[bytes, dict[str, str]]:
    kind = draw(st.integers(0, 4))
    headers: dict[str, str] = {}
    if kind == 0:
        return draw(st.binary(max_size=200)), headers
    head = json.dumps(draw(REQUESTS)).encode()
    if kind == 1:  # binary tensor extension: a JSON head and a tail of bytes
        tail = draw(st.binary(max_size=64))
        headers["inference-header-content-length"] = draw(st.one_of(
            st.just(str(len(head))), st.text(max_size=6),
            st.integers(-5, len(head) + 80).map(str)))
        return head + tail, headers
    if kind == 2:
        import gzip
        import zlib

        enc = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, gzip", ""]))
        headers["content-encoding"] = enc
        packed = gzip.compress(head) if enc == "gzip" else zlib.compress(head)
        return (packed if draw(st.booleans()) else draw(st.binary(max_size=40))), headers
    return head, headers


@given(route=st.one_of(INFER, st.tuples(METHODS, PATHS)), body=bodies())
@settings(max_examples=HANDLER_EXAMPLES, **SETTINGS)  # type: ignore[arg-type]
def _fuzz_handler(agent: Agent, route: tuple[str, str],
                  body: tuple[bytes, dict[str, str]]) -> None:
    assert agent.http is not None
    method, path = route
    status, _, payload, _ = agent.http.app.handle(method, path, body[1], body[0])
    assert status < 500, (status, payload[:300])
    if status >= 400:
        assert json.loads(payload)["error"]
    _COUNT["handler"] += 1
    _COUNT["infer_ok"] += status == 200 and path.endswith("/infer")


VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.9", "HTTP/2", "X"])
HEADER_NAMES = st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding",
                                "Inference-Header-Content-Length", "Content-Encoding",
                                "Expect", "Connection", "Host", "X-A", "Bad Name", ""])


@given(method=METHODS, path=PATHS, version=VERSIONS, body=bodies(),
       extra=st.lists(st.tuples(HEADER_NAMES, st.text(max_size=12)), max_size=4),
       length=st.one_of(st.none(), st.integers(-1, 300).map(str), st.just("1_0")))
@settings(max_examples=SOCKET_EXAMPLES, **SETTINGS)  # type: ignore[arg-type]
def _fuzz_socket(agent: Agent, method: str, path: str, version: str,
                 body: tuple[bytes, dict[str, str]], extra: list[tuple[str, str]],
                 length: str | None) -> None:
    assert agent.http is not None
    data, headers = body
    lines = [f"{method} {path} {version}", f"Content-Length: {length or len(data)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"{k}: {v}" for k, v in extra]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + data
    with socket.create_connection(("127.0.0.1", agent.http.port), timeout=10) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)  # the server sees the end instead of waiting
        except OSError:
            pass
        got = read_until_closed(s)
    for part in got.split(b"HTTP/1.1 ")[1:]:
        # 505 (HTTP/1.9, HTTP/2 lines) is the client's error despite its class.
        assert not part.startswith(b"5") or part.startswith(b"505"), got[:400]
    _COUNT["socket"] += 1


_COUNT = {"handler": 0, "socket": 0, "infer_ok": 0}


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_and_the_server_survives(agent: Agent) -> None:
    assert agent.http is not None
    call(agent.http.port, "POST", "/v2/models/multi/infer", b"{}")  # warm the paths
    rss0 = rss_mb()
    _fuzz_handler(agent)
    _fuzz_socket(agent)
    assert _COUNT["handler"] >= HANDLER_EXAMPLES * 0.9
    assert _COUNT["handler"] + _COUNT["socket"] >= 2000
    assert _COUNT["infer_ok"] >= 20, _COUNT  # generation reached predict, not only errors
    assert metric(agent, "edge_agent_errors_total", status="500") == 0
    assert agent.slots.current is not None and agent.slots.current.health.errors == 0
    assert call(agent.http.port, "GET", "/v2/health/ready")[0] == 200
    assert rss_mb() - rss0 < 100, f"RSS grew from {rss0:.0f} to {rss_mb():.0f} MB"
