"""Answers on the device (issue 27, item 4): Triton's classification extension, raw
JPEG/PNG bodies answered in the task's terms, and the image bounds, against a real agent
serving artifacts converted in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from converters import ConvertConfig, convert
from converters._measure import MeasureConfig
from device_agent import Agent
from tests._agent_local import LocalSource, config, deployment
from tests._http_agent import call, metric, wait_for
from tests._images import encode, png_bomb
from tests._prepost_models import classifier, detector, images, segmenter

FAST = ConvertConfig(measure=MeasureConfig(rounds=1, runs_per_round=2, warmup=0))
NAMES = [f"class {i}" for i in range(10)]


@contextmanager
def serving_artifact(tmp: Path, art: Path, **http: Any) -> Iterator[Agent]:
    """An agent (``connect=False``) with the converted artifact ``art`` installed."""
    a = Agent(config(tmp / "state", http={"port": 0, **http}), source=LocalSource(),
              connect=False)
    a.start()
    try:
        a.submit(deployment(edge_sdk.Artifact.from_dir(art), 1))
        wait_for(lambda: a.slots.current is not None, "the model to be swapped in")
        wait_for(lambda: a.installer.state.phase == "committed", "the install to commit")
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("agent-images")
    (d / "labels.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (d / "det.txt").write_text("cat\ndog\nbird\n")
    cls = classifier(d / "cls.onnx")
    return {
        "cls": convert(cls, d / "cls", name="cls", quantize="none",
                       preprocess="image:size=32x32,resize=letterbox",
                       postprocess="classify:topk=3", labels=d / "labels.txt",
                       config=FAST).artifact.path,
        "det": convert(detector(d / "det.onnx"), d / "det", name="det", quantize="none",
                       preprocess="image:resize=letterbox",
                       postprocess="detect:layout=yolov8", labels=d / "det.txt",
                       config=FAST).artifact.path,
        "emb": convert(segmenter(d / "emb.onnx"), d / "emb", name="emb", quantize="none",
                       preprocess="image:resize=stretch", postprocess="embed:l2norm",
                       config=FAST).artifact.path,
        "tensor": convert(cls, d / "plain", name="plain", quantize="none",
                          labels=d / "labels.txt", task="classify",
                          config=FAST).artifact.path,
    }


@pytest.fixture(scope="module")
def cls_agent(arts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Agent]:
    with serving_artifact(tmp_path_factory.mktemp("cls-agent"), arts["cls"]) as a:
        yield a


def _port(agent: Agent) -> int:
    assert agent.http is not None
    return agent.http.port


def post_image(agent: Agent, body: bytes, ctype: str = "image/png",
               name: str = "cls") -> tuple[int, Any, dict[str, str]]:
    return call(_port(agent), "POST", f"/v2/models/{name}/infer", body,
                {"Content-Type": ctype})


def test_png_and_jpeg_bodies_answer_labels_with_scores(
        arts: dict[str, Path], cls_agent: Agent) -> None:
    img = images(1, 45, 60, seed=3)[0]
    want = edge_sdk.load(arts["cls"]).answer(img)
    status, got, _ = post_image(cls_agent, encode(img, "PNG"))
    assert status == 200, got
    assert got["model_name"] == "cls" and got["task"] == "classify"
    assert [(lb["name"], lb["index"]) for lb in got["labels"]] == [
        (lb.name, lb.index) for lb in want.labels]
    np.testing.assert_allclose([lb["score"] for lb in got["labels"]],
                               [lb.score for lb in want.labels], rtol=1e-6)
    status, got, _ = post_image(cls_agent, encode(img, "JPEG"), "image/jpeg")
    assert status == 200 and len(got["labels"]) == 3


def test_image_body_to_a_detector_answers_boxes_and_the_bounds_are_the_configured_ones(
        arts: dict[str, Path], tmp_path: Path) -> None:
    img = images(1, 48, 96)[0]
    want = edge_sdk.load(arts["det"]).answer(img)
    with serving_artifact(tmp_path, arts["det"], max_image_pixels=50_000,
                          max_decode_bytes=256 << 10) as a:
        status, got, _ = post_image(a, encode(img), name="det")
        # The keys bound what they name, before decoding: 100x1000 is over the pixels;
        # 100x100 passes both (its pixel data then fails to decode); 300x150 passes the
        # pixels but needs more decoding memory than 256 KiB.
        over, over_err, _ = post_image(a, png_bomb(100, 1000), name="det")
        under, under_err, _ = post_image(a, png_bomb(100, 100), name="det")
        big, big_err, _ = post_image(a, encode(images(1, 150, 300)[0]), name="det")
    assert over == 413 and "http.max_image_pixels (50000)" in over_err["error"], over_err
    assert under == 400 and "cannot decode" in under_err["error"], under_err
    assert big == 413 and "http.max_decode_bytes" in big_err["error"], big_err
    assert status == 200, got
    assert [b["label"] for b in got["boxes"]] == ["dog", "bird", "cat"]
    np.testing.assert_allclose([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in got["boxes"]],
                               [[b.x0, b.y0, b.x1, b.y1] for b in want.boxes], atol=1e-4)
    assert all(0 < b["score"] <= 1 for b in got["boxes"])


def test_image_body_to_an_embedder_answers_its_embedding(
        arts: dict[str, Path], tmp_path: Path) -> None:
    img = images(1, 24, 40, seed=7)[0]
    want = edge_sdk.load(arts["emb"]).answer(img).embedding
    assert want is not None
    with serving_artifact(tmp_path, arts["emb"]) as a:
        status, got, _ = post_image(a, encode(img), name="emb")
    assert status == 200 and got["task"] == "embed", got
    assert got["size"] == want.shape[0]
    np.testing.assert_allclose(got["embedding"], want, rtol=1e-5, atol=1e-6)


def test_png_bomb_is_413_naming_the_key_before_decoding(cls_agent: Agent) -> None:
    # 100 x 100000 pixels declared; its pixel data would not even decode (that is a 400).
    status, got, _ = post_image(cls_agent, png_bomb(100, 100_000))
    assert status == 413, got
    assert "http.max_image_pixels" in got["error"] and "100x100000" in got["error"]
    assert metric(cls_agent, "edge_agent_requests_total", model="cls", outcome="error") == 0


def test_body_that_is_not_an_image_is_400_not_counted_against_the_model(
        cls_agent: Agent) -> None:
    before = metric(cls_agent, "edge_agent_requests_total", model="cls",
                    outcome="bad_request")
    for body, ctype in ((b"\x89PNG\r\n\x1a\n truncated", "image/png"),
                        (b"hello", "image/jpeg"), (png_bomb(10, 10), "image/png")):
        status, got, _ = post_image(cls_agent, body, ctype)
        assert status == 400, got
        assert "JPEG or PNG" in got["error"] or "cannot decode" in got["error"]
    status, got, _ = post_image(cls_agent, encode(images(1, 8, 8)[0], "GIF"), "image/gif")
    assert status == 415 and "image/jpeg or image/png" in got["error"], got
    assert metric(cls_agent, "edge_agent_requests_total", model="cls",
                  outcome="bad_request") == before + 4
    assert metric(cls_agent, "edge_agent_requests_total", model="cls", outcome="error") == 0
    assert metric(cls_agent, "edge_agent_requests_total", model="cls",
                  outcome="cannot_run") == 0


def test_tritonclient_classification_gives_score_index_label_strings(
        arts: dict[str, Path], cls_agent: Agent, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    img = images(1, 45, 60, seed=3)
    want = edge_sdk.load(arts["cls"]).predict({"image": img})
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{_port(cls_agent)}")
    try:
        feed = httpclient.InferInput("image", list(img.shape), "UINT8")
        feed.set_data_from_numpy(img)
        for binary in (False, True):
            out = httpclient.InferRequestedOutput("scores", binary_data=binary, class_count=2)
            res = c.infer("cls", [feed], outputs=[out])
            got = res.as_numpy("scores")
            assert got.shape == (1, 2)
            texts = [t.decode() if isinstance(t, bytes) else t for t in got.reshape(-1)]
            ids = want["class_ids"][0, :2]
            assert texts == [f"{s:f}:{i}:class {i}" for s, i in
                             zip(want["scores"][0, :2].tolist(), ids.tolist(), strict=True)]
    finally:
        c.close()
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    logits = edge_sdk.load(arts["tensor"]).predict(x)["logits"]
    with serving_artifact(tmp_path, arts["tensor"]) as a:
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{_port(a)}")
        try:
            feed = httpclient.InferInput("input", list(x.shape), "FP32")
            feed.set_data_from_numpy(x)
            out = httpclient.InferRequestedOutput("logits", binary_data=False, class_count=3)
            got = c.infer("plain", [feed], outputs=[out]).as_numpy("logits")
            # And an image to this tensor model: 4xx naming what the artifact lacks.
            status, err, _ = post_image(a, encode(img[0]), name="plain")
        finally:
            c.close()
    top = np.argsort(-logits, axis=-1)[:, :3]
    assert got.shape == (2, 3)
    for row, ids, lg in zip(got, top, logits, strict=True):
        texts = [t.decode() if isinstance(t, bytes) else t for t in row]
        assert texts == [f"{lg[i]:f}:{i}:class {i}" for i in ids]
    assert status == 415 and "no --preprocess" in err["error"], err


def test_bad_classification_count_is_400(cls_agent: Agent) -> None:
    img = images(1, 8, 8)
    body = {"inputs": [{"name": "image", "shape": list(img.shape), "datatype": "UINT8",
                        "data": img.reshape(-1).tolist()}],
            "outputs": [{"name": "scores", "parameters": {"classification": 0}}]}
    status, got, _ = call(_port(cls_agent), "POST", "/v2/models/cls/infer",
                          json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == 400 and "'classification'" in got["error"], got


_WITHOUT_PILLOW = """
import sys
sys.modules["PIL"] = None  # what an install without the agent-images extra has
from pathlib import Path
import edge_sdk
from device_agent import Agent
from tests._agent_local import LocalSource, config, deployment
from tests._http_agent import call, wait_for
from tests._images import PNG_8X8
art, tmp = Path(sys.argv[1]), Path(sys.argv[2])
a = Agent(config(tmp / "state"), source=LocalSource(), connect=False)
a.start()
try:
    a.submit(deployment(edge_sdk.Artifact.from_dir(art), 1))
    wait_for(lambda: a.slots.current is not None, "the model")
    status, got, _ = call(a.http.port, "POST", "/v2/models/cls/infer", PNG_8X8,
                          {"Content-Type": "image/png"})
    print(status, got["error"])
finally:
    a.stop()
"""


def test_without_pillow_image_bodies_are_501_naming_the_extra(
        arts: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT_PILLOW, str(arts["cls"]),
                          str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("501 ") and "edge-sdk[agent-images]" in out.stdout, out.stdout
