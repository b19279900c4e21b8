"""Serving and shadow answers compared in the task's terms (edge_sdk.quality.Comparer):
classes, embeddings, values, and whatever hostile arrays a model may return."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edge_sdk.quality import CompareConfig, Comparer, Comparison
from tests import _models
from tests._quality import manifest

RNG = np.random.default_rng(7)


def _logits(rows: int = 3, classes: int = 10) -> np.ndarray:
    return RNG.normal(0, 3, (rows, classes)).astype(np.float32)


def _classify() -> Comparer:
    return Comparer.for_manifest(manifest([("logits", "float32", ["batch", 10])],
                                          task="classify"))


# ---------------------------------------------------------------- classification

def test_identical_outputs_agree_with_score_one() -> None:
    x = _logits()
    got = _classify().compare({"logits": x}, {"logits": x.copy()})
    assert got == Comparison(True, 1.0, "identical")


def test_small_logit_noise_keeping_every_top1_agrees() -> None:
    x = _logits()
    x[:, 0] += 20  # a clear winner in every row
    got = _classify().compare({"logits": x}, {"logits": x + 0.01})
    assert got.agree and got.score == 1.0


def test_changed_top1_in_one_row_of_a_batch_disagrees_and_names_the_row() -> None:
    x = _logits(4)
    y = x.copy()
    a, b = int(np.argmax(x[2])), (int(np.argmax(x[2])) + 1) % 10
    y[2, b] = x[2, a] + 5
    got = _classify().compare({"logits": x}, {"logits": y})
    assert not got.agree and got.score == 0.0
    assert got.detail == f"row 2: class {a} -> {b}"


def test_classify_is_judged_by_top1_not_by_cosine() -> None:
    # Two near-equal leading logits swap: cosine stays ~1 yet the answer changed.
    x = np.zeros((1, 1000), np.float32)
    x[0, 3], x[0, 5] = 10.0, 9.99
    y = x.copy()
    y[0, 3], y[0, 5] = 9.99, 10.0
    assert Comparer.for_manifest(None).compare({"o": x}, {"o": y}).agree  # generic: cosine
    got = Comparer.for_manifest(manifest([("o", "float32", [1, 1000])], task="classify")
                                ).compare({"o": x}, {"o": y})
    assert not got.agree and got.detail == "row 0: class 3 -> 5"


def test_per_token_classes_name_the_flipped_position() -> None:
    x = RNG.normal(0, 1, (1, 6, 4)).astype(np.float32)
    y = x.copy()
    k = int(np.argmax(x[0, 4]))
    y[0, 4, (k + 1) % 4] = x[0, 4, k] + 1
    got = Comparer.for_manifest(manifest([("o", "float32", [1, 6, 4])], task="classify")
                                ).compare({"o": x}, {"o": y})
    assert not got.agree
    assert got.detail == f"row 0: class {k} -> {(k + 1) % 4} at position 4"
    assert got.score == pytest.approx(1 - 1 / 6)


def test_in_graph_classify_answers_compare_the_top_class_id() -> None:
    c = Comparer.for_manifest(manifest(
        [("scores", "float32", ["batch", 5]), ("class_ids", "int64", ["batch", 5])],
        task="classify", extra={"postprocess": {"task": "classify", "top_k": 5}}))
    assert c.basis == "postprocess"
    ids = np.array([[3, 1, 2, 0, 4], [7, 1, 2, 0, 4]], np.int64)
    scores = np.array([[0.5, 0.2, 0.1, 0.1, 0.1]] * 2, np.float32)
    # Lower ranks reorder: still the same answer.
    other = ids.copy()
    other[0, 1:3] = [2, 1]
    assert c.compare({"scores": scores, "class_ids": ids},
                     {"scores": scores * 0.99, "class_ids": other}).agree
    other[1, 0] = 9
    got = c.compare({"scores": scores, "class_ids": ids},
                    {"scores": scores, "class_ids": other})
    assert (got.agree, got.score, got.detail) == (False, 0.0, "row 1: class 7 -> 9")


def test_perturbed_last_layer_of_a_real_cnn_is_caught(tmp_path: Path) -> None:
    """Two rows of the classifier's weights swapped: the classes those rows score trade
    places, as a broken conversion or a bad fine-tune would."""
    path = _models.small_cnn(tmp_path / "cnn.onnx")
    model = onnx.load(str(path))
    w = next(t for t in model.graph.initializer if t.name == "wf")
    arr = numpy_helper.to_array(w).copy()
    feed = {"input": RNG.normal(0, 1, (8, 3, 32, 32)).astype(np.float32)}
    serving = ort.InferenceSession(str(path)).run(None, feed)[0]
    top = np.bincount(serving.argmax(1), minlength=10).argmax()
    other = (top + 1) % 10
    arr[[top, other]] = arr[[other, top]]
    w.CopyFrom(numpy_helper.from_array(arr, "wf"))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    shadow = ort.InferenceSession(str(bad)).run(None, feed)[0]
    c = Comparer.for_manifest(manifest([("logits", "float32", ["batch", 10])],
                                       task="classify"))
    assert c.compare({"logits": serving}, {"logits": serving.copy()}).agree
    got = c.compare({"logits": serving}, {"logits": shadow})
    assert not got.agree and got.score == 0.0
    assert f"class {top} -> " in got.detail


# ---------------------------------------------------------------- embeddings, values

def _embed() -> Comparer:
    return Comparer.for_manifest(manifest([("e", "float32", ["batch", 64])], task="embed"))


def test_embedding_cosine_below_the_bound_in_one_row_disagrees() -> None:
    x = RNG.normal(0, 1, (3, 64)).astype(np.float32)
    y = x.copy()
    y[1] += RNG.normal(0, 0.2, 64).astype(np.float32)
    got = _embed().compare({"e": x}, {"e": y})
    assert not got.agree and got.detail.startswith("row 1: cosine 0.9")
    assert got.detail.endswith("< 0.99") and 0.9 < got.score < 0.99


def test_embedding_cosine_is_per_row_not_over_the_batch() -> None:
    # One row of tiny norm changed completely: a whole-batch cosine would not notice.
    x = RNG.normal(0, 1, (2, 64)).astype(np.float32)
    x[1] *= 1e-3
    y = x.copy()
    y[1] = -y[1]
    got = _embed().compare({"e": x}, {"e": y})
    assert not got.agree and got.score == 0.0 and got.detail.startswith("row 1: cosine")


def test_cosine_bound_comes_from_the_config() -> None:
    x = RNG.normal(0, 1, (1, 64)).astype(np.float32)
    y = x + RNG.normal(0, 0.2, (1, 64)).astype(np.float32)
    loose = Comparer.for_manifest(manifest([("e", "float32", ["batch", 64])], task="embed"),
                                  CompareConfig(cosine_min=0.5))
    assert loose.compare({"e": x}, {"e": y}).agree
    assert not _embed().compare({"e": x}, {"e": y}).agree


def test_regression_relative_error_per_row() -> None:
    c = Comparer.for_manifest(manifest([("y", "float32", ["batch", 1])], task="regress"))
    x = np.array([[100.0], [2.0]], np.float32)
    assert c.compare({"y": x}, {"y": x * 1.005}).agree
    got = c.compare({"y": x}, {"y": np.array([[100.0], [2.1]], np.float32)})
    assert not got.agree
    assert got.detail == "row 1: relative error 0.0500 > 0.01"
    assert got.score == pytest.approx(0.95, abs=1e-6)


def test_generic_rule_cosine_for_long_rows_relative_error_for_short_ones() -> None:
    c = Comparer.for_manifest(manifest([("long", "float32", ["b", 8]),
                                        ("short", "float32", ["b", 2])]))
    assert c.basis == "generic"
    long_ = RNG.normal(0, 1, (1, 8)).astype(np.float32)
    short = np.array([[1.0, 2.0]], np.float32)
    got = c.compare({"long": long_, "short": short},
                    {"long": long_ * 3, "short": short * 1.5})  # scale: cosine 1
    assert not got.agree and got.detail.startswith("short row 0: relative error 0.5000")


def test_integer_outputs_compare_exactly() -> None:
    c = Comparer.for_manifest(None)
    x = np.array([1, 2, 3], np.int64)
    assert c.compare({"label": x}, {"label": x.copy()}).agree
    got = c.compare({"label": x}, {"label": np.array([1, 5, 3], np.int64)})
    assert (got.agree, got.score, got.detail) == (False, 0.0, "row 1: 2 -> 5")


def test_task_outputs_section_decides_over_the_task() -> None:
    # A classifier with an embedding beside its logits: the converter said which is which.
    c = Comparer.for_manifest(manifest(
        [("logits", "float32", ["b", 10]), ("emb", "float32", ["b", 16])], task="classify",
        extra={"task_outputs": {"logits": {"kind": "top1"}, "emb": {"kind": "cosine"}}}))
    assert c.basis == "task_outputs" and c.plan() == {"logits": "top1", "emb": "cosine"}
    x, e = _logits(1), RNG.normal(0, 1, (1, 16)).astype(np.float32)
    got = c.compare({"logits": x, "emb": e}, {"logits": x, "emb": -e})
    assert not got.agree and got.detail.startswith("emb row 0: cosine")


def test_unknown_or_dangling_task_outputs_entries_fall_back() -> None:
    c = Comparer.for_manifest(manifest(
        [("o", "float32", ["b", 10])], task="classify",
        extra={"task_outputs": {"o": {"kind": "telepathy"}, "gone": {"kind": "top1"},
                                "x": "nonsense"}}))
    assert c.basis == "task"
    x = _logits(1)
    assert not c.compare({"o": x}, {"o": x[:, ::-1].copy()}).agree


# ---------------------------------------------------------------- hostile arrays

@pytest.mark.parametrize("shadow, detail", [
    ({}, "output o missing in shadow"),
    ({"o": np.zeros((2, 10), np.float16)}, "output o: dtype float32 -> float16"),
    ({"o": np.zeros((2, 11), np.float32)}, "output o: shape [2, 10] -> [2, 11]"),
    ({"o": np.zeros((10,), np.float32)}, "output o: shape [2, 10] -> [10]"),
    ({"o": "ten logits"}, "output o: dtype float32 -> <U10"),
    ({"o": [[object()] * 10] * 2}, "output o: dtype float32 -> object"),
])
def test_mismatched_outputs_disagree_with_score_zero(shadow: dict[str, Any],
                                                     detail: str) -> None:
    got = _classify().compare({"o": np.zeros((2, 10), np.float32)}, shadow)
    assert got == Comparison(False, 0.0, detail)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_the_shadow_disagrees(bad: float) -> None:
    x = _logits(3)
    y = x.copy()
    y[1, 4] = bad
    for c in (_classify(), _embed(), Comparer.for_manifest(None)):
        got = c.compare({"logits": x, "e": x}, {"logits": y, "e": y})
        assert not got.agree and got.score == 0.0 and "row 1: NaN/inf in shadow" in got.detail


def test_the_same_nan_on_both_sides_is_no_change() -> None:
    x = _logits(2)
    x[0, 0] = np.nan
    got = Comparer.for_manifest(None).compare({"o": x}, {"o": x.copy()})
    assert got.agree and got.score == 1.0
    y = x.copy()
    y[1, 1] = np.nan
    got = Comparer.for_manifest(None).compare({"o": x}, {"o": y})
    assert not got.agree and got.detail == "row 1: NaN/inf in shadow"


def test_nan_in_serving_only_is_a_disagreement_too() -> None:
    x = _logits(2)
    y = x.copy()
    x[0, 2] = np.nan
    got = _classify().compare({"o": x}, {"o": y})
    assert (got.agree, got.detail) == (False, "row 0: NaN/inf in serving")


@pytest.mark.parametrize("serving, shadow", [
    (None, {}), ({"o": 1}, None), ({"o": np.zeros(0)}, {"o": np.zeros(0)}),
    ({"o": np.zeros((0, 10), np.float32)}, {"o": np.zeros((0, 10), np.float32)}),
    ({"o": np.float32(3)}, {"o": np.float32(4)}),
    ({"o": np.zeros((1, 0), np.float32)}, {"o": np.zeros((1, 0), np.float32)}),
    ({"o": np.array(["a", "b"])}, {"o": np.array(["a", "c"])}),
    ({1: np.zeros(3)}, {1: np.ones(3)}),
])
def test_hostile_values_never_raise(serving: Any, shadow: Any) -> None:
    for c in (_classify(), _embed(), Comparer.for_manifest(None)):
        got = c.compare(serving, shadow)
        assert isinstance(got, Comparison) and 0.0 <= got.score <= 1.0
        assert len(got.detail) <= 200


class _Hostile:
    """What a broken runtime binding might hand over: it refuses to be an array or to be
    compared."""

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("no array here")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparison either")

    __hash__ = None  # type: ignore[assignment]


def test_objects_that_raise_become_a_disagreement_not_an_exception() -> None:
    objs = np.empty(2, dtype=object)
    for i in range(2):
        objs[i] = _Hostile()
    for serving, shadow in (({"o": _Hostile()}, {"o": _Hostile()}),
                            ({"o": objs}, {"o": objs.copy()})):
        got = Comparer.for_manifest(None).compare(serving, shadow)
        assert not got.agree and got.score == 0.0
        assert got.detail.startswith("cannot compare: RuntimeError: no ")


def test_the_worst_row_of_a_batch_gives_the_score_and_the_detail() -> None:
    x = RNG.normal(0, 1, (3, 64)).astype(np.float32)
    y = x.copy()
    y[0] += RNG.normal(0, 0.15, 64).astype(np.float32)  # a little off
    y[2] = RNG.normal(0, 1, 64)  # nothing alike
    got = _embed().compare({"e": x}, {"e": y})
    assert not got.agree and got.detail.startswith("row 2: cosine")
    assert got.score < 0.5


def test_string_outputs_of_other_widths_compare_by_value() -> None:
    c = Comparer.for_manifest(None)
    assert c.compare({"label": np.array(["cat", "dog"])},
                     {"label": np.array(["cat", "dog"], dtype="<U8")}).agree
    got = c.compare({"label": np.array(["cat", "dog"])}, {"label": np.array(["cat", "bird"])})
    assert (got.agree, got.detail) == (False, "row 1: dog -> bird")


def test_outputs_only_the_shadow_has_are_ignored() -> None:
    x = _logits(1)
    assert _classify().compare({"logits": x}, {"logits": x, "extra": np.ones(3)}).agree


def test_config_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="cosine_min"):
        CompareConfig(cosine_min=1.5)
    with pytest.raises(ValueError, match="max_detections"):
        CompareConfig(max_detections=0)


def test_rows_past_max_rows_are_not_compared() -> None:
    """The bound on work per request: a batch of 1000 rows costs what ``max_rows`` do."""
    x = _logits(4)
    y = x.copy()
    y[3] = -x[3]
    m = manifest([("o", "float32", ["b", 10])], task="embed")
    assert not Comparer.for_manifest(m).compare({"o": x}, {"o": y}).agree
    got = Comparer.for_manifest(m, CompareConfig(max_rows=3)).compare({"o": x}, {"o": y})
    assert got.agree and got.detail.startswith("row ")
