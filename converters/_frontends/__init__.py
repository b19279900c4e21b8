"""Framework front-ends: PyTorch, Keras/TensorFlow, scikit-learn and TFLite in.

:func:`convert_source` detects the source kind, loads the model with its own
framework in a child interpreter (:mod:`._child`; this process never imports a
framework), exports it there, checks the export against
the framework on the user's data (or synthetic inputs) and hands it to the ONNX
pipeline — or, for ``--to tflite``, to TensorFlow's converter — with the
framework's own predict as the accuracy reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._internal import sha256_file
from edge_sdk.errors import UsageError

from .._data import Samples
from ._child import FrameworkChild
from ._common import DEFAULT_CONFIG, FrontendConfig, Loaded, verification_samples, verify_export
from ._detect import KINDS, detect_kind, is_factory

if TYPE_CHECKING:
    from .._candidates import Candidate
    from .._pipeline import ConversionResult, ConvertConfig, ConvertOptions


def convert_source(
    src: Path | str,
    out_dir: Path,
    options: ConvertOptions,
    *,
    source_kind: str | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    trust_pickle: bool,
    config: ConvertConfig | None = None,
    frontend_config: FrontendConfig = DEFAULT_CONFIG,
) -> ConversionResult:
    """Convert a framework model (file, SavedModel directory or torch factory) into an
    artifact at ``out_dir``. Nothing is written at ``out_dir`` unless it all succeeds."""
    from .._onnx import convert_onnx
    from .._pipeline import SourceInfo, check_options
    from .._prepost_check import refuse_framework_images

    check_options(options)
    text = str(src)
    kind = detect_kind(text, source_kind)
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    if kind == "onnx":
        return convert_onnx(Path(text), out, options, config=config)
    refuse_framework_images(options, kind)
    if options.to is None:
        # Not asked: a .tflite stays TFLite; everything else becomes ONNX.
        options = dataclasses.replace(options, to="tflite" if kind == "tflite" else "onnx")
    if kind == "tflite":
        from ._tflite_in import check_one_signature

        check_one_signature(Path(text))
    if kind == "tflite" and options.to == "tflite":
        from ._tflite_in import convert_tflite_source

        return convert_tflite_source(Path(text), out, options, config=config)
    if options.to == "tflite" and kind != "keras":
        raise UsageError(
            f"--to tflite is supported from Keras/TensorFlow sources only (this is a {kind} "
            "model); TensorFlow's converter is the reliable route to TFLite, and ONNX → TFLite "
            "converters are not maintained. Use --to onnx or --to ort"
        )
    options = dataclasses.replace(options, name=options.name or _default_name(text))
    from .._pipeline import ConvertConfig

    timeout = (config or ConvertConfig()).framework_timeout_s
    with tempfile.TemporaryDirectory(prefix="edge-frontend-") as tmp:
        work = Path(tmp)
        with FrameworkChild(kind, work, timeout_s=timeout) as child:
            loaded = _load(child, kind, text, work, options, input_shapes, trust_pickle)
            digest = _source_digest(text)
            if options.to == "tflite":
                from .._tflite import convert_saved_model

                def build(dest: Path, schemes: Sequence[str], calib: Samples | None,
                          limit: int) -> list[Candidate]:
                    built: list[Candidate] = child.call(
                        "tflite_candidates", what="while converting to TFLite",
                        work=str(dest), schemes=list(schemes), calibration=calib,
                        max_calibration_samples=limit)
                    return built

                return convert_saved_model(
                    build, loaded, out, options, source_path=text, source_sha256=digest,
                    config=config,
                )
            onnx_path = Path(child.call("export", what="while exporting the model to ONNX",
                                        path=str(work / "export.onnx")))
            notes = child.call("export_notes", what="after exporting the model")
            loaded.warnings.extend(notes["warnings"])
            for key, value in notes["extra"].items():
                loaded.extra[key] = {**loaded.extra.get(key, {}), **value}
            samples = verification_samples(loaded.inputs, options.calibration, options.eval,
                                           frontend_config)
            checked = _check_export(onnx_path, loaded, samples, text, frontend_config)
            extra: dict[str, Any] = {**loaded.extra, "export_check": checked}
            if loaded.warnings:
                extra["export_warnings"] = list(loaded.warnings)
            source = SourceInfo(format=kind, path=text, sha256=digest,
                                reference=loaded.reference, extra=extra)
            result = convert_onnx(onnx_path, out, options, source, config=config)
    if loaded.warnings:
        # The CLI prints the report's warnings; the manifest keeps them as export_warnings.
        merged = list(dict.fromkeys([*loaded.warnings, *result.report.get("warnings", [])]))
        result = dataclasses.replace(result, warnings=(*loaded.warnings, *result.warnings),
                                     report={**result.report, "warnings": merged})
    return result


def _check_export(onnx_path: Path, loaded: Loaded, samples: Samples, src: str,
                  config: FrontendConfig) -> dict[str, Any]:
    if loaded.kind == "tflite":
        from ._tflite_in import describe_quantization

        scheme, detail = describe_quantization(Path(src))
        if scheme != "none" and scheme != "fp16":
            # The ONNX graph is the dequantized model: it differs from the int8 source by
            # the quantization error, which every candidate's measurement then shows.
            return {"skipped": f"the source is quantized ({detail}); its ONNX form is "
                    "dequantized, so each candidate is measured against the TFLite model"}
    return verify_export(onnx_path, loaded, samples, what=f"{src}: ONNX export check",
                         config=config)


def _load(
    child: FrameworkChild, kind: str, src: str, work: Path, options: ConvertOptions,
    input_shapes: Mapping[str, tuple[int, ...]] | None, trust_pickle: bool,
) -> Loaded:
    """Load the model in the child; its predictions are the child's ``reference`` op."""
    meta = child.call("open", what="while loading the model", kind=kind, src=src,
                      work=str(work), calibration=options.calibration,
                      input_shapes=dict(input_shapes) if input_shapes else None,
                      trust_pickle=trust_pickle)

    def reference(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = child.call(
            "reference", what=f"while predicting with the {kind} model", feed=dict(feed))
        return out

    return Loaded(kind, tuple(meta["inputs"]), reference, dict(meta["extra"]),
                  list(meta["warnings"]), list(meta.get("reported", [])))


def _source_digest(src: str) -> str:
    path = Path(src)
    if is_factory(src):
        return hashlib.sha256(src.encode()).hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(bytes.fromhex(sha256_file(f)))
        return h.hexdigest()
    return sha256_file(path)


def _default_name(src: str) -> str:
    base = src.split(":", 1)[1].split(".")[-1] if is_factory(src) else Path(src).stem
    if not is_factory(src) and Path(src).is_dir():
        base = Path(src).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "model"
    return name[:128]


__all__ = ["KINDS", "FrontendConfig", "convert_source", "detect_kind"]
