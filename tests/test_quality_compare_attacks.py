"""Attacks on the shadow comparer: outputs whose class changed must never agree."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_sdk.quality import Comparer
from tests._quality import manifest

skl2onnx = pytest.importorskip("skl2onnx")
linear_model = pytest.importorskip("sklearn.linear_model")


def _sklearn_outputs(zipmap: bool, seed: int) -> dict[str, Any]:
    rng = np.random.RandomState(0)
    x = rng.randn(200, 4).astype(np.float32)
    y = (x[:, seed] > 0).astype(int) + (x[:, seed + 1] > 0)
    model = linear_model.LogisticRegression().fit(x, y)
    onx = skl2onnx.to_onnx(model, x[:1], options={id(model): {"zipmap": zipmap}})
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x[:8]}), strict=True))


def test_zipmap_probabilities_that_keep_every_class_agree() -> None:
    out = _sklearn_outputs(True, 0)
    jitter = [{k: v * 1.0001 for k, v in d.items()} for d in out["output_probability"]]
    for task in ("classify", "generic"):
        c = Comparer.for_manifest(manifest([("output_label", "int64", ("N",)),
                                            ("output_probability", "float32", ("N",))],
                                           task=task))
        got = c.compare(out, {"output_label": out["output_label"],
                              "output_probability": jitter})
        assert got.agree, (task, got)


def test_zipmap_probability_whose_best_class_moved_disagrees() -> None:
    out = _sklearn_outputs(True, 0)
    probs = [dict(d) for d in out["output_probability"]]
    best = max(probs[5], key=probs[5].__getitem__)
    other = next(k for k in probs[5] if k != best)
    probs[5][best], probs[5][other] = probs[5][other], probs[5][best]
    c = Comparer.for_manifest(manifest([("output_probability", "float32", ("N",))],
                                       task="classify"))
    got = c.compare({"output_probability": out["output_probability"]},
                    {"output_probability": probs})
    assert not got.agree and "row 5" in got.detail


def test_zipmap_with_other_classes_disagrees_without_raising() -> None:
    out = _sklearn_outputs(True, 0)
    probs = [{k + 10: v for k, v in d.items()} for d in out["output_probability"]]
    c = Comparer.for_manifest(None)
    got = c.compare({"p": out["output_probability"]}, {"p": probs})
    assert not got.agree and got.score == 0.0


def test_sklearn_label_changed_in_one_row_of_a_batch_disagrees() -> None:
    out = _sklearn_outputs(False, 0)
    labels = out["label"].copy()
    labels[6] = (labels[6] + 1) % 3
    c = Comparer.for_manifest(manifest([("label", "int64", ("N",)),
                                        ("probabilities", "float32", ("N", 3))],
                                       task="classify"))
    got = c.compare(out, {"label": labels, "probabilities": out["probabilities"]})
    assert not got.agree and "row 6" in got.detail


@pytest.mark.parametrize("shape", [("N",), ("N", 1)])
def test_binary_score_crossing_its_cut_in_one_row_of_a_batch_disagrees(
        shape: tuple[str | int, ...]) -> None:
    c = Comparer.for_manifest(manifest([("p", "float32", shape)], task="classify"))
    dims = (40,) + (1,) * (len(shape) - 1)
    serving = np.full(dims, 0.3, np.float32)
    serving.reshape(-1)[4] = 0.9
    serving.reshape(-1)[7] = 0.4985
    shadow = serving.copy()
    shadow.reshape(-1)[7] = 0.5015  # row 7 is now class 1: a changed answer
    got = c.compare({"p": serving}, {"p": shadow})
    assert not got.agree and "row 7" in got.detail, got
    logits = serving - 0.5  # the same with logits: the cut is 0
    got = c.compare({"p": logits}, {"p": shadow - 0.5})
    assert not got.agree and "row 7" in got.detail, got


def test_one_value_per_row_is_not_diluted_by_the_rest_of_the_batch() -> None:
    c = Comparer.for_manifest(manifest([("y", "float32", ("batch",))], task="regress"))
    serving = np.linspace(1.0, 2.0, 100).astype(np.float32)
    shadow = serving.copy()
    shadow[50] *= 1.5  # one row's answer moved by half
    got = c.compare({"y": serving}, {"y": shadow})
    assert not got.agree and "row 50" in got.detail, got
    generic = Comparer.for_manifest(manifest([("y", "float32", ("batch",))]))
    assert not generic.compare({"y": serving}, {"y": shadow}).agree


def test_top1_named_on_a_single_column_compares_the_cut() -> None:
    c = Comparer.for_manifest(manifest([("p", "float32", ("N", 1))], task="classify",
                                       extra={"task_outputs": {"p": {"kind": "top1"}}}))
    serving = np.array([[0.2], [0.7]], np.float32)
    got = c.compare({"p": serving}, {"p": np.array([[0.2], [0.3]], np.float32)})
    assert not got.agree and "row 1" in got.detail


def test_in_graph_labels_without_a_batch_axis_compare_every_row() -> None:
    c = Comparer.for_manifest(manifest([("class_ids", "int64", ("N",)),
                                        ("scores", "float32", ("N",))], task="classify",
                                       extra={"postprocess": {"task": "classify"}}))
    ids = np.array([1, 2, 3, 4], np.int64)
    scores = np.ones(4, np.float32)
    got = c.compare({"class_ids": ids, "scores": scores},
                    {"class_ids": np.array([1, 2, 3, 0], np.int64), "scores": scores})
    assert not got.agree and "row 3" in got.detail


def test_a_class_map_detail_names_the_commonest_change_even_for_extreme_ids() -> None:
    c = Comparer.for_manifest(manifest([("class_map", "int64", ("N", 8, 8))],
                                       task="segment",
                                       extra={"postprocess": {"task": "segment"}}))
    a = np.zeros((2, 8, 8), np.int64)
    b = a.copy()
    b[1, :4] = 7  # 32 pixels 0 -> 7
    b[1, 4, :3] = -2
    got = c.compare({"class_map": a}, {"class_map": b})
    assert not got.agree and "row 1" in got.detail and "mostly class 0 -> 7" in got.detail
    huge = np.full((1, 8, 8), 2**62, np.int64)
    got = c.compare({"class_map": huge}, {"class_map": -huge})
    assert f"mostly class {2**62} -> {-2**62}" in got.detail
