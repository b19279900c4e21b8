"""``convert --preprocess/--postprocess/--labels``: an artifact that answers raw uint8
images with labels and boxes, verified against the source model run inside a numpy
reference pipeline, and a training-serving skew caught at conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_sdk
from converters import ConvertConfig, convert
from converters._measure import MeasureConfig
from converters._prepost import Bound, PipelineSpec
from converters._prepost_ref import postprocess, preprocess
from edge_sdk.cli import main
from edge_sdk.errors import UsageError
from tests._prepost_models import ANCHORS, classifier, detector, images, segmenter

FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=3, warmup=1))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET = "mean=0.485/0.456/0.406,std=0.229/0.224/0.225"


def reference_answers(model: Path, pre: str, post: str, img: np.ndarray,
                      size: tuple[int, int], model_input: str, output: str,
                      **bound: object) -> dict[str, np.ndarray]:
    """The source model (onnxruntime) inside the numpy reference pipeline."""
    spec = PipelineSpec.from_options(pre, post, None)
    assert spec is not None
    b = Bound(spec, model_input, "float32", size, "nchw", output, **bound)  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(model))
    raw = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, preprocess(b, img)),
                   strict=True))
    return postprocess(b, raw, img.shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prepost")
    np.savez(d / "photos.npz", image=images(8, 40, 52))
    (d / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    return {"dir": d, "cls": classifier(d / "cls.onnx"), "det": detector(d / "det.onnx")}


def test_classifier_artifact_answers_raw_images_with_the_reference_labels(
        models: dict[str, Path], tmp_path: Path) -> None:
    pre = f"image:size=32x32,resize=letterbox,{IMAGENET}"
    res = convert(models["cls"], tmp_path / "art", eval=models["dir"] / "photos.npz",
                  preprocess=pre, postprocess="classify:topk=3",
                  labels=models["dir"] / "labels.txt", config=FAST)
    acc = res.report["pipeline"]["accuracy"]
    assert acc["held"] and acc["verified_on_real_data"], acc
    assert res.report["pipeline"]["reference"]["max_abs_diff"] < 1e-5  # graph == numpy
    assert res.report["task"]["detected_from"] == "--postprocess"  # no --task was given
    art = edge_sdk.Artifact.from_dir(res.artifact.path)
    m = art.manifest.extra
    assert m["labels"] == [f"class {i}" for i in range(10)]
    assert m["preprocess"]["resize"] == "letterbox" and m["postprocess"]["softmax_added"]
    assert set(m["answers"]) == {"scores", "class_ids"}
    assert [i.name for i in art.manifest.inputs] == ["image"]
    model = edge_sdk.load(res.artifact.path)
    for h, w in ((32, 32), (75, 41), (19, 120)):  # sizes the evaluation never saw
        img = images(2, h, w, seed=h)
        got = model.predict({"image": img})
        want = reference_answers(models["cls"], pre, "classify:topk=3", img, (32, 32),
                                 "input", "logits", classes=10, softmax=True)
        assert np.array_equal(got["class_ids"], want["class_ids"]) or res.chosen != "fp32"
        assert np.array_equal(got["class_ids"][:, 0], want["class_ids"][:, 0]), (h, w)
        assert np.allclose(got["scores"].sum(-1), want["scores"].sum(-1), atol=0.05)
        one = model.predict({"image": img[1:]})  # a batch answers like its images
        assert np.array_equal(one["class_ids"][0], got["class_ids"][1])


def test_detector_boxes_come_back_in_original_pixels_with_the_letterbox_undone(
        models: dict[str, Path], tmp_path: Path) -> None:
    img = images(3, 48, 96)  # letterboxed into 64x64: scale 2/3, 16 px bands top and bottom
    np.savez(tmp_path / "wide.npz", image=img)
    pre, post = "image:resize=letterbox", "detect:layout=yolov8,score=0.25,iou=0.45,max=100"
    res = convert(models["det"], tmp_path / "art", eval=tmp_path / "wide.npz", quantize="none",
                  preprocess=pre, postprocess=post, config=FAST)
    assert res.report["pipeline"]["accuracy"]["matched_share"] == 1.0
    assert res.report["pipeline"]["batch"] == {"images": 3, "same_answers": True}
    got = edge_sdk.load(res.artifact.path).predict({"image": img[:2]})
    # By hand: x = x_model / (2/3), y = (y_model - 16) / (2/3), clipped to the image.
    r, top = 2 / 3, 16
    x0, y0 = ANCHORS[:, 0] - ANCHORS[:, 2] / 2, ANCHORS[:, 1] - ANCHORS[:, 3] / 2
    x1, y1 = x0 + ANCHORS[:, 2], y0 + ANCHORS[:, 3]
    hand = np.stack([x0 / r, (y0 - top) / r, x1 / r, (y1 - top) / r], 1)
    hand = np.clip(hand, 0, [96, 48, 96, 48])[[0, 2, 3]]  # anchor 1 is suppressed
    assert hand[2, 1] == 0.0  # the padding part was clipped away
    np.testing.assert_allclose(got["boxes"], np.concatenate([hand, hand]), atol=1e-3)
    assert got["class_ids"].tolist() == [1, 2, 0] * 2
    assert got["batch_index"].tolist() == [0, 0, 0, 1, 1, 1]
    want = reference_answers(models["det"], pre, post, img[:1], (64, 64), "images", "output0",
                             classes=3)
    one = edge_sdk.load(res.artifact.path).predict({"image": img[:1]})
    np.testing.assert_allclose(one["boxes"], want["boxes"], atol=1e-3)
    np.testing.assert_allclose(one["scores"], want["scores"], atol=1e-5)
    assert one["class_ids"].tolist() == want["class_ids"].tolist()


def test_mean_and_std_swapped_against_the_training_tensors_is_reported_as_skew(
        models: dict[str, Path], tmp_path: Path) -> None:
    img = images(6, 32, 32, seed=5)
    trained = ((img / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "train.npz", image=img, input=trained.astype(np.float32))
    swapped = "image:size=32x32,mean=0.229/0.224/0.225,std=0.485/0.456/0.406"
    res = convert(models["cls"], tmp_path / "bad", eval=tmp_path / "train.npz",
                  quantize="none", preprocess=swapped, postprocess="classify:topk=1",
                  config=FAST)
    skew = [w for w in res.warnings if w.startswith("training-serving skew")]
    assert skew and "'input'" in skew[0], res.warnings
    assert res.report["data"]["verified_on_real_data"] is False
    assert "skew" in res.report["data"]["not_verified_why"]
    assert edge_sdk.Artifact.from_dir(res.artifact.path).manifest.extra[
        "pipeline"]["skew"]["held"] is False
    good = convert(models["cls"], tmp_path / "good", eval=tmp_path / "train.npz",
                   quantize="none", preprocess=f"image:size=32x32,{IMAGENET}",
                   postprocess="classify:topk=1", config=FAST)
    assert not [w for w in good.warnings if "skew" in w]
    assert good.report["pipeline"]["skew"]["held"] is True
    assert good.report["data"]["verified_on_real_data"] is True


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--preprocess", "image:size=big", "size='big': expected HxW"),
    ("--preprocess", "image:resize=squash", "resize='squash': expected one of"),
    ("--preprocess", "image:mean=1/2", "mean='1/2': expected one number or three"),
    ("--preprocess", "image:std=0/1/1", "std='0': expected a number > 0"),
    ("--preprocess", "image:colour=rgb", "unknown key 'colour'"),
    ("--preprocess", "picture:size=32x32", "expected one of image"),
    ("--postprocess", "classify:topk=0", "topk='0': expected a whole number >= 1"),
    ("--postprocess", "detect:layout=yolov9", "layout='yolov9': expected one of"),
    ("--postprocess", "detect:score=2", "score='2': expected a number in [0.0, 1.0]"),
    ("--postprocess", "rank:topk=3", "expected one of classify, detect"),
    ("--labels", "{dir}/missing.txt", "no such file"),
    ("--labels", "{dir}/three.txt", "3 labels, but classifier output 'logits' has 10"),
])
def test_bad_spec_is_one_line_error_and_writes_nothing(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        flag: str, value: str, message: str) -> None:
    (models["dir"] / "three.txt").write_text("a\nb\nc\n")
    out = tmp_path / "art"
    args = ["convert", str(models["cls"]), "-o", str(out), "--quantize", "none",
            "--preprocess", "image:size=32x32", "--postprocess", "classify"]
    args += [flag, value.format(dir=models["dir"])]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("edge-sdk: error:") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_tflite_target_refuses_in_graph_pipeline_naming_what_to_use(
        models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="use --to onnx or --to ort"):
        convert(models["cls"], tmp_path / "art", to="tflite", preprocess="image:size=32x32")
    assert not (tmp_path / "art").exists()


def test_ort_artifact_carries_the_pipeline_and_json_report_says_so(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    code = main(["convert", str(models["cls"]), "-o", str(out), "--to", "ort", "--quantize",
                 "none", "--eval", str(models["dir"] / "photos.npz"), "--preprocess",
                 f"image:size=32x32,resize=center-crop,{IMAGENET}", "--postprocess",
                 "classify:topk=2", "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "pipeline (raw images in" in text and "top-1 labels agree 100.00%" in text
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"]["accuracy"]["held"]
    assert "Pipeline (raw images in" in (out / "report.md").read_text()
    model = edge_sdk.load(out)
    assert model.format == "ort"
    got = model.predict({"image": images(1, 50, 30)})
    assert got["class_ids"].shape == (1, 2) and got["class_ids"].dtype == np.int64


@pytest.mark.parametrize(("post", "key"), [("segment:argmax", "class_map"),
                                           ("embed:l2norm", "embedding")])
def test_segment_and_embed_answers_match_the_reference_even_when_names_collide(
        tmp_path: Path, post: str, key: str) -> None:
    model = segmenter(tmp_path / "seg.onnx")
    img = images(3, 24, 40, seed=7)
    np.savez(tmp_path / "photos.npz", image=img)
    pre = "image:resize=letterbox"
    res = convert(model, tmp_path / "art", eval=tmp_path / "photos.npz", quantize="none",
                  preprocess=pre, postprocess=post, config=FAST)
    assert res.report["pipeline"]["accuracy"]["held"]
    got = edge_sdk.load(res.artifact.path).predict({"image": img[:1]})
    want = reference_answers(model, pre, post, img[:1], (16, 16), "image", "scores",
                             classes=4)
    if key == "class_map":
        assert got[key].shape == (1, 24, 40)  # the input image's size
        assert np.mean(got[key] == want[key]) > 0.99
    else:
        np.testing.assert_allclose(np.linalg.norm(got[key], axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def _head(path: Path, layout: str, logits: bool, anchors: int = 20, classes: int = 3,
          size: int = 32) -> Path:
    """A detection head of ``layout`` with random boxes and scores that depend on the
    image (a 1x1 conv of a pooled input added to constant logits)."""
    rng = np.random.default_rng(11)
    cxcy = rng.uniform(4, size - 4, (anchors, 2))
    wh = rng.uniform(3, size / 2, (anchors, 2))
    boxes = np.concatenate([cxcy, wh], 1).astype(np.float32)  # [A, 4]
    raw = rng.normal(0, 2, (anchors, classes + 1)).astype(np.float32)
    sig = 1 / (1 + np.exp(-raw))
    scores = raw if logits else sig.astype(np.float32)
    inits = [numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shp"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "eps")]
    nodes = [helper.make_node("ReduceMean", ["images"], ["m4"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Reshape", ["m4", "shp"], ["m"]),
             helper.make_node("Mul", ["m", "eps"], ["d"])]
    outs: list[tuple[str, np.ndarray]] = []
    if layout == "yolov5":  # [N, A, 5+C]: box, objectness, classes
        outs.append(("output0", np.concatenate([boxes, scores], 1)[None]))
    elif layout == "yolov8":
        outs.append(("output0", np.concatenate([boxes, scores[:, 1:]], 1).T[None]))
    else:  # corner boxes [N, A, 4] and scores [N, C, A]
        corners = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2,
                                  boxes[:, :2] + boxes[:, 2:] / 2], 1)
        outs += [("boxes", corners[None]), ("cls_scores", scores[:, 1:].T[None])]
    vis = []
    for name, arr in outs:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name + "_c"))
        nodes.append(helper.make_node("Add", [name + "_c", "d"], [name]))
        vis.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                 ["N", *arr.shape[1:]]))
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        vis, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("layout", ["yolov8", "yolov5", "boxes-scores"])
@pytest.mark.parametrize("logits", [False, True])
def test_every_detect_layout_decodes_like_the_reference(
        tmp_path: Path, layout: str, logits: bool) -> None:
    model = _head(tmp_path / "head.onnx", layout, logits)
    img = images(2, 30, 45, seed=3)
    np.savez(tmp_path / "photos.npz", image=img)
    pre, post = "image:resize=letterbox", f"detect:layout={layout},score=0.3,iou=0.5,max=4"
    res = convert(model, tmp_path / "art", eval=tmp_path / "photos.npz", quantize="none",
                  preprocess=pre, postprocess=post, config=FAST)
    manifest = edge_sdk.Artifact.from_dir(res.artifact.path).manifest.extra
    assert manifest["postprocess"]["sigmoid_added"] is logits
    got = edge_sdk.load(res.artifact.path).predict({"image": img})
    assert 0 < len(got["scores"]) <= 8 and np.bincount(got["batch_index"]).max() <= 4
    for b in range(2):
        sel = got["batch_index"] == b
        want = reference_answers(
            model, pre, post, img[b:b + 1], (32, 32), "images",
            "boxes" if layout == "boxes-scores" else "output0", classes=3, sigmoid=logits,
            partner="cls_scores" if layout == "boxes-scores" else None, scores_t=True)
        np.testing.assert_allclose(got["boxes"][sel], want["boxes"], atol=1e-3)
        np.testing.assert_allclose(got["scores"][sel], want["scores"], atol=1e-5)
        assert got["class_ids"][sel].tolist() == want["class_ids"].tolist()


def test_postprocess_alone_answers_the_model_input_tensors(tmp_path: Path) -> None:
    model = classifier(tmp_path / "cls.onnx")
    x = np.random.default_rng(2).normal(0, 1, (6, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    res = convert(model, tmp_path / "art", eval=tmp_path / "calib.npz", quantize="none",
                  postprocess="classify:topk=4", config=FAST)
    assert res.report["pipeline"]["accuracy"]["held"]
    pred = edge_sdk.load(res.artifact.path)
    assert [i.name for i in pred.inputs] == ["input"]
    got = pred.predict({"input": x[:2]})
    logits = ort.InferenceSession(str(model)).run(None, {"input": x[:2]})[0]
    assert got["class_ids"].tolist() == np.argsort(-logits, axis=1)[:, :4].tolist()


def test_without_images_synthetic_ones_check_the_pipeline_but_do_not_verify_it(
        models: dict[str, Path], tmp_path: Path) -> None:
    res = convert(models["cls"], tmp_path / "art", quantize="none",
                  preprocess="image:size=32x32", postprocess="classify", config=FAST)
    sec = res.report["pipeline"]
    assert sec["images"]["origin"] == "synthetic" and sec["images"]["count"] == 3
    assert sec["accuracy"]["held"] and not sec["accuracy"]["verified_on_real_data"]
    assert res.report["data"]["verified_on_real_data"] is False


def test_auto_quantizes_the_model_part_only_and_pre_alone_keeps_the_outputs(
        models: dict[str, Path], tmp_path: Path) -> None:
    photos = models["dir"] / "photos.npz"
    res = convert(models["cls"], tmp_path / "q", calibration=photos, eval=photos,
                  quantize="int8-static", preprocess=f"image:size=32x32,{IMAGENET}",
                  postprocess="classify:topk=2", force=True, config=FAST)
    graph = onnx.load(str(res.artifact.model_path)).graph
    ours = [n for n in graph.node if n.name.startswith("prepost/")]
    quant = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
    assert ours and not [n for n in ours if n.op_type in quant]
    assert [n for n in graph.node if n.op_type in quant]  # the model part is int8
    pre_only = convert(models["cls"], tmp_path / "pre", eval=photos, quantize="none",
                       preprocess=f"image:size=32x32,{IMAGENET}", config=FAST)
    pred = edge_sdk.load(pre_only.artifact.path)
    assert [o.name for o in pred.outputs] == ["logits"]
    assert pre_only.report["pipeline"]["accuracy"]["mean_cosine"] > 0.9999
    det = convert(models["det"], tmp_path / "det", quantize="none",
                  preprocess="image:resize=stretch", postprocess="detect", config=FAST)
    assert edge_sdk.load(det.artifact.path).inputs[0].shape[0] == "batch"


def test_labels_alone_go_into_the_manifest_and_must_match_the_classes(
        tmp_path: Path) -> None:
    model = classifier(tmp_path / "cls.onnx", classes=3)
    (tmp_path / "abc.txt").write_text("cat\ndog\n\nbird\n\n")  # a blank line inside is kept
    with pytest.raises(UsageError, match="4 labels, but output 'logits' has 3 classes"):
        convert(model, tmp_path / "art", quantize="none", task="classify",
                labels=tmp_path / "abc.txt", config=FAST)
    (tmp_path / "abc.txt").write_text("cat\ndog\nbird\n")
    res = convert(model, tmp_path / "art", quantize="none", task="classify",
                  labels=tmp_path / "abc.txt", config=FAST)
    extra = edge_sdk.Artifact.from_dir(res.artifact.path).manifest.extra
    assert extra["labels"] == ["cat", "dog", "bird"] and "postprocess" not in extra


def test_an_opset_10_model_is_upgraded_before_the_pipeline_goes_around_it(
        tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])], "old",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]), str(path))
    res = convert(path, tmp_path / "art", quantize="none", preprocess="image", config=FAST)
    assert any("upgraded opset 10" in n for n in res.report["normalization"])
    out = edge_sdk.load(res.artifact.path).predict({"image": images(1, 5, 9)})["out"]
    assert out.shape == (1, 3, 8, 8) and out.max() <= 1.0


def test_a_model_whose_input_is_named_image_takes_its_tensors_as_model_image(
        tmp_path: Path) -> None:
    model = segmenter(tmp_path / "seg.onnx")
    img = images(4, 16, 16, seed=9)
    tensors = (img / 255.0).transpose(0, 3, 1, 2).astype(np.float32)
    both: Any = {"image": img, "model/image": tensors[:, ::-1]}  # BGR, not what it says
    np.savez(tmp_path / "both.npz", **both)
    res = convert(model, tmp_path / "art", eval=tmp_path / "both.npz", quantize="none",
                  preprocess="image", postprocess="segment:argmax", config=FAST)
    assert res.report["pipeline"]["images"]["given_tensors"]
    assert [w for w in res.warnings if w.startswith("training-serving skew")]
    np.savez(tmp_path / "tensors.npz", image=tensors)  # the model's own input, not images
    res = convert(model, tmp_path / "art2", eval=tmp_path / "tensors.npz", quantize="none",
                  preprocess="image", postprocess="segment:argmax", config=FAST)
    assert res.report["pipeline"]["images"]["origin"] == "synthetic"


def test_framework_source_with_raw_images_is_refused_before_loading(tmp_path: Path) -> None:
    np.savez(tmp_path / "photos.npz", image=images(2, 16, 16))
    with pytest.raises(UsageError, match="raw 'image' images with a torch source"):
        convert("tests._framework_models:torch_cnn", tmp_path / "art",
                eval=tmp_path / "photos.npz", preprocess="image:size=16x16", config=FAST)
