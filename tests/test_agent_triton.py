"""tritonclient's model config, statistics, repository index and compressed requests
against a real agent (issue 11, item 11)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from tests import _models
from tests._http_agent import call, serving


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    d = tmp_path_factory.mktemp("triton")
    sample = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.int64)}
    with serving(d, _models.multi_io_model(d / "multi.onnx"), "multi", sample,
                 http={"max_body_bytes": 1 << 20}) as a:
        yield a


@pytest.fixture()
def client(agent: Agent) -> Iterator[Any]:
    import tritonclient.http as httpclient

    assert agent.http is not None
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.http.port}")
    yield c
    c.close()


def inputs() -> tuple[list[Any], np.ndarray, np.ndarray]:
    import tritonclient.http as httpclient

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1], [2]], dtype=np.int64)
    ia = httpclient.InferInput("a", [2, 3], "FP32")
    ia.set_data_from_numpy(a)
    ib = httpclient.InferInput("b", [2, 1], "INT64")
    ib.set_data_from_numpy(b)
    return [ia, ib], a, b


def test_tritonclient_reads_the_model_config(client: Any) -> None:
    for version in ("", "1"):
        cfg = client.get_model_config("multi", model_version=version)
        assert cfg["name"] == "multi" and cfg["platform"] == "onnxruntime_onnx"
        assert cfg["max_batch_size"] == 0
        assert cfg["input"] == [{"name": "a", "data_type": "TYPE_FP32", "dims": [-1, 3]},
                                {"name": "b", "data_type": "TYPE_INT64", "dims": [-1, 1]}]
        assert [o["name"] for o in cfg["output"]] == ["sum", "double_b"]
    with pytest.raises(Exception, match="version '9'"):
        client.get_model_config("multi", model_version="9")


def test_tritonclient_reads_inference_statistics(client: Any) -> None:
    before = client.get_inference_statistics("multi")["model_stats"][0]
    feed, _, _ = inputs()
    for _ in range(3):
        client.infer("multi", feed)
    with pytest.raises(Exception, match="unknown input"):
        client.infer("multi", [_unknown_input()])
    stats = client.get_inference_statistics("multi")["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "multi" and stats[0]["version"] == "1"
    s = stats[0]["inference_stats"]
    assert s["success"]["count"] == before["inference_stats"]["success"]["count"] + 3
    assert s["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert s["compute_infer"]["ns"] > 0 and stats[0]["last_inference"] > 0
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "multi"
    assert client.get_inference_statistics("multi", "1")["model_stats"][0]["version"] == "1"


def _unknown_input() -> Any:
    import tritonclient.http as httpclient

    x = httpclient.InferInput("zz", [2, 3], "FP32")
    x.set_data_from_numpy(np.zeros((2, 3), np.float32))
    return x


def test_tritonclient_reads_the_repository_index(client: Any) -> None:
    assert client.get_model_repository_index() == [
        {"name": "multi", "version": "1", "state": "READY"}]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_are_inflated(client: Any, algorithm: str) -> None:
    feed, a, b = inputs()
    res = client.infer("multi", feed, request_compression_algorithm=algorithm,
                       response_compression_algorithm=algorithm)
    np.testing.assert_array_equal(res.as_numpy("sum"), a + b.astype(np.float32))


def test_zip_bomb_is_refused_with_413_not_inflated(agent: Agent) -> None:
    assert agent.http is not None
    bomb = gzip.compress(b" " * (256 << 20))  # 256 MiB of blanks in ~250 KiB
    assert len(bomb) < 1 << 20
    status, res, _ = call(agent.http.port, "POST", "/v2/models/multi/infer", bomb,
                          {"Content-Encoding": "gzip"})
    assert status == 413 and "http.max_body_bytes" in res["error"], res
    raw_deflate = zlib.compressobj(wbits=-15)
    body = raw_deflate.compress(json.dumps({"inputs": []}).encode()) + raw_deflate.flush()
    status, res, _ = call(agent.http.port, "POST", "/v2/models/multi/infer", body,
                          {"Content-Encoding": "deflate"})
    assert status == 400 and "non-empty 'inputs'" in res["error"], res
    status, res, _ = call(agent.http.port, "POST", "/v2/models/multi/infer", b"x",
                          {"Content-Encoding": "br"})
    assert status == 415 and "gzip, deflate" in res["error"], res
