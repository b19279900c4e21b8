"""``inspect``, ``predict`` and ``bench``: commands that need only the base install."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np

from .._answers import Answer
from .._artifact import MANIFEST_NAME, format_for_path
from .._bench import (
    concrete_specs,
    measure,
    runtime_error_text,
    search_input_shapes,
    shape_text,
    symbolic_dims,
    synthetic_inputs,
)
from .._fs import sha256_file
from .._io import read_inputs, save_npz, to_jsonable
from .._runtime import Predictor, litert_op_names, load
from ..errors import EdgeError, UsageError


def _describe(path: Path, predictor: Predictor) -> dict[str, Any]:
    if predictor.manifest is not None:
        info = predictor.manifest.to_json()
        info["path"] = str(path)
    else:
        info = {
            "path": str(path),
            "name": path.stem,
            "version": None,
            "format": predictor.format,
            "model": path.name,
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
            "inputs": [s.to_json() for s in predictor.inputs],
            "outputs": [s.to_json() for s in predictor.outputs],
            "quantization": None,
        }
    model_file = predictor.path
    ops = ops_summary(model_file, predictor.format)
    info["ops"] = ops
    if info.get("quantization") is None and ops is not None:
        info["quantization"] = _detect_quantization(ops, model_file, predictor.format)
    return info


def ops_summary(model_file: Path, fmt: str) -> dict[str, int] | None:
    """Op type → count, or None where this install cannot read the format's graph."""
    if fmt == "onnx":
        try:
            import onnx
        except ImportError:
            return None
        model = onnx.load(str(model_file), load_external_data=False)
        counts: Counter[str] = Counter()

        def walk(graph: Any) -> None:
            for node in graph.node:
                counts[node.op_type] += 1
                for attr in node.attribute:
                    if attr.g is not None and attr.g.node:
                        walk(attr.g)
                    for g in attr.graphs:
                        walk(g)

        walk(model.graph)
        return dict(counts.most_common())
    if fmt == "tflite":
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            return None
        interp = Interpreter(model_path=str(model_file))
        return dict(Counter(litert_op_names(interp)).most_common())
    return None


def _detect_quantization(ops: dict[str, int], model_file: Path, fmt: str) -> str:
    if "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "ConvInteger" in ops:
        return "int8-dynamic"
    if "QuantizeLinear" in ops or any(k.startswith("QLinear") for k in ops):
        return "int8-static"
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        kinds = {np.dtype(t["dtype"]).name for t in
                 Interpreter(model_path=str(model_file)).get_tensor_details()}
        if "int8" in kinds or "uint8" in kinds:
            return "int8"
        if "float16" in kinds:
            return "fp16"
    return "none"


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _open(path: str) -> Predictor:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if p.is_file() and p.name != MANIFEST_NAME:
        format_for_path(p)  # clear error for unknown suffixes before the runtime tries
    return load(p)


@click.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show PATH's signature, format, size, quantization and ops summary.

    PATH is an artifact directory (its manifest and model hash are verified) or a
    bare .onnx, .ort or .tflite file.
    """
    predictor = _open(path)
    info = _describe(Path(path), predictor)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    version = f" {info['version']}" if info.get("version") else ""
    click.echo(f"{info['name']}{version}  [{info['format']}]  {_human_size(info['size_bytes'])}  "
               f"quantization: {info.get('quantization') or 'unknown'}")
    click.echo(f"sha256: {info['sha256']}")
    if predictor.manifest is not None:
        src = predictor.manifest.source
        if src:
            click.echo(f"source: {src.get('format', '?')} {str(src.get('sha256', ''))[:16]}")
        click.echo(f"task: {predictor.manifest.task}")
        rt = predictor.manifest.runtime
        if rt:
            click.echo("runtime: " + ", ".join(f"{k} {v}" for k, v in rt.items()))
    click.echo("inputs:")
    for s in predictor.inputs:
        click.echo(f"  {s.describe()}")
    click.echo("outputs:")
    for s in predictor.outputs:
        click.echo(f"  {s.describe()}")
    ops = info.get("ops")
    if ops:
        total = sum(ops.values())
        top = ", ".join(f"{k}×{v}" for k, v in list(ops.items())[:12])
        more = f", … ({len(ops) - 12} more types)" if len(ops) > 12 else ""
        click.echo(f"ops ({total}): {top}{more}")
    elif ops is None:
        click.echo("ops: not available for this format with this install")


@click.command("predict")
@click.argument("path")
@click.option("--input", "-i", "input_file",
              help="Inputs: .npz (keys = input names), .npy (single-input models) or .json "
              "(default: the artifact's own sample.npz).")
@click.option("--image", "image_file", type=click.Path(path_type=Path),
              help="Answer this JPEG/PNG in the task's terms (labels, boxes, class map or "
              "embedding); needs an artifact converted with --preprocess and --postprocess.")
@click.option("-o", "--output", "output_file", help="Write the outputs to this .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime intra-op threads.")
def predict_cmd(path: str, input_file: str | None, image_file: Path | None,
                output_file: str | None, as_json: bool, threads: int | None) -> None:
    """Run PATH (artifact directory or model file) offline on INPUT (default: the
    artifact's sample), or answer an --image."""
    if output_file is not None and not output_file.endswith(".npz"):
        raise UsageError(f"{output_file}: the output file must end in .npz")
    if image_file is not None and (input_file is not None or output_file is not None):
        raise UsageError("--image answers in the task's terms; it goes without --input and "
                         "--output")
    predictor = _open(path) if threads is None else load(path, threads=threads)
    if image_file is not None:
        _print_answer(predictor, predictor.answer(image_file), as_json)
        return
    if input_file is None:
        input_file = str(_sample_file(path, predictor) or "")
        if not input_file:
            raise UsageError(f"{path} has no sample.npz to run; pass --input FILE (.npz keyed "
                             "by input name, .npy or .json)")
    feed = read_inputs(input_file, predictor.inputs)
    outputs = _run(predictor, feed, input_file)
    if output_file is not None:
        save_npz(output_file, outputs)
    if as_json:
        click.echo(json.dumps({"model": predictor.name, "version": predictor.version,
                               "outputs": to_jsonable(outputs)}))
        return
    for name, value in outputs.items():
        arr = np.asarray(value)
        click.echo(f"{name} {arr.dtype} {list(arr.shape)}")
        click.echo(np.array2string(arr, threshold=64, precision=5))
    if output_file is not None:
        click.echo(f"wrote {output_file}")


def _print_answer(predictor: Predictor, answer: Answer, as_json: bool) -> None:
    labels = predictor.manifest.extra.get("labels") if predictor.manifest else None
    names = [str(x) for x in labels] if isinstance(labels, list) else None
    if as_json:
        click.echo(json.dumps({"model": predictor.name, "version": predictor.version,
                               **answer.to_json(names)}))
        return
    for lb in answer.labels:
        click.echo(f"{lb.score:.4f}  {lb.name} (class {lb.index})")
    for b in answer.boxes:
        click.echo(f"{b.score:.4f}  {b.label} (class {b.index})  x0={b.x0:.1f} y0={b.y0:.1f} "
                   f"x1={b.x1:.1f} y1={b.y1:.1f}")
    if answer.task in ("classify", "detect") and not (answer.labels or answer.boxes):
        click.echo("no detection" if answer.task == "detect" else "no label")
    if answer.class_map is not None:
        h, w = answer.class_map.shape
        click.echo(f"class map {w}x{h} (W x H):")
        for cls in answer.to_json(names)["classes"]:
            click.echo(f"  {cls['name']} (class {cls['index']}): {cls['pixels']} pixels")
    if answer.embedding is not None:
        emb = answer.embedding
        click.echo(f"embedding of {emb.shape[-1]} values: "
                   f"{np.array2string(emb[:8], precision=4)}{' ...' if emb.shape[-1] > 8 else ''}")


@click.command("bench")
@click.argument("path")
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", type=click.IntRange(min=1), help="Runtime intra-op threads.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Size of a symbolic batch axis (the sample is repeated along it).")
@click.option("--input", "-i", "input_file", help="Use these inputs (default: the artifact's "
              "own sample.npz, else random inputs of a shape the model runs on).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--on", "devices", multiple=True, metavar="DEVICE",
              help="Measure on this device's agent instead (repeatable; needs --broker and "
              "--repo, served by `edge-sdk serve`).")
@click.option("--broker", envvar="EDGE_BROKER", help="Broker URL (with --on).")
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False),
              help="Release repository whose deployment key signs the request (with --on).")
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
              show_envvar=True, help="Fleet name (the {fleet} level of every topic).")
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory (default: the repository's).")
@click.option("--username", envvar="EDGE_MQTT_USERNAME", help="Broker user name.")
@click.option("--password", envvar="EDGE_MQTT_PASSWORD", help="Broker password.")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=float,
              help="Seconds to wait for the devices' figures (with --on).")
def bench_cmd(path: str, runs: int, warmup: int, threads: int | None, batch: int,
              input_file: str | None, as_json: bool, devices: tuple[str, ...],
              broker: str | None, repo_dir: str | None, fleet: str, keydir: str | None,
              username: str | None, password: str | None, timeout_s: float) -> None:
    """Measure PATH's latency percentiles and throughput on this machine, or with --on
    on devices (load, warm-up, median and p90 latency, peak memory)."""
    if not Path(path).exists():
        raise UsageError(f"{path}: no such file or directory")
    predictor = load(path, threads=threads)
    feed, origin = _bench_feed(path, predictor, input_file, batch)
    expected = _run(predictor, feed, origin)  # surfaces input errors before timing
    if devices:
        _bench_on(path, predictor, feed, expected, devices, broker, repo_dir, fleet, keydir,
                  username, password, runs, warmup, timeout_s, as_json)
        return
    stats = measure(lambda: predictor.predict(feed), runs=runs, warmup=warmup)
    result = {"model": predictor.name, "format": predictor.format, "threads": threads,
              "cpu_count": os.cpu_count(), **stats.to_json()}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{predictor.name} [{predictor.format}]  runs={runs} warmup={warmup} "
               f"threads={threads or 'default'}")
    click.echo(f"latency ms  p50 {stats.p50_ms:.3f}  p90 {stats.p90_ms:.3f}  "
               f"p99 {stats.p99_ms:.3f}  mean {stats.mean_ms:.3f}")
    click.echo(f"throughput  {stats.throughput_per_s:.1f} inferences/s")


def _sample_file(path: str, predictor: Predictor) -> Path | None:
    """The artifact's own sample (None for a bare model file or an artifact without one)."""
    if predictor.manifest is None or predictor.manifest.sample is None:
        return None
    p = Path(path)
    return (p if p.is_dir() else p.parent) / predictor.manifest.sample


def _bench_feed(path: str, predictor: Predictor, input_file: str | None,
                batch: int) -> tuple[dict[str, Any], str]:
    """--input, else the artifact's sample (repeated along a symbolic batch axis to
    ``batch``), else random inputs of shapes the model runs on; and where they came from."""
    if input_file:
        return read_inputs(input_file, predictor.inputs), input_file
    sample = _sample_file(path, predictor)
    if sample is not None:
        feed = read_inputs(sample, predictor.inputs)
        for s in predictor.inputs:
            arr = np.asarray(feed.get(s.name))
            if batch > 1 and s.shape and not isinstance(s.shape[0], int) and arr.ndim and \
                    arr.shape[0] == 1:
                feed[s.name] = np.repeat(arr, batch, axis=0)
        return feed, str(sample)
    found = search_input_shapes(predictor.predict, predictor.inputs, batch=batch)
    if found.shapes is None:
        dims = "; ".join(f"{k}: {', '.join(v)}" for k, v in found.free.items())
        tried = ", ".join(shape_text(t[k]) for t in found.tried[:2] for k in t) + (
            f", … {len(found.tried)} tries" if len(found.tried) > 2 else "")
        raise UsageError(
            f"{path} runs on no random input shape tried and has no sample: pass --input "
            "FILE (.npz keyed by input name) with inputs it accepts ("
            + (f"symbolic dims {dims}; " if dims else "")
            + f"tried {tried}; last error: {(found.error or '')[:100]})")
    return synthetic_inputs(concrete_specs(predictor.inputs, found.shapes),
                            int_high=found.int_high), "random inputs"


def _run(predictor: Predictor, feed: Mapping[str, Any], origin: str) -> dict[str, np.ndarray]:
    """``predictor.predict(feed)``; the runtime's failure on inputs that fit the signature
    is the caller's one-line error, not an internal one."""
    try:
        return predictor.predict(feed)
    except EdgeError:
        raise
    except Exception as err:
        shapes = ", ".join(f"{k} {shape_text(np.shape(v))}" for k, v in feed.items())
        free = {s.name: symbolic_dims(s) for s in predictor.inputs if symbolic_dims(s)}
        hint = ("; symbolic dims " + "; ".join(f"{k}: {', '.join(v)}" for k, v in free.items())
                if free else "")
        raise UsageError(f"{predictor.name} fails on {origin}: pass --input FILE with inputs "
                         f"it accepts ({shapes}{hint}; {runtime_error_text(err)[:120]})"
                         ) from err


def _bench_on(path: str, predictor: Any, feed: dict[str, np.ndarray],
              expected: Mapping[str, Any], devices: tuple[str, ...], broker: str | None,
              repo_dir: str | None, fleet: str, keydir: str | None, username: str | None,
              password: str | None, runs: int, warmup: int, timeout_s: float,
              as_json: bool) -> None:
    if not broker or not repo_dir:
        raise UsageError("--on needs --broker URL and --repo REPO (served by `edge-sdk "
                         "serve`, whose deployment key signs the request)")
    from ..release import ProfileConfig, ProfilingError, RepositoryProfiler
    from ..transport import MqttConfig

    model_file = Path(predictor.path)
    prof = RepositoryProfiler(repo_dir, MqttConfig(url=broker, fleet=fleet,
                                                   username=username, password=password),
                              devices, keydir=keydir,
                              config=ProfileConfig(timeout_s=timeout_s, runs=runs,
                                                   warmup=warmup))
    results = prof([("model", model_file)], feed,
                   {"model": {k: np.asarray(v) for k, v in expected.items()}},
                   spread=_conversion_spread(predictor))
    rows = {}
    for d in devices:
        res = results[d]
        t = res.timing("model")
        rows[d] = {"hardware": dict(res.hardware), "threads": res.threads,
                   **({**t.to_json(), "error": t.why_excluded} if t is not None
                      else {"error": "not measured"})}
    if as_json:
        click.echo(json.dumps({"model": predictor.name, "format": predictor.format,
                               "devices": rows}))
    else:
        for d, r in rows.items():
            hw = r["hardware"]
            feats = ",".join(str(f) for f in (hw.get("cpu_features") or [])[:12]) or "-"
            click.echo(f"{d}: {hw.get('arch')} {hw.get('cpu')} {hw.get('cores')} cores "
                       f"[{feats}] threads={r['threads'] or 'default'}")
            if r.get("error"):
                click.echo(f"  excluded: {r['error']}")
                continue
            rss = r.get("peak_rss_bytes")
            click.echo(f"  {predictor.name} [{predictor.format}]  load {_ms(r['load_ms'], 1)}  "
                       f"warm-up {_ms(r['warmup_ms'], 1)}  median {_ms(r['median_ms'], 3)}  "
                       f"p90 {_ms(r['p90_ms'], 3)}  runs={r['runs']}  peak RSS "
                       + (f"{rss / 2**20:.1f} MiB" if rss else "-"))
    failed = [d for d, r in rows.items() if r.get("error")]
    if failed:
        raise ProfilingError(f"{path} does not run as on this machine on device "
                             f"{', '.join(failed)}: {rows[failed[0]]['error']}")


def _conversion_spread(predictor: Any) -> dict[str, float] | None:
    """How far the conversion measured the artifact's outputs from its float model's on
    its sample (``extra.conversion.spread``): a quantized model's kernels round that much
    apart on another CPU (x86 without VNNI and ARM differ in int8), so a device within it
    still runs the model as this machine does. None when the artifact says nothing."""
    from ..profiling._request import MAX_SPREAD

    manifest = getattr(predictor, "manifest", None)
    conv = manifest.extra.get("conversion") if manifest is not None else None
    s = conv.get("spread") if isinstance(conv, dict) else None
    if isinstance(s, int | float) and not isinstance(s, bool) and 0 < s <= MAX_SPREAD:
        return {"model": float(s)}
    return None


def _ms(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f} ms"


__all__ = ["bench_cmd", "inspect_cmd", "ops_summary", "predict_cmd"]
