"""Shadow comparison of detectors (raw YOLOv8/YOLOv5 heads, boxes + scores, in-graph
detections) and segmenters: boxes matched by class and IoU, class maps by pixels."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pytest

from edge_sdk.quality import CompareConfig, Comparer
from tests._quality import manifest

C, N = 3, 64
Det = tuple[float, float, float, float, int, float]  # cx, cy, w, h, class, score


def yolov8(*images: Sequence[Det], noise: float = 1e-4, logits: bool = False) -> np.ndarray:
    """``[B, 4+C, N]``: each image's detections on the first anchors, the rest background
    (tiny boxes, scores 0.01), plus a little noise so nothing is bit-identical."""
    rng = np.random.default_rng(len(images))
    out = np.zeros((len(images), 4 + C, N), np.float32)
    out[:, :4] = np.array([5, 5, 2, 2], np.float32)[None, :, None]
    out[:, 4:] = 0.01
    for b, dets in enumerate(images):
        for a, (cx, cy, w, h, k, s) in enumerate(dets):
            out[b, :4, a] = (cx, cy, w, h)
            out[b, 4 + k, a] = s
    out[:, 4:] += rng.uniform(0, noise, (len(images), C, N)).astype(np.float32)
    if logits:
        out[:, 4:] = np.log(out[:, 4:] / (1 - out[:, 4:]))
    return out


def v8() -> Comparer:
    return Comparer.for_manifest(manifest([("output0", "float32", ["b", 4 + C, N])],
                                          task="detect"))


CAT = (50.0, 50.0, 20.0, 20.0, 1, 0.9)
DOG = (120.0, 80.0, 30.0, 40.0, 2, 0.7)


def test_same_detections_with_score_noise_agree() -> None:
    got = v8().compare({"output0": yolov8([CAT, DOG])},
                       {"output0": yolov8([CAT, (*DOG[:5], 0.68)], noise=2e-4)})
    assert (got.agree, got.score, got.detail) == (True, 1.0, "row 0: 2 detections agree")


def test_a_detection_changing_class_in_place_is_named() -> None:
    got = v8().compare({"output0": yolov8([CAT, DOG])},
                       {"output0": yolov8([(*CAT[:4], 0, 0.9), DOG])})
    assert not got.agree and got.score == pytest.approx(2 / 4)
    assert got.detail == "row 0: class 1 -> 0 (2/4 matched)"


def test_a_box_moved_below_the_match_iou_is_named_with_its_iou() -> None:
    got = v8().compare({"output0": yolov8([CAT])},
                       {"output0": yolov8([(60.0, 50.0, 20.0, 20.0, 1, 0.9)])})
    assert not got.agree and got.score == 0.0
    assert got.detail == "row 0: detection of class 1 at IoU 0.33 (0/2 matched)"


def test_lost_and_added_detections_are_named() -> None:
    lost = v8().compare({"output0": yolov8([CAT, DOG])}, {"output0": yolov8([CAT])})
    assert not lost.agree and lost.detail == "row 0: detection of class 2 lost (2/3 matched)"
    added = v8().compare({"output0": yolov8([CAT])}, {"output0": yolov8([CAT, DOG])})
    assert not added.agree and added.detail.startswith("row 0: detection of class 2 added")


def test_a_score_just_under_the_threshold_is_no_loss() -> None:
    # 0.27 -> 0.22: within the margin under the 0.25 threshold.
    weak = (50.0, 50.0, 20.0, 20.0, 1, 0.27)
    got = v8().compare({"output0": yolov8([weak])},
                       {"output0": yolov8([(*weak[:5], 0.22)])})
    assert got.agree
    gone = v8().compare({"output0": yolov8([weak])},
                        {"output0": yolov8([(*weak[:5], 0.15)])})
    assert not gone.agree


def test_no_detections_on_either_side_agree() -> None:
    got = v8().compare({"output0": yolov8([])}, {"output0": yolov8([], noise=3e-4)})
    assert (got.agree, got.score, got.detail) == (True, 1.0, "row 0: no detections")


def test_batch_agrees_only_if_every_image_does() -> None:
    serving = yolov8([CAT], [DOG], [CAT, DOG])
    shadow = yolov8([CAT], [(*DOG[:4], 1, 0.7)], [CAT, DOG])
    got = v8().compare({"output0": serving}, {"output0": shadow})
    assert not got.agree and got.detail == "row 1: class 2 -> 1 (0/2 matched)"


def test_class_logits_are_read_through_a_sigmoid() -> None:
    serving = yolov8([CAT, DOG], logits=True)
    assert v8().compare({"output0": serving},
                        {"output0": yolov8([CAT, DOG], noise=3e-4, logits=True)}).agree
    got = v8().compare({"output0": serving}, {"output0": yolov8([CAT], logits=True)})
    assert not got.agree and "class 2 lost" in got.detail
    # Logit 0.0 (p 0.5) -> -2.9 (p 0.05): lost, though both are under 0.25 read raw.
    faded = v8().compare({"output0": yolov8([CAT, (*DOG[:5], 0.5)], logits=True)},
                         {"output0": yolov8([CAT, (*DOG[:5], 0.05)], logits=True)})
    assert not faded.agree and "class 2 lost" in faded.detail


def test_whole_tensor_cosine_would_miss_the_class_change() -> None:
    """DESIGN.md: an int8 YOLOv8n kept cosine 0.9994 over its packed output while a
    detection changed class; the generic rule alone would call it agreement."""
    serving = yolov8([(300.0, 300.0, 200.0, 200.0, 1, 0.9)])
    shadow = yolov8([(300.0, 300.0, 200.0, 200.0, 2, 0.9)])
    assert Comparer.for_manifest(None).compare({"o": serving}, {"o": shadow}).agree
    assert not v8().compare({"output0": serving}, {"output0": shadow}).agree


def test_yolov5_layout_with_objectness() -> None:
    def v5(dets: Sequence[Det], obj: float = 0.95) -> np.ndarray:
        out = np.transpose(yolov8(dets), (0, 2, 1))  # [1, N, 4+C]
        o = np.full((1, N, 1), 0.01, np.float32)
        o[0, :len(dets)] = obj
        return np.concatenate([out[:, :, :4], o, out[:, :, 4:]], axis=2)

    c = Comparer.for_manifest(manifest([("out", "float32", [1, N, 5 + C])], task="detect"))
    assert c.compare({"out": v5([CAT, DOG])}, {"out": v5([CAT, DOG], obj=0.93)}).agree
    got = c.compare({"out": v5([CAT, DOG])}, {"out": v5([CAT, DOG], obj=0.2)})
    assert not got.agree and "lost" in got.detail


def test_with_the_task_alone_boxes_beside_scores_are_not_read_as_a_yolov5_head() -> None:
    m = manifest([("boxes", "float32", [1, N, 4]), ("scores", "float32", [1, N, C + 3])],
                 task="detect")
    assert Comparer.for_manifest(m).basis == "generic"
    single = manifest([("out", "float32", [1, N, 5 + C])], task="detect")
    assert Comparer.for_manifest(single).plan() == {"out": "task:detect"}


def test_boxes_and_scores_outputs_as_the_converter_planned_them() -> None:
    """detect-boxes: boxes ``[B, 4, N]`` in centre-and-size, scores ``[B, C, N]``, the
    layout the converter detected and wrote to ``task_outputs``."""
    c = Comparer.for_manifest(manifest(
        [("boxes", "float32", [1, 4, N]), ("scores", "float32", [1, C, N])], task="detect",
        extra={"task_outputs": {"boxes": {
            "kind": "detect-boxes", "partner": "scores", "sigmoid": False, "boxes_t": True,
            "scores_t": True, "box_format": "cxcywh"}}}))
    assert c.basis == "task_outputs" and c.plan() == {"boxes": "detect-boxes"}
    a = yolov8([CAT, DOG])
    b = yolov8([CAT, (*DOG[:4], 0, 0.7)])
    assert c.compare({"boxes": a[:, :4], "scores": a[:, 4:]},
                     {"boxes": a[:, :4].copy(), "scores": a[:, 4:] + 1e-4}).agree
    got = c.compare({"boxes": a[:, :4], "scores": a[:, 4:]},
                    {"boxes": b[:, :4], "scores": b[:, 4:]})
    assert not got.agree and got.detail == "row 0: class 2 -> 0 (2/4 matched)"


def test_every_anchor_firing_in_a_broken_shadow_is_bounded_and_disagrees() -> None:
    """A yolov8n-sized head where the shadow scores all 8400 anchors alike: the
    comparison looks at the best ``max_candidates`` boxes only, and says no."""
    rng = np.random.default_rng(0)
    serving = np.zeros((1, 84, 8400), np.float32)
    serving[:, :4] = rng.uniform(0, 640, (1, 4, 8400))
    serving[:, 4:] = rng.uniform(0, 0.05, (1, 80, 8400))
    shadow = serving.copy()
    shadow[:, 4:] = 0.9
    c = Comparer.for_manifest(manifest([("output0", "float32", [1, 84, 8400])],
                                       task="detect"), CompareConfig(max_candidates=50))
    got = c.compare({"output0": serving}, {"output0": shadow})
    assert not got.agree and got.score == 0.0 and "added" in got.detail
    m = re.search(r"\((\d+)/(\d+) matched\)", got.detail)
    assert m is not None and 0 < int(m.group(2)) <= 50


# ---------------------------------------------------------------- in-graph detections

def _answers(*dets: tuple[int, float, int]) -> dict[str, np.ndarray]:
    """(image, x, class) → the in-graph detect outputs (boxes 20 px wide at x)."""
    return {"boxes": np.array([[x, 10, x + 20, 30] for _, x, _ in dets],
                              np.float32).reshape(-1, 4),
            "scores": np.full(len(dets), 0.8, np.float32),
            "class_ids": np.array([k for _, _, k in dets], np.int64),
            "batch_index": np.array([i for i, _, _ in dets], np.int64)}


def _graph_detect() -> Comparer:
    return Comparer.for_manifest(manifest(
        [("boxes", "float32", ["detections", 4]), ("scores", "float32", ["detections"]),
         ("class_ids", "int64", ["detections"]), ("batch_index", "int64", ["detections"])],
        task="detect", extra={"postprocess": {"task": "detect"}}))


def test_in_graph_detections_match_per_image_whatever_their_order() -> None:
    c = _graph_detect()
    assert c.basis == "postprocess"
    serving = _answers((0, 0, 1), (1, 50, 2), (1, 100, 0))
    shadow = _answers((1, 100, 0), (0, 1, 1), (1, 50, 2))
    got = c.compare(serving, shadow)
    assert got.agree and got.score == 1.0


def test_in_graph_detection_missing_from_one_image_disagrees() -> None:
    got = _graph_detect().compare(_answers((0, 0, 1), (1, 50, 2)), _answers((0, 0, 1)))
    assert not got.agree and got.detail == "row 1: detection of class 2 lost (0/1 matched)"


def test_in_graph_no_detections_on_either_side_agree() -> None:
    got = _graph_detect().compare(_answers(), _answers())
    assert got.agree and got.score == 1.0


@pytest.mark.parametrize("field, value", [
    ("scores", np.zeros(3, np.float32)),
    ("batch_index", np.array([0, 2 ** 40], np.int64)[:1]),
    ("boxes", np.zeros((2, 5), np.float32)),
    ("scores", np.array([np.nan, 0.5], np.float32)),
])
def test_in_graph_detections_that_do_not_line_up_disagree(field: str,
                                                          value: np.ndarray) -> None:
    serving = _answers((0, 0, 1), (0, 50, 2))
    shadow = dict(serving, **{field: value})
    got = _graph_detect().compare(serving, shadow)
    assert not got.agree and got.score == 0.0


def test_in_graph_batch_index_far_out_of_range_is_cheap() -> None:
    serving = _answers((0, 0, 1))
    shadow = dict(_answers((0, 0, 1)), batch_index=np.array([2 ** 62], np.int64))
    got = _graph_detect().compare(serving, shadow)
    assert not got.agree and "lost" in got.detail


# ---------------------------------------------------------------- segmentation

def _seg_scores(cmap: np.ndarray, classes: int = 4, nhwc: bool = False) -> np.ndarray:
    """``[B, C, H, W]`` (or NHWC) scores whose argmax is ``cmap`` ``[B, H, W]``."""
    out: np.ndarray = np.eye(classes, dtype=np.float32)[cmap]  # [B, H, W, C]
    return out if nhwc else np.moveaxis(out, -1, 1).copy()


def test_segment_logits_compare_by_pixel_agreement() -> None:
    c = Comparer.for_manifest(manifest([("masks", "float32", ["b", 4, 16, 16])],
                                       task="segment"))
    cmap = np.zeros((2, 16, 16), np.int64)
    cmap[:, 4:12, 4:12] = 2
    moved = cmap.copy()
    moved[1, 4:12, 4:6] = 3  # 16 of 256 pixels: 2 -> 3
    assert c.compare({"masks": _seg_scores(cmap)},
                     {"masks": _seg_scores(cmap) * 0.9}).agree
    got = c.compare({"masks": _seg_scores(cmap)}, {"masks": _seg_scores(moved)})
    assert not got.agree and got.score == pytest.approx(1 - 16 / 256)
    assert got.detail == "row 1: pixel agreement 0.9375 < 0.99, mostly class 2 -> 3"


def test_segment_classes_last_as_the_converter_planned_them() -> None:
    c = Comparer.for_manifest(manifest(
        [("masks", "float32", ["b", 16, 16, 4])], task="segment",
        extra={"task_outputs": {"masks": {"kind": "segment-nhwc"}}}))
    cmap = np.zeros((1, 16, 16), np.int64)
    moved = cmap.copy()
    moved[0, :8] = 1
    got = c.compare({"masks": _seg_scores(cmap, nhwc=True)},
                    {"masks": _seg_scores(moved, nhwc=True)})
    assert not got.agree and got.detail.endswith("mostly class 0 -> 1")


def test_in_graph_class_maps_compare_by_pixels_with_the_configured_bound() -> None:
    m = manifest([("class_map", "int64", ["b", 10, 10])], task="segment",
                 extra={"postprocess": {"task": "segment"}})
    cmap = np.zeros((1, 10, 10), np.int64)
    moved = cmap.copy()
    moved[0, 0, :2] = 5  # 2 % of the pixels
    assert not Comparer.for_manifest(m).compare({"class_map": cmap},
                                                {"class_map": moved}).agree
    loose = Comparer.for_manifest(m, CompareConfig(mask_agreement_min=0.95))
    got = loose.compare({"class_map": cmap}, {"class_map": moved})
    assert got.agree and got.score == pytest.approx(0.98)


def test_in_graph_embedding_compares_by_cosine() -> None:
    c = Comparer.for_manifest(manifest([("embedding", "float32", ["b", 32])], task="embed",
                                       extra={"postprocess": {"task": "embed"}}))
    e = np.random.default_rng(1).normal(0, 1, (2, 32)).astype(np.float32)
    assert c.plan() == {"embedding": "cosine"}
    assert not c.compare({"embedding": e}, {"embedding": e[::-1].copy()}).agree


def test_converter_plan_of_boxes_and_scores_round_trips_to_the_comparer() -> None:
    """The converter detects boxes ``[1, N, 4]`` in centre-and-size with scores
    ``[1, C, N]``; what it writes to ``task_outputs`` makes the device read them alike."""
    from converters._tasks import plan_task

    a = yolov8([CAT, DOG])
    ref = [{"boxes": np.swapaxes(a[:, :4], 1, 2).copy(), "scores": a[:, 4:].copy()}]
    plan = plan_task("detect", (), ref, {})
    written = plan.task_outputs()
    assert written == {"boxes": {"kind": "detect-boxes", "sigmoid": False,
                                 "partner": "scores", "boxes_t": False, "scores_t": True,
                                 "box_format": "cxcywh"}}
    c = Comparer.for_manifest(manifest(
        [("boxes", "float32", [1, N, 4]), ("scores", "float32", [1, C, N])], task="detect",
        extra={"task_outputs": written}))
    b = yolov8([CAT, (*DOG[:4], 0, 0.7)])
    got = c.compare(ref[0], {"boxes": np.swapaxes(b[:, :4], 1, 2).copy(),
                             "scores": b[:, 4:].copy()})
    assert not got.agree and got.detail == "row 0: class 2 -> 0 (2/4 matched)"
