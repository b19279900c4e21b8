"""Keras/TensorFlow → TFLite with TensorFlow's own converter, measured like the ONNX path.

Candidates (named by the same schemes as the ONNX path):
- ``float32`` (scheme ``none``): plain conversion, the baseline;
- ``float16`` (``fp16``): float16 weights, dequantized at load;
- ``dynamic-range`` (``int8-dynamic``): int8 weights, float activations;
- ``int8`` (``int8-static``): full integer with int8 inputs and outputs, calibrated
  on a representative dataset from the calibration file. The Predictor
  applies the input/output scale and zero-point, so callers still pass and get
  float32.

:class:`TfliteBackend` builds them; the conversion driver
(:func:`converters._pipeline.drive`) runs each in LiteRT through
:func:`edge_sdk.load` on the evaluation samples, compares it with the
framework's own outputs, times it (here, or on devices with --profile-on) and
chooses by the ONNX path's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import edge_sdk
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError

from ._candidates import Candidate
from ._data import Samples
from ._measure import Measurement

if TYPE_CHECKING:
    from ._frontends._common import Loaded
    from ._pipeline import ConversionResult, ConvertConfig, ConvertOptions, Run, SourceInfo
    from ._tasks import TaskScorer

BASELINE = "float32"
# candidate name → (scheme, description)
VARIANTS: dict[str, tuple[str, str]] = {
    "float32": ("none", "TFLite float32"),
    "float16": ("fp16", "TFLite float16 weights"),
    "dynamic-range": ("int8-dynamic", "TFLite dynamic-range int8 weights, float activations"),
    "int8": ("int8-static", "TFLite full-integer int8 (int8 in/out), representative dataset"),
}


def build_tflite_candidates(
    saved_dir: Path, signature_key: str, work: Path, schemes: Sequence[str],
    calibration: Samples | None, *, max_calibration_samples: int = 256,
) -> list[Candidate]:
    """Convert the SavedModel once per scheme; a failed variant comes back with ``error``."""
    from ._frontends._common import quiet, require

    tf = require("tensorflow", "converting to TFLite")
    out: list[Candidate] = []
    for name, (scheme, desc) in VARIANTS.items():
        if scheme not in schemes:
            continue
        if scheme == "int8-static" and calibration is None:
            out.append(Candidate(name, scheme, None, desc,
                                 error="needs calibration data (--calibration)",
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
            out.append(Candidate(name, scheme, None, desc,
                                 error=f"TFLite converter failed: {one_line(err)}"))
            continue
        path = work / f"{name}.tflite"
        path.write_bytes(data)
        out.append(Candidate(name, scheme, path, desc))
    return out


def _representative(
    samples: Samples, limit: int
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    def gen() -> Iterator[dict[str, np.ndarray]]:
        for feed in samples.feeds[:limit]:
            yield {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f"
                   else np.asarray(v) for k, v in feed.items()}

    return gen


BuildCandidates = Callable[[Path, Sequence[str], Samples | None, int], list[Candidate]]


class TfliteBackend:
    """``--to tflite`` from a loaded Keras/TF source: ``build(work, schemes, calibration,
    max_calibration_samples)`` converts its SavedModel (:func:`build_tflite_candidates`,
    run where TensorFlow is); the driver measures them against the source's own predict."""

    baseline = BASELINE

    def __init__(self, build: BuildCandidates, loaded: Loaded, options: ConvertOptions,
                 cfg: ConvertConfig, source_path: str) -> None:
        self._build = build
        self.loaded = loaded
        self.options = options
        self.cfg = cfg
        self.source_path = source_path
        self.fixes: list[str] = []

    @property
    def state(self) -> Mapping[str, str]:
        return {}

    def title(self, source: SourceInfo) -> str:
        return f"Conversion report: {Path(source.path).name} → TFLite"

    def prepare(self, work: Path, warnings: list[str],
                ) -> tuple[Sequence[edge_sdk.TensorSpec], Run]:
        return self.loaded.inputs, self.loaded.reference

    def reference(
        self, source: SourceInfo, warnings: list[str],
    ) -> tuple[Callable[[dict[str, np.ndarray]], Mapping[str, Any]], str]:
        return self.loaded.reference, f"the {self.loaded.kind} source model"

    def build(self, work: Path, schemes: Sequence[str], calib: Samples | None,
              warnings: list[str]) -> list[Candidate]:
        if self.options.quantize == "auto" and calib is None:
            warnings.append("int8 (full integer) skipped: it needs a representative dataset "
                            "(--calibration)")
        cands = self._build(work, schemes, calib, self.cfg.candidates.max_calibration_samples)
        base = next(c for c in cands if c.name == BASELINE)
        if base.error is not None:
            raise ConversionError(f"{self.source_path}: {base.error}")
        for c in cands:
            if c.error is not None and c.scheme in schemes and not c.needs_calibration:
                warnings.append(f"{c.name}: {c.error}")
        return cands

    def ineligible(self, cands: Sequence[Candidate]) -> dict[str, str]:
        return {}

    def requested(self, requested: str | None, cands: Sequence[Candidate],
                  ineligible: Mapping[str, str], warnings: list[str]) -> str | None:
        failed = [c for c in cands if c.scheme == requested and c.error is not None]
        if failed:
            raise ConversionError(f"{self.source_path}: --to tflite --quantize {requested} "
                                  f"failed: {failed[0].error}")
        return requested

    def preferred(self) -> tuple[str | None, str]:
        return None, ""

    def why(self, why: str) -> str:
        return why

    def finish(self, chosen: Candidate, measured: Measurement, work: Path, evalset: Samples,
               reference: Sequence[Mapping[str, np.ndarray]], budget: float,
               scorer: TaskScorer | None) -> tuple[Path, str | None]:
        assert chosen.path is not None
        return chosen.path, None

    def base_info(self, cands: Sequence[Candidate], chosen: str,
                  warnings: list[str]) -> dict[str, Any] | None:
        return None


def convert_saved_model(
    build: BuildCandidates, loaded: Loaded, out: Path, options: ConvertOptions, *,
    source_path: str, source_sha256: str, config: ConvertConfig | None = None,
) -> ConversionResult:
    """``--to tflite`` for a loaded Keras/TF source through the conversion driver."""
    from ._pipeline import ConvertConfig, SourceInfo, drive

    cfg = config or ConvertConfig()
    source = SourceInfo(format=loaded.kind, path=source_path, sha256=source_sha256,
                        reference=loaded.reference, extra=loaded.extra)
    return drive(TfliteBackend(build, loaded, options, cfg, source_path), out, options,
                 source, cfg)


__all__ = ["BASELINE", "VARIANTS", "TfliteBackend", "build_tflite_candidates",
           "convert_saved_model"]
