"""TFLite in, kept TFLite: check the model loads and runs in LiteRT, read its signature,
write the artifact.

The model is kept byte for byte: re-quantizing a TFLite file is out of scope
(the quantizer needs the float graph; convert from the framework source). ``--to
onnx``/``ort`` converts it instead (:mod:`._tflite_onnx`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import edge_sdk
from edge_sdk._internal import litert_op_names, sha256_file
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from .._data import Samples, load_samples, synthetic_samples
from .._measure import measure_candidates
from ._common import first_line

if TYPE_CHECKING:
    from .._pipeline import ConversionResult, ConvertConfig, ConvertOptions


def convert_tflite_source(
    src: Path, out: Path, options: ConvertOptions, *, config: ConvertConfig | None = None,
) -> ConversionResult:
    from .._pipeline import ConversionResult, ConvertConfig
    from .._tflite import tflite_report, write_tflite_artifact

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
    try:
        predictor = edge_sdk.load(src, threads=options.threads)
    except EdgeError as err:
        raise ConversionError(f"{src}: not a TFLite model LiteRT can run: {err}") from err
    warnings: list[str] = []
    samples = _samples(options, predictor.inputs, cfg.synthetic_samples, warnings)
    outputs = []
    for feed in samples.feeds:
        try:
            outputs.append(predictor.predict(dict(feed)))
        except EdgeError as err:
            raise UsageError(f"{samples.origin}: the TFLite model rejects these inputs: "
                             f"{err}") from err
        except Exception as err:
            raise ConversionError(f"{src}: the model fails in LiteRT: {first_line(err)}") \
                from err
    bad = [k for o in outputs for k, v in o.items()
           if np.asarray(v).dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        warnings.append(f"output(s) {', '.join(sorted(set(bad)))} hold NaN/inf on "
                        f"{samples.origin} inputs")
    quant, details = describe_quantization(src)
    kept = (f"kept as is ({details}): a .tflite is not re-quantized without its float "
            "source; convert the Keras/TF source with --to tflite, or this file with --to onnx")
    if options.quantize == "auto":
        warnings.append(f"--quantize auto built no candidate from this TFLite; {kept}")
    digest = sha256_file(src)
    ms = measure_candidates([("tflite", src, quant)], samples.feeds, outputs,
                            metric=options.metric, threads=options.threads,
                            config=cfg.measure, progress=options.progress)
    m = ms[0]
    if not m.ok:
        raise ConversionError(f"{src}: the model fails in LiteRT: {m.error}")
    row = {"name": "tflite", "scheme": quant, "description": f"the source TFLite ({details})",
           "status": "chosen", "note": None, "error": None, "size_bytes": m.size_bytes,
           "latency_ms": m.latency_ms, "latency_rounds_ms": list(m.latency_rounds_ms),
           "accuracy": m.accuracy.to_json() if m.accuracy else None}
    with tempfile.TemporaryDirectory(prefix="edge-tflite-in-") as tmp:
        work = Path(tmp)
        report = tflite_report(
            title=f"Packaging report: {src.name}",
            source={"format": "tflite", "path": str(src), "sha256": digest},
            options=options, calib=None, evalset=samples,
            reference_label="the source TFLite model itself (unchanged)", budget=0.0,
            rows=[row], chosen="tflite",
            why=f"tflite: the source model, {kept}",
            warnings=warnings, notes=[f"signature checked in LiteRT: {details}"],
        )
        report["baseline"] = "tflite"
        art = write_tflite_artifact(
            src, out, options=options, kind="tflite", source_path=str(src),
            source_sha256=digest, quantization=quant, report=report,
            sample=samples.feeds[0], work=work,
            extra={"tflite": {"quantization_detail": details},
                   "latency_ms": {"p50": m.latency_ms, "threads": options.threads,
                                  "batch": 1}},
        )
    return ConversionResult(artifact=art, chosen="tflite", report=report,
                            warnings=tuple(report["warnings"]))


def _samples(options: ConvertOptions, specs: Any, n: int, warnings: list[str]) -> Samples:
    for path, what in ((options.eval, "evaluation"), (options.calibration, "calibration")):
        if path is not None:
            return load_samples(path, specs, what=what)
    warnings.append("checked on synthetic inputs only (pass --eval to run it on real data)")
    return synthetic_samples(specs, n=n)


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
