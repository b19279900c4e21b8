"""Accuracy in the model's own terms: classification, detection, segmentation,
embeddings, regression; the task recorded in the manifest; and auto refusing a
candidate whose task metric breaks the budget however high its cosine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from converters import ConversionResult, convert
from converters._tasks import (
    DetectConfig,
    OutputMetric,
    TaskPlan,
    TaskScorer,
    class_changes,
    match_detections,
    nms,
    parse_output_metrics,
    plan_task,
    score_cosine,
    score_detect,
    score_regress,
    score_segment,
    score_top1,
)
from edge_sdk.cli import main
from edge_sdk.errors import ArtifactError, UsageError
from tests import _convert_models as M
from tests._convert_checks import FAST


def _det(*rows: tuple[float, float, float, float, float, int]) -> np.ndarray:
    return np.array(rows, np.float64).reshape(-1, 6)


# ---------------------------------------------------------------- detection, by hand

def test_detection_that_changes_class_at_the_same_place_is_not_matched() -> None:
    src = _det((0, 0, 10, 10, 0.72, 0), (20, 20, 30, 30, 0.9, 1))
    cand = _det((0, 0, 10, 10, 0.56, 2), (20, 20, 30, 30, 0.9, 1))
    assert match_detections(src, cand) == (2, 4)
    assert class_changes(src, cand) == 1


def test_detections_match_at_iou_half_and_not_below() -> None:
    src = _det((0, 0, 10, 10, 0.9, 0))
    # Shifted right by 3: IoU 70/130 = 0.54; by 4: 60/140 = 0.43.
    assert match_detections(src, _det((3, 0, 13, 10, 0.9, 0))) == (2, 2)
    assert match_detections(src, _det((4, 0, 14, 10, 0.9, 0))) == (0, 2)


def test_detection_dipping_just_under_the_threshold_is_not_counted_lost() -> None:
    src = _det((0, 0, 10, 10, 0.27, 0))
    assert match_detections(src, _det((0, 0, 10, 10, 0.23, 0))) == (1, 1)
    assert match_detections(src, _det((0, 0, 10, 10, 0.10, 0))) == (0, 1)


def test_nms_suppresses_overlaps_within_a_class_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], np.float64)
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]])
    dets = nms(boxes, scores, threshold=0.25, iou_threshold=0.45, max_detections=10)
    assert [(round(d[4], 2), int(d[5])) for d in dets] == [(0.9, 0), (0.7, 1)]


def test_yolov5_layout_scores_are_objectness_times_class() -> None:
    # [N, 5+C]: one confident box of class 1, one with low objectness.
    rows = np.zeros((16, 7), np.float32)
    rows[:, 2:4] = 1.0
    rows[0] = [50, 50, 20, 20, 0.9, 0.1, 0.8]
    rows[1] = [10, 10, 20, 20, 0.1, 0.9, 0.1]
    out = rows[None]
    score = score_detect([out], [out], "detect-yolov5")
    assert score.details["detections_source"] == 1
    assert score.score == 1.0


def test_detection_worst_image_breaks_the_budget_though_the_pooled_share_holds() -> None:
    """Nine images keep all 20 detections; the tenth changes the class of 3 of its 5:
    pooled, 98.4% of detections still match (budget 98%), but that image is far below
    the 90% floor."""
    def image(n: int, flip: int) -> np.ndarray:
        out = np.zeros((1, 4 + 2, 32), np.float32)
        out[0, 2:4] = 5.0  # w, h
        for i in range(n):
            out[0, 0, i], out[0, 1, i] = 10.0 * i, 0.0
            out[0, 4 + (1 if i < flip else 0), i] = 0.9
        return out

    ref = [image(20, 0) for _ in range(9)] + [image(5, 0)]
    cand = [image(20, 0) for _ in range(9)] + [image(5, 3)]
    plan = TaskPlan("detect", {"output0": OutputMetric("detect-yolov8")})
    acc = TaskScorer(plan)([{"output0": c} for c in cand], [{"output0": r} for r in ref])
    assert acc.drop <= 0.02
    assert acc.worst is not None and acc.worst["index"] == 9
    assert not acc.within(0.02)
    assert any("sample 9" in b for b in acc.breaks)


# ---------------------------------------------------------------- the other tasks, by hand

def test_top1_reports_agreement_top5_overlap_and_probability_change() -> None:
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    cand = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6]])
    s = score_top1([cand], [ref])
    assert s.score == 0.75
    assert s.details["top5_overlap"] == 1.0
    assert s.details["max_probability_change"] == pytest.approx(0.2)
    assert s.worst()[0] == 2  # the flipped sample


def test_top1_over_token_positions_counts_each_position_of_a_sample() -> None:
    ref = np.zeros((2, 4, 3))  # two samples, 4 tokens, 3 classes
    ref[..., 0] = 1.0
    cand = ref.copy()
    cand[1, 3, 2] = 2.0  # one token of the second sample flips
    s = score_top1([cand[:1], cand[1:]], [ref[:1], ref[1:]])
    assert s.score == pytest.approx(7 / 8)
    assert s.worst()[0] == 1 and s.worst()[1] >= 0.25


def test_segment_iou_is_per_class_from_the_argmax_over_the_class_axis() -> None:
    ref = np.zeros((1, 3, 4, 4), np.float32)
    ref[0, 0] = 1.0  # all class 0 ...
    ref[0, 1, :2] = 2.0  # ... but the top half is class 1
    cand = ref.copy()
    cand[0, 2, 0, :] = 3.0  # the first row becomes class 2
    s = score_segment([cand], [ref])
    ious = s.details["iou_per_class"]
    assert ious == {"0": 1.0, "1": 0.5, "2": 0.0}
    assert s.score == pytest.approx(0.5)


def test_embedding_cosine_is_per_sample_not_over_the_flattened_batch() -> None:
    ref = np.array([[100.0, 0.0, 0.0], [0.0, 0.01, 0.0]])
    cand = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.01]])  # second sample: orthogonal
    flat = float(np.dot(ref.ravel(), cand.ravel()) /
                 (np.linalg.norm(ref) * np.linalg.norm(cand)))
    assert flat > 0.999
    s = score_cosine([cand], [ref])
    assert s.score == pytest.approx(0.5)
    assert s.worst() == (1, pytest.approx(1.0))


def test_regression_error_is_absolute_and_relative_to_the_outputs_scale() -> None:
    ref = [np.array([[10.0], [20.0]]), np.array([[30.0], [40.0]])]
    cand = [np.array([[10.5], [20.0]]), np.array([[30.0], [38.0]])]
    s = score_regress(cand, ref)
    assert s.details["mean_abs_error"] == pytest.approx(2.5 / 4)
    assert s.details["max_abs_error"] == pytest.approx(2.0)
    assert s.drop == pytest.approx((2.5 / 4) / 25.0)
    assert s.worst()[0] == 3


# ---------------------------------------------------------------- planning

def test_task_is_detected_from_detector_layout_softmax_head_and_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    det = np.concatenate([rng.uniform(0, 300, (1, 4, 64)), rng.uniform(0, 1, (1, 3, 64))], 1)
    assert plan_task(None, (), [{"output0": det}], {}).task == "detect"
    probs = np.array([[0.2, 0.8]], np.float32)
    assert plan_task(None, (), [{"p": probs}], {}).task == "classify"
    hidden = rng.normal(0, 1, (1, 16, 32)).astype(np.float32)  # a transformer's states
    assert plan_task(None, (), [{"h": hidden}], {}).task == "generic"
    reg = {"sklearn": {"estimator": "Ridge", "task": "regress"}}
    assert plan_task(None, (), [{"variable": np.ones((1, 1))}], reg).task == "regress"


def test_metric_output_kind_syntax_is_validated_in_one_line() -> None:
    assert parse_output_metrics(("output0:detect-yolov8", "a:b:cosine")) == {
        "output0": "detect-yolov8", "a:b": "cosine"}
    for bad in ("output0:iou", ":top1", "output0:"):
        with pytest.raises(UsageError, match="OUTPUT:KIND"):
            parse_output_metrics((bad,))
    with pytest.raises(UsageError, match="no output 'nope'"):
        plan_task(None, ("nope:top1",), [{"logits": np.ones((1, 3))}], {})


# ---------------------------------------------------------------- manifests

def test_old_manifest_without_task_loads_as_generic_and_bad_task_is_refused(
    tmp_path: Path,
) -> None:
    from tests._models import add_model

    art = edge_sdk.build_artifact(add_model(tmp_path / "m.onnx"), tmp_path / "art",
                                  name="m", version="1")
    data = json.loads((art.path / "manifest.json").read_text())
    assert data["task"] == "generic"
    del data["task"]
    assert edge_sdk.Manifest.from_json(data).task == "generic"
    with pytest.raises(ArtifactError, match="task 'kitten'"):
        edge_sdk.Manifest.from_json({**data, "task": "kitten"})


# ---------------------------------------------------------------- through convert

@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("detector")
    np.savez(d / "photos.npz", images=M.images(32, 32))
    return M.yolo_like_detector(d / "det.onnx"), d / "photos.npz"


def _rows(res: ConversionResult) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in res.report["candidates"]}


def test_auto_refuses_int8_detector_that_flips_classes_though_cosine_accepts_it(
    detector: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, photos = detector
    old = convert(model, tmp_path / "old", calibration=photos, task="generic", config=FAST)
    new = convert(model, tmp_path / "new", calibration=photos, config=FAST)
    old_rows, new_rows = _rows(old), _rows(new)
    static = [n for n in new_rows if n.startswith("int8-static")]
    assert static
    for name in static:
        # The whole-tensor cosine (the old metric) keeps it well within its budget ...
        assert old_rows[name]["accuracy"]["drop"] <= old.report["metric"]["max_drop"]
        assert old_rows[name]["accuracy"]["score"] > 0.999
        assert old_rows[name]["status"] != "over-budget"
        # ... while detections change class, and auto refuses it.
        det = new_rows[name]["accuracy"]["details"]["output0"]
        assert det["class_changed"] >= 1
        assert new_rows[name]["status"] == "over-budget"
    assert new.chosen in ("fp32", "fp16")
    assert new.report["task"]["name"] == "detect"
    assert new.report["task"]["outputs"] == {"output0": "detect-yolov8"}
    assert new.report["data"]["verified_on_real_data"] is True
    worst = new.report["data"]["worst_sample"]
    assert worst["output"] == "output0" and isinstance(worst["index"], int)
    assert new.artifact.manifest.task == "detect"
    assert old.artifact.manifest.task == "generic"


def test_forced_int8_detector_over_its_task_budget_is_not_called_verified(
    detector: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, photos = detector
    with pytest.raises(edge_sdk.ConversionError, match="detect-yolov8"):
        convert(model, tmp_path / "refused", calibration=photos, quantize="int8-static",
                config=FAST)
    res = convert(model, tmp_path / "forced", calibration=photos, quantize="int8-static",
                  force=True, config=FAST)
    assert res.report["data"]["verified_on_real_data"] is False
    assert res.report["data"]["task_budget_held"] is False
    assert "task metric broke its budget" in (res.artifact.path / "report.md").read_text()
    manifest = json.loads((res.artifact.path / "manifest.json").read_text())
    assert manifest["accuracy"]["verified_on_real_data"] is False
    assert manifest["accuracy"]["breaks"]


def test_metric_flag_names_the_detector_output_and_inspect_shows_the_task(
    detector: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model, photos = detector
    out = tmp_path / "art"
    code = main(["convert", str(model), "-o", str(out), "--calibration", str(photos),
                 "--metric", "output0:detect-yolov8",
                 "--quantize", "fp16"])
    text = capsys.readouterr().out
    assert code == 0
    assert "task metric: output0: detect-yolov8" in text and "worst sample: #" in text
    assert main(["inspect", str(out)]) == 0
    assert "task: detect" in capsys.readouterr().out


def test_bad_metric_flag_is_one_line_and_non_zero(
    detector: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model, photos = detector
    code = main(["convert", str(model), "-o", str(tmp_path / "x"), "--calibration",
                 str(photos), "--metric", "output0:iou"])
    err = capsys.readouterr().err
    assert code != 0 and "OUTPUT:KIND" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_segmenter_is_judged_by_mean_iou_per_class(tmp_path: Path) -> None:
    model = M.tiny_segmenter(tmp_path / "seg.onnx")
    np.savez(tmp_path / "img.npz", input=M.images(16, 32))
    res = convert(model, tmp_path / "art", calibration=tmp_path / "img.npz", task="segment",
                  config=FAST)
    chosen = _rows(res)[res.chosen]["accuracy"]
    assert chosen["metric"] == "segment"
    details = chosen["details"]["masks"]
    assert details["mean_iou"] >= 0.98 and details["iou_per_class"]
    assert res.artifact.manifest.task == "segment"


def test_classifier_logits_named_with_top1_are_judged_by_agreement(tmp_path: Path) -> None:
    model = M.mlp_classifier(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "tab.npz", features=M.tabular(24))
    res = convert(model, tmp_path / "art", calibration=tmp_path / "tab.npz",
                  output_metrics=("logits:top1",), config=FAST)
    acc = _rows(res)[res.chosen]["accuracy"]
    assert acc["task"] == "classify" and acc["metric"] == "top1"
    assert set(acc["details"]["logits"]) >= {"top1_agreement", "top5_overlap",
                                             "max_probability_change"}
    assert res.artifact.manifest.task == "classify"


def test_softmax_head_is_detected_as_classification_through_convert(tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(M.mlp_classifier(tmp_path / "mlp.onnx")))
    model.graph.output[0].name = "probabilities"
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"],
                                             axis=-1))
    onnx.save(model, str(tmp_path / "softmax.onnx"))
    np.savez(tmp_path / "tab.npz", features=M.tabular(24))
    res = convert(tmp_path / "softmax.onnx", tmp_path / "art",
                  calibration=tmp_path / "tab.npz", config=FAST)
    assert res.report["task"]["detected_from"] == "softmax/probabilities head"
    assert res.report["task"]["outputs"] == {"probabilities": "top1"}
    assert res.artifact.manifest.task == "classify"


@pytest.mark.parametrize(("task", "metric", "figure"), [("embed", "cosine", "min_cosine"),
                                                        ("regress", "regress",
                                                         "relative_error")])
def test_embed_and_regress_tasks_score_every_sample(
    tmp_path: Path, task: str, metric: str, figure: str,
) -> None:
    model = M.mlp_classifier(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "tab.npz", features=M.tabular(24))
    res = convert(model, tmp_path / "art", calibration=tmp_path / "tab.npz", task=task,
                  config=FAST)
    acc = _rows(res)[res.chosen]["accuracy"]
    assert acc["metric"] == metric and figure in acc["details"]["logits"]
    assert acc["samples"] >= 2
    assert res.artifact.manifest.task == task


def test_detect_config_defaults_are_the_documented_ones() -> None:
    cfg = DetectConfig()
    assert (cfg.score_threshold, cfg.nms_iou, cfg.match_iou) == (0.25, 0.45, 0.5)


@pytest.mark.parametrize(("kind", "task"), [("classifier", "classify"),
                                            ("regressor", "regress")])
def test_scikit_learn_estimator_says_its_task(tmp_path: Path, kind: str, task: str) -> None:
    from sklearn.linear_model import LogisticRegression, Ridge

    from tests import _framework_models as fm

    x, y = fm.sklearn_inputs()
    est = LogisticRegression().fit(x, y) if kind == "classifier" else Ridge().fit(
        x, x @ np.arange(fm.FEATURES, dtype=np.float32))
    res = convert(fm.save_pickle(est, tmp_path / "est.pkl"), tmp_path / "art",
                  calibration=fm.save_npz(tmp_path / "calib.npz", input=x),
                  trust_pickle=True, quantize="none", config=FAST)
    assert res.artifact.manifest.task == task
    assert res.report["task"]["detected_from"].startswith("scikit-learn")
    assert res.report["data"]["verified_on_real_data"] is True
