"""scikit-learn front-end: pickles of estimators and Pipelines → verified ONNX artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin, is_regressor

import edge_sdk
from converters._frontends import convert_source
from converters._measure import MeasureConfig
from converters._pipeline import ConvertConfig, ConvertOptions
from edge_sdk.errors import ConversionError, UsageError
from tests import _framework_models as fm

REGRESSION_ATOL = 1e-3  # float32 trees reproduce scikit-learn's to ~1e-6 on a ~20 range
FAST = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=5, warmup=2))
PROBA_TOL = 1e-5  # float32 ONNX vs float64 scikit-learn


@pytest.fixture(scope="session")
def sk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("sklearn")
    models = fm.sklearn_models()
    x, y = fm.sklearn_inputs()
    return {
        "models": models,
        "pickles": {k: fm.save_pickle(m, d / f"{k}.pkl") for k, m in models.items()},
        "x": x,
        "calib": fm.save_npz(d / "calib.npz", input=x, labels=y),
    }


def _convert(src: Path, out: Path, **opts: Any) -> Any:
    return convert_source(src, out, ConvertOptions(**opts), source_kind=None, input_shapes=None,
                          trust_pickle=True, config=FAST)


@pytest.mark.parametrize("kind", ["logreg", "forest", "pipeline"])
def test_sklearn_classifier_artifact_matches_labels_and_probabilities(
    sk: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    est = sk["models"][kind]
    res = _convert(sk["pickles"][kind], tmp_path / "art", calibration=sk["calib"])
    model = edge_sdk.load(res.artifact.path)
    out = model.predict({"input": sk["x"]})
    assert [o.name for o in model.outputs] == ["label", "probabilities"]
    np.testing.assert_array_equal(out["label"], est.predict(sk["x"]))
    np.testing.assert_allclose(out["probabilities"], est.predict_proba(sk["x"]), atol=PROBA_TOL)
    manifest = json.loads((res.artifact.path / "manifest.json").read_text())
    assert manifest["labels"] == [0, 1, 2]
    assert manifest["source"]["format"] == "sklearn"
    assert manifest["export_check"]["label.agreement"] == 1.0
    assert res.artifact.manifest.inputs[0].shape == ("batch", fm.FEATURES)
    if kind != "pipeline":  # its scaler, exported as a true division, adds no ai.onnx.ml op
        # skl2onnx writes duplicate opset imports; the ONNX pipeline's normalization merges them
        assert any("duplicate opset imports" in n for n in res.report["normalization"])


def test_pipeline_records_its_steps_in_the_manifest(sk: dict[str, Any], tmp_path: Path) -> None:
    res = _convert(sk["pickles"]["pipeline"], tmp_path / "art", calibration=sk["calib"])
    steps = res.artifact.manifest.extra["sklearn"]["steps"]
    assert steps == ["standardscaler: StandardScaler", "logisticregression: LogisticRegression"]


def test_regressor_has_one_float_output(tmp_path: Path) -> None:
    from sklearn.linear_model import Ridge

    x, _ = fm.sklearn_inputs()
    target = x @ np.arange(fm.FEATURES, dtype=np.float32)
    est = Ridge().fit(x, target)
    res = _convert(fm.save_pickle(est, tmp_path / "ridge.joblib"), tmp_path / "art")
    out = edge_sdk.load(res.artifact.path).predict(x)
    np.testing.assert_allclose(out["variable"].ravel(), est.predict(x), rtol=1e-4, atol=1e-2)


def test_pickle_without_trust_is_refused_and_nothing_written(
    sk: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "art"
    with pytest.raises(UsageError, match="--trust-pickle") as info:
        convert_source(sk["pickles"]["logreg"], out, ConvertOptions(), source_kind=None,
                       input_shapes=None, trust_pickle=False)
    assert "runs any code" in str(info.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_pickle_of_something_else_is_a_clear_error(tmp_path: Path) -> None:
    src = fm.save_pickle({"not": "a model"}, tmp_path / "thing.pkl")
    with pytest.raises(ConversionError, match="not a scikit-learn estimator"):
        _convert(src, tmp_path / "art")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("kind", fm.SKLEARN_KINDS)
def test_common_estimator_converted_with_auto_agrees_with_sklearn_on_held_out_rows(
    tmp_path: Path, kind: str
) -> None:
    x, labels, target = fm.tabular()
    regressor = is_regressor(fm.sklearn_estimator(kind))
    y = target if regressor else labels
    est = fm.sklearn_fitted(kind, x[:200], y[:200])
    calib = fm.save_npz(tmp_path / "calib.npz", input=x[:120], labels=y[:120])
    res = _convert(fm.save_pickle(est, tmp_path / "model.pkl"), tmp_path / "art",
                   quantize="auto", calibration=calib)
    held_out = x[200:]
    out = edge_sdk.load(res.artifact.path).predict({"input": held_out})
    if regressor:
        err = np.abs(out["variable"].ravel() - est.predict(held_out))
        assert err.max() <= REGRESSION_ATOL, f"{res.chosen}: max abs error {err.max():.3g}"
    else:
        agreement = np.mean(out["label"] == est.predict(held_out))
        assert agreement >= 0.99, f"{res.chosen}: labels agree on {agreement:.1%}"
        assert res.artifact.manifest.extra["labels"] == [0, 1, 2]


def test_unconvertible_estimator_is_named_in_one_short_line(tmp_path: Path) -> None:
    est = _Weird().fit(*fm.sklearn_inputs())
    assert isinstance(est, BaseEstimator) and isinstance(est, ClassifierMixin)
    with pytest.raises(UsageError, match="skl2onnx cannot convert _Weird") as info:
        _convert(fm.save_pickle(est, tmp_path / "weird.pkl"), tmp_path / "art")
    _assert_one_short_line(str(info.value))


def test_pipeline_step_without_converter_is_named_not_the_pipeline(tmp_path: Path) -> None:
    from sklearn.isotonic import IsotonicRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, _, target = fm.tabular(60)
    est = make_pipeline(StandardScaler(), IsotonicRegression()).fit(x[:, :1], target)
    named = r"cannot convert IsotonicRegression \(in this Pipeline\)"
    with pytest.raises(UsageError, match=named) as info:
        _convert(fm.save_pickle(est, tmp_path / "iso.pkl"), tmp_path / "art")
    _assert_one_short_line(str(info.value))
    assert not (tmp_path / "art").exists()


def test_framework_error_quoted_in_a_diagnosis_is_capped() -> None:
    from edge_sdk._internal import CAUSE_CHARS, one_line

    quoted = one_line(ValueError("attributes={" + "1, " * 100_000 + "}\nsecond line"))
    assert quoted.startswith("ValueError: attributes={1, 1, ")
    assert len(quoted) == CAUSE_CHARS


def _assert_one_short_line(message: str) -> None:
    assert "\n" not in message
    assert len(message) < 400, message


class _Weird(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A classifier skl2onnx has no converter for (module level so it pickles)."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Weird:
        self.classes_ = np.unique(y)
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x), dtype=np.int64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.full((len(x), len(self.classes_)), 1 / len(self.classes_))


def test_string_class_labels_come_out_as_strings(tmp_path: Path) -> None:
    from sklearn.tree import DecisionTreeClassifier

    x, y = fm.sklearn_inputs()
    names = np.array(["cat", "dog", "eel"])[y]
    est = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, names)
    res = _convert(fm.save_pickle(est, tmp_path / "tree.pkl"), tmp_path / "art",
                   calibration=fm.save_npz(tmp_path / "c.npz", input=x))
    out = edge_sdk.load(res.artifact.path).predict({"input": x})
    assert out["label"].tolist() == est.predict(x).tolist()
    assert res.artifact.manifest.extra["labels"] == ["cat", "dog", "eel"]
