"""Choice stability: one model converted N times, alternating idle and loaded.

Builds a MobileNet-like CNN and its calibration images, then runs ``convert --quantize
auto`` on it ``--runs`` times; every other run starts ``--busy`` processes that spin on
the CPU for the length of that conversion (each also ends by itself after
``--busy-max-s``). Prints, per run, the choice, fp32's median latency and every
candidate's ratio to fp32 (median of the per-round ratios, their IQR and the status the
rule gives it) next to the naive ratio of the medians, which load does not cancel.

    .venv/bin/python bench/choice_stability.py [--runs 5] [--busy 2] [--prefer balanced]

Goal: the same choice in every run, or choices the runs' reported bands cannot tell
apart: the end prints, for every two choices, their paired per-round ratio in each run
(with ``--prefer balanced`` the smaller may also win at up to 1.10 at its q1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import ConvertConfig, convert
from converters._candidates import CandidateConfig
from converters._measure import MeasureConfig, round_ratios
from tests import _convert_models as M


def _busy(n: int, max_s: float) -> list[subprocess.Popen[bytes]]:
    code = (f"import time\nend = time.monotonic() + {max_s}\n"
            "while time.monotonic() < end:\n    pass\n")
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=2, help="busy processes in loaded runs")
    ap.add_argument("--busy-max-s", type=float, default=60.0)
    ap.add_argument("--prefer", choices=("latency", "size", "balanced"), default="balanced")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    # Fewer variants than the default (one per kind) keep a run within seconds.
    cfg = ConvertConfig(
        measure=MeasureConfig(rounds=6, max_rounds=18, runs_per_round=15, warmup=3,
                              time_budget_s=4.0),
        candidates=CandidateConfig(dynamic_variants=(("", False, False), ("-matmul", True, False)),
                                   static_methods=("minmax",), static_per_tensor_methods=()))
    tol = cfg.measure.latency_tolerance
    work = Path(tempfile.mkdtemp(prefix="choice-stability-"))
    model = M.mobilenet_like(work / "cnn.onnx", size=64, width=24, blocks=5)
    np.savez(work / "img.npz", input=M.images(16, 64))
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        loaded = i % 2 == 1
        procs = _busy(args.busy, args.busy_max_s) if loaded else []
        t0 = time.monotonic()
        try:
            result = convert(model, work / f"run{i}", calibration=work / "img.npz",
                             prefer=args.prefer, threads=args.threads, config=cfg)
        finally:
            _stop(procs)
        report = result.report
        report["_seconds"] = time.monotonic() - t0
        report["_loaded"] = loaded
        runs.append(report)

    print(f"{'run':>3} {'load':<6} {'s':>5} {'fp32 ms':>8} {'rounds':>6}  chosen")
    for i, r in enumerate(runs):
        rows = {c["name"]: c for c in r["candidates"]}
        base = rows["fp32"]
        print(f"{i:>3} {'busy' if r['_loaded'] else 'idle':<6} {r['_seconds']:5.1f} "
              f"{base['latency_ms']:8.3f} {len(base['latency_rounds_ms']):>6}  {r['chosen']}")
    names = [c["name"] for c in runs[0]["candidates"]
             if c.get("latency_ratio") and c["name"] != "fp32"]
    print("\nratio to fp32 per run: median [q1–q3] status | naive ratio of the medians")
    for name in names:
        cells = []
        for r in runs:
            c = next((c for c in r["candidates"] if c["name"] == name), {})
            lr = c.get("latency_ratio")
            base = next(b for b in r["candidates"] if b["name"] == "fp32")
            if not lr:
                cells.append(f"{'–':>28}")
                continue
            naive = c["latency_ms"] / base["latency_ms"]
            cells.append(f"{lr['median']:.2f} [{lr['q1']:.2f}–{lr['q3']:.2f}] "
                         f"{lr['status'][:4]:<4}|{naive:5.2f}")
        print(f"{name:<22} " + "  ".join(cells))
    chosen = sorted({r["chosen"] for r in runs})
    print(f"\nchoices: {', '.join(r['chosen'] for r in runs)}")
    for a in chosen:
        for b in chosen:
            if a >= b:
                continue
            cells = []
            for r in runs:
                rows = {c["name"]: c for c in r["candidates"]}
                ra, rb = rows[a]["latency_rounds_ms"], rows[b]["latency_rounds_ms"]
                if not (ra and rb and len(ra) == len(rb)):
                    cells.append("–")
                    continue
                x, y = round_ratios(ra, rb), round_ratios(rb, ra)
                cells.append(f"{x.median:.2f} [{x.q1:.2f}–{x.q3:.2f}] "
                             f"{x.status(tol)[:4]}/{y.status(tol)[:4]}")
            print(f"{a} / {b} per run (paired rounds; status of a vs b / b vs a): "
                  f"{'; '.join(cells)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
