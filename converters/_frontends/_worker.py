"""The child side of :class:`~converters._frontends._child.FrameworkChild`.

Run as ``python -m converters._frontends._worker FD``: FD is a socket to the parent.
The first message mirrors the parent's ``sys.path`` and hidden modules; then each
message is ``(op, kwargs)`` and gets ``("ok", result)``, ``("edge", EdgeError)`` or
``("error", "Type: text")`` back. EOF or ``exit`` ends the process.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class _State:
    exporter: Any = None
    loaded: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _open(state: _State, *, kind: str, src: str, work: str, calibration: Path | None,
          input_shapes: Mapping[str, tuple[int, ...]] | None,
          trust_pickle: bool) -> dict[str, Any]:
    exporter: Any
    if kind == "torch":
        from ._torch import TorchSource

        exporter = TorchSource(src, input_shapes=input_shapes, calibration=calibration,
                               trust_pickle=trust_pickle)
    elif kind == "keras":
        from ._keras import KerasSource

        exporter = KerasSource(Path(src), Path(work), trust_pickle=trust_pickle,
                               input_shapes=input_shapes)
    elif kind == "sklearn":
        from ._sklearn import SklearnSource

        exporter = SklearnSource(Path(src), trust_pickle=trust_pickle, input_shapes=input_shapes)
    elif kind == "tflite":
        from ._tflite_onnx import TfliteSource

        exporter = TfliteSource(Path(src))
    else:
        from edge_sdk.errors import UsageError

        raise UsageError(f"{src}: unsupported source kind {kind!r}")
    loaded = exporter.loaded()
    fixed = getattr(exporter, "fixed_batch", None)
    if fixed is not None:
        loaded.warnings.append(
            f"the exported program was traced with a fixed batch of {fixed}; export it with "
            "dynamic_shapes for a dynamic batch"
        )
    state.exporter, state.loaded = exporter, loaded
    return {"inputs": tuple(loaded.inputs), "extra": dict(loaded.extra),
            "warnings": list(loaded.warnings), "reported": list(loaded.reported)}


def _export(state: _State, *, path: str) -> str:
    return str(state.exporter.export(Path(path)))


def _export_notes(state: _State) -> dict[str, Any]:
    """What the last export decided that the manifest should say (precision, warnings)."""
    notes = getattr(state.exporter, "export_notes", None)
    return dict(notes()) if notes is not None else {"extra": {}, "warnings": []}


def _reference(state: _State, *, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in state.loaded.reference(dict(feed)).items()}


def _tflite_candidates(state: _State, *, work: str, schemes: Sequence[str], calibration: Any,
                       max_calibration_samples: int) -> list[Any]:
    from .._tflite import build_tflite_candidates

    return build_tflite_candidates(
        Path(state.exporter.saved_dir), state.exporter.signature_key, Path(work), schemes,
        calibration, max_calibration_samples=max_calibration_samples)


def _ping(state: _State) -> None:
    return None


OPS: dict[str, Callable[..., Any]] = {
    "ping": _ping, "open": _open, "export": _export,
    "export_notes": _export_notes, "reference": _reference,
    "tflite_candidates": _tflite_candidates,
}


def main(argv: Sequence[str]) -> int:
    # Ctrl-C reaches the whole process group; the parent decides and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[1]))
    try:
        op, hello = conn.recv()
    except EOFError:
        return 0
    if op == "hello":
        sys.path[:] = [p for p in hello["sys_path"] if p]
        for name in hello["hidden"]:
            sys.modules[name] = None  # type: ignore[assignment]
        os.chdir(hello["cwd"])
    from ._child import portable_error
    from ._common import capture_output

    capture_output()
    state = _State()
    while True:
        try:
            op, kwargs = conn.recv()
        except EOFError:
            return 0
        if op == "exit":
            return 0
        try:
            conn.send(("ok", OPS[op](state, **kwargs)))
        except BaseException as err:  # every failure, even SystemExit, goes back to the parent
            conn.send(portable_error(err))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
