"""Task detection and scoring on the output layouts third-party models come with:
boxes and scores apart (transposed or not, corners or centre and size), class scores
shaped ``[B, 1, C]``, a softmax head next to an embedding, segmenters with classes last
or a per-pixel softmax, and candidates that output NaN. Each model is built here from
the small test models, its outputs rearranged the way other exporters write them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import ConversionResult, convert
from converters._tasks import TaskScorer, plan_task
from edge_sdk.cli import main
from tests import _convert_models as M
from tests._convert_checks import FAST

CLASSES = 8  # >= 5: transposed scores [1, C, N] then look like a YOLOv8 output
SIZE = 32
N = (SIZE // 4) ** 2


def _vi(name: str, shape: list[Any], dtype: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, dtype, shape)


def _rewire(src: Path, dst: Path,
            tail: Callable[[str, onnx.GraphProto], tuple[list[Any], list[Any], list[Any]]],
            ) -> Path:
    """``src`` with its single output fed into ``tail`` (→ nodes, outputs, initializers)."""
    model = onnx.load(str(src))
    g = model.graph
    nodes, outs, inits = tail(g.output[0].name, g)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.extend(outs)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def _split_boxes_scores(out: str) -> tuple[list[Any], list[Any]]:
    # [1, 4+C, N] -> boxes [1, 4, N] (cx, cy, w, h) and scores [1, C, N]
    return ([helper.make_node("Split", [out, "sizes"], ["boxes_t", "scores_t"], axis=1)],
            [numpy_helper.from_array(np.array([4, CLASSES], np.int64), "sizes")])


def _rows(res: ConversionResult) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in res.report["candidates"]}


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("layouts")
    np.savez(d / "photos.npz", images=M.images(32, SIZE))
    return M.yolo_like_detector(d / "det.onnx", size=SIZE, classes=CLASSES), d / "photos.npz"


def _assert_judged_as_boxes(res: ConversionResult, boxes: str) -> None:
    assert res.report["task"]["name"] == "detect"
    assert res.report["task"]["outputs"] == {boxes: "detect-boxes"}
    rows = _rows(res)
    assert rows["fp32"]["status"] != "over-budget"
    assert rows["fp32"]["accuracy"]["details"][boxes]["matched_share"] == 1.0
    static = [n for n in rows if n.startswith("int8-static")]
    assert static and all(rows[n]["status"] == "over-budget" for n in static)
    assert res.chosen in ("fp32", "fp16")


def test_transposed_boxes_and_scores_are_a_boxes_pair_not_a_yolov8_output(
    detector: tuple[Path, Path], tmp_path: Path,
) -> None:
    model, photos = detector

    def tail(out: str, g: onnx.GraphProto) -> tuple[list[Any], list[Any], list[Any]]:
        nodes, inits = _split_boxes_scores(out)
        return nodes, [_vi("boxes_t", [1, 4, N]), _vi("scores_t", [1, CLASSES, N])], inits

    src = _rewire(model, tmp_path / "bt_st.onnx", tail)
    res = convert(src, tmp_path / "art", calibration=photos, config=FAST)
    _assert_judged_as_boxes(res, "boxes_t")


def test_boxes_in_centre_and_size_are_not_read_as_corners(
    detector: tuple[Path, Path], tmp_path: Path,
) -> None:
    """Boxes [1, N, 4] as cx, cy, w, h with scores [1, C, N]: read as corners, most boxes
    have x2 < x1, so no detection matched even the float model itself."""
    model, photos = detector

    def tail(out: str, g: onnx.GraphProto) -> tuple[list[Any], list[Any], list[Any]]:
        nodes, inits = _split_boxes_scores(out)
        nodes.append(helper.make_node("Transpose", ["boxes_t"], ["boxes"], perm=[0, 2, 1]))
        return nodes, [_vi("boxes", [1, N, 4]), _vi("scores_t", [1, CLASSES, N])], inits

    src = _rewire(model, tmp_path / "cxcywh.onnx", tail)
    res = convert(src, tmp_path / "art", calibration=photos, config=FAST)
    _assert_judged_as_boxes(res, "boxes")


def test_candidate_with_nan_is_refused_even_where_no_image_has_a_detection(
    tmp_path: Path,
) -> None:
    """A detector that finds nothing on the evaluation images matches any candidate
    vacuously; NaN where the source is finite must still fail it (and a regressor's NaN
    error, which compares false against every budget)."""
    model = M.yolo_like_detector(tmp_path / "det.onnx", size=SIZE, classes=CLASSES,
                                 class_bias=-12.0)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = [{"output0": sess.run(None, {"images": x[None]})[0]} for x in M.images(4, SIZE)]
    nan = [{"output0": np.full_like(r["output0"], np.nan)} for r in ref]
    plan = plan_task(None, (), ref, {})
    assert plan.outputs["output0"].kind == "detect-yolov8"
    assert TaskScorer(plan)(ref, ref).within(0.01)
    acc = TaskScorer(plan)(nan, ref)
    assert not acc.within(0.01)
    assert "NaN/inf" in " ".join(acc.breaks)
    reg = plan_task("regress", (), ref, {})
    assert not TaskScorer(reg)(nan, ref).within(0.01)


def test_class_scores_shaped_b_1_c_are_detected_and_judged_by_top1(tmp_path: Path) -> None:
    src = M.mobilenet_like(tmp_path / "cls.onnx", classes=1000)

    def tail(out: str, g: onnx.GraphProto) -> tuple[list[Any], list[Any], list[Any]]:
        return ([helper.make_node("Softmax", [out], ["p"], axis=-1),
                 helper.make_node("Unsqueeze", ["p", "one"], ["probs"])],
                [_vi("probs", ["batch", 1, 1000])],
                [numpy_helper.from_array(np.array([1], np.int64), "one")])

    model = _rewire(src, tmp_path / "b1c.onnx", tail)
    np.savez(tmp_path / "img.npz", input=M.images(32, 32))
    res = convert(model, tmp_path / "art", calibration=tmp_path / "img.npz", config=FAST)
    assert res.report["task"]["name"] == "classify"
    assert res.report["task"]["outputs"] == {"probs": "top1"}
    flips = [c for c in res.report["candidates"] if c.get("accuracy") and
             c["accuracy"]["details"]["probs"]["flipped"]]
    assert flips, "no candidate flipped a class: the model no longer tests the rule"
    assert all(c["status"] == "over-budget" for c in flips)
    # --task classify accepts the shape too
    assert main(["convert", str(model), "-o", str(tmp_path / "art2"), "--calibration",
                 str(tmp_path / "img.npz"), "--task", "classify", "--quantize", "fp16"]) == 0


def test_embedding_next_to_a_softmax_head_is_not_scored_by_its_argmax(
    tmp_path: Path,
) -> None:
    src = M.mobilenet_like(tmp_path / "cls.onnx", classes=10)

    def tail(out: str, g: onnx.GraphProto) -> tuple[list[Any], list[Any], list[Any]]:
        gap = next(n for n in g.node if n.op_type == "GlobalAveragePool").output[0]
        return ([helper.make_node("Softmax", [out], ["probs"], axis=-1),
                 helper.make_node("Flatten", [gap], ["embedding"])],
                [_vi("probs", ["batch", 10]), _vi("embedding", ["batch", "d"])], [])

    model = _rewire(src, tmp_path / "two_heads.onnx", tail)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = [dict(zip(("probs", "embedding"), sess.run(None, {"input": x[None]}), strict=True))
           for x in M.images(8, 32)]
    plan = plan_task(None, (), ref, {})
    assert plan.task == "classify" and dict(plan.outputs) == {"probs": plan.outputs["probs"]}
    # An embedding whose direction is lost but whose largest entry stays in place: top-1
    # over its entries would keep it; the generic cosine must refuse it.
    broken = []
    for r in ref:
        e = r["embedding"].copy()
        top = int(np.argmax(e))
        rest = np.delete(np.arange(e.shape[-1]), top)
        e[0, rest] = e[0, rest][::-1] * -1.0
        e[0, top] = abs(e).max() + 1.0
        broken.append({"probs": r["probs"], "embedding": e})
    acc = TaskScorer(plan)(broken, ref)
    assert not acc.within(0.01)
    assert acc.details is not None
    assert acc.details["generic"]["outputs"] == ["embedding"]


def _segmenter_outputs(tmp_path: Path) -> list[np.ndarray]:
    model = M.tiny_segmenter(tmp_path / "seg.onnx", classes=4)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"input": x[None]})[0] for x in M.images(4, 32)]


def test_segmenter_with_classes_last_is_scored_over_its_class_axis(tmp_path: Path) -> None:
    nchw = _segmenter_outputs(tmp_path)
    # The candidate swaps classes 0 and 1 in the top-left quarter of every mask.
    cand = [m.copy() for m in nchw]
    for c in cand:
        c[:, [0, 1], :16, :16] = c[:, [1, 0], :16, :16]
    as_nchw = TaskScorer(plan_task("segment", (), [{"m": nchw[0]}], {}))(
        [{"m": c} for c in cand], [{"m": r} for r in nchw])
    nhwc = [np.ascontiguousarray(m.transpose(0, 2, 3, 1)) for m in nchw]
    plan = plan_task("segment", (), [{"m": nhwc[0]}], {})
    assert plan.outputs["m"].kind == "segment-nhwc"
    as_nhwc = TaskScorer(plan)([{"m": c.transpose(0, 2, 3, 1)} for c in cand],
                               [{"m": r} for r in nhwc])
    assert not as_nchw.within(0.01)
    assert as_nhwc.drop == pytest.approx(as_nchw.drop)
    assert not as_nhwc.within(0.01)


def test_per_pixel_softmax_is_detected_as_segmentation(tmp_path: Path) -> None:
    src = M.tiny_segmenter(tmp_path / "seg.onnx", classes=4)
    model = _rewire(src, tmp_path / "softmax.onnx", lambda out, g: (
        [helper.make_node("Softmax", [out], ["masks_p"], axis=1)],
        [_vi("masks_p", ["batch", 4, 32, 32])], []))
    np.savez(tmp_path / "img.npz", input=M.images(8, 32))
    res = convert(model, tmp_path / "art", calibration=tmp_path / "img.npz", config=FAST)
    assert res.report["task"]["name"] == "segment"
    assert res.report["task"]["detected_from"] == "per-pixel softmax head"


def test_logits_without_a_task_say_how_to_judge_them_as_classes(tmp_path: Path,
                                                                capsys: Any) -> None:
    model = M.mobilenet_like(tmp_path / "cls.onnx", classes=100)
    np.savez(tmp_path / "img.npz", input=M.images(8, 32))
    assert main(["convert", str(model), "-o", str(tmp_path / "art"), "--calibration",
                 str(tmp_path / "img.npz"), "--quantize", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "logits [1, 100] may be class scores" in out and "--task classify" in out


def test_detector_with_class_logits_says_to_pass_task_detect(tmp_path: Path) -> None:
    """Class scores outside [0, 1] are not taken for a detector on their own (hidden
    states look alike), but the report says which flag judges them as one."""
    src = M.yolo_like_detector(tmp_path / "det.onnx", size=SIZE, classes=CLASSES)
    model = onnx.load(str(src))
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Sigmoid"))
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    concat.input[1] = next(n for n in model.graph.node if n.op_type == "Split").output[1]
    onnx.save(model, str(tmp_path / "logits.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "logits.onnx"),
                                providers=["CPUExecutionProvider"])
    ref = [{"output0": sess.run(None, {"images": x[None]})[0]} for x in M.images(2, SIZE)]
    plan = plan_task(None, (), ref, {})
    assert plan.task == "generic"
    assert "--task detect" in plan.hint and "output0:detect-yolov8" in plan.hint
    assert plan_task("detect", (), ref, {}).outputs["output0"].sigmoid
