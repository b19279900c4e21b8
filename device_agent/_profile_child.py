"""The child process that times one profiling candidate (``python -m
device_agent._profile_child SPEC_JSON``), so that a model that crashes, hangs or
eats memory takes down only this process: the parent runs it at nice 19 under
RLIMIT_AS and kills it on timeout (see :mod:`device_agent._profiler`).

SPEC_JSON: ``{"model", "sample", "expected", "threads", "runs", "warmup", "rounds",
"rtol", "atol"}``. Prints one JSON line: load_ms, warmup_ms, median_ms (the median of
the ``rounds`` fresh sessions' medians), p90_ms (over all runs), runs, max_abs_diff,
and ``error`` when the outputs do not match the host's.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def compare(outputs: dict[str, Any], expected: dict[str, Any], rtol: float,
            atol: float) -> tuple[float, str | None]:
    """(largest absolute difference, why the outputs do not match or None). A float output
    matches when its NaN/inf are the host's and, over the finite elements,
    ``max|dev - host| <= atol + rtol * max|host|``; others must be equal."""
    import numpy as np

    worst = 0.0
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None:
            return worst, f"output {name!r} missing (got {sorted(outputs)})"
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            return worst, f"output {name!r} has shape {list(got.shape)}, the host's " \
                          f"{list(want.shape)}"
        if want.dtype.kind in "fc":
            # As converters' compare_outputs: NaN/inf must be where the host has them (the
            # same value), only the finite elements are compared within the tolerance.
            g, w = got.astype(np.complex128 if want.dtype.kind == "c" else np.float64), \
                want.astype(np.complex128 if want.dtype.kind == "c" else np.float64)
            fin = np.isfinite(w)
            if not np.array_equal(np.isfinite(g), fin) or \
                    not np.array_equal(g[~fin], w[~fin], equal_nan=True):
                return worst, (f"output {name!r} has NaN/inf where the host's does not "
                               "(or other ones)")
            diff = float(np.max(np.abs(g[fin] - w[fin]))) if fin.any() else 0.0
            worst = max(worst, diff)
            limit = atol + rtol * (float(np.max(np.abs(w[fin]))) if fin.any() else 0.0)
            if diff > limit:
                return worst, (f"output {name!r} differs from the host's by {diff:.3g} "
                               f"(tolerance {limit:.3g})")
        elif not np.array_equal(got, want):
            return worst, f"output {name!r} differs from the host's (exact match required)"
    return worst, None


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    import edge_sdk
    from edge_sdk._internal import load_npz

    feed, expected = load_npz(spec["sample"]), load_npz(spec["expected"])
    t0 = time.perf_counter()
    pred = edge_sdk.load(spec["model"], threads=int(spec["threads"]) or None)
    load_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    out: Any = None
    for _ in range(max(1, int(spec["warmup"]))):
        out = pred.predict(feed)
    warmup_ms = (time.perf_counter() - t0) * 1e3
    diff, why = compare(dict(out), expected, float(spec["rtol"]), float(spec["atol"]))
    res: dict[str, Any] = {"load_ms": load_ms, "warmup_ms": warmup_ms, "max_abs_diff": diff}
    if why is not None:
        return {**res, "error": why}
    runs, rounds = int(spec["runs"]), max(1, int(spec.get("rounds", 1)))
    times: list[float] = []
    medians = []
    for r in range(rounds):
        if r:  # a fresh session: its threads land elsewhere
            del pred
            pred = edge_sdk.load(spec["model"], threads=int(spec["threads"]) or None)
            for _ in range(max(1, int(spec["warmup"]))):
                pred.predict(feed)
        these = []
        for _ in range(runs // rounds + (r < runs % rounds)):
            t = time.perf_counter_ns()
            pred.predict(feed)
            these.append((time.perf_counter_ns() - t) / 1e6)
        medians.append(float(np.median(these)))
        times.extend(these)
    return {**res, "median_ms": float(np.median(medians)),
            "p90_ms": float(np.percentile(times, 90)), "runs": len(times),
            "round_medians_ms": medians}


def main(argv: list[str]) -> int:
    try:
        res = run(json.loads(argv[1]))
    except Exception as err:  # reported to the parent as this candidate's error
        from edge_sdk._internal import one_line

        res = {"error": f"does not run on this device: {one_line(err)}"}
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
