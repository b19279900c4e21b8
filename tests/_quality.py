"""Shared helpers of the shadow-comparison tests: manifests as a converter writes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edge_sdk import Manifest, TensorSpec


def manifest(outputs: Sequence[tuple[str, str, Sequence[int | str]]], *,
             task: str = "generic", extra: Mapping[str, Any] | None = None) -> Manifest:
    """A manifest with ``outputs`` (name, dtype, shape), one float input, ``task`` and
    ``extra``; only what the comparer reads is meaningful."""
    return Manifest(
        name="m", version="1", format="onnx", model="model.onnx", sha256="0" * 64,
        size_bytes=1, inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        task=task, extra=dict(extra or {}))
