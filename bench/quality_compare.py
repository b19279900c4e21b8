"""Cost of one shadow comparison (``edge_sdk.quality.Comparer.compare``) per request.

It runs on the device's shadow worker for every compared request, so it counts against
the shadow's CPU share. Cases: a 1000-class classifier row (logits, noisy shadow), a
384-value embedding, a YOLOv8n-sized head ``[1, 84, 8400]`` with ten objects (noisy
shadow), the same head with a broken shadow scoring every anchor 0.9 (the bound:
``max_candidates`` boxes looked at, ``max_detections`` kept), and bit-identical
outputs (the fast path).

    .venv/bin/python -m bench.quality_compare [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_sdk import Manifest, TensorSpec
from edge_sdk.quality import Comparer


def _comparer(name: str, shape: list[int | str], task: str) -> Comparer:
    return Comparer.for_manifest(Manifest(
        name="m", version="1", format="onnx", model="m.onnx", sha256="0" * 64, size_bytes=1,
        inputs=(TensorSpec("x", "float32", (1, 3)),),
        outputs=(TensorSpec(name, "float32", tuple(shape)),), task=task))


def _yolov8n(rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((1, 84, 8400), np.float32)
    out[0, :2] = rng.uniform(0, 640, (2, 8400))
    out[0, 2:4] = rng.uniform(4, 60, (2, 8400))
    out[0, 4:] = rng.uniform(0, 0.05, (80, 8400))
    for a in rng.choice(8400, 10, replace=False):  # ten objects, a few anchors each
        out[0, 4 + rng.integers(80), a] = rng.uniform(0.4, 0.95)
    return out


def cases(rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    cls = _comparer("logits", ["b", 1000], "classify")
    logits = rng.normal(0, 3, (1, 1000)).astype(np.float32)
    emb = _comparer("e", ["b", 384], "embed")
    e = rng.normal(0, 1, (1, 384)).astype(np.float32)
    det = _comparer("output0", [1, 84, 8400], "detect")
    head = _yolov8n(rng)
    noisy = head + rng.normal(0, 1e-3, head.shape).astype(np.float32)
    broken = head.copy()
    broken[0, 4:] = 0.9
    return {
        "classify [1, 1000] logits": lambda: cls.compare(
            {"logits": logits}, {"logits": logits + 1e-3}),
        "embed [1, 384]": lambda: emb.compare({"e": e}, {"e": e + 1e-3}),
        "detect [1, 84, 8400], 10 objects": lambda: det.compare(
            {"output0": head}, {"output0": noisy}),
        "detect [1, 84, 8400], broken shadow": lambda: det.compare(
            {"output0": head}, {"output0": broken}),
        "detect [1, 84, 8400], identical": lambda: det.compare(
            {"output0": head}, {"output0": head.copy()}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'case':40} {'median ms':>10} {'p90 ms':>8}  result")
    for name, fn in cases(rng).items():
        result = fn()  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"{name:40} {statistics.median(times):10.3f} "
              f"{times[int(0.9 * (len(times) - 1))]:8.3f}  {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
