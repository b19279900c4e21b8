"""Calibration and evaluation data: ``.npz`` files keyed by model input name.

Reusable by every front-end::

    samples = load_samples(path, input_specs, what="calibration")  # -> Samples
    calib, evalset = split_holdout(samples, fraction=0.25)
    synthetic = synthetic_samples(input_specs, n=16, seed=0)
    shapes = check_input_shapes(input_specs, {"images": (1, 3, 320, 320)})  # --input-shape
    evalset = synthetic_evalset(predictor.predict, input_specs, n=16, given=shapes)

Layout (../shared/DESIGN.md "Calibration and evaluation files"): one array per
input name, plus an optional ``labels`` array (one label per sample). When an
array has the same rank as the input, axis 0 is the batch axis and sample i is
``arr[i:i+1]``; with one more dimension, axis 0 indexes samples and sample i is
the whole feed ``arr[i]`` (stateful models: a ``[2, 1, 128]`` state, a scalar
sample rate). Anything else is a :class:`~edge_sdk.errors.UsageError` naming
the input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk import TensorSpec
from edge_sdk._internal import (
    concrete_specs,
    index_bound,
    load_npz,
    runtime_error_text,
    search_input_shapes,
    shape_text,
    symbolic_dims,
    synthetic_inputs,
)
from edge_sdk.errors import ConversionError, UsageError

LABELS_KEY = "labels"
#: Bytes one synthetic feed (all inputs of one run) may take: an --input-shape past it
#: is refused rather than allocated.
MAX_FEED_BYTES = 256 << 20
#: Bytes the whole synthetic evaluation set may take: fewer samples (at least 2) for
#: large inputs.
SYNTHETIC_BUDGET_BYTES = 512 << 20


@dataclass(frozen=True)
class Samples:
    """Per-sample feeds (each a complete ``{input name: array}`` for one run)."""

    feeds: tuple[dict[str, np.ndarray], ...]
    labels: np.ndarray | None
    origin: str  # a file path, "synthetic", or "<path> (held out)"

    @property
    def real(self) -> bool:
        return self.origin != "synthetic"

    def __len__(self) -> int:
        return len(self.feeds)


def load_samples(
    path: str | Path, inputs: Sequence[TensorSpec], *, what: str = "calibration"
) -> Samples:
    """Read ``path`` (.npz) as samples for a model with signature ``inputs``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such {what} file")
    if p.suffix.lower() != ".npz":
        raise UsageError(f"{p}: the {what} file must be an .npz keyed by input name")
    arrays = load_npz(p)
    return samples_from_arrays(arrays, inputs, origin=str(p), what=what)


def samples_from_arrays(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], *, origin: str,
    what: str = "calibration",
) -> Samples:
    """Split in-memory arrays (same layout as the .npz) into per-sample feeds."""
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    unknown = [k for k in arrays if k not in names and k != LABELS_KEY]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown key(s) {', '.join(map(repr, unknown))}")
        sig = "; ".join(s.describe() for s in inputs)
        raise UsageError(
            f"{origin}: {what} data does not match the model: {' and '.join(parts)} "
            f"(the model expects: {sig}; optional key '{LABELS_KEY}')"
        )
    per_input: dict[str, tuple[np.ndarray, bool]] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        arr = np.asarray(arrays[spec.name])
        rank = len(spec.shape)
        if arr.ndim == rank and rank > 0:
            stacked = False
        elif arr.ndim == rank + 1:
            stacked = True
        else:
            raise UsageError(
                f"{origin}: {what} input '{spec.name}' has shape {list(arr.shape)}; expected "
                f"rank {rank} (samples along axis 0) or rank {rank + 1} (axis 0 indexes whole "
                f"feeds) for {spec.describe()}"
            )
        sample_shape = arr.shape[1:] if stacked else (1, *arr.shape[1:])
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int) and sample_shape[i] != dim and not (i == 0 and not stacked):
                raise UsageError(
                    f"{origin}: {what} input '{spec.name}' has shape {list(arr.shape)}: dim "
                    f"{i} of each sample is {sample_shape[i]} but the model expects {dim} "
                    f"({spec.describe()})"
                )
        if not stacked and isinstance(spec.shape[0], int) and spec.shape[0] != 1:
            raise UsageError(
                f"{origin}: {what} input '{spec.name}' has a fixed batch of {spec.shape[0]}; "
                f"give one more leading axis so that axis 0 indexes whole feeds"
            )
        arr = _cast(arr, spec, origin, what)
        per_input[spec.name] = (arr, stacked)
        counts[spec.name] = arr.shape[0]
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"'{k}': {v}" for k, v in counts.items())
        raise UsageError(f"{origin}: {what} inputs disagree on the number of samples ({desc})")
    n = next(iter(counts.values())) if counts else 0
    if n == 0:
        raise UsageError(f"{origin}: the {what} set is empty (0 samples)")
    labels = None
    if LABELS_KEY in arrays:
        labels = np.asarray(arrays[LABELS_KEY]).reshape(-1) if np.ndim(
            arrays[LABELS_KEY]) <= 2 else None
        if labels is None or labels.shape[0] != n:
            raise UsageError(
                f"{origin}: '{LABELS_KEY}' must hold one label per sample ({n}), got shape "
                f"{list(np.shape(arrays[LABELS_KEY]))}"
            )
    feeds = tuple(
        {name: (np.asarray(arr[i]) if stacked else arr[i:i + 1])
         for name, (arr, stacked) in per_input.items()}
        for i in range(n)
    )
    return Samples(feeds=feeds, labels=labels, origin=origin)


def _cast(arr: np.ndarray, spec: TensorSpec, origin: str, what: str) -> np.ndarray:
    if spec.dtype == "str":
        return arr
    target = np.dtype(spec.dtype)
    if arr.dtype == target:
        return arr
    # float64 arrays saved by numpy are the common case; same-kind narrowing is accepted.
    if np.can_cast(arr.dtype, target, "same_kind"):
        return arr.astype(target)
    raise UsageError(
        f"{origin}: {what} input '{spec.name}' has dtype {arr.dtype}, which cannot be used "
        f"as {target} ({spec.describe()})"
    )


def split_holdout(samples: Samples, fraction: float) -> tuple[Samples, Samples]:
    """Split into (calibration, evaluation); the evaluation part is the last ``fraction``.

    With a single sample both parts are that sample (the caller should warn).
    """
    n = len(samples)
    if n < 2:
        return samples, samples
    k = min(n - 1, max(1, round(n * fraction)))
    lab = samples.labels
    calib = Samples(samples.feeds[: n - k], None if lab is None else lab[: n - k], samples.origin)
    held = Samples(samples.feeds[n - k:], None if lab is None else lab[n - k:],
                   f"{samples.origin} (held out)")
    return calib, held


def synthetic_samples(
    inputs: Sequence[TensorSpec], *, n: int, seed: int = 0, dim_size: int = 16,
    shapes: Mapping[str, Sequence[int]] | None = None, int_high: int = 8,
) -> Samples:
    """``n`` random feeds matching ``inputs``: the inputs named in ``shapes`` get that
    shape; elsewhere batch dims are 1, other symbolic dims ``dim_size`` (see
    :func:`edge_sdk._bench.synthetic_inputs`)."""
    specs = concrete_specs(inputs, shapes or {})
    feeds = [synthetic_inputs(specs, seed=seed + i, other=dim_size, int_high=int_high)
             for i in range(n)]
    return Samples(tuple(feeds), None, "synthetic")


def check_input_shapes(
    inputs: Sequence[TensorSpec], given: Mapping[str, Sequence[int]] | None,
) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values checked against the signature: a :class:`UsageError`
    for an unknown input name, another rank, or a size that contradicts a fixed dim."""
    by_name = {s.name: s for s in inputs}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in (given or {}).items():
        arg = f"--input-shape {name}={shape_text(shape)}"
        spec = by_name.get(name)
        if spec is None:
            raise UsageError(f"{arg}: the model has no input {name!r} (its inputs: "
                             f"{'; '.join(s.describe() for s in inputs)})")
        if len(shape) != len(spec.shape):
            raise UsageError(f"{arg}: {len(shape)} dims, but {name!r} has {len(spec.shape)} "
                             f"({spec.describe()})")
        for i, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
            if got < 1:
                raise UsageError(f"{arg}: dim {i} must be at least 1")
            if isinstance(want, int) and want != got:
                raise UsageError(f"{arg}: dim {i} of {name!r} is fixed at {want} in the model, "
                                 f"not {got} ({spec.describe()})")
        out[name] = tuple(int(d) for d in shape)
        size = _nbytes(spec, out[name])
        if size > MAX_FEED_BYTES:
            raise UsageError(f"{arg}: {size / (1 << 20):.0f} MiB of {spec.dtype} for one "
                             f"sample, more than the {MAX_FEED_BYTES >> 20} MiB synthetic "
                             "inputs may take; give a smaller shape or --calibration")
    return out


def _nbytes(spec: TensorSpec, shape: Sequence[int]) -> int:
    """Bytes of one ``spec`` array of ``shape`` (8 per element for strings)."""
    itemsize = 8 if spec.dtype == "str" else np.dtype(spec.dtype).itemsize
    return int(np.prod([int(d) for d in shape], dtype=np.float64)) * itemsize


def synthetic_evalset(
    run: Callable[[dict[str, np.ndarray]], object], inputs: Sequence[TensorSpec], *, n: int,
    given: Mapping[str, Sequence[int]] | None = None, max_tries: int = 10,
) -> Samples:
    """``n`` random feeds of shapes the model runs on (``run`` is its predict): the
    ``given`` ones (checked by :func:`check_input_shapes`), the rest found by
    :func:`edge_sdk._bench.search_input_shapes`. A :class:`ConversionError` saying
    which inputs and dims to give when no tried shape runs."""
    found = search_input_shapes(run, inputs, given=given, max_tries=max_tries)
    if found.shapes is not None:
        shapes = found.shapes
        feed = sum(_nbytes(s, shapes.get(s.name, ())) for s in inputs)
        n = max(2, min(n, SYNTHETIC_BUDGET_BYTES // max(1, feed)))
        return _runnable_samples(run, inputs, n=n, shapes=shapes, int_high=found.int_high)
    err = (found.error or "")[:80]
    tried = ", ".join(shape_text(t[k]) for t in found.tried[:2] for k in t) + (
        f", … {len(found.tried)} tries" if len(found.tried) > 2 else "")
    if not found.free:
        other = " or an --input-shape it accepts" if given else ""
        raise ConversionError(f"the model fails on synthetic inputs: pass --calibration "
                              f"CALIB.npz with real inputs{other} ({tried}: {err})")
    hints = " ".join(f"--input-shape {s.name}={_template(s)}" for s in inputs
                     if s.name in found.free)
    dims = "; ".join(f"{k}: {', '.join(v)}" for k, v in found.free.items())
    raise ConversionError(f"the model runs on no synthetic input shape tried: pass "
                          f"--calibration CALIB.npz with real inputs or {hints} (symbolic "
                          f"dims {dims}; tried {tried}; last error: {err})")


def _runnable_samples(
    run: Callable[[dict[str, np.ndarray]], object], inputs: Sequence[TensorSpec], *, n: int,
    shapes: Mapping[str, Sequence[int]], int_high: int,
) -> Samples:
    """``n`` synthetic feeds of ``shapes``, only those ``run`` accepts: the search checked
    one feed, and integer inputs (a channel index, TopK's k) differ from feed to feed.
    Ids past a table an error names lower the integer range once more. Feed 0 is the
    one the search ran, so at least one is kept. Models without integer inputs are not
    run again (a stateful model's state would move on)."""
    if not any(s.dtype != "str" and np.dtype(s.dtype).kind in "iu" for s in inputs):
        return synthetic_samples(inputs, n=n, shapes=shapes, int_high=int_high)
    for _ in range(4):
        feeds, bound = [], None
        for feed in synthetic_samples(inputs, n=n, shapes=shapes, int_high=int_high).feeds:
            try:
                run(dict(feed))
            except Exception as err:
                named = index_bound(runtime_error_text(err))
                if named is not None and named < int_high:
                    bound = named if bound is None else min(bound, named)
                continue
            feeds.append(feed)
        if bound is None:
            break
        int_high = bound
    return Samples(tuple(feeds), None, "synthetic")


def _template(spec: TensorSpec) -> str:
    """``1x3xHxW``: the --input-shape to give, symbolic dims by name."""
    free = symbolic_dims(spec)
    dims = [str(d) if isinstance(d, int) else ("1" if i == 0 else free.pop(0).replace(" ", ""))
            for i, d in enumerate(spec.shape)]
    return "x".join(dims)


__all__ = [
    "LABELS_KEY", "Samples", "check_input_shapes", "load_samples", "samples_from_arrays",
    "split_holdout", "synthetic_evalset", "synthetic_samples",
]
