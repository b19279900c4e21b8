"""TFLite in, kept TFLite: check the model loads and runs in LiteRT, read its signature,
write the artifact.

The model is kept byte for byte: re-quantizing a TFLite file is out of scope
(the quantizer needs the float graph; convert from the framework source). ``--to
onnx``/``ort`` converts it instead (:mod:`._tflite_onnx`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import edge_sdk
from edge_sdk._internal import litert_op_names, one_line, sha256_file
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from .._candidates import Candidate
from .._data import Samples
from .._measure import Measurement

if TYPE_CHECKING:
    from .._pipeline import ConversionResult, ConvertConfig, ConvertOptions, Run, SourceInfo
    from .._tasks import TaskScorer


def convert_tflite_source(
    src: Path, out: Path, options: ConvertOptions, *, config: ConvertConfig | None = None,
) -> ConversionResult:
    """Keep a ``.tflite`` as TFLite, through the conversion driver with one candidate: the
    file itself, checked and timed in LiteRT (and on devices with --profile-on)."""
    from .._pipeline import ConvertConfig, SourceInfo, drive

    cfg = config or ConvertConfig()
    if options.quantize not in ("auto", "none"):
        raise UsageError(
            f"{src}: re-quantizing a TFLite model is out of scope (--quantize "
            f"{options.quantize}); quantize from the framework source (Keras/TF with --to "
            "tflite --quantize ...) or convert this file with --to onnx, or pass --quantize "
            "auto/none to keep it as is"
        )
    if options.base is not None:
        raise UsageError(f"{src}: a TFLite source is packaged as is; --base (reuse an earlier "
                         "artifact's int8 parameters) needs a source the converter quantizes")
    backend = KeptTflite(src, options)
    source = SourceInfo(format="tflite", path=str(src), sha256=sha256_file(src),
                        extra={"tflite": {"quantization_detail": backend.details}})
    return drive(backend, out, options, source, cfg)


def check_one_signature(src: Path) -> None:
    """Refuse a ``.tflite`` with several signatures: an artifact runs one (LiteRT's
    first), so the others would be dropped without a word. A file LiteRT cannot read
    passes here; loading it says why."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        sigs = list(Interpreter(model_path=str(src)).get_signature_list())
    except Exception:  # not a TFLite file, no LiteRT: the loader's error is the one to show
        return
    if len(sigs) > 1:
        raise UsageError(f"{src}: {len(sigs)} signatures ({', '.join(sigs)}); an artifact "
                         "runs one: export each signature to its own .tflite")


class KeptTflite:
    """The back-end of a ``.tflite`` kept as it is: its one candidate is the file."""

    baseline = "tflite"

    def __init__(self, src: Path, options: ConvertOptions) -> None:
        self.src = src
        self.options = options
        try:
            self.predictor = edge_sdk.load(src, threads=options.threads)
        except EdgeError as err:
            raise ConversionError(f"{src}: not a TFLite model LiteRT can run: {err}") from err
        self.scheme, self.details = describe_quantization(src)
        self.fixes = [f"signature checked in LiteRT: {self.details}"]
        self.kept = (f"kept as is ({self.details}): a .tflite is not re-quantized without its "
                     "float source; convert the Keras/TF source with --to tflite, or this "
                     "file with --to onnx")

    @property
    def state(self) -> Mapping[str, str]:
        return {}

    def title(self, source: SourceInfo) -> str:
        return f"Packaging report: {self.src.name}"

    def prepare(self, work: Path, warnings: list[str],
                ) -> tuple[Sequence[edge_sdk.TensorSpec], Run]:
        if self.options.quantize == "auto":
            warnings.append(f"--quantize auto built no candidate from this TFLite; {self.kept}")
        return self.predictor.inputs, self.predictor.predict

    def reference(
        self, source: SourceInfo, warnings: list[str],
    ) -> tuple[Callable[[dict[str, np.ndarray]], Mapping[str, Any]], str]:
        bad: set[str] = set()

        def run(feed: dict[str, np.ndarray]) -> Mapping[str, Any]:
            try:
                out = self.predictor.predict(feed)
            except EdgeError:
                raise
            except Exception as err:
                raise ConversionError(f"{self.src}: the model fails in LiteRT: "
                                      f"{one_line(err)}") from err
            new = {k for k, v in out.items() if np.asarray(v).dtype.kind == "f"
                   and not np.all(np.isfinite(v))} - bad
            if new:
                bad.update(new)
                warnings.append(f"output(s) {', '.join(sorted(new))} hold NaN/inf on these "
                                "inputs")
            return out

        return run, "the source TFLite model itself (unchanged)"

    def build(self, work: Path, schemes: Sequence[str], calib: Samples | None,
              warnings: list[str]) -> list[Candidate]:
        return [Candidate("tflite", self.scheme, self.src,
                          f"the source TFLite ({self.details})")]

    def ineligible(self, cands: Sequence[Candidate]) -> dict[str, str]:
        return {}

    def requested(self, requested: str | None, cands: Sequence[Candidate],
                  ineligible: Mapping[str, str], warnings: list[str]) -> str | None:
        return None  # auto or none: either way the file as it is

    def preferred(self) -> tuple[str | None, str]:
        return None, ""

    def why(self, why: str) -> str:
        return f"tflite: the source model, {self.kept}"

    def finish(self, chosen: Candidate, measured: Measurement, work: Path, evalset: Samples,
               reference: Sequence[Mapping[str, np.ndarray]], budget: float,
               scorer: TaskScorer | None) -> tuple[Path, str | None]:
        if not measured.ok:
            raise ConversionError(f"{self.src}: the model fails in LiteRT: {measured.error}")
        return self.src, None

    def base_info(self, cands: Sequence[Candidate], chosen: str,
                  warnings: list[str]) -> dict[str, Any] | None:
        return None


def describe_quantization(path: Path) -> tuple[str, str]:
    """(scheme, human detail) read from the model's tensors: float16 weights, int8
    weights with float activations (dynamic range) or full integer."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    tensors = interp.get_tensor_details()
    dtypes = Counter(np.dtype(t["dtype"]).name for t in tensors)
    ops = Counter(litert_op_names(interp))
    ins = [np.dtype(d["dtype"]).name for d in interp.get_input_details()]
    resource = any(k in ops for k in ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"))
    note = ", resource variables" if resource else ""
    if any(d in ("int8", "uint8") for d in ins):
        return "int8-static", f"full integer, {'/'.join(ins)} inputs{note}"
    if dtypes.get("float16"):
        return "fp16", f"{dtypes['float16']} float16 tensors{note}"
    if dtypes.get("int8") or dtypes.get("uint8"):
        scheme = "int8-static" if "QUANTIZE" in ops else "int8-dynamic"
        kind = "int8 activations" if scheme == "int8-static" else "dynamic range"
        return scheme, f"int8 weights, {kind}{note}"
    return "none", f"float32{note}"


__all__ = ["convert_tflite_source", "describe_quantization"]
