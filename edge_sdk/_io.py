"""Reading input files (.npz / .npy / .json) and writing outputs atomically."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._artifact import TensorSpec
from ._fs import atomic_write_bytes
from .errors import UsageError


def read_inputs(path: str | os.PathLike[str], inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Read an input file for a model with signature ``inputs``.

    ``.npz``: one array per input name. ``.npy``: the single input of a
    single-input model. ``.json``: ``{name: nested list}`` (or a bare nested
    list for a single-input model), converted to each input's dtype.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise UsageError(f"{p}: no such input file")
    try:
        if suffix == ".npz":
            return dict(load_npz(p))
        if suffix == ".npy":
            if len(inputs) != 1:
                raise UsageError(
                    f"{p}: a .npy file holds one array but the model has {len(inputs)} inputs; "
                    "use .npz or .json keyed by input name"
                )
            return {inputs[0].name: np.load(p, allow_pickle=False)}
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, Mapping):
                if len(inputs) != 1:
                    raise UsageError(f"{p}: expected a JSON object {{input name: nested list}}")
                data = {inputs[0].name: data}
            dtypes = {s.name: s.dtype for s in inputs}
            out: dict[str, Any] = {}
            for key, value in data.items():
                dt = dtypes.get(key)
                try:
                    out[key] = np.asarray(value, dtype=None if dt in (None, "str") else dt)
                except (ValueError, TypeError) as err:
                    raise UsageError(f"{p}: input '{key}' is not a numeric array: {err}") from err
            return out
    except json.JSONDecodeError as err:
        raise UsageError(f"{p}: invalid JSON: {err.msg} at line {err.lineno}") from err
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"{p}: cannot read {suffix} file: {err}") from err
    raise UsageError(f"{p}: unsupported input file kind {suffix!r} (use .npz, .npy or .json)")


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, pickles refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"{path}: not a readable .npz file: {err}") from err


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """The ``.npz`` encoding of ``arrays`` (name → array)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> None:
    """Write arrays to ``path`` as ``.npz`` atomically."""
    atomic_write_bytes(path, npz_bytes(arrays))


def to_jsonable(arrays: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)),
            "data": np.asarray(v).tolist()}
        for k, v in arrays.items()
    }
