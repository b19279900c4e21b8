"""Run a test helper that needs torch or TensorFlow in a fresh interpreter.

The pytest process never imports a framework: PyPI's default torch wheel (a CUDA
build) segfaults once TensorFlow shares its process, and the converter keeps them
apart the same way (converters/_frontends/_child.py). Builders return what a test
needs as plain data: paths, numpy arrays, dicts of them.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_CODE = """
import importlib, pickle, sys
results = []
for target, args, kwargs in pickle.load(sys.stdin.buffer):
    module, func = target.split(":")
    results.append(getattr(importlib.import_module(module), func)(*args, **kwargs))
with open(sys.argv[1], "wb") as f:
    pickle.dump(results, f)
"""

Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def in_child(target: str, *args: Any, **kwargs: Any) -> Any:
    """``module:function(*args, **kwargs)`` in a child interpreter; its pickled result."""
    return in_one_child([(target, args, kwargs)])[0]


def in_one_child(calls: list[Call]) -> list[Any]:
    """Several ``(target, args, kwargs)`` calls, in order, in one child interpreter (one
    framework import for all); their results."""
    targets = ", ".join(c[0] for c in calls)
    with tempfile.TemporaryDirectory(prefix="edge-test-child-") as tmp:
        out = Path(tmp) / "result.pkl"
        proc = subprocess.run(
            [sys.executable, "-c", _CODE, str(out)], input=pickle.dumps(calls),
            capture_output=True, cwd=ROOT, timeout=600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-15:]
            raise AssertionError(f"{targets} failed in its child (exit {proc.returncode}):\n"
                                 + "\n".join(tail))
        with open(out, "rb") as f:
            results: list[Any] = pickle.load(f)
            return results
