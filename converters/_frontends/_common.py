"""Pieces every front-end shares: lazy framework imports, export verification, samples."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError

from .._data import Samples, load_samples, synthetic_samples

Reference = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

_EXTRAS = {
    "torch": "torch",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "tf2onnx": "tensorflow",
    "sklearn": "convert",
    "skl2onnx": "convert",
    "joblib": "convert",
    "onnx": "convert",
}


@dataclass(frozen=True)
class FrontendConfig:
    """Tolerances and sizes for checking a framework export against the framework.

    A float output passes when ``max|onnx - ref| <= atol + rtol * max|ref|``;
    an integer or string output (class labels) when at least ``label_agreement``
    of its elements are equal — float32 vs float64 ties can flip a rare label.
    """

    rtol: float = 1e-3
    atol: float = 1e-4
    label_agreement: float = 0.99
    verify_samples: int = 32
    synthetic_samples: int = 8


DEFAULT_CONFIG = FrontendConfig()


def require(module: str, what: str) -> ModuleType:
    """Import a framework lazily; a missing one is a one-line install hint."""
    with quiet():
        try:
            return importlib.import_module(module)
        except ImportError as err:
            top = module.split(".")[0]
            extra = _EXTRAS.get(top, "convert")
            raise ConversionError(
                f"{what} needs {top}, which is not installed here "
                f"(pip install 'edge-sdk[{extra}]'): {err}"
            ) from err


_captured = False


def capture_output() -> None:
    """Say that this process's stdout and stderr already go to a log (the framework
    child's): :func:`quiet` then leaves them alone, so the last line a framework printed
    before a crash is there to report."""
    global _captured
    _captured = True


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the frameworks' progress prints, warnings and C++ logs for one block.

    TensorFlow's converter and LiteRT print from C++ straight to file descriptors 1
    and 2, so those are pointed at /dev/null too (unless :func:`capture_output` was
    called); failures still surface as exceptions, which is how every caller reports
    them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    previous = logging.root.manager.disable
    if _captured:
        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.disable(previous)
        return
    sink = io.StringIO()
    saved: list[tuple[int, int]] = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass  # no real descriptors (embedded interpreters): Python-level silence only
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        for fd, copy in reversed(saved):
            os.dup2(copy, fd)
            os.close(copy)


@dataclass
class Loaded:
    """A framework model ready to export: its signature and its own predict."""

    kind: str
    inputs: tuple[TensorSpec, ...]
    reference: Reference
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Float outputs whose difference is reported but refused by no tolerance: the task is
    # judged by the others (a classifier by its labels, not its probabilities).
    reported: list[str] = field(default_factory=list)


def verification_samples(
    inputs: Sequence[TensorSpec], calibration: Path | None, evaluation: Path | None,
    config: FrontendConfig = DEFAULT_CONFIG,
) -> Samples:
    """The user's eval (else calibration) samples, else synthetic ones; capped in number."""
    for path, what in ((evaluation, "evaluation"), (calibration, "calibration")):
        if path is not None:
            s = load_samples(path, inputs, what=what)
            return Samples(s.feeds[: config.verify_samples],
                           None if s.labels is None else s.labels[: config.verify_samples],
                           s.origin)
    return synthetic_samples(inputs, n=config.synthetic_samples, seed=0)


def batched(
    samples: Samples, inputs: Sequence[TensorSpec] = ()
) -> list[dict[str, np.ndarray]]:
    """Feeds to verify with: all samples stacked into one batch where they share shapes
    and every input has a symbolic batch axis, else one feed per sample."""
    feeds = list(samples.feeds)
    dynamic = all(s.shape and not isinstance(s.shape[0], int) for s in inputs)
    if len(feeds) > 1 and dynamic:
        try:
            stacked = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
        except ValueError:
            return feeds
        return [stacked]
    return feeds


def compare_outputs(
    got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], *, what: str,
    config: FrontendConfig = DEFAULT_CONFIG, reported: Sequence[str] = (),
) -> dict[str, float]:
    """Raise :class:`ConversionError` unless ``got`` matches ``ref`` within the tolerances
    (outputs named in ``reported`` are only measured).

    Returns per-output figures (max abs error or label agreement) for the report.
    """
    figures: dict[str, float] = {}
    missing = [k for k in ref if k not in got]
    if missing:
        raise ConversionError(
            f"{what}: the exported model has no output(s) {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, got))})"
        )
    for name, r in ref.items():
        a = np.asarray(got[name])
        b = np.asarray(r)
        if a.size != b.size:
            raise ConversionError(
                f"{what}: output '{name}' has shape {list(a.shape)} but the framework gives "
                f"{list(b.shape)}"
            )
        a = a.reshape(b.shape)
        if b.dtype.kind in "fc":
            af = a.astype(np.float64)
            bf = b.astype(np.float64)
            if not np.array_equal(np.isfinite(af), np.isfinite(bf)):
                raise ConversionError(
                    f"{what}: output '{name}' has NaN/inf where the framework's does not"
                )
            fin = np.isfinite(bf)
            err = float(np.max(np.abs(af[fin] - bf[fin]))) if fin.any() else 0.0
            scale = float(np.max(np.abs(bf[fin]))) if fin.any() else 0.0
            bound = config.atol + config.rtol * scale
            if err > bound and name not in reported:
                raise ConversionError(
                    f"{what}: output '{name}' differs from the framework by up to {err:.3g} "
                    f"(allowed {bound:.3g} = atol {config.atol:g} + rtol {config.rtol:g} × "
                    f"max|ref| {scale:.3g}); the export is wrong for these inputs"
                )
            figures[f"{name}.max_abs_err"] = err
            figures[f"{name}.max_rel_err"] = err / scale if scale else 0.0
        else:
            agree = float(np.mean(a.astype(b.dtype) == b)) if b.size else 1.0
            if agree < config.label_agreement:
                raise ConversionError(
                    f"{what}: output '{name}' agrees with the framework on only "
                    f"{agree:.1%} of elements (need {config.label_agreement:.0%})"
                )
            figures[f"{name}.agreement"] = agree
    return figures


def verify_export(
    model_file: Path, loaded: Loaded, samples: Samples, *, what: str,
    config: FrontendConfig = DEFAULT_CONFIG,
) -> dict[str, Any]:
    """Run ``model_file`` through :func:`edge_sdk.load` and the framework on ``samples``."""
    import edge_sdk

    try:
        predictor = edge_sdk.load(model_file)
    except edge_sdk.EdgeError as err:
        raise ConversionError(f"{what}: the exported model does not load: {err}") from err
    figures: dict[str, float] = {}
    for feed in batched(samples, predictor.inputs):
        try:
            got = predictor.predict(feed)
        except edge_sdk.EdgeError as err:
            raise ConversionError(f"{what}: the exported model does not run: {err}") from err
        except Exception as err:
            raise ConversionError(
                f"{what}: the exported model fails on the verification inputs: "
                f"{one_line(err)}"
            ) from err
        ref = loaded.reference(feed)
        figures_now = compare_outputs(got, ref, what=what, config=config,
                                      reported=loaded.reported)
        for k, v in figures_now.items():
            worse = min if k.endswith(".agreement") else max
            figures[k] = worse(figures.get(k, v), v)
    return {"samples": len(samples), "origin": samples.origin, **figures}


def rename_batch_dims(onnx_path: Path) -> None:
    """Give axis 0 of every graph input/output the symbolic name ``batch``.

    Exporters invent names (``s77``, ``unk__12``); a stable name is what the
    manifest shows and what users pass to ``bench --batch``.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    renamed: dict[str, str] = {}
    inputs = list(model.graph.input)
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param:
            renamed[dims[0].dim_param] = "batch"
    if not renamed:
        return
    if all(len(vi.type.tensor_type.shape.dim) and vi.type.tensor_type.shape.dim[0].dim_param
           for vi in inputs):
        # Every input is batched, so a symbolic axis 0 on an output is the batch too
        # (tf2onnx names it unk__N independently of the input's).
        for vi in model.graph.output:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) and dims[0].dim_param:
                renamed.setdefault(dims[0].dim_param, "batch")
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in renamed:
                d.dim_param = renamed[d.dim_param]
    onnx.save(model, str(onnx_path))


__all__ = [
    "DEFAULT_CONFIG", "FrontendConfig", "Loaded", "Reference", "batched",
    "capture_output", "compare_outputs", "quiet", "rename_batch_dims", "require",
    "verification_samples", "verify_export",
]
