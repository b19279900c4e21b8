"""``edge_sdk.load(art).answer(img)`` and ``edge-sdk predict ART --image``: an artifact
converted with --preprocess/--postprocess/--labels answers an image file or array with
labels, boxes, a class map or an embedding (issue 27, item 5)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from converters import ConvertConfig, convert
from converters._measure import MeasureConfig
from edge_sdk.cli import main
from edge_sdk.errors import InputError
from tests._images import encode, png_bomb, save
from tests._prepost_models import classifier, detector, images, segmenter

FAST = ConvertConfig(measure=MeasureConfig(rounds=1, runs_per_round=2, warmup=0))
NAMES = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("answers")
    (d / "labels.txt").write_text("".join(f"{n}\n" for n in NAMES))
    (d / "det.txt").write_text("cat\ndog\nbird\n")
    out = {}
    for key, model, pre, post, labels in (
            ("cls", classifier(d / "cls.onnx"), "image:size=32x32,resize=letterbox",
             "classify:topk=3", d / "labels.txt"),
            ("det", detector(d / "det.onnx"), "image:resize=letterbox",
             "detect:layout=yolov8,score=0.25,iou=0.45,max=100", d / "det.txt"),
            ("seg", segmenter(d / "seg.onnx"), "image:resize=stretch", "segment:argmax", None),
            ("emb", segmenter(d / "emb.onnx"), "image:resize=stretch", "embed:l2norm", None)):
        out[key] = convert(model, d / key, quantize="none", preprocess=pre, postprocess=post,
                           labels=labels, config=FAST).artifact.path
    out["tensor"] = convert(classifier(d / "plain.onnx"), d / "plain", quantize="none",
                            config=FAST).artifact.path
    return out


def test_classifier_answers_a_png_with_named_labels_like_its_tensors(
        arts: dict[str, Path], tmp_path: Path) -> None:
    img = images(1, 45, 60, seed=3)[0]
    png = save(tmp_path / "photo.png", img)
    model = edge_sdk.load(arts["cls"])
    raw = model.predict({"image": img[None]})
    for source in (png, str(png), img):
        answer = model.answer(source)
        assert answer.task == "classify" and len(answer.labels) == 3
        assert [lb.index for lb in answer.labels] == raw["class_ids"][0].tolist()
        assert [lb.name for lb in answer.labels] == [NAMES[i] for i in raw["class_ids"][0]]
        np.testing.assert_allclose([lb.score for lb in answer.labels], raw["scores"][0])
    assert isinstance(answer.labels[0], edge_sdk.Label)
    batch = model.answers(images(2, 45, 60, seed=3))
    assert [lb.index for lb in batch[0].labels] == raw["class_ids"][0].tolist()
    jpg = model.answer(save(tmp_path / "photo.jpg", img))  # lossy, but it decodes
    assert len(jpg.labels) == 3


def test_detector_answers_boxes_with_label_and_score_per_image(
        arts: dict[str, Path]) -> None:
    model = edge_sdk.load(arts["det"])
    batch = images(2, 48, 96)
    raw = model.predict({"image": batch})
    answers = model.answers(batch)
    assert len(answers) == 2
    for n, answer in enumerate(answers):
        mine = raw["batch_index"] == n
        assert [b.label for b in answer.boxes] == ["dog", "bird", "cat"]
        assert [b.index for b in answer.boxes] == raw["class_ids"][mine].tolist()
        np.testing.assert_allclose([[b.x0, b.y0, b.x1, b.y1] for b in answer.boxes],
                                   raw["boxes"][mine], atol=1e-4)
        np.testing.assert_allclose([b.score for b in answer.boxes], raw["scores"][mine])
        assert all(isinstance(b, edge_sdk.Box) for b in answer.boxes)
    assert model.answer(batch[1]).boxes == answers[1].boxes


def test_segmenter_and_embedder_answer_a_class_map_and_an_embedding(
        arts: dict[str, Path]) -> None:
    img = images(1, 24, 40, seed=7)[0]
    seg = edge_sdk.load(arts["seg"]).answer(img)
    assert seg.class_map is not None and seg.class_map.shape == (24, 40)
    data = seg.to_json(["sky", "road"])
    assert sum(c["pixels"] for c in data["classes"]) == 24 * 40
    assert data["classes"][0]["name"] in ("sky", "road", "2", "3")
    packed = data["class_map"]
    back = np.frombuffer(base64.b64decode(packed["base64"]), packed["dtype"])
    assert np.array_equal(back.reshape(packed["shape"]), seg.class_map)
    emb = edge_sdk.load(arts["emb"]).answer(img)
    assert emb.embedding is not None and emb.embedding.ndim == 1
    np.testing.assert_allclose(np.linalg.norm(emb.embedding), 1.0, rtol=1e-5)


def test_predict_image_prints_labels_and_json(
        arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = save(tmp_path / "photo.png", images(1, 45, 60, seed=3)[0])
    want = edge_sdk.load(arts["cls"]).answer(png)
    assert main(["predict", str(arts["cls"]), "--image", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].endswith(f"{want.labels[0].name} "
                                                 f"(class {want.labels[0].index})")
    assert main(["predict", str(arts["det"]), "--image", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "detect" and {b["label"] for b in data["boxes"]} == {
        "cat", "dog", "bird"}
    assert main(["predict", str(arts["emb"]), "--image", str(png)]) == 0
    assert capsys.readouterr().out.startswith("embedding of ")


def test_tensor_artifact_given_an_image_says_it_has_no_pre_processing(
        arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = save(tmp_path / "photo.png", images(1, 32, 32)[0])
    assert main(["predict", str(arts["tensor"]), "--image", str(png)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no --preprocess" in err and "no --postprocess" in err
    with pytest.raises(InputError, match="no --preprocess"):
        edge_sdk.load(arts["tensor"]).answer(images(1, 32, 32)[0])


def test_bad_image_file_is_a_one_line_error(
        arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"GIF89a not really")
    assert main(["predict", str(arts["cls"]), "--image", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a JPEG or PNG" in err
    gif = encode(images(1, 8, 8)[0], "GIF")  # a real image, but not a format we take
    with pytest.raises(InputError, match="not a JPEG or PNG"):
        edge_sdk.load(arts["cls"]).answer(gif)


def test_image_bomb_is_refused_from_its_header_before_decoding(
        arts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(100, 100_000))  # its pixel data would not even decode
    assert main(["predict", str(arts["cls"]), "--image", str(bomb)]) != 0
    err = capsys.readouterr().err.strip()
    assert "100x100000" in err and "not decoded" in err and "\n" not in err
    model = edge_sdk.load(arts["cls"])
    with pytest.raises(InputError, match="over max_pixels"):
        model.answer(bomb, max_pixels=1000)
    with pytest.raises(InputError, match="cannot decode"):  # under the limit: decoding fails
        model.answer(bomb, max_pixels=10**8)
