"""The ONNX conversion pipeline: load and check, normalize, optimize, build
candidates, measure each on this machine against the source, pick one, write
the artifact atomically.

Front-ends export their framework model to ONNX and call :func:`convert_onnx`
with a :class:`SourceInfo` whose ``reference`` is the framework's own predict,
so accuracy is measured against the real source rather than the export.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import sha256_file
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from ._base import Base, build_base_candidate, check_base, float_initializers
from ._candidates import SCHEMES, Candidate, CandidateConfig, build_candidates
from ._data import Samples, check_input_shapes, load_samples, split_holdout, synthetic_evalset
from ._measure import (
    METRICS,
    PREFER,
    MeasureConfig,
    Measurement,
    Selection,
    accuracy,
    closed_loop,
    default_max_drop,
    measure_candidates,
    select,
    state_pairs,
)
from ._normalize import load_checked, normalize, optimize, to_ort_format
from ._report import (
    latency_fields,
    manifest_figures,
    measured_status,
    report_json,
    write_report,
)
from ._tasks import TASKS, TaskPlan, TaskScorer, parse_output_metrics, task_scorer

QUANTIZE_CHOICES = (*SCHEMES, "auto")
TARGETS = ("onnx", "ort", "tflite")
BASELINE = "fp32"
NOT_VERIFIED = "accuracy NOT verified on real data"


@dataclass(frozen=True)
class ConvertOptions:
    quantize: str = "auto"  # none|fp16|int8-dynamic|int8-static|auto
    to: str = "onnx"  # onnx|ort|tflite
    calibration: Path | None = None  # .npz
    eval: Path | None = None  # .npz
    metric: str = "cosine"  # cosine|top1|mse|max-abs
    max_drop: float | None = None  # None -> metric default (see _measure.default_max_drop)
    threads: int | None = None
    name: str | None = None
    version: str = "1.0.0"
    force: bool = False
    overwrite: bool = False
    progress: bool = False  # progress bar on stderr
    exclude_ops: tuple[str, ...] = ()
    prefer: str = "balanced"  # latency|size|balanced: how auto weighs latency vs size
    # An earlier int8 ONNX artifact of this model (v1): its scales and zero points are
    # reused where they still fit, so that v2 is a small delta from it.
    base: Path | None = None
    # What the model is for (converters._tasks.TASKS); None: detected from the source.
    task: str | None = None
    # "OUTPUT:KIND" entries (--metric output0:detect-yolov8): one output's task metric.
    output_metrics: tuple[str, ...] = ()
    # --input-shape for an ONNX source: the shapes of synthetic inputs for symbolic dims
    # (the artifact keeps the symbolic signature). Front-ends use theirs for the export.
    input_shapes: Mapping[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class SourceInfo:
    format: str  # onnx|torch|keras|sklearn|tflite
    path: str
    sha256: str
    # The framework's own predict; when given, accuracy is measured against it
    # instead of the fp32 ONNX.
    reference: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # goes into the manifest


@dataclass(frozen=True)
class ConversionResult:
    artifact: edge_sdk.Artifact
    chosen: str  # candidate name
    report: Mapping[str, Any]
    warnings: tuple[str, ...]


#: ``profiler(candidates, sample, expected) -> {device: result}``: times ``candidates``
#: ((name, model file)) on devices, given the first evaluation sample and each candidate's
#: outputs on it here; each result has ``hardware``, ``threads`` and ``timing(name)`` (an
#: :class:`edge_sdk.trust.CandidateTiming`). ``edge-sdk convert --profile-on`` injects one
#: built on :func:`edge_sdk.release.profile_on_devices`.
DeviceProfiler = Callable[
    [Sequence[tuple[str, Path]], Mapping[str, np.ndarray], Mapping[str, Mapping[str, np.ndarray]]],
    Mapping[str, Any]]


@dataclass(frozen=True)
class ConvertConfig:
    """Tunables of one conversion (tests shrink ``measure``)."""

    measure: MeasureConfig = field(default_factory=MeasureConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    holdout_fraction: float = 0.25
    synthetic_samples: int = 16
    # The longest one framework step (load, export, a reference batch, the TFLite
    # converter) may take in its child process before it is stopped.
    framework_timeout_s: float = 1800.0
    # --base: a weight (channel, table row) or activation keeps the base's scale while its
    # values pass the base's range by at most this fraction of it (those values are
    # clipped, by at most ~1.3 int8 steps at 0.01); beyond it gets its own scale.
    base_tolerance: float = 0.01
    # When set, candidates are also timed on devices and auto chooses by the worst
    # device's latency (accuracy stays measured here, against the source).
    device_profiler: DeviceProfiler | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.base_tolerance < 1.0:
            raise ValueError(f"base_tolerance must be in [0, 1), got {self.base_tolerance}")


def check_options(options: ConvertOptions) -> None:
    """Raise :class:`UsageError` for option values or combinations that cannot work."""
    if options.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {options.quantize!r} is not one of "
                         f"{', '.join(QUANTIZE_CHOICES)}")
    if options.to not in TARGETS:
        raise UsageError(f"--to {options.to!r} is not one of {', '.join(TARGETS)}")
    if options.metric not in METRICS:
        raise UsageError(f"--metric {options.metric!r} is not one of {', '.join(METRICS)}")
    if options.task is not None and options.task not in TASKS:
        raise UsageError(f"--task {options.task!r} is not one of {', '.join(TASKS)}")
    parse_output_metrics(options.output_metrics)
    if options.prefer not in PREFER:
        raise UsageError(f"--prefer {options.prefer!r} is not one of {', '.join(PREFER)}")
    if options.max_drop is not None and not (options.max_drop >= 0 and
                                             np.isfinite(options.max_drop)):
        raise UsageError(f"--max-drop must be a non-negative number, got {options.max_drop}")
    if options.threads is not None and options.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {options.threads}")
    if options.quantize == "int8-static" and options.calibration is None:
        raise UsageError("--quantize int8-static needs calibration data (--calibration "
                         "CALIB.npz keyed by input name)")
    for label, p in (("calibration", options.calibration), ("eval", options.eval)):
        if p is not None and not Path(p).is_file():
            raise UsageError(f"{p}: no such {label} file")
    if options.base is not None:
        check_base(Path(options.base), to=options.to, quantize=options.quantize,
                   calibration=options.calibration)


def artifact_name(options: ConvertOptions, src: Path) -> str:
    if options.name:
        return options.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).strip("-._") or "model"
    return name[:128]


def convert_onnx(
    onnx_path: Path,
    out_dir: Path,
    options: ConvertOptions,
    source: SourceInfo | None = None,
    *,
    config: ConvertConfig | None = None,
) -> ConversionResult:
    """Convert ``onnx_path`` into an artifact at ``out_dir`` (written atomically)."""
    cfg = config or ConvertConfig()
    check_options(options)
    src = Path(onnx_path)
    out = Path(out_dir)
    if options.to == "tflite":
        raise ConversionError(
            "--to tflite from an ONNX model is not supported: the reliable path to TFLite is "
            "from the framework source; pass the Keras/TF model"
        )
    if out.exists() and not options.overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    model = load_checked(src)
    base = None if options.base is None else Base.from_artifact(
        options.base, to=options.to, quantize=options.quantize, calibration=options.calibration)
    if source is None:
        source = SourceInfo(format="onnx", path=str(src), sha256=sha256_file(src))
    import onnx

    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp:
        work = Path(tmp)
        model, fixes = normalize(model)
        norm_path = work / "normalized.onnx"
        onnx.save(model, str(norm_path))
        fp32_path = work / "fp32.onnx"
        optimize(norm_path, fp32_path)
        try:
            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(fp32_path))),
                      str(fp32_path))
        except Exception as err:
            fixes.append(f"shape inference after optimization failed ({_short(err)})")
        fp32_pred = edge_sdk.load(fp32_path)
        specs = fp32_pred.inputs
        warnings: list[str] = []
        if base is not None:
            _check_base_matches(base, fp32_path, warnings)
        given = check_input_shapes(specs, options.input_shapes if source.format == "onnx"
                                   else None)
        calib, evalset = _data(options, specs, cfg, warnings, fp32_pred.predict, given)
        ref_fn, ref_label = _reference_fn(src, norm_path, source, warnings)
        reference = _run_reference(ref_fn, source, evalset)
        plan, scorer = task_scorer(options.task, options.output_metrics, reference,
                                   source.extra, generic_metric=options.metric,
                                   max_drop=options.max_drop, labels=evalset.labels)
        state = state_pairs(fp32_pred.inputs, fp32_pred.outputs)
        del fp32_pred
        loop_ref = None
        if state and len(evalset) >= 2:
            try:
                loop_ref = closed_loop(ref_fn, evalset.feeds, state)
                fixes.append(
                    "stateful model: every candidate is also checked closed-loop over "
                    f"{len(evalset)} steps, feeding back " + ", ".join(
                        f"{o} → {i}" for i, o in state.items()))
            except Exception as err:
                warnings.append(f"closed-loop state check skipped: {_short(err)}")
        schemes = _schemes(options.quantize)
        cands = build_candidates(
            fp32_path, work, schemes, calibration=calib, exclude_ops=options.exclude_ops,
            config=cfg.candidates,
        )
        if base is not None:
            cands.append(build_base_candidate(
                base, fp32_path, work, cands, calibration=calib,
                exclude_ops=options.exclude_ops, config=cfg.candidates,
                tolerance=cfg.base_tolerance))
        built = [c for c in cands if c.path is not None and c.error is None]
        ms = measure_candidates(
            [c.as_tuple() for c in built], evalset.feeds, reference, metric=options.metric,
            labels=evalset.labels, threads=options.threads, config=cfg.measure,
            progress=options.progress, state=state if loop_ref is not None else None,
            closed_loop_reference=loop_ref, baseline=BASELINE, scorer=scorer,
        )
        ineligible = _ineligible(cands)
        profiled: ProfiledOn | None = None
        ms_sel = ms
        if cfg.device_profiler is not None:
            profiled = _profile_on_devices(cfg.device_profiler, ms, evalset.feeds[0],
                                           options.threads, ineligible)
            ms_sel = profiled.measurements
            ineligible = {**ineligible, **profiled.excluded}
        budget = (options.max_drop if options.max_drop is not None
                  else plan.default_max_drop() if scorer is not None
                  else default_max_drop(options.metric, reference))
        requested = None if options.quantize == "auto" else options.quantize
        if requested not in (None, "none") and not any(
                c.scheme == requested and c.name not in ineligible and c.error is None
                for c in cands):
            noop = [c for c in cands if c.scheme == requested and c.noop]
            if noop and options.force:
                warnings.append(f"--quantize {requested} quantized no weight; the float model "
                                "is written instead (--force)")
                requested = "none"
            elif noop:
                raise ConversionError(
                    f"--quantize {requested} quantized no weight of this model (no-op: "
                    f"{_weight_note(noop[0])}); it would be float32 labelled int8. Use "
                    "--quantize auto or none, or --force to write the float model"
                )
        sel = select(ms_sel, baseline=BASELINE, max_drop=budget, requested=requested,
                     force=options.force, ineligible=ineligible, prefer=options.prefer,
                     latency_tolerance=cfg.measure.latency_tolerance,
                     balanced_max_slowdown=cfg.measure.balanced_max_slowdown,
                     balanced_max_size_ratio=cfg.measure.balanced_max_size_ratio,
                     preferred=None if base is None else base.candidate_name,
                     preferred_why=f"reuses the int8 parameters of base {base.version}"
                     if base is not None else "")
        warnings.extend(sel.warnings)
        for name, why in ineligible.items():
            if options.quantize in ("auto", next(c.scheme for c in cands if c.name == name)):
                warnings.append(f"{name}: {why}")
        chosen = next(m for m in ms if m.name == sel.chosen.name)  # the host's figures
        chosen_cand = next(c for c in cands if c.name == chosen.name)
        assert chosen_cand.path is not None
        model_file = chosen_cand.path
        ort_note = None
        if options.to == "ort":
            model_file = work / "model.ort"
            to_ort_format(chosen_cand.path, model_file)
            ort_note = _check_ort(model_file, evalset, reference, options.metric, budget,
                                  chosen, evalset.labels, scorer)
        base_info = None if base is None else _base_info(base, cands, chosen.name, warnings)
        rule = sel.rule if profiled is None else f"{sel.rule}; {profiled.rule}"
        report = _report(src, source, options, fixes, calib, evalset, ref_label, budget, cands,
                         ms, chosen, sel.why, rule, ineligible, warnings, ort_note,
                         base_info, profiled, plan, sel=sel)
        files = write_report(work / "report", report)
        baseline = next(m for m in ms if m.name == BASELINE)
        extra: dict[str, Any] = {
            **dict(source.extra),
            **manifest_figures(chosen, baseline, budget, evalset, options.threads, ref_label,
                               verified=report["data"]["verified_on_real_data"]),
            "conversion": {"chosen": chosen.name, "candidates": [c.name for c in cands],
                           "normalization": fixes},
        }
        if profiled is not None:
            extra["profiled_on"] = {d: {"hardware": dict(info["hardware"]),
                                        "threads": info["threads"],
                                        "latency_ms": profiled.rows.get(chosen.name, {})
                                        .get(d, {}).get("median_ms")}
                                    for d, info in profiled.devices.items()}
        if base is not None and base_info is not None:
            extra["conversion"]["base"] = {
                k: base_info.get(k) for k in ("name", "version", "sha256", "candidate", "used")}
        try:
            art = edge_sdk.build_artifact(
                model_file, out,
                name=artifact_name(options, Path(source.path)),
                version=options.version,
                quantization=chosen.scheme,
                task=plan.task,
                source={"format": source.format, "path": Path(source.path).name,
                        "sha256": source.sha256},
                runtime={"threads": options.threads} if options.threads else None,
                sample=evalset.feeds[0],
                report=report,
                extra_files={"report.md": files["report.md"], "report.png": files["report.png"]},
                extra=extra,
                overwrite=options.overwrite,
            )
        except EdgeError:
            raise
        except OSError as err:
            raise ConversionError(f"{out}: cannot write the artifact: {err}") from err
    return ConversionResult(artifact=art, chosen=chosen.name, report=report,
                            warnings=tuple(report["warnings"]))


def _check_base_matches(base: Base, fp32_path: Path, warnings: list[str]) -> None:
    """Refuse a base that shares no weight with the model; say which weights it lacks."""
    import onnx

    weights = {k: v.shape for k, v in float_initializers(onnx.load(str(fp32_path))).items()
               if v.ndim >= 2 and v.size > 1}
    base.check_matches(weights)
    missing = base.unmatched(weights)
    if missing:
        names = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        warnings.append(f"base {base.path} has no parameters for {len(missing)} of "
                        f"{len(weights)} weights ({names}); they get their own scales")


def _base_info(base: Base, cands: Sequence[Candidate], chosen: str,
               warnings: list[str]) -> dict[str, Any]:
    """The report's ``base`` section: what the base candidate reused, whether it was used."""
    cand = next(c for c in cands if c.name == base.candidate_name)
    info: dict[str, Any] = {**base.describe(), "built": cand.name, "used": chosen == cand.name}
    if cand.error is not None:
        info["not_used"] = f"it could not be built: {cand.error}"
    elif chosen != cand.name:
        info["not_used"] = next((w for w in warnings if w.startswith(cand.name + " (")),
                                "not chosen")
    info.update({k: v for k, v in cand.params.get("base", {}).items() if k not in info})
    return info


def _schemes(quantize: str) -> list[str]:
    if quantize == "auto":
        return ["none", "fp16", "int8-dynamic", "int8-static"]
    return ["none"] if quantize == "none" else ["none", quantize]


def _data(
    options: ConvertOptions, specs: Sequence[edge_sdk.TensorSpec], cfg: ConvertConfig,
    warnings: list[str], run: Callable[[dict[str, np.ndarray]], object],
    given: Mapping[str, tuple[int, ...]],
) -> tuple[Samples | None, Samples]:
    """Calibration and evaluation samples: the user's, else synthetic ones of shapes the
    model (``run``) accepts: --input-shape's (``given``) and tried ones."""
    calib = load_samples(options.calibration, specs, what="calibration") \
        if options.calibration is not None else None
    evalset = load_samples(options.eval, specs, what="evaluation") \
        if options.eval is not None else None
    if evalset is None and calib is not None:
        if len(calib) < 2:
            warnings.append("the calibration set has a single sample; it is also the "
                            "evaluation set (pass --eval for an honest figure)")
        calib, evalset = split_holdout(calib, cfg.holdout_fraction)
    if evalset is None:
        evalset = synthetic_evalset(run, specs, n=cfg.synthetic_samples, given=given)
        shapes = ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}"
                           for k, v in evalset.feeds[0].items())
        warnings.append(f"{NOT_VERIFIED}: no --calibration or --eval given; accuracy was "
                        f"checked on {len(evalset)} synthetic inputs only ({shapes})")
    elif given:
        warnings.append("--input-shape is not used: the calibration/evaluation data's "
                        "shapes are")
    return calib, evalset


def _reference_fn(
    src: Path, norm_path: Path, source: SourceInfo, warnings: list[str],
) -> tuple[Callable[[dict[str, np.ndarray]], Mapping[str, Any]], str]:
    if source.reference is not None:
        return source.reference, f"the {source.format} source model"
    try:
        pred = edge_sdk.load(src)
        label = "the source ONNX model (onnxruntime)"
    except EdgeError as err:
        # Some real exports only load once normalized (duplicate opset imports).
        pred = edge_sdk.load(norm_path)
        label = "the normalized source ONNX model (onnxruntime)"
        warnings.append(f"the source model does not load as is ({_short(err)}); accuracy is "
                        "measured against its normalized form")
    return pred.predict, label


def _run_reference(
    fn: Callable[[dict[str, np.ndarray]], Mapping[str, Any]], source: SourceInfo,
    evalset: Samples,
) -> list[dict[str, np.ndarray]]:
    try:
        return [{k: np.asarray(v) for k, v in fn(dict(f)).items()} for f in evalset.feeds]
    except edge_sdk.InputError as err:
        raise UsageError(f"{evalset.origin}: the source model rejects these inputs: "
                         f"{_short(err)}") from err
    except EdgeError:
        raise
    except Exception as err:
        raise ConversionError(f"the {source.format} source model fails on {evalset.origin}: "
                              f"{_short(err)}") from err


def _ineligible(cands: Sequence[Candidate]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in cands:
        if c.noop:
            out[c.name] = f"quantized no weight (no-op; {_weight_note(c)})"
        elif c.scheme == "fp16" and c.error is None and c.quantized_weights == 0:
            out[c.name] = "converted no weight to float16 (no-op)"
    return out


def _weight_note(c: Candidate) -> str:
    if c.total_weights == 0:
        return "the model has no float weight tensors"
    ops = c.params.get("op_types")
    return (f"0 of {c.total_weights} float weight tensors quantized"
            + (f"; ops tried: {', '.join(ops)}" if ops else ""))


def _check_ort(
    path: Path, evalset: Samples, reference: Sequence[Mapping[str, np.ndarray]], metric: str,
    budget: float, chosen: Measurement, labels: np.ndarray | None,
    scorer: TaskScorer | None = None,
) -> str:
    try:
        pred = edge_sdk.load(path)
        outs = [pred.predict(dict(f)) for f in evalset.feeds]
    except Exception as err:
        raise ConversionError(f"the ORT-format model does not run: {_short(err)}") from err
    acc = scorer(outs, reference) if scorer is not None else accuracy(
        outs, reference, metric, labels=labels)
    if not acc.within(budget):
        raise ConversionError(
            f"the ORT-format model of {chosen.name} breaks the budget: "
            + ("; ".join(acc.breaks) or f"{metric} drop {acc.drop:.4g} > {budget:.4g}"))
    return f"ORT format verified: {acc.metric} drop {acc.drop:.4g}"


def _status(c: Candidate, m: Measurement | None, budget: float, sel: Selection,
            ineligible: Mapping[str, str]) -> tuple[str, str | None]:
    if c.error is not None:
        return ("skipped" if c.needs_calibration else "failed",
                c.error)
    if m is None or not m.ok:
        return "failed", (m.error if m else "not measured")
    if c.name in ineligible:
        return "no-op", ineligible[c.name]
    status = measured_status(sel, m, budget)
    if status == "over-budget" and m.accuracy is not None:
        return status, "; ".join(m.accuracy.breaks) or None
    return status, None


def _report(
    src: Path, source: SourceInfo, options: ConvertOptions, fixes: list[str],
    calib: Samples | None, evalset: Samples, ref_label: str, budget: float,
    cands: Sequence[Candidate], ms: Sequence[Measurement], chosen: Measurement, why: str,
    rule: str, ineligible: Mapping[str, str], warnings: list[str], ort_note: str | None,
    base: Mapping[str, Any] | None = None, profiled: ProfiledOn | None = None,
    plan: TaskPlan | None = None,
    *, sel: Selection,
) -> dict[str, Any]:
    by_name = {m.name: m for m in ms}
    # Status ("slower") and ratio follow the latency the choice used (the devices' when
    # profiled), as the choice rule judged it.
    decided = by_name if profiled is None else {m.name: m for m in profiled.measurements}
    rows = []
    for c in cands:
        m = by_name.get(c.name)
        status, note = _status(c, decided.get(c.name), budget, sel, ineligible)
        if profiled is not None and c.name in profiled.excluded:
            status, note = "excluded", profiled.excluded[c.name]
        rows.append({
            "name": c.name, "scheme": c.scheme, "description": c.description,
            "status": status, "note": note, "error": m.error if m else c.error,
            "size_bytes": m.size_bytes if m else None,
            "latency_ms": m.latency_ms if m else None,
            "latency_rounds_ms": list(m.latency_rounds_ms) if m else [],
            **latency_fields(sel, c.name),
            "accuracy": m.accuracy.to_json() if m and m.accuracy else None,
            "quantized_weights": c.quantized_weights, "total_weights": c.total_weights,
            "params": c.params,
        })
        if profiled is not None:
            rows[-1]["host_latency_ms"] = rows[-1]["latency_ms"]
            # An excluded candidate has no device figure: its latency is the host's.
            rows[-1]["device_latency_ms"] = (
                decided[c.name].latency_ms
                if c.name in profiled.rows and c.name not in profiled.excluded else None)
            rows[-1]["devices"] = profiled.rows.get(c.name, {})
    notes = list(fixes)
    if ort_note:
        notes.append(ort_note)
    return report_json(
        title=f"Conversion report: {Path(source.path).name}",
        source={"format": source.format, "path": source.path, "sha256": source.sha256},
        options={"quantize": options.quantize, "to": options.to, "metric": options.metric,
                 "max_drop": options.max_drop, "exclude_ops": list(options.exclude_ops),
                 "force": options.force, "prefer": options.prefer,
                 **({"base": str(options.base)} if options.base is not None else {})},
        normalization=notes, calib=calib, evalset=evalset, reference=ref_label,
        budget=budget, threads=options.threads, baseline=BASELINE, rows=rows,
        chosen=chosen.name, why=why, rule=rule, warnings=warnings, base=base,
        devices=None if profiled is None else profiled.devices,
        task=None if plan is None else plan.describe(), chosen_accuracy=chosen.accuracy)


@dataclass(frozen=True)
class ProfiledOn:
    """What the devices measured: ``measurements`` are the host's with the worst device's
    median latency in place of the host's (what the choice uses); ``excluded`` the
    candidates a device could not run or whose outputs differed, with why; ``rows``
    candidate → device → figures; ``devices`` device → hardware and threads."""

    measurements: list[Measurement]
    excluded: dict[str, str]
    rows: dict[str, dict[str, dict[str, Any]]]
    devices: dict[str, dict[str, Any]]
    rule: str


def _profile_on_devices(profiler: DeviceProfiler, ms: Sequence[Measurement],
                        feed: Mapping[str, np.ndarray], threads: int | None,
                        ineligible: Mapping[str, str]) -> ProfiledOn:
    from dataclasses import replace

    usable = [m for m in ms if m.ok and m.name not in ineligible]
    expected: dict[str, dict[str, np.ndarray]] = {}
    for m in usable:
        pred = edge_sdk.load(m.path, threads=threads)
        expected[m.name] = {k: np.asarray(v) for k, v in pred.predict(dict(feed)).items()}
        del pred
    results = profiler([(m.name, Path(m.path)) for m in usable], dict(feed), expected)
    if not results:
        raise ConversionError("on-device profiling returned no device's figures")
    names = sorted(results)
    out: list[Measurement] = []
    excluded: dict[str, str] = {}
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for m in ms:
        if m not in usable:
            out.append(m)
            continue
        per: dict[str, dict[str, Any]] = {}
        why = None
        for d in names:
            t = results[d].timing(m.name)
            per[d] = t.to_json() if t is not None else {"error": "not measured"}
            if why is None and (t is None or not t.ok):
                why = f"on device {d}: {t.why_excluded if t is not None else 'not measured'}"
        rows[m.name] = per
        if why is not None:
            excluded[m.name] = why
            out.append(m)
            continue
        worst = max(float(per[d]["median_ms"]) for d in names)
        out.append(replace(m, latency_ms=worst, latency_rounds_ms=()))
    if BASELINE in excluded:
        raise ConversionError(f"the float baseline '{BASELINE}' failed "
                              f"{excluded[BASELINE]}")
    devices = {d: {"hardware": dict(results[d].hardware), "threads": results[d].threads}
               for d in names}
    who = ", ".join(names)
    rule = (f"latency measured on device {who} (median, batch 1)" if len(names) == 1 else
            f"latency measured on devices {who} (median, batch 1); the worst device's "
            "latency decides")
    return ProfiledOn(out, excluded, rows, devices, rule)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:240] if text else type(err).__name__


__all__ = ["ConversionResult", "ConvertConfig", "ConvertOptions", "SourceInfo",
           "check_options", "convert_onnx"]
