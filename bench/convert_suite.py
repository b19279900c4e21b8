"""Conversion suite: `edge-sdk convert --quantize auto` vs naive `quantize_dynamic`.

For each model the bench builds (MobileNet-like and ResNet-like CNNs, a small
transformer encoder, a MiniLM-sized text encoder whose 30k × 384 word embedding is
most of its bytes, an MLP, an MLP with Constant-node weights) it converts with
``auto`` (calibration data of the right kind), quantizes the same source with
onnxruntime's ``quantize_dynamic`` defaults, then measures the source fp32, the
naive model and auto's artifact side by side in one interleaved run, and prints
size ratio, latency ratio and cosine to the source for both. For the text encoder
it also prints every candidate auto measured (size×, latency×, cosine). A YOLOv8-style
detector and a segmenter are judged in their task's terms too (detections matched by
class and IoU, mean IoU per class; converters._tasks), with the worst sample.

    .venv/bin/python bench/convert_suite.py [--quick] [--threads N] [--rounds R]
                                            [--prefer latency|size|balanced]
                                            [--only detector,segmenter,...]

Goals: auto latency ≤ 1.0× fp32 on every model and ≤ 0.7× geomean on the CNNs;
size ≤ 0.3× where int8 is chosen; transformer cosine ≥ 0.99; text encoder ≤ 0.3×
size and ≤ 0.35× latency at cosine ≥ 0.99; auto within the task budget on the
detector and the segmenter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import ConvertConfig, convert
from converters._data import load_samples
from converters._measure import MeasureConfig, measure_candidates
from converters._tasks import TaskScorer, plan_task
from edge_sdk import load
from tests import _convert_models as M

TASKS = {"detector": None, "segmenter": "segment"}  # --task per model (None: detected)


def build_suite(d: Path, quick: bool) -> list[tuple[str, Path, Path, bool]]:
    """(name, model, calibration .npz, is_cnn)."""
    n = 48 if quick else 96
    img = 48 if quick else 96
    np.savez(d / "img.npz", input=M.images(n, img))
    np.savez(d / "photos.npz", images=M.images(n, 2 * img))  # the detector's input name
    np.savez(d / "tok.npz", input_ids=M.token_ids(n, 32 if quick else 64, vocab=1000))
    np.savez(d / "tab.npz", features=M.tabular(n, 256))
    np.savez(d / "text.npz", input_ids=M.token_ids(n, 64, vocab=30000))
    w = 16 if quick else 32
    return [
        ("mobilenet-like", M.mobilenet_like(d / "mobilenet.onnx", size=img, width=w,
                                            blocks=5 if quick else 7), d / "img.npz", True),
        ("resnet-like", M.resnet_like(d / "resnet.onnx", size=img, width=w,
                                      blocks=3 if quick else 4), d / "img.npz", True),
        ("transformer", M.transformer_encoder(d / "transformer.onnx", d=128 if quick else 256,
                                              heads=4, ff=512 if quick else 1024,
                                              layers=2 if quick else 4, vocab=1000),
         d / "tok.npz", False),
        ("text-encoder", M.transformer_encoder(d / "encoder.onnx", d=384, heads=6, ff=1536,
                                               layers=3, vocab=30000), d / "text.npz", False),
        ("mlp", M.mlp_classifier(d / "mlp.onnx", features=256, hidden=512 if quick else 1024,
                                 classes=10), d / "tab.npz", False),
        ("constant-weights", M.constant_weights_mlp(d / "const.onnx", features=256,
                                                    hidden=512 if quick else 1024, classes=10),
         d / "tab.npz", False),
        ("detector", M.yolo_like_detector(d / "detector.onnx", size=2 * img, width=2 * w,
                                          classes=8), d / "photos.npz", False),
        ("segmenter", M.tiny_segmenter(d / "segmenter.onnx", size=img, width=2 * w,
                                       classes=6),
         d / "img.npz", False),
    ]


def naive_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    root = logging.getLogger()
    root.addHandler(logging.NullHandler())
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(str(src), str(dst))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer runs")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--prefer", choices=("latency", "size", "balanced"), default="balanced")
    ap.add_argument("--only", default="", help="comma-separated model names to run")
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    rounds = args.rounds or (5 if args.quick else 9)
    mcfg = MeasureConfig(rounds=rounds, runs_per_round=20 if args.quick else 30, warmup=5)
    cfg = ConvertConfig(measure=mcfg)
    work = Path(tempfile.mkdtemp(prefix="convert-suite-"))
    rows = []
    encoder: Any = None
    try:
        for name, model, calib, is_cnn in build_suite(work, args.quick):
            if only and name not in only:
                continue
            out = work / f"{name}-auto"
            result = convert(model, out, calibration=calib, threads=args.threads,
                             prefer=args.prefer, config=cfg, task=TASKS.get(name))
            naive = work / f"{name}-naive.onnx"
            naive_dynamic(model, naive)
            specs = load(model).inputs
            feeds = list(load_samples(calib, specs).feeds[-24:])
            ref_pred = load(model)
            reference = [ref_pred.predict(f) for f in feeds]
            ms = measure_candidates(
                [("fp32", model, "none"), ("naive", naive, "int8-dynamic"),
                 ("auto", result.artifact.model_path, result.artifact.manifest.quantization)],
                feeds, reference, metric="cosine", threads=args.threads, config=mcfg,
            )
            by = {m.name: m for m in ms}
            base = by["fp32"]
            row: dict[str, Any] = {"model": name, "cnn": is_cnn, "chosen": result.chosen}
            for key in ("naive", "auto"):
                m = by[key]
                row[f"{key}_size"] = m.size_bytes / base.size_bytes
                row[f"{key}_lat"] = (m.latency_ms / base.latency_ms
                                     if m.latency_ms and base.latency_ms else math.nan)
                row[f"{key}_cos"] = m.accuracy.score if m.accuracy else math.nan
            row["fp32_ms"] = base.latency_ms or math.nan
            if name in TASKS:
                row["task"] = task_figures(
                    TASKS[name], {"naive": naive, "auto": result.artifact.model_path},
                    feeds, reference)
            rows.append(row)
            print(f"  {name}: chosen {result.chosen} — {result.report['why']}", flush=True)
            if name == "text-encoder":
                encoder = result.report
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'model':<18} {'fp32 ms':>8} | {'auto choice':<24} {'size':>6} {'latency':>8} "
          f"{'cosine':>8} | {'naive size':>10} {'latency':>8} {'cosine':>8}")
    for r in rows:
        print(f"{r['model']:<18} {r['fp32_ms']:8.3f} | {r['chosen']:<24} "
              f"{r['auto_size']:5.2f}× {r['auto_lat']:7.2f}× {r['auto_cos']:8.4f} | "
              f"{r['naive_size']:9.2f}× {r['naive_lat']:7.2f}× {r['naive_cos']:8.4f}")
    cnn = [r["auto_lat"] for r in rows if r["cnn"]]
    geo = math.exp(sum(math.log(x) for x in cnn) / len(cnn)) if cnn else math.nan
    naive_cnn = [r["naive_lat"] for r in rows if r["cnn"]]
    ngeo = math.exp(sum(math.log(x) for x in naive_cnn) / len(naive_cnn)) if cnn else math.nan
    task_rows = [r for r in rows if "task" in r]
    if task_rows:
        print()
        print(f"{'model':<18} {'task':<8} | {'auto':<26} {'within':>6} {'worst sample':<40} "
              f"| {'naive':<26} {'within':>6}")
        for r in task_rows:
            t = r["task"]
            print(f"{r['model']:<18} {t['task']:<8} | {t['auto']['figure']:<26} "
                  f"{'yes' if t['auto']['within'] else 'NO':>6} {t['auto']['worst']:<40} | "
                  f"{t['naive']['figure']:<26} {'yes' if t['naive']['within'] else 'NO':>6}")
    if encoder is not None:
        print()
        print_candidates("text-encoder candidates (auto's own measurement)", encoder)
    print()
    print(f"CNN latency geomean: auto {geo:.2f}× fp32, naive dynamic {ngeo:.2f}× fp32")
    worst = max(r["auto_lat"] for r in rows)
    int8 = [r for r in rows if r["chosen"].startswith("int8")]
    tf = [r for r in rows if r["model"] == "transformer"]
    print(f"goals: auto latency ≤ 1.0× everywhere: {'yes' if worst <= 1.0 else 'NO'} "
          f"(worst {worst:.2f}×); CNN geomean ≤ 0.7×: "
          f"{('yes' if geo <= 0.7 else 'NO') if cnn else 'not run'}; "
          f"size ≤ 0.3× where int8: "
          f"{'yes' if all(r['auto_size'] <= 0.3 for r in int8) else 'NO'}; transformer "
          f"cosine ≥ 0.99: "
          f"{('yes' if tf[0]['auto_cos'] >= 0.99 else 'NO') if tf else 'not run'}; auto "
          f"within the task budget: "
          f"{'yes' if all(r['task']['auto']['within'] for r in task_rows) else 'NO'}")
    te = next((r for r in rows if r["model"] == "text-encoder"), None)
    if te is not None:
        ok = te["auto_size"] <= 0.3 and te["auto_lat"] <= 0.35 and te["auto_cos"] >= 0.99
        print(f"text encoder ≤ 0.3× size, ≤ 0.35× latency, cosine ≥ 0.99: "
              f"{'yes' if ok else 'NO'} ({te['auto_size']:.2f}×, {te['auto_lat']:.2f}×, "
              f"{te['auto_cos']:.4f})")
    return 0


def task_figures(task: str | None, models: dict[str, Path], feeds: list[Any],
                 reference: list[Any]) -> dict[str, Any]:
    """Each model judged in the task's terms (the figure, within budget, worst sample)."""
    plan = plan_task(task, (), reference, {})
    scorer = TaskScorer(plan)
    out: dict[str, Any] = {"task": plan.task}
    for key, path in models.items():
        pred = load(path)
        acc = scorer([pred.predict(f) for f in feeds], reference)
        worst = acc.worst or {}
        out[key] = {"figure": f"{acc.metric} {acc.score:.4f}", "within": acc.within(0.0),
                    "worst": f"#{worst.get('index')} {worst.get('figure')} "
                             f"{worst.get('value', math.nan):.3f}"}
    return out


def print_candidates(title: str, report: Any) -> None:
    rows = report["candidates"]
    base = next(r for r in rows if r["name"] == report["baseline"])
    print(title + f" — rule: {report.get('rule')}")
    print(f"  {'candidate':<36} {'size':>6} {'latency':>8} {'cosine':>8}  status")
    for r in rows:
        if not r.get("latency_ms") or not r.get("size_bytes"):
            print(f"  {r['name']:<36} {'–':>6} {'–':>8} {'–':>8}  {r['status']}")
            continue
        acc = (r.get("accuracy") or {}).get("score", math.nan)
        print(f"  {r['name']:<36} {r['size_bytes'] / base['size_bytes']:5.2f}× "
              f"{r['latency_ms'] / base['latency_ms']:7.2f}× {acc:8.4f}  {r['status']}")


if __name__ == "__main__":
    raise SystemExit(main())
