"""Which framework a source is: from ``--from``, the path's suffix, or its first bytes.

Suffixes are tried first because they are what users name files by; the
content sniff catches the common mismatches (a TorchScript archive named
``.bin``, a pickle named ``.model``) and every unknown suffix.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from edge_sdk.errors import UsageError

KINDS = ("torch", "keras", "sklearn", "onnx", "tflite")

# module.path:callable — what a torch factory looks like on the command line.
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

_SUFFIX_KIND = {
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".keras": "keras",
    ".h5": "keras",
    ".hdf5": "keras",
    ".pt2": "torch",
    ".pt": "torch",
    ".pth": "torch",
    ".ts": "torch",
    ".torchscript": "torch",
    ".jit": "torch",
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".joblib": "sklearn",
}

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_factory(src: str) -> bool:
    """True when ``src`` reads as ``package.module:factory`` rather than a path."""
    return bool(_FACTORY.match(src)) and not Path(src).exists()


def detect_kind(src: str, source_kind: str | None) -> str:
    """Return one of :data:`KINDS` for ``src`` or raise :class:`UsageError`."""
    if source_kind is not None:
        kind = source_kind.lower()
        if kind in ("tensorflow", "tf", "savedmodel"):
            kind = "keras"
        if kind in ("pytorch",):
            kind = "torch"
        if kind not in KINDS:
            raise UsageError(
                f"--from {source_kind!r}: unknown source kind (use one of {', '.join(KINDS)})"
            )
        if kind != "torch" or not is_factory(src):
            _require_exists(src)
        return kind
    if is_factory(src):
        return "torch"
    path = _require_exists(src)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "keras"
        if (path / "manifest.json").is_file():
            raise UsageError(
                f"{path}: this is already an edge-sdk artifact directory; convert its source "
                "model instead (edge-sdk inspect shows where it came from)"
            )
        raise UsageError(
            f"{path}: a directory that is not a TensorFlow SavedModel (no saved_model.pb); "
            "pass a model file, a SavedModel directory or package.module:factory"
        )
    by_suffix = _SUFFIX_KIND.get(path.suffix.lower())
    sniffed = sniff(path)
    # A .pt that is really a pickle still is torch (torch.save), so the suffix wins
    # whenever the content does not clearly say otherwise.
    if by_suffix is not None and (sniffed is None or sniffed == by_suffix or
                                  (by_suffix == "torch" and sniffed == "sklearn")):
        return by_suffix
    if sniffed is not None:
        return sniffed
    if by_suffix is not None:
        return by_suffix
    raise UsageError(
        f"{path}: unknown model file kind (suffix {path.suffix or '(none)'!r}); expected "
        ".onnx, .tflite, .keras/.h5 or a SavedModel directory, a TorchScript/.pt2 file, "
        "a scikit-learn pickle/.joblib, or package.module:factory; pass --from "
        f"{'|'.join(KINDS)} to say which"
    )


def sniff(path: Path) -> str | None:
    """Guess a kind from the file's content; None when it is not recognisable."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from err
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(_HDF5_MAGIC):
        return "keras"
    if head.startswith(b"PK"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "sklearn"  # a pickle protocol 2-5 header
    return None


def _sniff_zip(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "keras"
    # torch.jit.save, torch.export.save and torch.save all write zip archives
    # with an archive folder; any of them is a torch source.
    if any(n.endswith(("/constants.pkl", "/data.pkl", "/archive_format", "/version"))
           or "/serialized_exported_program" in n or n.startswith("models/") for n in names):
        return "torch"
    return None


def _require_exists(src: str) -> Path:
    path = Path(src)
    if not path.exists():
        if ":" in src and not _FACTORY.match(src):
            raise UsageError(
                f"{src}: no such file, and not a valid torch factory (expected "
                "package.module:callable)"
            )
        raise UsageError(f"{src}: no such file or directory")
    return path


__all__ = ["KINDS", "detect_kind", "is_factory", "sniff"]
