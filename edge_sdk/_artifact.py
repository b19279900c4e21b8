"""The artifact: a directory with ``manifest.json``, the model file it names and reports.

It is the unit that moves from the workstation to the device. Reading one
validates the manifest and the model's hash; a wrong byte is an
:class:`~edge_sdk.errors.ArtifactError`, never a silently different model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._fs import sha256_file
from .errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
FORMATS = ("onnx", "ort", "tflite")
#: What a model is for; the converter judges accuracy in these terms.
TASKS = ("classify", "detect", "segment", "embed", "regress", "generic")
_SUFFIX_FORMAT = {".onnx": "onnx", ".ort": "ort", ".tflite": "tflite"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Dim = int | str | None


def format_for_path(path: str | os.PathLike[str]) -> str:
    """Model format from a file suffix (``.onnx``, ``.ort``, ``.tflite``)."""
    fmt = _SUFFIX_FORMAT.get(Path(path).suffix.lower())
    if fmt is None:
        raise ArtifactError(
            f"{path}: unknown model file kind (expected .onnx, .ort or .tflite, "
            "or an artifact directory with manifest.json)"
        )
    return fmt


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name and shape (symbolic dims as strings)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorSpec:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where}: expected an object with name, dtype, shape")
        name, dtype, shape = data.get("name"), data.get("dtype"), data.get("shape")
        if not isinstance(name, str) or not name:
            raise ArtifactError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(dtype, str):
            raise ArtifactError(f"{where} ({name}): 'dtype' must be a string")
        if not isinstance(shape, list) or not all(
            d is None or isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in shape
        ):
            raise ArtifactError(
                f"{where} ({name}): 'shape' must be a list of non-negative ints or dim names"
            )
        return cls(name, dtype, tuple(shape))

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds. Unknown extra keys are kept in ``extra``."""

    name: str
    version: str
    format: str
    model: str
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: str = "none"
    source: Mapping[str, Any] = field(default_factory=dict)
    runtime: Mapping[str, Any] = field(default_factory=dict)
    sample: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # What the model is for (TASKS); manifests written before tasks load as "generic".
    task: str = "generic"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "model": self.model,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "quantization": self.quantization,
            "task": self.task,
            "source": dict(self.source),
            "runtime": dict(self.runtime),
        }
        if self.sample is not None:
            out["sample"] = self.sample
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where}: expected a JSON object")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: unsupported manifest schema {schema!r} (this edge-sdk reads "
                f"schema {SCHEMA_VERSION})"
            )

        def req(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ArtifactError(f"{where}: missing field '{key}'")
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ArtifactError(f"{where}: field '{key}' has the wrong type")
            return value

        name = req("name", str)
        version = req("version", str)
        fmt = req("format", str)
        if fmt not in FORMATS:
            raise ArtifactError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        model = req("model", str)
        if not SAFE_NAME.fullmatch(model) or model in (MANIFEST_NAME, REPORT_NAME):
            raise ArtifactError(
                f"{where}: model file name {model!r} must be a plain file name inside the artifact"
            )
        sha = req("sha256", str)
        if not _HEX64.fullmatch(sha):
            raise ArtifactError(f"{where}: sha256 must be 64 lowercase hex digits")
        size = req("size_bytes", int)
        if size < 0:
            raise ArtifactError(f"{where}: size_bytes must be >= 0")
        inputs = tuple(
            TensorSpec.from_json(t, f"{where}: inputs[{i}]")
            for i, t in enumerate(req("inputs", list))
        )
        outputs = tuple(
            TensorSpec.from_json(t, f"{where}: outputs[{i}]")
            for i, t in enumerate(req("outputs", list))
        )
        if not inputs or not outputs:
            raise ArtifactError(f"{where}: a model needs at least one input and one output")
        quant = req("quantization", str)
        source = req("source", dict)
        runtime = req("runtime", dict)
        task = data.get("task", "generic")
        if task not in TASKS:
            raise ArtifactError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
        sample = data.get("sample")
        if sample is not None and (not isinstance(sample, str) or not SAFE_NAME.fullmatch(sample)):
            raise ArtifactError(f"{where}: sample must be a plain file name inside the artifact")
        known = {
            "schema", "name", "version", "format", "model", "sha256", "size_bytes",
            "inputs", "outputs", "quantization", "source", "runtime", "sample", "task",
        }
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(
            name=name, version=version, format=fmt, model=model, sha256=sha, size_bytes=size,
            inputs=inputs, outputs=outputs, quantization=quant, source=source,
            runtime=runtime, sample=sample, extra=extra, task=task,
        )


class Artifact:
    """A verified artifact directory. Build with :meth:`from_dir` or :func:`build_artifact`."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model

    @property
    def sample_path(self) -> Path | None:
        return None if self.manifest.sample is None else self.path / self.manifest.sample

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], *, verify_hash: bool = True) -> Artifact:
        """Read and validate ``path/manifest.json``; check the model file's size and sha256."""
        root = Path(path)
        mpath = root / MANIFEST_NAME
        if not root.is_dir():
            raise ArtifactError(f"{root}: not an artifact directory")
        try:
            raw = mpath.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArtifactError(f"{root}: no {MANIFEST_NAME} (not an artifact directory)") from None
        except OSError as err:
            raise ArtifactError(f"{mpath}: cannot read: {err.strerror}") from err
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{mpath}: invalid JSON: {err.msg} at line {err.lineno}") from err
        manifest = Manifest.from_json(data, str(mpath))
        art = cls(root, manifest)
        art.verify(check_hash=verify_hash)
        return art

    def verify(self, *, check_hash: bool = True) -> None:
        """Raise :class:`ArtifactError` unless the model file matches the manifest."""
        mp = self.model_path
        try:
            size = mp.stat().st_size
        except FileNotFoundError:
            raise ArtifactError(
                f"{self.path}: model file {self.manifest.model!r} named in the manifest is missing"
            ) from None
        if size != self.manifest.size_bytes:
            raise ArtifactError(
                f"{mp}: size {size} bytes does not match the manifest "
                f"({self.manifest.size_bytes} bytes)"
            )
        if check_hash:
            digest = sha256_file(mp)
            if digest != self.manifest.sha256:
                raise ArtifactError(
                    f"{mp}: sha256 {digest[:16]}… does not match the manifest "
                    f"({self.manifest.sha256[:16]}…); the model file was changed or corrupted"
                )
        sp = self.sample_path
        if sp is not None and not sp.is_file():
            raise ArtifactError(f"{self.path}: sample file {self.manifest.sample!r} is missing")

    def read_report(self) -> dict[str, Any]:
        p = self.path / REPORT_NAME
        if not p.is_file():
            return {}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{p}: unreadable report: {err}") from err
        return data if isinstance(data, dict) else {}
