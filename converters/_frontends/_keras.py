"""Keras / TensorFlow in: ``.keras``, ``.h5`` or a SavedModel directory.

Everything goes through one SavedModel with a ``serving_default`` signature
whose inputs and outputs carry the model's names: Keras models are exported
to one (``keras.export.ExportArchive``), SavedModels are used as they are.
TFLite is converted from it (see ``converters/_tflite.py``) and ONNX with
tf2onnx from the same signature, so both formats see the same graph.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, UsageError

from ._common import Loaded, quiet, rename_batch_dims, require

ONNX_OPSET = 17
SIGNATURE = "serving_default"
_AUTO_NAME = re.compile(r"^keras_tensor(_\d+)?$")


class KerasSource:
    """A Keras model or SavedModel and the SavedModel directory everything is built from."""

    def __init__(
        self, path: Path, work: Path, *, trust_pickle: bool,
        input_shapes: Mapping[str, tuple[int, ...]] | None,
    ) -> None:
        self.tf = require("tensorflow", "converting a Keras/TensorFlow model")
        self.path = path
        self.model: Any = None
        if path.is_dir():
            self.origin = "savedmodel"
            self.saved_dir = path
        else:
            self.origin = "keras"
            self.model = _load_keras(path, trust_pickle)
            self.saved_dir = work / "savedmodel"
            self._export_keras(input_shapes)
        self._load_signature()

    # -- loading -----------------------------------------------------------------------

    def _export_keras(self, input_shapes: Mapping[str, tuple[int, ...]] | None) -> None:
        keras = require("keras", "converting a Keras model")
        tf = self.tf
        model = self.model
        inputs = list(getattr(model, "inputs", None) or [])
        if not inputs:
            raise ConversionError(
                f"{self.path}: the Keras model has no defined inputs (a subclassed model that "
                "was never built); save it after calling it once or use a functional model"
            )
        names = [_clean(t.name, "input", i, len(inputs)) for i, t in enumerate(inputs)]
        # The model takes its inputs positionally in this order; the SavedModel
        # signature lists them by name (sorted), so keep the order for the reference.
        self.keras_input_names = names
        specs = []
        for n, t in zip(names, inputs, strict=True):
            shape = [None, *list(t.shape)[1:]]
            if input_shapes and n in input_shapes:
                shape = [None, *list(input_shapes[n])[1:]]
            specs.append(tf.TensorSpec(shape, tf.as_dtype(t.dtype), name=n))
        raw_out = list(getattr(model, "outputs", None) or [])
        out_names = list(getattr(model, "output_names", None) or [])
        if len(out_names) != len(raw_out) or any(_AUTO_NAME.match(n) for n in out_names):
            out_names = [_clean(t.name, "output", i, len(raw_out)) for i, t in enumerate(raw_out)]
        self.keras_output_names = out_names

        def serve(*args: Any) -> dict[str, Any]:
            out = model(list(args) if len(args) > 1 else args[0], training=False)
            outs = list(out.values()) if isinstance(out, Mapping) else (
                list(out) if isinstance(out, list | tuple) else [out])
            return dict(zip(out_names, outs, strict=True))

        try:
            with quiet():
                archive = keras.export.ExportArchive()
                archive.track(model)
                archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=specs)
                archive.write_out(str(self.saved_dir), verbose=False)
        except Exception as err:
            raise ConversionError(
                f"{self.path}: could not export the Keras model to a SavedModel: "
                f"{one_line(err)}"
            ) from err

    def _load_signature(self) -> None:
        tf = self.tf
        try:
            with quiet():
                self.saved = tf.saved_model.load(str(self.saved_dir))
        except Exception as err:
            raise ConversionError(
                f"{self.saved_dir}: TensorFlow cannot load this SavedModel: {one_line(err)}"
            ) from err
        sigs = dict(self.saved.signatures)
        if not sigs:
            raise ConversionError(
                f"{self.saved_dir}: the SavedModel has no signatures; export it with "
                "tf.saved_model.save(..., signatures=...) or model.export()"
            )
        self.signature_key = SIGNATURE if SIGNATURE in sigs else sorted(sigs)[0]
        fn = sigs[self.signature_key]
        self.fn = fn
        kw = fn.structured_input_signature[1]
        self.input_specs = tuple(
            TensorSpec(name, np.dtype(spec.dtype.as_numpy_dtype).name,
                       tuple(("batch" if i == 0 else None) if d is None else int(d)
                             for i, d in enumerate(spec.shape.as_list())))
            for name, spec in kw.items()
        )
        self.output_names = list(fn.structured_outputs)
        self.tf_specs = [tf.TensorSpec(spec.shape, spec.dtype, name=name)
                         for name, spec in kw.items()]

    # -- running -----------------------------------------------------------------------

    def reference(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = self.tf
        with quiet():
            if self.model is not None:
                args = [feed[n] for n in self.keras_input_names]
                out = self.model(args if len(args) > 1 else args[0], training=False)
                outs = list(out.values()) if isinstance(out, Mapping) else (
                    list(out) if isinstance(out, list | tuple) else [out])
                return {n: np.asarray(o) for n, o in
                        zip(self.keras_output_names, outs, strict=True)}
            res = self.fn(**{s.name: tf.constant(feed[s.name]) for s in self.input_specs})
        return {k: v.numpy() for k, v in res.items()}

    def loaded(self) -> Loaded:
        extra: dict[str, Any] = {"tensorflow": {
            "origin": self.origin, "version": str(self.tf.__version__),
            "signature": self.signature_key,
        }}
        return Loaded("keras", self.input_specs, self.reference, extra)

    # -- ONNX --------------------------------------------------------------------------

    def export(self, out: Path) -> Path:
        """ONNX via tf2onnx from the serving signature (dynamic batch on axis 0)."""
        try:
            with quiet():
                import tf2onnx  # type: ignore[import-untyped]
        except ImportError as err:
            raise ConversionError(
                f"{self.path}: Keras/TensorFlow → ONNX needs tf2onnx, which is not installed "
                "(pip install 'edge-sdk[tensorflow]'); or convert with --to tflite"
            ) from err
        tf = self.tf
        fn = self.fn
        names = [s.name for s in self.input_specs]

        @tf.function(input_signature=self.tf_specs)  # type: ignore[untyped-decorator]
        def call(*args: Any) -> Any:
            return fn(**dict(zip(names, args, strict=True)))

        try:
            with quiet():
                tf2onnx.convert.from_function(call, input_signature=self.tf_specs,
                                              opset=ONNX_OPSET, output_path=str(out))
        except Exception as err:
            raise ConversionError(
                f"{self.path}: tf2onnx {getattr(tf2onnx, '__version__', '?')} cannot convert "
                f"this model with TensorFlow {tf.__version__}: {one_line(err)}; use --to "
                "tflite (TensorFlow's own converter) instead"
            ) from err
        rename_batch_dims(out)
        return out


def _load_keras(path: Path, trust_pickle: bool) -> Any:
    keras = require("keras", "converting a Keras model")
    try:
        with quiet():
            # safe_mode refuses Lambda layers (they unpickle Python bytecode).
            return keras.models.load_model(str(path), compile=False, safe_mode=not trust_pickle)
    except Exception as err:
        msg = one_line(err)
        if "safe_mode" in str(err):
            raise UsageError(
                f"{path}: this Keras model holds Python code (a Lambda layer) that runs when "
                "it loads; pass --trust-pickle if you trust its origin"
            ) from err
        raise ConversionError(f"{path}: not a Keras model Keras can load: {msg}") from err


def _clean(name: str, prefix: str, i: int, n: int) -> str:
    if not name or _AUTO_NAME.match(name) or not re.match(r"^[A-Za-z_][\w.\-/]*$", name):
        return prefix if n == 1 else f"{prefix}_{i}"
    return name


__all__ = ["KerasSource"]
