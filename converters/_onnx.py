"""The ONNX back-end of the conversion driver: load and check, normalize, optimize,
build the ONNX candidates (and ``--base``'s), write ``.onnx`` or ``.ort``.

The driver (:func:`converters._pipeline.drive`) does the rest: data, reference,
measurement, choice, report and artifact, the same for every format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import one_line, sha256_file
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from ._base import Base, build_base_candidate, float_initializers
from ._candidates import Candidate, build_candidates
from ._data import Samples
from ._measure import Measurement, accuracy, state_pairs
from ._normalize import load_checked, normalize, optimize, to_ort_format
from ._pipeline import (
    ConversionResult,
    ConvertConfig,
    ConvertOptions,
    Run,
    SourceInfo,
    check_options,
    drive,
)
from ._tasks import TaskScorer


class OnnxBackend:
    """``--to onnx`` / ``--to ort`` from an ONNX model (the source, or a framework's
    export of it)."""

    format = "onnx"
    baseline = "fp32"

    def __init__(self, src: Path, options: ConvertOptions, cfg: ConvertConfig) -> None:
        self.src = src
        self.options = options
        self.cfg = cfg
        self.model = load_checked(src)
        self.base = None if options.base is None else Base.from_artifact(
            options.base, to=options.to or "onnx", quantize=options.quantize,
            calibration=options.calibration)
        self.fixes: list[str] = []
        self.state: dict[str, str] = {}
        self.fp32_path = Path()
        self.norm_path = Path()

    def title(self, source: SourceInfo) -> str:
        return f"Conversion report: {Path(source.path).name}"

    def prepare(self, work: Path, warnings: list[str],
                ) -> tuple[Sequence[edge_sdk.TensorSpec], Run]:
        """Normalize and optimize into ``work``; the float model's input specs."""
        import onnx

        model, self.fixes = normalize(self.model)
        self.norm_path = work / "normalized.onnx"
        onnx.save(model, str(self.norm_path))
        self.fp32_path = work / "fp32.onnx"
        optimize(self.norm_path, self.fp32_path)
        try:
            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(self.fp32_path))),
                      str(self.fp32_path))
        except Exception as err:
            self.fixes.append(f"shape inference after optimization failed ({one_line(err)})")
        fp32_pred = edge_sdk.load(self.fp32_path)
        self.state = state_pairs(fp32_pred.inputs, fp32_pred.outputs)
        if self.base is not None:
            _check_base_matches(self.base, self.fp32_path, warnings)
        return fp32_pred.inputs, fp32_pred.predict

    def reference(
        self, source: SourceInfo, warnings: list[str],
    ) -> tuple[Callable[[dict[str, np.ndarray]], Mapping[str, Any]], str]:
        if source.reference is not None:
            return source.reference, f"the {source.format} source model"
        try:
            pred = edge_sdk.load(self.src)
            label = "the source ONNX model (onnxruntime)"
        except EdgeError as err:
            # Some real exports only load once normalized (duplicate opset imports).
            pred = edge_sdk.load(self.norm_path)
            label = "the normalized source ONNX model (onnxruntime)"
            warnings.append(f"the source model does not load as is ({one_line(err)}); accuracy "
                            "is measured against its normalized form")
        return pred.predict, label

    def build(self, work: Path, schemes: Sequence[str], calib: Samples | None,
              warnings: list[str]) -> list[Candidate]:
        opts, cfg = self.options, self.cfg
        cands = build_candidates(self.fp32_path, work, schemes, calibration=calib,
                                 exclude_ops=opts.exclude_ops, config=cfg.candidates)
        if self.base is not None:
            cands.append(build_base_candidate(
                self.base, self.fp32_path, work, cands, calibration=calib,
                exclude_ops=opts.exclude_ops, config=cfg.candidates,
                tolerance=cfg.base_tolerance))
        return cands

    def ineligible(self, cands: Sequence[Candidate]) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in cands:
            if c.noop:
                out[c.name] = f"quantized no weight (no-op; {_weight_note(c)})"
            elif c.scheme == "fp16" and c.error is None and c.quantized_weights == 0:
                out[c.name] = "converted no weight to float16 (no-op)"
        return out

    def requested(self, requested: str | None, cands: Sequence[Candidate],
                  ineligible: Mapping[str, str], warnings: list[str]) -> str | None:
        """An explicit int8 scheme that quantized no weight is refused (or, with --force,
        the float model is written)."""
        if requested in (None, "none") or any(
                c.scheme == requested and c.name not in ineligible and c.error is None
                for c in cands):
            return requested
        noop = [c for c in cands if c.scheme == requested and c.noop]
        if noop and self.options.force:
            warnings.append(f"--quantize {requested} quantized no weight; the float model "
                            "is written instead (--force)")
            return "none"
        if noop:
            raise ConversionError(
                f"--quantize {requested} quantized no weight of this model (no-op: "
                f"{_weight_note(noop[0])}); it would be float32 labelled int8. Use "
                "--quantize auto or none, or --force to write the float model"
            )
        return requested

    def preferred(self) -> tuple[str | None, str]:
        if self.base is None:
            return None, ""
        return self.base.candidate_name, f"reuses the int8 parameters of base {self.base.version}"

    def why(self, why: str) -> str:
        return why

    def finish(self, chosen: Candidate, measured: Measurement, work: Path, evalset: Samples,
               reference: Sequence[Mapping[str, np.ndarray]], budget: float,
               scorer: TaskScorer | None) -> tuple[Path, str | None]:
        """The file to ship: the chosen ONNX model, or its ORT form checked again."""
        assert chosen.path is not None
        if self.options.to != "ort":
            return chosen.path, None
        model_file = work / "model.ort"
        to_ort_format(chosen.path, model_file)
        return model_file, _check_ort(model_file, evalset, reference, self.options.metric,
                                      budget, measured, evalset.labels, scorer)

    def base_info(self, cands: Sequence[Candidate], chosen: str,
                  warnings: list[str]) -> dict[str, Any] | None:
        """The report's ``base`` section: what the base candidate reused, whether it was
        used."""
        if self.base is None:
            return None
        cand = next(c for c in cands if c.name == self.base.candidate_name)
        info: dict[str, Any] = {**self.base.describe(), "built": cand.name,
                                "used": chosen == cand.name}
        if cand.error is not None:
            info["not_used"] = f"it could not be built: {cand.error}"
        elif chosen != cand.name:
            info["not_used"] = next((w for w in warnings if w.startswith(cand.name + " (")),
                                    "not chosen")
        info.update({k: v for k, v in cand.params.get("base", {}).items() if k not in info})
        return info


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
        raise ConversionError(f"the ORT-format model does not run: {one_line(err)}") from err
    acc = scorer(outs, reference) if scorer is not None else accuracy(
        outs, reference, metric, labels=labels)
    if not acc.within(budget):
        raise ConversionError(
            f"the ORT-format model of {chosen.name} breaks the budget: "
            + ("; ".join(acc.breaks) or f"{metric} drop {acc.drop:.4g} > {budget:.4g}"))
    return f"ORT format verified: {acc.metric} drop {acc.drop:.4g}"


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
    if options.to is None:
        options = replace(options, to="onnx")
    src = Path(onnx_path)
    out = Path(out_dir)
    if options.to == "tflite":
        raise ConversionError(
            "--to tflite from an ONNX model is not supported: the reliable path to TFLite is "
            "from the framework source; pass the Keras/TF model"
        )
    if out.exists() and not options.overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    backend = OnnxBackend(src, options, cfg)
    if source is None:
        source = SourceInfo(format="onnx", path=str(src), sha256=sha256_file(src))
    return drive(backend, out, options, source, cfg)


__all__ = ["OnnxBackend", "convert_onnx"]
