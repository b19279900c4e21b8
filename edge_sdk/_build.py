"""Building an artifact directory from a model file.

Apart from :mod:`._artifact` because it needs the runtime (to read the model's
signature) and the npz writer, both of which depend on the artifact's types:
keeping it there made ``_artifact``, ``_io`` and ``_runtime`` import each other.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._artifact import (
    MANIFEST_NAME,
    REPORT_NAME,
    SAFE_NAME,
    TASKS,
    Artifact,
    Manifest,
    format_for_path,
)
from ._fs import atomic_write_bytes, atomic_write_text, sha256_file, staged_dir
from ._io import npz_bytes
from ._runtime import load_model_file
from .errors import ArtifactError


def build_artifact(
    model_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    quantization: str = "none",
    task: str = "generic",
    source: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
    sample: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Write an artifact directory for ``model_file`` and return it, verified.

    The model is loaded once with the runtime to read its signature, so a file
    that does not load never becomes an artifact. ``sample`` (name → array) is
    saved as ``sample.npz`` for smoke tests. The directory appears atomically:
    on any error nothing is left at ``out_dir``.
    """
    src = Path(model_file)
    fmt = format_for_path(src)
    if not SAFE_NAME.fullmatch(name):
        raise ArtifactError(
            f"artifact name {name!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
        )
    if task not in TASKS:
        raise ArtifactError(f"artifact task {task!r} is not one of {', '.join(TASKS)}")
    if not version or "/" in version or len(version) > 64:
        raise ArtifactError(f"artifact version {version!r} must be a short string without '/'")
    predictor = load_model_file(src)
    model_name = f"model.{fmt}"
    rt: dict[str, Any] = dict(runtime or {})
    rt.setdefault("name", "litert" if fmt == "tflite" else "onnxruntime")
    if fmt == "onnx" and "opset" not in rt:
        opset = _onnx_opset(src)
        if opset is not None:
            rt["opset"] = opset
    rt.setdefault("min_version", _min_runtime_version(fmt))
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        shutil.copyfile(src, tmp / model_name)
        sample_name = None
        if sample is not None:
            sample_name = "sample.npz"
            atomic_write_bytes(tmp / sample_name, npz_bytes(sample))
        for fname, path in (extra_files or {}).items():
            if not SAFE_NAME.fullmatch(fname):
                raise ArtifactError(f"extra file name {fname!r} must be a plain file name")
            shutil.copyfile(path, tmp / fname)
        manifest = Manifest(
            name=name,
            version=version,
            format=fmt,
            model=model_name,
            sha256=sha256_file(tmp / model_name),
            size_bytes=(tmp / model_name).stat().st_size,
            inputs=predictor.inputs,
            outputs=predictor.outputs,
            quantization=quantization,
            task=task,
            source=dict(source or {"format": fmt, "sha256": sha256_file(src)}),
            runtime=rt,
            sample=sample_name,
            extra=dict(extra or {}),
        )
        atomic_write_text(tmp / MANIFEST_NAME, manifest.dumps())
        atomic_write_text(
            tmp / REPORT_NAME, json.dumps(dict(report or {}), indent=2, default=str) + "\n"
        )
        Artifact(tmp, manifest).verify()
    return Artifact.from_dir(out_dir)


def _min_runtime_version(fmt: str) -> str:
    if fmt == "tflite":
        return "1.2"
    # ORT format and opsets are tied to the runtime that wrote them.
    import onnxruntime

    major, minor = onnxruntime.__version__.split(".")[:2]
    return f"{major}.{minor}" if fmt == "ort" else "1.17"


def _onnx_opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


