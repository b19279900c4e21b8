"""The ONNX conversion pipeline: load and check, normalize, optimize, build
candidates, measure each on this machine against the source, pick one, write
the artifact atomically.

Front-ends export their framework model to ONNX and call
:func:`converters._onnx.convert_onnx` with a :class:`SourceInfo` whose ``reference`` is
the framework's own predict, so accuracy is measured against the real source rather than
the export.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

import edge_sdk
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from ._base import check_base
from ._candidates import SCHEMES, Candidate, CandidateConfig
from ._data import Samples, check_input_shapes, load_samples, split_holdout, synthetic_evalset
from ._measure import (
    METRICS,
    PREFER,
    MeasureConfig,
    Measurement,
    Selection,
    closed_loop,
    default_max_drop,
    measure_candidates,
    select,
)
from ._prepost import IMAGE_INPUT, PipelineSpec
from ._prepost_check import Prepost
from ._report import (
    latency_fields,
    manifest_figures,
    measured_status,
    report_json,
    write_report,
)
from ._tasks import TASKS, TaskPlan, TaskScorer, parse_output_metrics, task_scorer

if TYPE_CHECKING:  # converting never needs the agent extra that signing requests does
    from edge_sdk.profiling import DeviceProfiler

QUANTIZE_CHOICES = (*SCHEMES, "auto")
TARGETS = ("onnx", "ort", "tflite")
BASELINE = "fp32"
NOT_VERIFIED = "accuracy NOT verified on real data"
TFLITE_PREPOST = ("--preprocess/--postprocess are ONNX operators in the graph; a TFLite "
                  "artifact cannot carry them yet (no Resize/NonMaxSuppression pipeline is built "
                  "for LiteRT): use --to onnx or --to ort, or convert without them")


@dataclass(frozen=True)
class ConvertOptions:
    quantize: str = "auto"  # none|fp16|int8-dynamic|int8-static|auto
    # onnx|ort|tflite; None: a .tflite source stays TFLite, any other becomes ONNX.
    to: str | None = None
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
    # --preprocess / --postprocess specs and --labels (converters._prepost): ops around the
    # model in the graph, verified on raw images; ONNX and ORT targets only.
    preprocess: str | None = None
    postprocess: str | None = None
    labels: Path | None = None


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
    # ``edge-sdk convert --profile-on`` injects an edge_sdk.release.RepositoryProfiler.
    device_profiler: DeviceProfiler | None = None
    # --preprocess: the in-graph pre-processing may differ from the training pipeline's
    # tensors (given next to the images) by this mean |difference| relative to their
    # spread before it is reported as a training-serving skew.
    skew_budget: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.base_tolerance < 1.0:
            raise ValueError(f"base_tolerance must be in [0, 1), got {self.base_tolerance}")


def check_options(options: ConvertOptions) -> None:
    """Raise :class:`UsageError` for option values or combinations that cannot work."""
    if options.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {options.quantize!r} is not one of "
                         f"{', '.join(QUANTIZE_CHOICES)}")
    if options.to is not None and options.to not in TARGETS:
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
    if options.base is not None and options.to == "tflite":
        raise UsageError("--base reuses an ONNX artifact's int8 scales, which TensorFlow's "
                         "TFLite converter cannot take; drop --base, or use --to onnx")
    if options.base is not None:
        check_base(Path(options.base), to=options.to or "onnx", quantize=options.quantize,
                   calibration=options.calibration)
    pipeline = PipelineSpec.from_options(options.preprocess, options.postprocess,
                                         options.labels)
    if pipeline is not None and pipeline.graph and options.to == "tflite":
        raise UsageError(TFLITE_PREPOST)
    if (pipeline is not None and pipeline.post is not None and options.task is not None
            and options.task != pipeline.post.task):
        raise UsageError(f"--task {options.task} and --postprocess {pipeline.post.task} "
                         "disagree; drop --task")


def artifact_name(options: ConvertOptions, src: Path) -> str:
    if options.name:
        return options.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).strip("-._") or "model"
    return name[:128]


#: Runs a model on one feed (what synthetic inputs are tried on).
Run = Callable[[dict[str, np.ndarray]], object]


class Backend(Protocol):
    """One output format's part of a conversion (:mod:`._onnx`, :mod:`._tflite`): it
    prepares the source, builds the candidates and writes its file format; :func:`drive`
    does everything else the same way for every format."""

    #: The float candidate every ratio is against.
    baseline: str
    #: Notes for the report (normalization, what was checked).
    fixes: list[str]
    @property
    def state(self) -> Mapping[str, str]:
        """Inputs fed back from outputs (a stateful model), checked closed-loop."""
        ...

    def title(self, source: SourceInfo) -> str: ...

    def prepare(self, work: Path, warnings: list[str],
                ) -> tuple[Sequence[edge_sdk.TensorSpec], Run]:
        """Get the source ready in ``work``; its input specs and a function that runs the
        float model (synthetic inputs take the shapes it accepts)."""
        ...

    def reference(
        self, source: SourceInfo, warnings: list[str],
    ) -> tuple[Callable[[dict[str, np.ndarray]], Mapping[str, Any]], str]:
        """What accuracy is measured against, and its label."""
        ...

    def build(self, work: Path, schemes: Sequence[str], calib: Samples | None,
              warnings: list[str]) -> list[Candidate]: ...

    def ineligible(self, cands: Sequence[Candidate]) -> dict[str, str]:
        """Candidates auto must not choose (built but pointless), with why."""
        ...

    def requested(self, requested: str | None, cands: Sequence[Candidate],
                  ineligible: Mapping[str, str], warnings: list[str]) -> str | None:
        """The explicitly requested scheme to select with, or raise when it cannot be."""
        ...

    def preferred(self) -> tuple[str | None, str]:
        """A candidate to prefer within the budget (--base), and why."""
        ...

    def why(self, why: str) -> str:
        """The report's ``why`` for the choice the rule explained as ``why``."""
        ...

    def finish(self, chosen: Candidate, measured: Measurement, work: Path, evalset: Samples,
               reference: Sequence[Mapping[str, np.ndarray]], budget: float,
               scorer: TaskScorer | None) -> tuple[Path, str | None]:
        """The file to ship for the chosen candidate, and a note for the report."""
        ...

    def base_info(self, cands: Sequence[Candidate], chosen: str,
                  warnings: list[str]) -> dict[str, Any] | None: ...


def drive(backend: Backend, out: Path, options: ConvertOptions, source: SourceInfo,
          cfg: ConvertConfig) -> ConversionResult:
    """data → candidates → measure → choose → report → artifact, for any back-end."""
    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp:
        work = Path(tmp)
        warnings: list[str] = []
        specs, run = backend.prepare(work, warnings)
        strings = [s.name for s in specs if s.dtype == "str"]
        if strings:
            # Calibration, evaluation and the artifact's sample.npz hold numeric arrays
            # (an .npz of strings needs pickle, which is never loaded).
            raise UsageError(f"{source.path}: input(s) {', '.join(map(repr, strings))} take "
                             "strings; edge-sdk converts models with numeric inputs (encode "
                             "the strings as numbers before the model)")
        fixes = backend.fixes
        # Framework sources (Keras, torch, scikit-learn) were exported at --input-shape;
        # ONNX and TFLite files keep their signature and are measured at it.
        given = check_input_shapes(specs, options.input_shapes
                                   if source.format in ("onnx", "tflite") else None)
        pipeline = PipelineSpec.from_options(options.preprocess, options.postprocess,
                                             options.labels)
        if pipeline is not None and pipeline.graph and options.to not in ("onnx", "ort"):
            raise UsageError(TFLITE_PREPOST)
        pp = None if pipeline is None else Prepost.start(pipeline, specs)
        calib, evalset = _data(options, specs, cfg, warnings, run, given, pp)
        ref_fn, ref_label = backend.reference(source, warnings)
        reference = _run_reference(ref_fn, source, evalset)
        task, given_by = options.task, "--task"
        if pipeline is not None and pipeline.post is not None:
            task, given_by = pipeline.post.task, "--postprocess"
        plan, scorer = task_scorer(task, options.output_metrics, reference,
                                   source.extra, generic_metric=options.metric,
                                   max_drop=options.max_drop, labels=evalset.labels,
                                   given_by=given_by)
        output_names: list[str] = []
        if pp is not None:
            output_names = list(_outputs_of(run, evalset))
            pp.bind_outputs(reference, plan, output_names)
        state = backend.state
        loop_ref = None
        if state and len(evalset) >= 2:
            try:
                loop_ref = closed_loop(ref_fn, evalset.feeds, state)
                fixes.append(
                    "stateful model: every candidate is also checked closed-loop over "
                    f"{len(evalset)} steps, feeding back " + ", ".join(
                        f"{o} → {i}" for i, o in state.items()))
            except Exception as err:
                warnings.append(f"closed-loop state check skipped: {one_line(err)}")
        cands = backend.build(work, _schemes(options.quantize), calib, warnings)
        built = [c for c in cands if c.path is not None and c.error is None]
        ms = measure_candidates(
            [c.as_tuple() for c in built], evalset.feeds, reference, metric=options.metric,
            labels=evalset.labels, threads=options.threads, config=cfg.measure,
            progress=options.progress, state=state if loop_ref is not None else None,
            closed_loop_reference=loop_ref, baseline=backend.baseline, scorer=scorer,
        )
        baseline = backend.baseline
        ineligible = backend.ineligible(cands)
        profiled: ProfiledOn | None = None
        ms_sel = ms
        if cfg.device_profiler is not None:
            profiled = _profile_on_devices(cfg.device_profiler, ms, evalset.feeds[0],
                                           options.threads, ineligible, baseline)
            ms_sel = profiled.measurements
            ineligible = {**ineligible, **profiled.excluded}
        budget = (options.max_drop if options.max_drop is not None
                  else plan.default_max_drop() if scorer is not None
                  else default_max_drop(options.metric, reference))
        requested = backend.requested(None if options.quantize == "auto" else options.quantize,
                                      cands, ineligible, warnings)
        preferred, preferred_why = backend.preferred()
        sel = select(ms_sel, baseline=baseline, max_drop=budget, requested=requested,
                     force=options.force, ineligible=ineligible, prefer=options.prefer,
                     latency_tolerance=cfg.measure.latency_tolerance,
                     balanced_max_slowdown=cfg.measure.balanced_max_slowdown,
                     balanced_max_size_ratio=cfg.measure.balanced_max_size_ratio,
                     preferred=preferred, preferred_why=preferred_why)
        warnings.extend(sel.warnings)
        for name, why in ineligible.items():
            if options.quantize in ("auto", next(c.scheme for c in cands if c.name == name)):
                warnings.append(f"{name}: {why}")
        chosen = next(m for m in ms if m.name == sel.chosen.name)  # the host's figures
        chosen_cand = next(c for c in cands if c.name == chosen.name)
        model_file, finish_note = backend.finish(chosen_cand, chosen, work, evalset, reference,
                                                 budget, scorer)
        if pp is not None and pp.bound is not None and chosen_cand.path is not None:
            # The model part is the chosen candidate; the pre/post ops around it stay float.
            model_file = pp.attach(
                chosen_cand.path, work, to=options.to or "onnx", reference=ref_fn,
                reference_outputs=reference, evalset=evalset, output_names=output_names,
                max_drop=options.max_drop, force=options.force, skew_budget=cfg.skew_budget)
            warnings.extend(pp.warnings)
        base_info = backend.base_info(cands, chosen.name, warnings)
        rule = sel.rule if profiled is None else f"{sel.rule}; {profiled.rule}"
        report = _report(backend.title(source), source, options, fixes, calib, evalset,
                         ref_label, budget, cands, ms, chosen, backend.why(sel.why), rule,
                         ineligible,
                         warnings, finish_note, base_info, profiled, baseline, plan, sel=sel)
        if pp is not None and pp.section:
            report["pipeline"] = pp.section
            if not pp.verified():
                report["data"]["verified_on_real_data"] = False
                report["data"]["not_verified_why"] = pp.not_verified_why()
        input_stats = _input_stats(evalset, pp, warnings)
        if input_stats:
            report["input_stats"] = input_stats
        files = write_report(work / "report", report)
        base_m = next(m for m in ms if m.name == baseline)
        extra: dict[str, Any] = {
            **dict(source.extra),
            **manifest_figures(chosen, base_m, budget, evalset, options.threads, ref_label,
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
        if chosen.name != baseline and pp is None:
            # How far two correct runtimes may round the chosen model apart on its sample
            # (x86 and ARM int8 kernels do): `bench --on` checks a device's outputs with it.
            spread = _spread({m.name: _outputs(m, evalset.feeds[0], options.threads)
                              for m in (base_m, chosen)}, baseline).get(chosen.name)
            if spread:
                extra["conversion"]["spread"] = spread
        if pp is not None:
            extra.update(pp.manifest())
        if plan.outputs and "postprocess" not in extra:
            # In-graph post-processing replaces the outputs the plan names with answers.
            extra["task_outputs"] = plan.task_outputs()
        if input_stats:
            # Signed with the artifact: what a device's inputs are compared with (drift).
            extra["input_stats"] = input_stats
        if base_info is not None:
            extra["conversion"]["base"] = {
                k: base_info.get(k) for k in ("name", "version", "sha256", "candidate", "used")}
        art = write_artifact(model_file, out, options, source, quantization=chosen.scheme,
                             task=plan.task, report=report, files=files,
                             sample=pp.sample if pp is not None and pp.sample is not None
                             else evalset.feeds[0], extra=extra)
    return ConversionResult(artifact=art, chosen=chosen.name, report=report,
                            warnings=tuple(report["warnings"]))


def write_artifact(model_file: Path, out: Path, options: ConvertOptions, source: SourceInfo,
                   *, quantization: str, task: str, report: Mapping[str, Any],
                   files: Mapping[str, Path],
                   sample: Mapping[str, np.ndarray] | None,
                   extra: Mapping[str, Any]) -> edge_sdk.Artifact:
    """Write the artifact directory (atomically) with report.json/md/png."""
    try:
        return edge_sdk.build_artifact(
            model_file, out,
            name=artifact_name(options, Path(source.path)),
            version=options.version,
            quantization=quantization,
            task=task,
            source={"format": source.format, "path": Path(source.path).name,
                    "sha256": source.sha256},
            runtime={"threads": options.threads} if options.threads else None,
            sample=sample,
            report=report,
            extra_files={"report.md": files["report.md"], "report.png": files["report.png"]},
            extra=extra,
            overwrite=options.overwrite,
        )
    except EdgeError:
        raise
    except OSError as err:
        raise ConversionError(f"{out}: cannot write the artifact: {err}") from err


def _schemes(quantize: str) -> list[str]:
    if quantize == "auto":
        return ["none", "fp16", "int8-dynamic", "int8-static"]
    return ["none"] if quantize == "none" else ["none", quantize]


def _data(
    options: ConvertOptions, specs: Sequence[edge_sdk.TensorSpec], cfg: ConvertConfig,
    warnings: list[str], run: Callable[[dict[str, np.ndarray]], object],
    given: Mapping[str, tuple[int, ...]], pp: Prepost | None = None,
) -> tuple[Samples | None, Samples]:
    """Calibration and evaluation samples: the user's, else synthetic ones of shapes the
    model (``run``) accepts: --input-shape's (``given``) and tried ones. With
    --preprocess, a file's ``image`` array is read by the pipeline (``pp``)."""
    load = pp.load if pp is not None else load_samples
    calib = load(options.calibration, specs, what="calibration") \
        if options.calibration is not None else None
    evalset = load(options.eval, specs, what="evaluation") \
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


def _input_stats(evalset: Samples, pp: Prepost | None,
                 warnings: list[str]) -> dict[str, Any]:
    """Per-input statistics of the evaluation set (edge_sdk.quality._drift's reference):
    what the model was verified on, for the devices' drift figures. None for synthetic
    data (random inputs say nothing about real ones). With in-graph pre-processing the
    artifact takes the images, so their pixels are the reference."""
    from edge_sdk.quality import reference_stats

    if not evalset.real:
        return {}
    feeds: list[Mapping[str, np.ndarray]] = list(evalset.feeds)
    if pp is not None and pp.spec.pre is not None and pp.bound is not None:
        feeds = [] if pp.images is None else [{IMAGE_INPUT: im} for im in pp.images.images]
    try:
        return reference_stats(feeds)
    except (ValueError, MemoryError) as err:
        warnings.append(f"no input statistics for drift: {one_line(err)}")
        return {}


def _outputs_of(run: Run, evalset: Samples) -> list[str]:
    """The model's output names (what the pipeline's post-processing reads)."""
    out = run(dict(evalset.feeds[0]))
    if not isinstance(out, Mapping):
        raise ConversionError("the model's outputs are not named tensors")
    return [str(k) for k in out]


def _run_reference(
    fn: Callable[[dict[str, np.ndarray]], Mapping[str, Any]], source: SourceInfo,
    evalset: Samples,
) -> list[dict[str, np.ndarray]]:
    try:
        return [{k: np.asarray(v) for k, v in fn(dict(f)).items()} for f in evalset.feeds]
    except edge_sdk.InputError as err:
        raise UsageError(f"{evalset.origin}: the source model rejects these inputs: "
                         f"{one_line(err)}") from err
    except EdgeError:
        raise
    except Exception as err:
        raise ConversionError(f"the {source.format} source model fails on {evalset.origin}: "
                              f"{one_line(err)}") from err


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
    title: str, source: SourceInfo, options: ConvertOptions, fixes: list[str],
    calib: Samples | None, evalset: Samples, ref_label: str, budget: float,
    cands: Sequence[Candidate], ms: Sequence[Measurement], chosen: Measurement, why: str,
    rule: str, ineligible: Mapping[str, str], warnings: list[str], ort_note: str | None,
    base: Mapping[str, Any] | None = None, profiled: ProfiledOn | None = None,
    baseline: str = BASELINE, plan: TaskPlan | None = None, *, sel: Selection,
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
        title=title,
        source={"format": source.format, "path": source.path, "sha256": source.sha256},
        options={"quantize": options.quantize, "to": options.to, "metric": options.metric,
                 "max_drop": options.max_drop, "exclude_ops": list(options.exclude_ops),
                 "force": options.force, "prefer": options.prefer,
                 **({"base": str(options.base)} if options.base is not None else {})},
        normalization=notes, calib=calib, evalset=evalset, reference=ref_label,
        budget=budget, threads=options.threads, baseline=baseline, rows=rows,
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
                        ineligible: Mapping[str, str], baseline: str = BASELINE) -> ProfiledOn:
    usable = [m for m in ms if m.ok and m.name not in ineligible]
    expected = {m.name: _outputs(m, feed, threads) for m in usable}
    results = profiler([(m.name, Path(m.path)) for m in usable], dict(feed), expected,
                       spread=_spread(expected, baseline))
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
    if baseline in excluded:
        raise ConversionError(f"the float baseline '{baseline}' failed "
                              f"{excluded[baseline]}")
    devices = {d: {"hardware": dict(results[d].hardware), "threads": results[d].threads}
               for d in names}
    who = ", ".join(names)
    rule = (f"latency measured on device {who} (median, batch 1)" if len(names) == 1 else
            f"latency measured on devices {who} (median, batch 1); the worst device's "
            "latency decides")
    return ProfiledOn(out, excluded, rows, devices, rule)



def _outputs(m: Measurement, feed: Mapping[str, np.ndarray],
             threads: int | None) -> dict[str, np.ndarray]:
    """Candidate ``m``'s outputs on ``feed`` (the model let go of at once)."""
    pred = edge_sdk.load(m.path, threads=threads)
    return {k: np.asarray(v) for k, v in pred.predict(dict(feed)).items()}


def _spread(expected: Mapping[str, Mapping[str, np.ndarray]],
            baseline: str) -> dict[str, float]:
    """Per candidate, its largest distance from the float baseline's outputs on the sample:
    two correct runtimes round a quantized model differently (x86 without VNNI saturates
    int8 sums that ARM keeps) by about that much, so a device within it still matches."""
    base = expected.get(baseline)
    if base is None:
        return {}
    out: dict[str, float] = {}
    for name, outs in expected.items():
        if name == baseline:
            continue
        worst = 0.0
        for k, v in outs.items():
            w, b = np.asarray(v), np.asarray(base.get(k))
            if w.dtype.kind == "f" and b.shape == w.shape:
                fin = np.isfinite(w) & np.isfinite(b)
                if fin.any():
                    worst = max(worst, float(np.max(np.abs(w[fin] - b[fin]))))
        out[name] = worst
    return out

__all__ = ["Backend", "ConversionResult", "ConvertConfig", "ConvertOptions", "SourceInfo",
           "check_options", "drive", "write_artifact"]

