"""PyTorch in: TorchScript files, exported programs (.pt2) and ``package.module:factory``.

Modules and TorchScript go through the TorchScript-based exporter with
``dynamic_axes`` (fast, and a dynamic batch without shape guards); exported
programs through the dynamo exporter, which is the only one that takes them.
Either way the ONNX file is checked against the torch model before it is used.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, UsageError

from .._data import load_samples
from ._common import Loaded, quiet, rename_batch_dims, require
from ._detect import is_factory

OPSET = 17


class TorchSource:
    """A loaded torch model, its input signature and example inputs for tracing."""

    def __init__(
        self, src: str, *, input_shapes: Mapping[str, tuple[int, ...]] | None,
        calibration: Path | None, trust_pickle: bool,
    ) -> None:
        self.torch = require("torch", "converting a PyTorch model")
        self.src = src
        self.program: Any = None
        self.module: Any = None
        if is_factory(src):
            self.module = _from_factory(src)
            self.origin = "factory"
        else:
            path = Path(src)
            self.origin, obj = _load_file(self.torch, path, trust_pickle)
            if self.origin == "exported-program":
                self.program = obj
                self.module = obj.module()
            else:
                self.module = obj
        if hasattr(self.module, "eval") and self.origin != "exported-program":
            self.module.eval()
        self.param_names = _forward_names(self.module, self.program)
        self.example = self._example_inputs(input_shapes, calibration)
        self.input_names = list(self.example)
        with quiet(), self.torch.inference_mode():
            out = self.module(*self._tensors(self.example))
        self.output_names = _output_names(out)

    # -- signature ---------------------------------------------------------------------

    def _example_inputs(
        self, input_shapes: Mapping[str, tuple[int, ...]] | None, calibration: Path | None,
    ) -> dict[str, np.ndarray]:
        if self.program is not None:
            return self._program_example(input_shapes)
        if input_shapes:
            names = self._order(list(input_shapes))
            specs = [TensorSpec(n, "float32", tuple(input_shapes[n])) for n in names]
            if calibration is not None:
                specs = self._calibration_specs(calibration, specs)
            rng = np.random.default_rng(0)
            return {s.name: _example_batch(rng.standard_normal(
                [d if isinstance(d, int) else 1 for d in s.shape]).astype(s.dtype)) for s in specs}
        if calibration is not None:
            return self._from_calibration(calibration)
        raise UsageError(
            f"{self.src}: a {self.origin} torch model carries no input shapes; pass "
            f"--input-shape NAME=1x3x224x224 (inputs: {', '.join(self.param_names) or '?'}) "
            "or a --calibration .npz keyed by input name"
        )

    def _order(self, names: list[str]) -> list[str]:
        # The exporter binds inputs by position, so follow forward()'s parameter order.
        if set(names) <= set(self.param_names):
            return [n for n in self.param_names if n in names]
        if len(names) > len(self.param_names) and self.param_names:
            raise UsageError(
                f"{self.src}: {len(names)} inputs given but forward() takes "
                f"{len(self.param_names)} ({', '.join(self.param_names)})"
            )
        return names

    def _from_calibration(self, calibration: Path) -> dict[str, np.ndarray]:
        from edge_sdk._internal import load_npz

        from .._data import LABELS_KEY

        arrays = {k: v for k, v in load_npz(calibration).items() if k != LABELS_KEY}
        names = self._order(list(arrays))
        specs = [TensorSpec(n, _float32_if_float(arrays[n].dtype),
                            (None, *arrays[n].shape[1:])) for n in names]
        samples = load_samples(calibration, specs, what="calibration")
        first = samples.feeds[0]
        return {n: _example_batch(first[n]) for n in names}

    def _calibration_specs(
        self, calibration: Path, specs: Sequence[TensorSpec]
    ) -> list[TensorSpec]:
        from edge_sdk._internal import load_npz

        arrays = load_npz(calibration)
        return [TensorSpec(s.name, _float32_if_float(arrays[s.name].dtype), s.shape)
                if s.name in arrays else s for s in specs]

    def _program_example(
        self, input_shapes: Mapping[str, tuple[int, ...]] | None
    ) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        example: dict[str, np.ndarray] = {}
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        user = list(self.program.graph_signature.user_inputs)
        for node in placeholders:
            if node.name not in user:
                continue
            val = node.meta.get("val")
            shape = [int(d) if str(d).isdigit() else 2 for d in val.shape]
            if input_shapes and node.name in input_shapes:
                shape = list(input_shapes[node.name])
            dtype = str(val.dtype).replace("torch.", "")
            arr = rng.standard_normal(shape) if "float" in dtype else rng.integers(0, 8, shape)
            example[node.name] = arr.astype(dtype)
        return example

    # -- running -----------------------------------------------------------------------

    def _tensors(self, feed: Mapping[str, np.ndarray]) -> list[Any]:
        return [self.torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]

    def reference(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with quiet(), self.torch.inference_mode():
            out = self.module(*self._tensors(feed))
        flat = _flatten(out)
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, flat, strict=True)}

    def loaded(self) -> Loaded:
        specs = tuple(
            TensorSpec(n, str(a.dtype), ("batch", *a.shape[1:]) if a.ndim else ())
            for n, a in self.example.items()
        )
        extra: dict[str, Any] = {"torch": {"origin": self.origin,
                                           "version": str(self.torch.__version__)}}
        return Loaded("torch", specs, self.reference, extra)

    # -- export ------------------------------------------------------------------------

    def export(self, out: Path) -> Path:
        """Write the ONNX export to ``out`` (dynamic batch on axis 0)."""
        torch = self.torch
        args = tuple(self._tensors(self.example))
        try:
            with quiet():
                if self.program is not None:
                    torch.onnx.export(self.program, args, str(out), dynamo=True,
                                      input_names=self.input_names,
                                      output_names=self.output_names, verbose=False)
                else:
                    axes = {n: {0: "batch"} for n, a in self.example.items() if a.ndim}
                    axes.update({n: {0: "batch"} for n in self.output_names})
                    torch.onnx.export(self.module, args, str(out), dynamo=False,
                                      opset_version=OPSET, input_names=self.input_names,
                                      output_names=self.output_names, dynamic_axes=axes,
                                      do_constant_folding=True)
        except Exception as err:
            raise ConversionError(
                f"{self.src}: torch.onnx.export failed for this {self.origin} model: "
                f"{one_line(err)}"
            ) from err
        if not out.is_file():
            raise ConversionError(f"{self.src}: torch.onnx.export wrote no file")
        rename_batch_dims(out)
        return out

    @property
    def fixed_batch(self) -> int | None:
        """The batch an exported program was traced with, when it is not dynamic."""
        if self.program is None:
            return None
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in self.program.graph_signature.user_inputs:
                dim0 = node.meta["val"].shape[0] if node.meta["val"].ndim else None
                return int(dim0) if dim0 is not None and str(dim0).isdigit() else None
        return None


def _from_factory(src: str) -> Any:
    module_name, attr = src.split(":", 1)
    # The CLI's sys.path lacks the working directory, where the user's package usually is.
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        with quiet():
            try:
                mod = importlib.import_module(module_name)
            except Exception as err:
                raise UsageError(
                    f"torch factory {src!r}: cannot import module {module_name!r}: "
                    f"{one_line(err)} (run from the directory that holds the package, or "
                    "install it)"
                ) from err
            obj: Any = mod
            for part in attr.split("."):
                if not hasattr(obj, part):
                    raise UsageError(
                        f"torch factory {src!r}: module {module_name!r} has no attribute "
                        f"{attr!r}"
                    )
                obj = getattr(obj, part)
            if not callable(obj):
                raise UsageError(f"torch factory {src!r}: {attr!r} is not callable")
            try:
                model = obj()
            except Exception as err:
                raise ConversionError(
                    f"torch factory {src!r} raised {one_line(err)}"
                ) from err
    finally:
        if added:
            sys.path.remove(cwd)
    torch = require("torch", "converting a PyTorch model")
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(
            f"torch factory {src!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _load_file(torch: Any, path: Path, trust_pickle: bool) -> tuple[str, Any]:
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConversionError(
            f"{path}: not a TorchScript or exported-program archive ({one_line(err)}); "
            "save with torch.jit.save or torch.export.save, or pass package.module:factory"
        ) from err
    is_program = any("serialized_exported_program" in n or n.startswith("models/")
                     or n.endswith("/archive_format") for n in names)
    is_script = any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
    try:
        with quiet():
            if is_program or path.suffix.lower() == ".pt2":
                return "exported-program", torch.export.load(str(path))
            if is_script:
                return "torchscript", torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ConversionError(f"{path}: torch cannot load it: {one_line(err)}") from err
    # torch.save of a whole module or a state_dict: a pickle, so it can run code.
    if not trust_pickle:
        raise UsageError(
            f"{path}: a torch.save pickle, and loading a pickle runs code from the file; "
            "pass --trust-pickle if you trust its origin, or save the model with "
            "torch.jit.save / torch.export.save, or pass package.module:factory"
        )
    try:
        with quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConversionError(f"{path}: torch.load failed: {one_line(err)}") from err
    if isinstance(obj, torch.nn.Module):
        return "pickled-module", obj
    raise ConversionError(
        f"{path}: holds a {type(obj).__name__} (a state_dict?), not a model; pass "
        "package.module:factory that builds the module and loads these weights"
    )


def _forward_names(module: Any, program: Any) -> list[str]:
    if program is not None:
        return list(program.graph_signature.user_inputs)
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript
        return [a.name for a in schema.arguments[1:]]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flatten(v)]
    return [out]


def _output_names(out: Any) -> list[str]:
    if isinstance(out, Mapping) and all(not isinstance(v, Mapping | list | tuple)
                                        for v in out.values()):
        return [str(k) for k in out]
    n = len(_flatten(out))
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _example_batch(arr: np.ndarray) -> np.ndarray:
    # Tracing with batch 1 lets an exporter fold the batch into reshapes; use 2.
    if arr.ndim and arr.shape[0] == 1:
        return np.concatenate([arr, arr], axis=0)
    return arr


def _float32_if_float(dtype: np.dtype[Any]) -> str:
    return "float32" if dtype.kind == "f" else dtype.name


__all__ = ["TorchSource"]
