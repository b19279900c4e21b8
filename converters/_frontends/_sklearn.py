"""scikit-learn in: a pickle/joblib file of an estimator or Pipeline → ONNX via skl2onnx.

What the model is comes from its final step, not from a list of estimators:

* a classifier (``is_classifier`` and ``classes_``) comes out with ``label`` and, when
  it has ``predict_proba``, ``probabilities``; one without (RidgeClassifier, LinearSVC,
  SGDClassifier with hinge loss, Perceptron, ...) with ``label`` and ``scores``, its
  decision function. No ZipMap: a list of dicts is useless to a device and slow.
* a regressor or transformer with one float tensor ``variable``; a clusterer or outlier
  detector with ``label`` (and ``scores``).

skl2onnx's outputs are mapped to those names by their type, whatever skl2onnx calls them.
The export is judged in the task's terms: labels must agree; probabilities are compared
and the difference reported, not refused; a regressor's values must agree within the
front-end's tolerance.

A tree model (a tree, or an ensemble made of trees only) after other steps
is exported the way skl2onnx documents for trees ("Issues when switching to float"):
the steps before it run in double, as scikit-learn runs them, and a ``CastTransformer``
to float32 sits just before the trees, as scikit-learn's trees cast their input. The
artifact still takes and gives float32. In float32 throughout, a scaled feature one ulp
off a split threshold sends a row down the other branch.

The model takes one float32 matrix ``[batch, n_features]``. Models fitted on strings
(categories or a DataFrame whose columns a ColumnTransformer selects by name) are refused
in one line that says so: encode the strings as numbers and select columns by position.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from ._common import Loaded, quiet, require

# skl2onnx writes ai.onnx.ml ops; opset 3 of that domain is what onnxruntime ≥ 1.15 runs.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
KINDS = ("classifier", "regressor", "transformer", "predictor")
TASKS = {"classifier": "classify", "regressor": "regress"}  # others: "generic"


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
                f"{path}: could not unpickle a scikit-learn model: {one_line(err)}"
            ) from err
        if not (hasattr(est, "fit") and (hasattr(est, "predict") or hasattr(est, "transform"))):
            raise ConversionError(
                f"{path}: holds a {type(est).__module__}.{type(est).__name__}, not a "
                "scikit-learn estimator or Pipeline"
            )
        # A fitted search (GridSearchCV, RandomizedSearchCV, HalvingGridSearchCV...)
        # predicts with the estimator it refitted, exactly; that is the model.
        while getattr(est, "best_estimator_", None) is not None:
            est = est.best_estimator_
        self.path = path
        self.est = est
        self.final = _final(est)
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
        strings = _string_input(est)
        if strings:
            raise UsageError(
                f"{path}: {strings}; edge-sdk converts scikit-learn models that take one "
                "numeric matrix: encode strings as numbers (e.g. OrdinalEncoder before "
                "fitting) and select ColumnTransformer columns by position"
            )
        self.input_name = name
        self.n_features = int(n)
        self.kind = _kind(est, self.final)
        targets = _targets(self.final) if self.kind == "classifier" else 1
        if targets > 1:
            raise UsageError(
                f"{path}: {type(self.final).__name__} here predicts {targets} labels per row "
                "(a multi-output classifier); edge-sdk converts classifiers of one target: "
                "fit and convert one classifier per target"
            )
        self.has_proba = self.kind == "classifier" and hasattr(est, "predict_proba")
        self.precision = "float32"
        self.warnings: list[str] = []

    @property
    def outputs(self) -> list[str]:
        """The artifact's output names, in order."""
        if self.kind == "classifier":
            return ["label", "probabilities" if self.has_proba else "scores"]
        if self.kind == "predictor":
            return ["label", "scores"]
        return ["variable"]

    def loaded(self) -> Loaded:
        specs = (TensorSpec(self.input_name, "float32", ("batch", self.n_features)),)
        extra: dict[str, Any] = {"sklearn": {
            "estimator": type(self.est).__name__,
            "steps": [f"{n}: {type(s).__name__}" for n, s in getattr(self.est, "steps", [])],
            "n_features": self.n_features,
            "kind": self.kind,
            "task": TASKS.get(self.kind, "generic"),
            "outputs": self.outputs,
        }}
        if self.kind == "classifier":
            extra["labels"] = np.asarray(self.final.classes_).tolist()
        # A classifier is judged by its labels; its probabilities' difference is reported.
        reported = ["probabilities"] if self.has_proba else []
        return Loaded("sklearn", specs, self.reference, extra, reported=reported)

    def reference(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x32 = np.asarray(feed[self.input_name], dtype=np.float32)
        try:
            # The device feeds float32; those values, exactly, in float64 are what
            # scikit-learn predicts from in its users' hands (given a float32 array its
            # scalers compute in float32)...
            return self._predict(x32.astype(np.float64))
        except (ValueError, TypeError):
            # ...unless the model was fitted on float32 and takes nothing else (KMeans).
            return self._predict(x32)

    def _predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with quiet():
            if self.kind in ("classifier", "predictor"):
                label = np.asarray(self.est.predict(x))
                label = label.astype(np.int64) if label.dtype.kind in "iub" else label
                out = {"label": label}
                if self.has_proba:
                    out["probabilities"] = np.asarray(self.est.predict_proba(x),
                                                      dtype=np.float32)
                return out
            if self.kind == "regressor":
                y = np.asarray(self.est.predict(x), dtype=np.float32)
            else:
                y = np.asarray(self.est.transform(x), dtype=np.float32)
        return {"variable": y.reshape(x.shape[0], -1)}

    def export(self, out: Path) -> Path:
        require("skl2onnx", "converting a scikit-learn model to ONNX")
        model = None
        est = _predict_only(self.est)
        doubled = _cast_before_trees(est)
        if doubled is not None:
            try:
                model = self._convert(doubled, double=True)
                self.precision = "float64 before the trees"
            except ConversionError as err:
                self.warnings.append(
                    f"the steps before the tree model could not be exported in double "
                    f"precision ({err}); they run in float32, so rows near a split threshold "
                    "may take the other branch"
                )
        if model is None:
            model = self._convert(est, double=False)
        for vi in [*model.graph.input, *model.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and not dims[0].dim_value:
                dims[0].dim_param = "batch"
        out.write_bytes(model.SerializeToString())
        return out

    def export_notes(self) -> dict[str, Any]:
        """After :meth:`export`: the precision it chose, for the manifest, and warnings."""
        return {"extra": {"sklearn": {"precision": self.precision}},
                "warnings": list(self.warnings)}

    def _convert(self, est: Any, *, double: bool) -> Any:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

        tensor = DoubleTensorType if double else FloatTensorType
        final = _final(est)
        options: dict[int, dict[str, Any]] = {}
        if _allows(final, "zipmap"):
            options[id(final)] = {"zipmap": False}
        elif self.kind == "classifier":
            # skl2onnx's Pipeline parser gives a classifier without options a zipmap one,
            # which LinearSVC's converter then refuses; any entry for it prevents that
            options[id(final)] = {}
        for part in _walk(est):
            if _allows(part, "div"):
                # skl2onnx scales by x * (1 / s) unless asked; scikit-learn divides, and
                # the last bit of difference moves rows across a later tree's thresholds
                options[id(part)] = {"div": "div" if double else "div_cast"}
        try:
            with quiet():
                model = convert_sklearn(
                    est, name=f"ONNX({type(self.est).__name__})",
                    initial_types=[(self.input_name, tensor([None, self.n_features]))],
                    options=options or None, target_opset=TARGET_OPSET, **_bool_safe_converters(),
                )
        except Exception as err:
            missing = _unconvertible(self.est)
            if missing:
                top = type(self.est).__name__
                where = "" if missing == [top] else f" (in this {top})"
                raise UsageError(
                    f"{self.path}: skl2onnx cannot convert {', '.join(missing)}{where}: it "
                    "has no converter for that class; replace it with a supported estimator, "
                    "or export the model to ONNX yourself and convert the .onnx file"
                ) from err
            refused: type[EdgeError] = ConversionError
            if not double and (isinstance(err, NotImplementedError)
                               or "not supported" in str(err)):
                # skl2onnx's converter exists but refuses how this step is configured
                # (FunctionTransformer with a function, ...): the user's to change
                refused = UsageError
            raise refused(
                f"{self.path}: skl2onnx cannot convert {type(self.est).__name__}"
                f"{' in double precision' if double else ''}: {one_line(err)}"
            ) from err
        # What skl2onnx.to_onnx does after convert_sklearn: declare the opset asked for.
        for op in model.opset_import:
            if op.domain == "":
                op.version = TARGET_OPSET[""]
        self._name_outputs(model)
        if double:
            _float_io(model)
            _check_runs(model, self.path)
        return model

    def _name_outputs(self, model: Any) -> None:
        """Rename skl2onnx's outputs to :attr:`outputs` by their element type: integer or
        string outputs are labels, float ones probabilities, scores or values."""
        from onnx import TensorProto

        by_type: dict[str, list[str]] = {"label": [], "float": []}
        for vi in model.graph.output:
            floaty = vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
            by_type["float" if floaty else "label"].append(vi.name)
        found = [o.name for o in model.graph.output]
        wanted = self.outputs
        if wanted == ["variable"]:
            pairs = list(zip(by_type["float"], wanted, strict=False))
            ok = len(by_type["float"]) == 1 and not by_type["label"]
        else:
            pairs = list(zip(by_type["label"][:1] + by_type["float"][:1], wanted, strict=False))
            ok = len(by_type["label"]) == 1 and len(by_type["float"]) <= 1
        if not ok:
            raise ConversionError(
                f"{self.path}: skl2onnx produced outputs {found} for this {self.kind}; "
                f"edge-sdk maps a {self.kind}'s outputs to {wanted} by type and cannot here"
            )
        _rename_outputs(model, dict(pairs))
        if "label" in wanted:
            _flat_label(model)
        for vi in model.graph.output:
            if vi.name == "scores":
                # a binary decision function is one column though skl2onnx declares two
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == 2:
                    dims[1].dim_param = "scores"


def _predict_only(est: Any) -> Any:
    """``est``, or a copy with what only shapes ``transform()`` of the final step reset:
    the artifact gives what ``predict``/``predict_proba`` give, and skl2onnx refuses a
    VotingClassifier whose ``flatten_transform`` is True (scikit-learn's default)."""
    final = _final(est)
    if not getattr(final, "flatten_transform", False):
        return est
    est = copy.deepcopy(est)
    _final(est).flatten_transform = False
    return est


def _flat_label(model: Any) -> None:
    """Make ``label`` one value per row, ``[batch]``, as scikit-learn's ``predict`` gives
    it: skl2onnx's outlier detectors write ``[batch, 1]``, its QDA ``[1, batch]``."""
    from onnx import TensorProto, helper

    inner = "label_unflattened"
    for node in model.graph.node:
        node.input[:] = [inner if n == "label" else n for n in node.input]
        node.output[:] = [inner if n == "label" else n for n in node.output]
    shape = helper.make_tensor("label_shape", TensorProto.INT64, [1], [-1])
    model.graph.initializer.append(shape)
    model.graph.node.append(helper.make_node("Reshape", [inner, "label_shape"], ["label"],
                                             name="label_flat"))
    for vi in model.graph.output:
        if vi.name == "label":
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            dims.add().dim_param = "batch"


def _targets(classifier: Any) -> int:
    """How many labels a fitted classifier predicts per row (``classes_`` is a list of
    arrays, one per target, when it was fitted on a 2-D ``y``)."""
    classes = classifier.classes_  # (not n_outputs_: an MLP's counts its output units)
    if isinstance(classes, list) and classes and np.ndim(classes[0]) == 1:
        return len(classes)
    return 1


def _final(est: Any) -> Any:
    while hasattr(est, "steps"):
        est = est.steps[-1][1]
    return est


def _kind(est: Any, final: Any) -> str:
    """What the model predicts, from its final step (see :data:`KINDS`)."""
    from sklearn.base import is_classifier, is_regressor

    if not hasattr(est, "predict"):
        return "transformer"
    if (is_classifier(final) or getattr(final, "_estimator_type", None) == "classifier") \
            and hasattr(final, "classes_"):
        return "classifier"
    if is_regressor(final) or getattr(final, "_estimator_type", None) == "regressor":
        return "regressor"
    return "predictor"


def _allows(est: Any, option: str) -> bool:
    """Whether skl2onnx's converter for ``est`` takes ``option`` (LinearSVC has no ZipMap
    and refuses a ``zipmap`` option)."""
    try:
        from skl2onnx import get_model_alias
        from skl2onnx.common._registration import get_converter

        allowed = get_converter(get_model_alias(type(est))).get_allowed_options()
    except (ImportError, RuntimeError, ValueError, AttributeError):
        return False
    return option in (allowed or {})


def _members(est: Any) -> list[Any]:
    """The estimators inside a Pipeline, ColumnTransformer or FeatureUnion ("drop" and
    "passthrough" stand in for members as strings)."""
    if hasattr(est, "steps"):
        members = [s for _, s in est.steps]
    elif hasattr(est, "transformers_"):
        members = [t for _, t, _ in est.transformers_]
    elif hasattr(est, "transformer_list"):
        members = [t for _, t in est.transformer_list]
    else:
        return []
    return [m for m in members if not isinstance(m, str)]


def _walk(est: Any) -> Iterator[Any]:
    yield est
    for m in _members(est):
        yield from _walk(m)


def _string_input(est: Any) -> str | None:
    """Why ``est`` needs strings (or named DataFrame columns) as input, or None."""
    for part in _walk(est):
        name = type(part).__name__
        cats = getattr(part, "categories_", None)
        if isinstance(cats, list) and any(np.asarray(c).dtype.kind in "OUS" for c in cats):
            return f"its {name} was fitted on string categories"
        stats = getattr(part, "statistics_", None)
        if stats is not None and np.asarray(stats).dtype.kind in "OUS":
            return f"its {name} was fitted on strings"
        for _, _, cols in getattr(part, "transformers_", []):
            flat = [cols] if isinstance(cols, str) else (
                list(cols) if isinstance(cols, list | tuple | np.ndarray) else [cols])
            if any(isinstance(c, str) or callable(c) for c in flat):
                return (f"its {name} selects columns by name (it was fitted on a "
                        "DataFrame)")
    return None


def _is_tree_model(est: Any) -> bool:
    """A tree, or an ensemble made of trees only: what splits its input on thresholds.
    A VotingClassifier or StackingRegressor of linear models is no tree model, though it
    lives in ``sklearn.ensemble``; it is judged by the estimators it holds."""
    module = type(est).__module__
    if module.startswith(("sklearn.tree", "sklearn.ensemble._hist_gradient_boosting")):
        return True
    if not module.startswith("sklearn.ensemble"):
        return False
    held = getattr(est, "estimators_", None)
    members = list(held.ravel()) if isinstance(held, np.ndarray) else list(held or [])
    final = getattr(est, "final_estimator_", None)
    members += [] if final is None else [final]
    return bool(members) and all(_is_tree_model(m) for m in members
                                 if not isinstance(m, str))


def _cast_before_trees(est: Any) -> Any | None:
    """A copy of ``est`` with a float32 ``CastTransformer`` before every tree model that
    follows other steps in a Pipeline, or None when there is none (a tree fed straight
    from the float32 input is exact already: skl2onnx picks float32 thresholds that split
    float32 inputs as scikit-learn's double ones do)."""
    if not hasattr(est, "steps"):
        return None
    from skl2onnx.sklapi import CastTransformer

    est = copy.deepcopy(est)
    found = False

    def visit(pipe: Any, first: bool) -> None:
        nonlocal found
        steps = []
        for i, (name, step) in enumerate(pipe.steps):
            if hasattr(step, "steps"):
                visit(step, first and i == 0)
            elif _is_tree_model(step) and not (first and i == 0):
                cast = CastTransformer(dtype=np.float32).fit(np.zeros((1, 1)))
                steps.append((f"{name}-cast32", cast))
                found = True
            steps.append((name, step))
        pipe.steps = steps

    visit(est, True)
    return est if found else None


def _float_io(model: Any) -> None:
    """Make a double-precision graph take and give float32 like every other artifact:
    a Cast after the input (exact) and before each double output."""
    from onnx import TensorProto, helper

    nodes = []
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
            inner = f"{vi.name}_float64"
            for node in model.graph.node:
                for i, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[i] = inner
            nodes.append(helper.make_node("Cast", [vi.name], [inner], to=TensorProto.DOUBLE,
                                          name=f"{vi.name}_to_float64"))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    tail = []
    for vi in model.graph.output:
        if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
            inner = f"{vi.name}_float64"
            for node in model.graph.node:
                node.input[:] = [inner if n == vi.name else n for n in node.input]
                node.output[:] = [inner if n == vi.name else n for n in node.output]
            tail.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT,
                                         name=f"{vi.name}_to_float32"))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    all_nodes = [*nodes, *model.graph.node, *tail]
    del model.graph.node[:]
    model.graph.node.extend(all_nodes)


def _check_runs(model: Any, path: Path) -> None:
    """onnxruntime loads ``model`` (skl2onnx writes double graphs it cannot run for some
    converters); a ConversionError otherwise."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ConversionError(f"onnxruntime refuses it: {one_line(err)}") from err


def _unconvertible(est: Any) -> list[str]:
    """Class names of the parts of ``est`` (itself, or the members of a Pipeline,
    ColumnTransformer or FeatureUnion, recursively) that skl2onnx has no converter for."""
    from skl2onnx import get_model_alias

    members = _members(est)
    if not members:
        try:
            get_model_alias(type(est))
        except RuntimeError:
            return [type(est).__name__]
        return []
    return [n for m in members for n in _unconvertible(m)]


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
    """Rename graph outputs, where they are made and where they are read (skl2onnx's
    linear classifiers compute ``label`` from ``probabilities``)."""
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for vi in model.graph.output:
        vi.name = names.get(vi.name, vi.name)


__all__ = ["SklearnSource"]
