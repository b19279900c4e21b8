"""scikit-learn in: a pickle/joblib file of an estimator or Pipeline → ONNX via skl2onnx.

Classifiers come out with two plain tensors, ``label`` and ``probabilities``
(no ZipMap: a list of dicts is useless to a device and slow), regressors and
transformers with one float tensor ``variable``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk.errors import ConversionError, UsageError

from ._common import Loaded, first_line, quiet, require

# skl2onnx writes ai.onnx.ml ops; opset 3 of that domain is what onnxruntime ≥ 1.15 runs.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


class SklearnSource:
    """A fitted estimator loaded from a pickle the user vouched for."""

    def __init__(
        self, path: Path, *, trust_pickle: bool,
        input_shapes: Mapping[str, tuple[int, ...]] | None,
    ) -> None:
        if not trust_pickle:
            raise UsageError(
                f"{path}: loading a pickle/joblib file runs any code stored in it, so edge-sdk "
                "refuses by default; pass --trust-pickle if you made this file or trust its "
                "origin"
            )
        require("sklearn", "converting a scikit-learn model")
        joblib = require("joblib", "loading a scikit-learn pickle")
        try:
            with quiet():
                est = joblib.load(path)
        except Exception as err:
            raise ConversionError(
                f"{path}: could not unpickle a scikit-learn model: {first_line(err)}"
            ) from err
        if not (hasattr(est, "fit") and (hasattr(est, "predict") or hasattr(est, "transform"))):
            raise ConversionError(
                f"{path}: holds a {type(est).__module__}.{type(est).__name__}, not a "
                "scikit-learn estimator or Pipeline"
            )
        self.path = path
        self.est = est
        self.final = est.steps[-1][1] if hasattr(est, "steps") else est
        n = getattr(est, "n_features_in_", None)
        name = "input"
        if input_shapes:
            if len(input_shapes) != 1:
                raise UsageError(f"{path}: a scikit-learn model has one input; "
                                 f"got --input-shape for {', '.join(input_shapes)}")
            name, shape = next(iter(input_shapes.items()))
            n = shape[-1] if n is None else n
        if n is None:
            raise ConversionError(
                f"{path}: the estimator does not record its number of features "
                "(n_features_in_); is it fitted?"
            )
        self.input_name = name
        self.n_features = int(n)
        self.classifier = hasattr(est, "predict_proba") and hasattr(self.final, "classes_")

    def loaded(self) -> Loaded:
        specs = (TensorSpec(self.input_name, "float32", ("batch", self.n_features)),)
        extra: dict[str, Any] = {"sklearn": {
            "estimator": type(self.est).__name__,
            "steps": [f"{n}: {type(s).__name__}" for n, s in getattr(self.est, "steps", [])],
            "n_features": self.n_features,
            "task": self.task(),
        }}
        if self.classifier:
            classes = np.asarray(self.final.classes_)
            extra["labels"] = classes.tolist()
        return Loaded("sklearn", specs, self.reference, extra)

    def task(self) -> str:
        """classify / regress as scikit-learn itself says (``is_classifier``)."""
        from sklearn.base import is_classifier, is_regressor

        if self.classifier or is_classifier(self.final):
            return "classify"
        return "regress" if is_regressor(self.final) else "generic"

    def reference(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(feed[self.input_name], dtype=np.float32)
        with quiet():
            if self.classifier:
                label = np.asarray(self.est.predict(x))
                label = label.astype(np.int64) if label.dtype.kind in "iub" else label
                proba = np.asarray(self.est.predict_proba(x), dtype=np.float32)
                return {"label": label, "probabilities": proba}
            if hasattr(self.est, "predict"):
                y = np.asarray(self.est.predict(x), dtype=np.float32)
            else:
                y = np.asarray(self.est.transform(x), dtype=np.float32)
        return {"variable": y.reshape(x.shape[0], -1)}

    def export(self, out: Path) -> Path:
        require("skl2onnx", "converting a scikit-learn model to ONNX")
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType

        options = {id(self.final): {"zipmap": False}} if self.classifier else None
        try:
            with quiet():
                model = convert_sklearn(
                    self.est, name=f"ONNX({type(self.est).__name__})",
                    initial_types=[(self.input_name, FloatTensorType([None, self.n_features]))],
                    options=options, target_opset=TARGET_OPSET, **_bool_safe_converters(),
                )
        except Exception as err:
            missing = _unconvertible(self.est)
            if missing:
                top = type(self.est).__name__
                where = "" if missing == [top] else f" (in this {top})"
                raise ConversionError(
                    f"{self.path}: skl2onnx cannot convert {', '.join(missing)}{where}: it "
                    "has no converter for that class; replace it with a supported estimator, "
                    "or export the model to ONNX yourself and convert the .onnx file"
                ) from err
            raise ConversionError(
                f"{self.path}: skl2onnx cannot convert {type(self.est).__name__}: "
                f"{first_line(err)}"
            ) from err
        # What skl2onnx.to_onnx does after convert_sklearn: declare the opset asked for.
        for op in model.opset_import:
            if op.domain == "":
                op.version = TARGET_OPSET[""]
        outputs = [o.name for o in model.graph.output]
        expected = ["label", "probabilities"] if self.classifier else ["variable"]
        if outputs != expected:
            # Older/newer skl2onnx name outputs differently; rename to the stable names.
            if len(outputs) != len(expected):
                raise ConversionError(
                    f"{self.path}: skl2onnx produced outputs {outputs}, expected {expected}"
                )
            _rename_outputs(model, dict(zip(outputs, expected, strict=True)))
        for vi in [*model.graph.input, *model.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and not dims[0].dim_value:
                dims[0].dim_param = "batch"
        out.write_bytes(model.SerializeToString())
        return out


def _unconvertible(est: Any) -> list[str]:
    """Class names of the parts of ``est`` (itself, or the members of a Pipeline,
    ColumnTransformer or FeatureUnion, recursively) that skl2onnx has no converter for."""
    from skl2onnx import get_model_alias

    if hasattr(est, "steps"):
        members = [s for _, s in est.steps]
    elif hasattr(est, "transformers_"):
        members = [t for _, t, _ in est.transformers_]
    elif hasattr(est, "transformer_list"):
        members = [t for _, t in est.transformer_list]
    else:
        try:
            get_model_alias(type(est))
        except RuntimeError:
            return [type(est).__name__]
        return []
    # "drop" and "passthrough" stand in for members as strings.
    return [n for m in members if not isinstance(m, str) for n in _unconvertible(m)]


def _bool_safe_converters() -> dict[str, dict[type, Any]]:
    """skl2onnx's own HistGradientBoosting converters and shape calculators, the
    converters made protobuf-safe, as keyword arguments for ``convert_sklearn``.

    skl2onnx 1.20's ``add_tree_to_attribute_pairs_hist_gradient_boosting`` gives every
    leaf ``nodes_missing_value_tracks_true = False`` (a Python bool literal; splits get
    ``missing_go_to_left``, a numpy uint8), and the protobuf onnx now runs on refuses a bool
    in the repeated int field ``AttributeProto.ints`` ("Expected an int, got a boolean"),
    so every HistGradientBoosting model failed. The wrapper only turns bools inside list
    attributes into ints, so with a skl2onnx that writes ints it changes nothing. It is
    passed per call rather than registered, so no other skl2onnx user in the process is
    affected; if skl2onnx's private registry moves, the workaround is skipped.
    """
    try:
        from skl2onnx import get_model_alias
        from skl2onnx.common._registration import get_converter, get_shape_calculator
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        pairs = {t: (get_converter(get_model_alias(t)), get_shape_calculator(get_model_alias(t)))
                 for t in (HistGradientBoostingClassifier, HistGradientBoostingRegressor)}
    except (ImportError, RuntimeError, ValueError):
        return {}
    return {"custom_conversion_functions": {t: _ints_not_bools(c) for t, (c, _) in pairs.items()},
            "custom_shape_calculators": {t: s for t, (_, s) in pairs.items()}}


def _ints_not_bools(convert: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    def converter(scope: Any, operator: Any, container: Any) -> None:
        add_node = container.add_node

        def add_int_node(*args: Any, **attrs: Any) -> Any:
            return add_node(*args, **{k: _no_bools(v) for k, v in attrs.items()})

        # Shadowed on this one container (made for this conversion), for this converter only.
        container.add_node = add_int_node
        try:
            convert(scope, operator, container)
        finally:
            del container.add_node

    return converter


def _no_bools(value: Any) -> Any:
    if isinstance(value, list) and any(isinstance(v, bool | np.bool_) for v in value):
        return [int(v) if isinstance(v, bool | np.bool_) else v for v in value]
    return value


def _rename_outputs(model: Any, names: Mapping[str, str]) -> None:
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o in names:
                node.output[i] = names[o]
    for vi in model.graph.output:
        vi.name = names.get(vi.name, vi.name)


__all__ = ["SklearnSource"]
