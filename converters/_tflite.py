"""Keras/TensorFlow → TFLite with TensorFlow's own converter, measured like the ONNX path.

Candidates (named by the same schemes as the ONNX path):
- ``float32`` (scheme ``none``): plain conversion, the baseline;
- ``float16`` (``fp16``): float16 weights, dequantized at load;
- ``dynamic-range`` (``int8-dynamic``): int8 weights, float activations;
- ``int8`` (``int8-static``): full integer with int8 inputs and outputs, calibrated
  on a representative dataset from the calibration file. The Predictor
  applies the input/output scale and zero-point, so callers still pass and get
  float32.

Each candidate is run in LiteRT through :func:`edge_sdk.load` on the evaluation
samples, compared with the framework's own outputs and timed; the choice
follows :func:`converters._measure.select`, the ONNX path's rule.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import edge_sdk
from edge_sdk.errors import ConversionError, EdgeError

from ._data import Samples, load_samples, split_holdout, synthetic_samples
from ._measure import Measurement, Selection, default_max_drop, measure_candidates, select
from ._report import (
    latency_fields,
    manifest_figures,
    measured_status,
    report_json,
    write_report,
)

if TYPE_CHECKING:
    from ._frontends._common import Loaded
    from ._pipeline import ConversionResult, ConvertConfig, ConvertOptions

BASELINE = "float32"
# candidate name → (scheme, description)
VARIANTS: dict[str, tuple[str, str]] = {
    "float32": ("none", "TFLite float32"),
    "float16": ("fp16", "TFLite float16 weights"),
    "dynamic-range": ("int8-dynamic", "TFLite dynamic-range int8 weights, float activations"),
    "int8": ("int8-static", "TFLite full-integer int8 (int8 in/out), representative dataset"),
}
NOT_VERIFIED = "accuracy NOT verified on real data"


@dataclass(frozen=True)
class TfliteCandidate:
    name: str
    scheme: str
    description: str
    path: Path | None
    error: str | None = None
    # Not built for want of a representative dataset: skipped, not failed.
    needs_calibration: bool = False


def build_tflite_candidates(
    saved_dir: Path, signature_key: str, work: Path, schemes: Sequence[str],
    calibration: Samples | None, *, max_calibration_samples: int = 256,
) -> list[TfliteCandidate]:
    """Convert the SavedModel once per scheme; a failed variant comes back with ``error``."""
    from ._frontends._common import first_line, quiet, require

    tf = require("tensorflow", "converting to TFLite")
    out: list[TfliteCandidate] = []
    for name, (scheme, desc) in VARIANTS.items():
        if scheme not in schemes:
            continue
        if scheme == "int8-static" and calibration is None:
            out.append(TfliteCandidate(name, scheme, desc, None,
                                       "needs calibration data (--calibration)",
                                       needs_calibration=True))
            continue
        try:
            with quiet():
                conv = tf.lite.TFLiteConverter.from_saved_model(
                    str(saved_dir), signature_keys=[signature_key])
                if scheme != "none":
                    conv.optimizations = [tf.lite.Optimize.DEFAULT]
                if scheme == "fp16":
                    conv.target_spec.supported_types = [tf.float16]
                if scheme == "int8-static":
                    assert calibration is not None
                    conv.representative_dataset = _representative(
                        calibration, max_calibration_samples)
                    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                    conv.inference_input_type = tf.int8
                    conv.inference_output_type = tf.int8
                data = conv.convert()
        except Exception as err:
            out.append(TfliteCandidate(name, scheme, desc, None,
                                       f"TFLite converter failed: {first_line(err)}"))
            continue
        path = work / f"{name}.tflite"
        path.write_bytes(data)
        out.append(TfliteCandidate(name, scheme, desc, path))
    return out


def _representative(
    samples: Samples, limit: int
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    def gen() -> Iterator[dict[str, np.ndarray]]:
        for feed in samples.feeds[:limit]:
            yield {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f"
                   else np.asarray(v) for k, v in feed.items()}

    return gen


BuildCandidates = Callable[[Path, Sequence[str], Samples | None, int], list[TfliteCandidate]]


def convert_saved_model(
    build: BuildCandidates, loaded: Loaded, out: Path, options: ConvertOptions, *,
    source_path: str, source_sha256: str, config: ConvertConfig | None = None,
) -> ConversionResult:
    """``--to tflite`` for a loaded Keras/TF source: ``build(work, schemes, calibration,
    max_calibration_samples)`` converts its SavedModel (:func:`build_tflite_candidates`,
    run where TensorFlow is); then measure, select, write the artifact."""
    from ._pipeline import ConvertConfig

    cfg = config or ConvertConfig()
    warnings: list[str] = []
    specs = loaded.inputs
    calib, evalset = _data(options, specs, cfg.holdout_fraction, cfg.synthetic_samples,
                           warnings)
    reference = _reference_outputs(loaded, evalset)
    schemes = (["none", "fp16", "int8-dynamic", "int8-static"] if options.quantize == "auto"
               else ["none"] if options.quantize == "none" else ["none", options.quantize])
    if options.quantize == "auto" and calib is None:
        warnings.append("int8 (full integer) skipped: it needs a representative dataset "
                        "(--calibration)")
    with tempfile.TemporaryDirectory(prefix="edge-tflite-") as tmp:
        work = Path(tmp)
        cands = build(work, schemes, calib, cfg.candidates.max_calibration_samples)
        base = next(c for c in cands if c.name == BASELINE)
        if base.error is not None:
            raise ConversionError(f"{source_path}: {base.error}")
        built = [c for c in cands if c.path is not None]
        ms = measure_candidates(
            [(c.name, c.path, c.scheme) for c in built if c.path is not None], evalset.feeds,
            reference, metric=options.metric, labels=evalset.labels, threads=options.threads,
            config=cfg.measure, progress=options.progress, baseline=BASELINE)
        budget = (options.max_drop if options.max_drop is not None
                  else default_max_drop(options.metric, reference))
        requested = None if options.quantize == "auto" else options.quantize
        failed = [c for c in cands if c.scheme == requested and c.error is not None]
        if failed:
            raise ConversionError(
                f"{source_path}: --to tflite --quantize {requested} failed: {failed[0].error}")
        sel = select(ms, baseline=BASELINE, max_drop=budget, requested=requested,
                     force=options.force, prefer=options.prefer,
                     latency_tolerance=cfg.measure.latency_tolerance,
                     balanced_max_slowdown=cfg.measure.balanced_max_slowdown,
                     balanced_max_size_ratio=cfg.measure.balanced_max_size_ratio)
        warnings.extend(sel.warnings)
        for c in cands:
            if c.error is not None and c.scheme in schemes and not c.needs_calibration:
                warnings.append(f"{c.name}: {c.error}")
        chosen = sel.chosen
        report = tflite_report(
            title=f"Conversion report: {Path(source_path).name} → TFLite",
            source={"format": loaded.kind, "path": source_path, "sha256": source_sha256},
            options=options, calib=calib, evalset=evalset,
            reference_label=f"the {loaded.kind} source model", budget=budget,
            rows=[_row(c, next((m for m in ms if m.name == c.name), None), budget, sel)
                  for c in cands],
            chosen=chosen.name, why=sel.why, rule=sel.rule, warnings=warnings,
        )
        model_file = Path(chosen.path)
        art = write_tflite_artifact(
            model_file, out, options=options, kind=loaded.kind, source_path=source_path,
            source_sha256=source_sha256, quantization=chosen.scheme, report=report,
            sample=evalset.feeds[0], work=work,
            extra={**loaded.extra, **manifest_figures(
                       chosen, next((m for m in ms if m.name == BASELINE), chosen), budget,
                       evalset, options.threads, f"the {loaded.kind} source model"),
                   "conversion": {"chosen": chosen.name,
                                  "candidates": [c.name for c in cands]}},
        )
    from ._pipeline import ConversionResult

    return ConversionResult(artifact=art, chosen=chosen.name, report=report,
                            warnings=(*loaded.warnings, *report["warnings"]))


def _data(
    options: ConvertOptions, specs: Sequence[edge_sdk.TensorSpec], holdout: float,
    n_synthetic: int, warnings: list[str],
) -> tuple[Samples | None, Samples]:
    # Same rules as the ONNX path: eval file, else a held-out part of the calibration
    # file, else synthetic inputs with a loud warning.
    calib = (load_samples(options.calibration, specs, what="calibration")
             if options.calibration is not None else None)
    evalset = (load_samples(options.eval, specs, what="evaluation")
               if options.eval is not None else None)
    if evalset is None and calib is not None:
        if len(calib) < 2:
            warnings.append("the calibration set has a single sample; it is also the "
                            "evaluation set (pass --eval for an honest figure)")
        calib, evalset = split_holdout(calib, holdout)
    if evalset is None:
        evalset = synthetic_samples(specs, n=n_synthetic)
        warnings.append(f"{NOT_VERIFIED}: no --calibration or --eval given; accuracy was "
                        f"checked on {len(evalset)} synthetic inputs only")
    return calib, evalset


def _reference_outputs(loaded: Loaded, evalset: Samples) -> list[dict[str, np.ndarray]]:
    try:
        return [{k: np.asarray(v) for k, v in loaded.reference(dict(f)).items()}
                for f in evalset.feeds]
    except EdgeError:
        raise
    except Exception as err:
        raise ConversionError(
            f"the {loaded.kind} source model failed on the evaluation inputs ({evalset.origin}):"
            f" {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from err


def _row(c: TfliteCandidate, m: Measurement | None, budget: float,
         sel: Selection) -> dict[str, Any]:
    note: str | None = None
    if c.error is not None:
        status, note = ("skipped" if c.needs_calibration else "failed"), c.error
    elif m is None or not m.ok:
        status, note = "failed", (m.error if m else "not measured")
    else:
        status = measured_status(sel, m, budget)
    return {
        "name": c.name, "scheme": c.scheme, "description": c.description, "status": status,
        "note": note, "error": (m.error if m else c.error),
        "size_bytes": m.size_bytes if m else None,
        "latency_ms": m.latency_ms if m else None,
        "latency_rounds_ms": list(m.latency_rounds_ms) if m else [],
        **latency_fields(sel, c.name),
        "accuracy": m.accuracy.to_json() if m and m.accuracy else None,
    }


def tflite_report(
    *, title: str, source: Mapping[str, Any], options: ConvertOptions, calib: Samples | None,
    evalset: Samples, reference_label: str, budget: float, rows: list[dict[str, Any]],
    chosen: str, why: str, warnings: Sequence[str], notes: Sequence[str] = (),
    rule: str | None = None,
) -> dict[str, Any]:
    """A report with the same keys as the ONNX pipeline's (see ``converters/_report.py``);
    ``rule`` is the choice rule applied (None when nothing was chosen between)."""
    return report_json(
        title=title, source=source,
        options={"quantize": options.quantize, "to": "tflite", "metric": options.metric,
                 "max_drop": options.max_drop, "force": options.force,
                 "prefer": options.prefer},
        normalization=list(notes), calib=calib, evalset=evalset, reference=reference_label,
        budget=budget, threads=options.threads, baseline=BASELINE, rows=rows, chosen=chosen,
        why=why, rule=rule, warnings=list(warnings))


def write_tflite_artifact(
    model_file: Path, out: Path, *, options: ConvertOptions, kind: str, source_path: str,
    source_sha256: str, quantization: str, report: Mapping[str, Any],
    sample: Mapping[str, np.ndarray] | None, work: Path, extra: Mapping[str, Any],
) -> edge_sdk.Artifact:
    """Write the artifact directory (atomically) with report.json/md/png."""
    from ._pipeline import artifact_name

    files = write_report(work / "report", report)
    try:
        return edge_sdk.build_artifact(
            model_file, out, name=artifact_name(options, Path(source_path)),
            version=options.version, quantization=quantization,
            source={"format": kind, "path": Path(source_path).name, "sha256": source_sha256},
            runtime={"threads": options.threads} if options.threads else None,
            sample=sample, report=report,
            extra_files={"report.md": files["report.md"], "report.png": files["report.png"]},
            extra=extra, overwrite=options.overwrite,
        )
    except EdgeError:
        raise
    except OSError as err:
        raise ConversionError(f"{out}: cannot write the artifact: {err}") from err


__all__ = ["BASELINE", "VARIANTS", "build_tflite_candidates", "convert_saved_model",
           "tflite_report", "write_tflite_artifact"]
