"""The conversion report: report.json, report.md (table, choice and why) and report.png.

``write_report(out_dir, report) -> dict[str, Path]`` writes the three files
(atomically, each) and returns file name → path, ready for
``edge_sdk.build_artifact(..., report=report, extra_files={"report.md": ..., "report.png": ...})``.

The report dict (built by the pipeline; front-ends fill the same keys):
``title`` (str), ``source`` {format, path, sha256}, ``normalization`` [str],
``data`` {calibration, evaluation, verified_on_real_data}, ``metric`` {name,
max_drop, reference}, ``threads``, ``baseline`` (candidate name), ``candidates``
[{name, scheme, description, status (chosen|ok|over-budget|slower|no-op|failed|excluded
(by a device, ``--profile-on``)),
size_bytes, latency_ms, latency_rounds_ms, latency_ratio {median, q1, q3, spread, rounds,
status (faster|same|slower), tolerance} (the ratio to the baseline the choice used, see
:func:`latency_fields`), accuracy {metric, score, drop, per_output, samples},
error, note}], ``chosen``, ``why``, ``rule`` (the choice rule in words, or None),
``warnings`` [str]; with ``convert --base`` also ``base`` {path, name, version, sha256,
scheme, candidate, built (the candidate with its parameters), used, not_used (why not),
tolerance, weights and activations {reused, total, own_scale [{tensor, why}], new
[names]} (activations None for dynamic int8), weights.base_only [names]}; with
``convert --profile-on`` also ``devices`` {device: {hardware, threads}} and per candidate
``host_latency_ms``, ``device_latency_ms`` (the worst device's median: what the choice
used) and ``devices`` {device: {median_ms, p90_ms, load_ms, warmup_ms, peak_rss_bytes,
max_abs_diff, runs, error}}.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk._internal import atomic_write_bytes, atomic_write_text

from ._prepost import pipeline_lines

if TYPE_CHECKING:
    from ._data import Samples
    from ._measure import Accuracy, Measurement, Selection


def manifest_figures(chosen: Measurement, baseline: Measurement, budget: float,
                     evalset: Samples, threads: int | None, reference: str,
                     verified: bool | None = None) -> dict[str, Any]:
    """The measured accuracy and latency the manifest carries for the chosen candidate."""
    return {
        "accuracy": {
            **(chosen.accuracy.to_json() if chosen.accuracy else {}),
            "max_drop": budget, "reference": reference, "evaluation": evalset.origin,
            "verified_on_real_data": evalset.real if verified is None else verified,
        },
        "latency_ms": {
            "p50": chosen.latency_ms, "baseline": baseline.name,
            "baseline_p50": baseline.latency_ms, "threads": threads, "batch": 1,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        },
    }


def latency_fields(sel: Selection, name: str) -> dict[str, Any]:
    """A candidate row's ``latency_ratio``: its latency ratio to the baseline as the choice
    used it (median and interquartile range of the per-round ratios), and its status by
    the rule's noise band; None for a candidate without a latency."""
    r = sel.ratios.get(name)
    if r is None:
        return {"latency_ratio": None}
    return {"latency_ratio": {**r.to_json(), "status": r.status(sel.tolerance),
                              "tolerance": sel.tolerance}}


def measured_status(sel: Selection, m: Measurement, budget: float) -> str:
    """``chosen``, ``over-budget``, ``slower`` or ``ok`` for a measured candidate that may
    be chosen: ``slower`` exactly when the choice rule's noise band calls it slower than
    the baseline (:meth:`Selection.latency_status`), so the report never says "slower" of
    a candidate the rule counted as equally fast, nor "ok" of one it excluded."""
    if m.name == sel.chosen.name:
        return "chosen"
    if m.accuracy is None or not m.accuracy.within(budget):
        return "over-budget"
    if sel.latency_status(m.name) == "slower":
        return "slower"
    return "ok"


def report_json(
    *, title: str, source: Mapping[str, Any], options: Mapping[str, Any],
    normalization: list[str], calib: Samples | None, evalset: Samples, reference: str,
    budget: float, threads: int | None, baseline: str, rows: list[dict[str, Any]],
    chosen: str, why: str, warnings: list[str], rule: str | None = None,
    base: Mapping[str, Any] | None = None, devices: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None, chosen_accuracy: Accuracy | None = None,
) -> dict[str, Any]:
    """The report dict described above; every pipeline builds it here.

    With a task (``task``: the plan's description) ``verified_on_real_data`` means the
    chosen candidate's task metric held its budget on real data, and ``data`` names
    the worst evaluation sample (``worst_sample``: output, index, figure, value)."""
    verified = evalset.real
    worst = None
    held: bool | None = None
    if chosen_accuracy is not None and chosen_accuracy.task is not None:
        held = not chosen_accuracy.breaks
        verified = evalset.real and held
        worst = dict(chosen_accuracy.worst or {})
    out: dict[str, Any] = {
        "title": title,
        "source": dict(source),
        "options": dict(options),
        "normalization": normalization,
        "data": {
            "calibration": {"origin": calib.origin if calib else None,
                            "samples": len(calib) if calib else 0},
            "evaluation": {"origin": evalset.origin, "samples": len(evalset),
                           "labels": evalset.labels is not None},
            "verified_on_real_data": verified,
        },
        "task": dict(task) if task is not None else {"name": "generic"},
        "metric": {"name": options["metric"], "max_drop": budget, "reference": reference},
        "threads": threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "baseline": baseline,
        "candidates": rows,
        "chosen": chosen,
        "why": why,
        "rule": rule,
        "warnings": list(dict.fromkeys(warnings)),
    }
    if worst is not None:
        out["data"]["worst_sample"] = worst
        out["data"]["task_budget_held"] = held
    if base is not None:
        out["base"] = dict(base)
    if devices is not None:
        out["devices"] = {d: dict(v) for d, v in devices.items()}
    return out


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report.json": out / "report.json", "report.md": out / "report.md",
             "report.png": out / "report.png"}
    atomic_write_text(paths["report.json"], json.dumps(dict(report), indent=2, default=str) + "\n")
    atomic_write_text(paths["report.md"], render_markdown(report))
    atomic_write_bytes(paths["report.png"], render_plot(report))
    return paths


_LISTED = 8  # tensors named in one line of the base section


def _kib(n: Any) -> str:
    return "–" if not n else f"{n / 1024:.1f}"


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def candidate_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Table rows (header first) shared by report.md and the CLI summary."""
    cands = list(report.get("candidates", []))
    base = next((c for c in cands if c.get("name") == report.get("baseline")), None)
    base_lat = base.get("latency_ms") if base else None
    base_size = base.get("size_bytes") if base else None
    metric = (report.get("metric") or {}).get("name", "accuracy")
    task = report.get("task") or {}
    if task.get("outputs"):
        metric = f"{task.get('name')} task"
    devices = sorted(report.get("devices") or {})
    head = ["candidate", "size KiB", "× size", "latency ms", "× latency", "IQR"]
    if devices:
        head = ["candidate", "size KiB", "× size", "host ms",
                *(f"{d} ms" for d in devices), "× latency", "IQR"]
        base_lat = base.get("device_latency_ms") if base else None
    rows = [[*head, f"{metric} score", "drop", "status"]]
    for c in cands:
        acc = c.get("accuracy") or {}
        lat = c.get("latency_ms")
        size = c.get("size_bytes")
        status = str(c.get("status", ""))
        note = c.get("error") or c.get("note")
        if note and status != "chosen":
            status = f"{status}: {note}"
        per = c.get("devices") or {}
        dev = [_fmt((per.get(d) or {}).get("median_ms")) for d in devices]
        if devices:
            lat = c.get("device_latency_ms")
        ratio = c.get("latency_ratio") or {}
        times = ratio.get("median", lat / base_lat if lat and base_lat else None)
        spread = (f"{ratio['q1']:.2f}–{ratio['q3']:.2f}"
                  if ratio.get("spread") else "–")
        rows.append([
            str(c.get("name")), _kib(size),
            _fmt(size / base_size if size and base_size else None, ".2f"),
            _fmt(c.get("latency_ms")), *dev, _fmt(times, ".2f"), spread,
            _fmt(acc.get("score"), ".4f"), _fmt(acc.get("drop"), ".4f"), status,
        ])
    return rows


def base_lines(report: Mapping[str, Any]) -> list[str]:
    """The ``base`` section (``convert --base``) as lines for report.md and the CLI summary,
    one finding a line; none without a base."""
    info = report.get("base")
    if not isinstance(info, Mapping):
        return []
    chosen = bool(info.get("used"))
    lines = [f"base: {info.get('name')} {info.get('version')} ({info.get('candidate')}) at "
             f"{info.get('path')}" + ("" if chosen else
                                       f" — NOT used: {info.get('not_used') or 'not chosen'}")]
    for kind in ("weights", "activations"):
        part = info.get(kind)
        if not isinstance(part, Mapping):
            if kind == "activations" and "weights" in info:
                lines.append("base activations: quantized at run time (dynamic); nothing "
                             "to reuse")
            continue
        lines.append(f"base {kind}: {part.get('reused')} of {part.get('total')} keep the "
                     "base's scale and zero point")
        own = list(part.get("own_scale") or [])
        for row in own[:_LISTED]:
            lines.append(f"base {kind}: own scale for {row.get('tensor')}: {row.get('why')}")
        if len(own) > _LISTED:
            lines.append(f"base {kind}: … and {len(own) - _LISTED} more with their own "
                         "scale (report.json lists all)")
        new = list(part.get("new") or [])
        if new:
            names = ", ".join(new[:_LISTED]) + (" …" if len(new) > _LISTED else "")
            lines.append(f"base {kind}: {len(new)} not in the base, own scale: {names}")
        gone = list(part.get("base_only") or [])
        if gone:
            names = ", ".join(gone[:_LISTED]) + (" …" if len(gone) > _LISTED else "")
            lines.append(f"base {kind}: {len(gone)} in the base only (not quantized now): "
                         f"{names}")
    return lines


def not_verified_why(data: Mapping[str, Any]) -> str:
    """Why a report is not verified, in a phrase."""
    if data.get("not_verified_why"):
        return str(data["not_verified_why"])
    if data.get("task_budget_held") is False:
        return "the task metric broke its budget; accepted with --force"
    return "synthetic inputs only; pass --calibration or --eval"


def task_lines(report: Mapping[str, Any]) -> list[str]:
    """The task, its per-output metrics and budgets, and the worst evaluation sample;
    none for a generic task."""
    task = report.get("task") or {}
    if not task or task.get("name", "generic") == "generic" or not task.get("outputs"):
        return []
    lines = [f"task: {task['name']}" + (f" (from {task['detected_from']})"
                                        if task.get("detected_from") else "")]
    budgets = task.get("budget") or {}
    for out, kind in (task.get("outputs") or {}).items():
        lines.append(f"task metric: {out}: {kind}, budget {budgets.get(out, '?')}")
    worst = (report.get("data") or {}).get("worst_sample")
    if worst:
        lines.append(f"worst sample: #{worst.get('index')} ({worst.get('output')}): "
                     f"{worst.get('figure')} {_fmt(worst.get('value'), '.4g')}")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# {report.get('title', 'Conversion report')}", ""]
    src = report.get("source") or {}
    if src:
        lines.append(f"- Source: `{src.get('path', '?')}` ({src.get('format', '?')}, sha256 "
                     f"`{str(src.get('sha256', ''))[:16]}…`)")
    metric = report.get("metric") or {}
    if metric and not task_lines(report):
        lines.append(f"- Accuracy: {metric.get('name')} vs {metric.get('reference', 'the source')},"
                     f" budget: drop ≤ {_fmt(metric.get('max_drop'), '.4g')}")
    data = report.get("data") or {}
    if data:
        ev = data.get("evaluation") or {}
        cal = data.get("calibration") or {}
        lines.append(f"- Evaluation: {ev.get('samples', 0)} samples from {ev.get('origin', '?')}; "
                     f"calibration: {cal.get('samples', 0)} samples from "
                     f"{cal.get('origin') or 'none'}")
        lines.extend(f"- {t[0].upper()}{t[1:]}" for t in task_lines(report))
        lines.extend(f"- {t[0].upper()}{t[1:]}" for t in pipeline_lines(report))
        if not data.get("verified_on_real_data", True):
            lines.append("")
            lines.append(f"**Accuracy NOT verified on real data** ({not_verified_why(data)}).")
    if report.get("threads"):
        lines.append(f"- Threads: {report['threads']}")
    for d, info in sorted((report.get("devices") or {}).items()):
        lines.append(f"- Profiled on device `{d}`: {hardware_text(info)}")
    lines.append("")
    rows = candidate_rows(report)
    if len(rows) > 1:
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
        for r in rows[1:]:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        lines.append("")
    if report.get("chosen"):
        lines.append(f"**Chosen: {report['chosen']}** — {report.get('why', '')}")
        lines.append("")
    if report.get("rule"):
        prefer = (report.get("options") or {}).get("prefer")
        flag = f" (--prefer {prefer})" if prefer else ""
        lines.append(f"Choice rule{flag}: {report['rule']}.")
        lines.append("")
    norm = report.get("normalization") or []
    if norm:
        lines.append("Normalization:")
        lines.extend(f"- {n}" for n in norm)
        lines.append("")
    based = base_lines(report)
    if based:
        lines.append("Base (--base):")
        lines.extend(f"- {b}" for b in based)
        lines.append("")
    warns = report.get("warnings") or []
    if warns:
        lines.append("Warnings:")
        lines.extend(f"- {w}" for w in warns)
        lines.append("")
    lines.append("![size, latency and accuracy per candidate](report.png)")
    lines.append("")
    return "\n".join(lines)


def _latency_bars(ax: Any, cands: list[Any], names: list[str], colors: list[str],
                  devices: list[str]) -> None:
    """Host and device latency side by side: one bar per machine within each candidate."""
    import numpy as np

    series = [("host", [c.get("latency_ms") or 0.0 for c in cands])]
    series += [(d, [((c.get("devices") or {}).get(d) or {}).get("median_ms") or 0.0
                    for c in cands]) for d in devices]
    h = 0.8 / len(series)
    y = np.arange(len(names))
    hatches = ["", "//", "xx", "..", "--", "++"]
    for i, (label, vals) in enumerate(series):
        bars = ax.barh(y - 0.4 + h * (i + 0.5), vals or [0], height=h, color=colors,
                       hatch=hatches[i % len(hatches)], edgecolor="white", label=label)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=6, padding=2)
    ax.set_yticks(y, names)
    ax.tick_params(labelsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.legend(fontsize=7)
    ax.set_title("latency (ms, batch 1): host vs device", fontsize=10)


def hardware_text(info: Mapping[str, Any]) -> str:
    """A device's reported hardware in words: arch, CPU, cores, features, threads."""
    hw = info.get("hardware") or {}
    feats = hw.get("cpu_features") or []
    parts = [str(hw.get("arch") or "?"), str(hw.get("cpu") or "unknown CPU"),
             f"{hw.get('cores') or '?'} cores",
             "features " + (", ".join(str(f) for f in feats[:32]) or "none reported"),
             f"{info.get('threads') or 'default'} thread(s)"]
    rt = (hw.get("runtimes") or {}).get("onnxruntime")
    if rt:
        parts.append(f"onnxruntime {rt}")
    return "; ".join(parts)


def render_plot(report: Mapping[str, Any]) -> bytes:
    """PNG bytes: size, latency and accuracy drop per candidate; the choice highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cands = [c for c in report.get("candidates", []) if c.get("size_bytes")]
    names = [str(c["name"]) for c in cands] or ["(none)"]
    chosen = report.get("chosen")
    colors = ["tab:green" if n == chosen else "tab:gray" for n in names]
    sizes = [c.get("size_bytes", 0) / 1024 for c in cands] or [0]
    lats = [c.get("latency_ms") or 0.0 for c in cands] or [0]
    # Drops span orders of magnitude (1e-5 for fp16, 1e-2 for a bad int8): log scale,
    # with exact zeros drawn at the floor.
    floor = 1e-7
    drops = [max(floor, (c.get("accuracy") or {}).get("drop") or 0.0) for c in cands] or [floor]
    fig = Figure(figsize=(11, 0.45 * len(names) + 1.6), dpi=100)
    axes = fig.subplots(1, 3, sharey=True)
    metric = (report.get("metric") or {}).get("name", "accuracy")
    task = report.get("task") or {}
    if task.get("outputs"):
        metric = f"{task.get('name')} task"
    devices = sorted(report.get("devices") or {})
    for ax, vals, title in zip(
        axes, (sizes, lats, drops),
        ("size (KiB)", "latency (ms, batch 1)" + (": host and devices" if devices else ""),
         f"{metric} drop vs source (log)"),
        strict=True,
    ):
        if vals is lats and devices:
            _latency_bars(ax, cands, names, colors, devices)
            continue
        bars = ax.barh(names, vals, color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
        ax.bar_label(bars, labels=["0" if v == floor and vals is drops else f"{v:.3g}"
                                   for v in vals], fontsize=7, padding=2)
        ax.margins(x=0.25)
    budget = (report.get("metric") or {}).get("max_drop")
    axes[2].set_xscale("log")
    top = max([*drops, budget if isinstance(budget, (int, float)) else 0.0])
    axes[2].set_xlim(floor, max(top, floor) * 10)
    if isinstance(budget, (int, float)):
        axes[2].axvline(budget, color="tab:red", linestyle="--", linewidth=1, label="budget")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"chosen: {chosen}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


__all__ = ["base_lines", "candidate_rows", "hardware_text", "latency_fields", "measured_status",
           "render_markdown", "render_plot", "write_report"]
