"""``edge-sdk convert``: a thin wrapper over :func:`converters.convert`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edge_sdk.errors import UsageError

from . import SOURCE_KINDS, ConvertConfig, convert
from ._measure import METRICS, PREFER
from ._pipeline import NOT_VERIFIED, QUANTIZE_CHOICES, TARGETS
from ._prepost import pipeline_lines
from ._report import (
    base_lines,
    candidate_rows,
    hardware_text,
    not_verified_why,
    task_lines,
)
from ._tasks import KINDS, TASKS

if TYPE_CHECKING:
    from edge_sdk.profiling import DeviceProfiler

_SHAPE = re.compile(r"^([^=]+)=(\d+(?:[x,]\d+)*)$")


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """``name=1x3x224x224`` (repeatable) → {name: (1, 3, 224, 224)}."""
    if not values:
        return None
    out: dict[str, tuple[int, ...]] = {}
    for v in values:
        m = _SHAPE.match(v.strip())
        if m is None:
            raise UsageError(f"--input-shape {v!r}: expected NAME=DIMxDIMx... "
                             "(e.g. input=1x3x224x224)")
        shape = tuple(int(d) for d in re.split(r"[x,]", m.group(2)))
        if out.get(m.group(1), shape) != shape:
            raise UsageError(f"--input-shape {m.group(1)!r} given twice with different shapes "
                             f"({'x'.join(map(str, out[m.group(1)]))} and "
                             f"{'x'.join(map(str, shape))})")
        out[m.group(1)] = shape
    return out


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to create (must not exist unless --overwrite).")
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), default="auto",
              show_default=True, help="Scheme; auto measures every candidate and picks one "
              "within the accuracy budget, never slower than float (see --prefer).")
@click.option("--prefer", type=click.Choice(PREFER), default="balanced", show_default=True,
              help="What auto weighs: latency (fastest), size (smallest no slower than "
              "float) or balanced (fastest, unless one at most 10% slower is under half "
              "its size).")
@click.option("--to", "to", type=click.Choice(TARGETS), default=None,
              help="Output format (default: onnx; a .tflite source stays TFLite).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help=".npz keyed by input name (axis 0 = samples); part is held back for "
              "evaluation when --eval is not given.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help=".npz evaluation set (optional key 'labels' for top1 accuracy).")
@click.option("--task", type=click.Choice(TASKS), help="What the model is for; accuracy "
              "is judged in its terms (default: detected from the source, else generic).")
@click.option("--metric", "metrics", multiple=True, metavar="[OUTPUT:]KIND",
              help="cosine|top1|mse|max-abs for outputs without a task metric (default "
              "cosine), or OUTPUT:KIND for one output (repeatable), KIND one of "
              f"{', '.join(KINDS)}; e.g. --metric output0:detect-yolov8.")
@click.option("--max-drop", type=float, help="Accuracy budget (cosine/top1 default 0.01; "
              "mse/max-abs absolute, default scaled to the outputs; with a task: the main "
              "budget of every task metric, see the README).")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads for latency "
              "measurement (match the device).")
@click.option("--name", help="Artifact name (default: the source file name).")
@click.option("--version", "version", default="1.0.0", show_default=True,
              help="Artifact version.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Accept an explicitly requested scheme that "
              "breaks the accuracy budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--exclude-op", "exclude_ops", multiple=True, metavar="OP",
              help="Op type to keep in float (repeatable), e.g. --exclude-op Softmax.")
@click.option("--from", "source_kind", type=click.Choice(SOURCE_KINDS),
              help="Source format (default: from the file suffix).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x224x224",
              help="Input shape (repeatable). ONNX and TFLite sources: the size of symbolic "
              "dims for synthetic inputs and latency when no --calibration/--eval is given (the "
              "artifact keeps its symbolic signature); without it, common sizes are tried. "
              "Other sources: the export shape where the source records none.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading pickled sources "
              "(scikit-learn .pkl/.joblib, full torch models): only for files you trust.")
@click.option("--base", type=click.Path(path_type=Path), metavar="V1_ARTIFACT_DIR",
              help="An earlier int8 ONNX artifact of this model: reuse its scales and zero "
              "points (and its scheme, within the budget) so that unchanged weights give "
              "identical bytes and the update is a small delta.")
@click.option("--profile-on", "profile_on", multiple=True, metavar="DEVICE",
              help="Also time the candidates on this device's agent and choose by its "
              "latency (repeatable: the worst device decides). Needs --broker and --repo "
              "(served by `edge-sdk serve`).")
@click.option("--broker", envvar="EDGE_BROKER", help="Broker URL (with --profile-on).")
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Release repository that carries the candidates to the devices and whose "
              "deployment key signs the request (with --profile-on).")
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET")
@click.option("--keys", "keydir", type=click.Path(file_okay=False, path_type=Path),
              help="Key directory (default: the repository's).")
@click.option("--username", envvar="EDGE_MQTT_USERNAME", help="Broker user name.")
@click.option("--password", envvar="EDGE_MQTT_PASSWORD", help="Broker password.")
@click.option("--profile-timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for the devices' figures.")
@click.option("--preprocess", metavar="image:KEY=VALUE,...",
              help="Put the pre-processing in the graph: the artifact takes uint8 RGB images "
              "[N, H, W, 3] of any size. Keys: size=HxW, resize=stretch|letterbox|center-crop, "
              "channels=rgb|bgr, layout=nchw|nhwc, scale=1/255, mean=R/G/B, std=R/G/B. "
              "--eval/--calibration may then hold an 'image' array (and the training "
              "pipeline's input tensors, to catch a skew).")
@click.option("--postprocess", metavar="TASK:KEY=VALUE,...",
              help="Put the post-processing in the graph: classify:topk=5 | "
              "detect:layout=yolov8|yolov5|boxes-scores,score=0.25,iou=0.45,max=100 | "
              "segment:argmax | embed:l2norm (optional output=NAME).")
@click.option("--labels", "labels", type=click.Path(path_type=Path),
              help="Class names, one per line (stored in the manifest; the count must match "
              "the model's classes).")
def convert_cmd(
    src: Path, output: Path, quantize: str, prefer: str, to: str | None,
    calibration: Path | None, eval_file: Path | None, task: str | None,
    metrics: tuple[str, ...], max_drop: float | None, threads: int | None,
    name: str | None, version: str, as_json: bool, force: bool, overwrite: bool,
    exclude_ops: tuple[str, ...], source_kind: str | None, input_shapes: tuple[str, ...],
    trust_pickle: bool, base: Path | None, profile_on: tuple[str, ...], broker: str | None,
    repo_dir: Path | None, fleet: str, keydir: Path | None, username: str | None,
    password: str | None, profile_timeout: float, preprocess: str | None,
    postprocess: str | None, labels: Path | None,
) -> None:
    """Convert SRC into a verified artifact directory (-o), picking the quantization
    scheme by measuring each candidate's accuracy vs the source and latency on this
    machine (or, with --profile-on, on the devices)."""
    metric, output_metrics = parse_metrics(metrics)
    config = None
    if profile_on:
        config = ConvertConfig(device_profiler=_device_profiler(
            profile_on, broker, repo_dir, fleet, keydir, username, password, profile_timeout))
    result = convert(
        src, output, source_kind=source_kind, input_shapes=parse_input_shapes(input_shapes),
        trust_pickle=trust_pickle, quantize=quantize, prefer=prefer, to=to,
        calibration=calibration,
        eval=eval_file, metric=metric, output_metrics=output_metrics, task=task,
        max_drop=max_drop, threads=threads, name=name,
        version=version, force=force, overwrite=overwrite, exclude_ops=exclude_ops,
        progress=not as_json and sys.stderr.isatty(), base=base, config=config,
        preprocess=preprocess, postprocess=postprocess, labels=labels,
    )
    report = result.report
    if as_json:
        click.echo(json.dumps({"artifact": str(result.artifact.path), **report}, default=str))
        return
    click.echo(summary(report, str(result.artifact.path)))


def parse_metrics(values: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """``--metric`` values → (the generic metric, the ``OUTPUT:KIND`` entries)."""
    plain = [v for v in values if ":" not in v]
    for v in plain:
        if v not in METRICS:
            raise UsageError(f"--metric {v!r} is not one of {', '.join(METRICS)} (or "
                             "OUTPUT:KIND for one output)")
    if len(set(plain)) > 1:
        raise UsageError(f"--metric: give at most one of {', '.join(METRICS)} "
                         f"(got {', '.join(plain)})")
    return (plain[0] if plain else "cosine"), tuple(v for v in values if ":" in v)


def _device_profiler(devices: tuple[str, ...], broker: str | None, repo: Path | None,
                     fleet: str, keydir: Path | None, username: str | None,
                     password: str | None, timeout_s: float) -> DeviceProfiler:
    """The injected profiler: the release package is imported only when asked for (it
    needs the agent extra), and the pipeline never sees MQTT."""
    if not broker or repo is None:
        raise UsageError("--profile-on needs --broker URL and --repo REPO (the repository "
                         "`edge-sdk serve` serves; its deployment key signs the request)")
    try:
        from edge_sdk.release import ProfileConfig, RepositoryProfiler
        from edge_sdk.transport import MqttConfig
    except ImportError as err:
        raise UsageError(f"--profile-on needs the agent extra (pip install "
                         f"'edge-sdk[agent]'): {err.name or err}") from err
    return RepositoryProfiler(repo, MqttConfig(url=broker, fleet=fleet, username=username,
                                               password=password), devices, keydir=keydir,
                              config=ProfileConfig(timeout_s=timeout_s))


def summary(report: dict[str, Any] | Any, path: str) -> str:
    rows = candidate_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(
            zip(r[:-1], widths, strict=True))]
        lines.append("  ".join(cells) + "  " + r[-1])
    lines.append("")
    lines.append(f"chosen: {report.get('chosen')} — {report.get('why', '')}")
    if report.get("rule"):
        lines.append(f"rule: {report['rule']}")
    metric = report.get("metric") or {}
    tasks = task_lines(report)
    if tasks:
        chosen: dict[str, Any] = next((c for c in report.get("candidates") or []
                       if c.get("name") == report.get("chosen")), {})
        rest = ((chosen.get("accuracy") or {}).get("details") or {}).get("generic")
        lines.append(f"accuracy: task metrics vs {metric.get('reference')}" + (
            f" (outputs {', '.join(rest['outputs'])}: {rest['metric']})" if rest else ""))
    else:
        lines.append(f"accuracy: {metric.get('name')} vs {metric.get('reference')}, budget "
                     f"drop ≤ {metric.get('max_drop'):.4g}")
        hint = (report.get("task") or {}).get("hint")
        if hint:
            lines.append(f"task: generic — {hint}")
    lines.extend(tasks)
    lines.extend(pipeline_lines(report))
    data = report.get("data") or {}
    if not data.get("verified_on_real_data", True):
        lines.append(f"WARNING: {NOT_VERIFIED} ({not_verified_why(data)})")
    for w in report.get("warnings") or []:
        if not w.startswith(NOT_VERIFIED):
            lines.append(f"warning: {w}")
    for n in report.get("normalization") or []:
        lines.append(f"note: {n}")
    for d, info in sorted((report.get("devices") or {}).items()):
        lines.append(f"profiled on {d}: {hardware_text(info)}")
    lines.extend(base_lines(report))
    lines.append(f"wrote {path}")
    return "\n".join(lines)


__all__ = ["convert_cmd", "parse_input_shapes"]
