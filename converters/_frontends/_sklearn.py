"""scikit-learn in: a pickle/joblib file of an estimator or Pipeline → ONNX via skl2onnx.

Classifiers come out with two plain tensors, ``label`` and ``probabilities``
(no ZipMap: a list of dicts is useless to a device and slow), regressors and
transformers with one float tensor ``variable``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        }}
        if self.classifier:
            classes = np.asarray(self.final.classes_)
            extra["labels"] = classes.tolist()
        return Loaded("sklearn", specs, self.reference, extra)

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
        skl2onnx = require("skl2onnx", "converting a scikit-learn model to ONNX")
        from skl2onnx.common.data_types import FloatTensorType

        options = {id(self.final): {"zipmap": False}} if self.classifier else None
        try:
            with quiet():
                model = skl2onnx.to_onnx(
                    self.est, initial_types=[(self.input_name,
                                              FloatTensorType([None, self.n_features]))],
                    options=options, target_opset=TARGET_OPSET,
                )
        except Exception as err:
            raise ConversionError(
                f"{self.path}: skl2onnx cannot convert {type(self.est).__name__}: "
                f"{first_line(err)}"
            ) from err
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


def _rename_outputs(model: Any, names: Mapping[str, str]) -> None:
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o in names:
                node.output[i] = names[o]
    for vi in model.graph.output:
        vi.name = names.get(vi.name, vi.name)


__all__ = ["SklearnSource"]
