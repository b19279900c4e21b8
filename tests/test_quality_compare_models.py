"""Real artifacts from the converter tell the device how to compare a shadow model:
``extra["task_outputs"]`` for raw heads, the in-graph answers when post-processing is
part of the graph; real onnxruntime outputs then agree or disagree in task terms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edge_sdk
from converters import ConvertConfig, convert
from converters._measure import MeasureConfig
from edge_sdk.quality import Comparer
from tests._prepost_models import classifier, detector, images

FAST = ConvertConfig(measure=MeasureConfig(rounds=1, runs_per_round=2, warmup=0))

pytestmark = pytest.mark.slow


def _swap_classes(src: Path, dst: Path, name: str, a: int, b: int, axis: int) -> Path:
    """``src`` with two classes' weights of initializer ``name`` swapped along
    ``axis``: the perturbed last layer of a bad candidate."""
    model = onnx.load(str(src))
    t = next(t for t in model.graph.initializer if t.name == name)
    arr = np.moveaxis(numpy_helper.to_array(t).copy(), axis, 0)
    arr[[a, b]] = arr[[b, a]]
    t.CopyFrom(numpy_helper.from_array(np.moveaxis(arr, 0, axis).copy(), name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("compare")
    cls = classifier(d / "cls.onnx")
    out = {"cls": convert(cls, d / "cls", quantize="none", task="classify",
                          config=FAST).artifact.path,
           "det": convert(detector(d / "det.onnx"), d / "det", quantize="none",
                          config=FAST).artifact.path,
           "det-answers": convert(detector(d / "det2.onnx"), d / "det-answers",
                                  quantize="none", preprocess="image:resize=letterbox",
                                  postprocess="detect:layout=yolov8,score=0.25,iou=0.45",
                                  config=FAST).artifact.path}
    feed = {"input": images(16, 32, 32).transpose(0, 3, 1, 2).astype(np.float32) / 255}
    top = int(np.bincount(edge_sdk.load(out["cls"]).predict(feed)["logits"].argmax(1)).argmax())
    bad = _swap_classes(cls, d / "cls-bad.onnx", "w2", top, (top + 1) % 10, axis=1)
    out["cls-bad"] = convert(bad, d / "cls-bad", quantize="none", task="classify",
                             config=FAST).artifact.path
    return out


def test_converter_writes_task_outputs_for_raw_heads(arts: dict[str, Path]) -> None:
    cls = edge_sdk.Artifact.from_dir(arts["cls"]).manifest
    assert cls.extra["task_outputs"] == {"logits": {"kind": "top1"}}
    det = edge_sdk.Artifact.from_dir(arts["det"]).manifest
    assert det.extra["task_outputs"] == {"output0": {"kind": "detect-yolov8",
                                                     "sigmoid": False}}
    assert Comparer.for_manifest(det).plan() == {"output0": "detect-yolov8"}


def test_in_graph_answers_need_no_task_outputs(arts: dict[str, Path]) -> None:
    m = edge_sdk.Artifact.from_dir(arts["det-answers"]).manifest
    assert "task_outputs" not in m.extra
    c = Comparer.for_manifest(m)
    assert c.basis == "postprocess" and c.plan() == {"boxes": "detections"}
    model = edge_sdk.load(arts["det-answers"])
    out = model.predict({"image": images(2, 48, 96)})
    assert c.compare(out, model.predict({"image": images(2, 48, 96)})).agree
    fewer = {k: v[1:] for k, v in out.items()}  # the best detection of image 0 lost
    got = c.compare(out, fewer)
    assert not got.agree and got.detail.startswith("row 0: detection of class 1 lost")


def test_a_perturbed_last_layer_disagrees_and_its_twin_agrees(
        arts: dict[str, Path]) -> None:
    serving = edge_sdk.load(arts["cls"])
    c = Comparer.for_manifest(serving.manifest)
    feed = {"input": images(16, 32, 32).transpose(0, 3, 1, 2).astype(np.float32) / 255}
    a = serving.predict(feed)
    assert c.compare(a, edge_sdk.load(arts["cls"]).predict(feed)).agree
    b = edge_sdk.load(arts["cls-bad"]).predict(feed)
    got = c.compare(a, b)
    assert not got.agree and got.score == 0.0 and " -> " in got.detail


def test_raw_detector_head_judged_by_its_detections(arts: dict[str, Path]) -> None:
    model = edge_sdk.load(arts["det"])
    c = Comparer.for_manifest(model.manifest)
    feed = {"images": images(2, 64, 64).transpose(0, 3, 1, 2).astype(np.float32) / 255}
    out = model.predict(feed)
    assert c.compare(out, model.predict(feed)).agree
    moved = out["output0"].copy()
    moved[1, 0, 0] += 12  # image 1's best box (class 1) moves right by 12 px of 20
    got = c.compare(out, {"output0": moved})
    assert not got.agree and got.detail.startswith("row 1: detection of class 1 at IoU")
