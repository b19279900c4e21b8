"""Host-side conversion: any supported model in, a verified edge-sdk artifact out.

    from converters import convert
    result = convert("model.onnx", "artifacts/model", calibration="calib.npz")
    print(result.chosen, result.report["why"])

``convert`` picks the quantization scheme by measuring every candidate on this
machine against the source model (see ``edge-sdk convert --help``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConversionError, UsageError

from ._onnx import convert_onnx
from ._pipeline import ConversionResult, ConvertConfig, ConvertOptions, SourceInfo

SOURCE_KINDS = ("onnx", "torch", "keras", "sklearn", "tflite")


def convert(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    source_kind: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    trust_pickle: bool = False,
    config: ConvertConfig | None = None,
    **option_fields: Any,
) -> ConversionResult:
    """Convert ``src`` into an artifact directory ``out_dir``.

    ``option_fields`` are :class:`ConvertOptions` fields (``quantize="auto"``,
    ``calibration=Path(...)``, ``metric="cosine"``, ...). ``source_kind`` forces
    the source format (default: from the file suffix and content). ``src`` may
    also be a SavedModel directory or a torch factory ``package.module:function``
    (see the front-ends). ``config`` shrinks or widens the measurement
    (:class:`ConvertConfig`). Raises
    :class:`~edge_sdk.errors.ConversionError` / :class:`~edge_sdk.errors.UsageError`.
    """
    if source_kind is not None and source_kind not in SOURCE_KINDS:
        raise UsageError(f"--from {source_kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    try:
        fields = dict(option_fields)
        for key in ("calibration", "eval", "base", "labels"):
            if fields.get(key) is not None:
                fields[key] = Path(fields[key])
        if input_shapes:
            fields["input_shapes"] = dict(input_shapes)
        if "exclude_ops" in fields:
            fields["exclude_ops"] = tuple(fields["exclude_ops"])
        options = ConvertOptions(**fields)
    except TypeError as err:
        raise UsageError(f"invalid conversion option: {err}") from err
    path = Path(src)
    is_onnx = source_kind == "onnx" or (source_kind is None and path.suffix.lower() == ".onnx")
    if is_onnx:
        return convert_onnx(path, Path(out_dir), options, config=config)
    if importlib.util.find_spec(f"{__name__}._frontends") is None:
        raise ConversionError(
            f"{path}: only ONNX sources are supported by this install (give a .onnx file or "
            "--from onnx)"
        )  # pragma: no cover - the front-ends ship with this package
    from ._frontends import convert_source  # type: ignore[import-not-found,unused-ignore]

    result: ConversionResult = convert_source(
        path, Path(out_dir), options, source_kind=source_kind, input_shapes=input_shapes,
        trust_pickle=trust_pickle, config=config,
    )
    return result


__all__ = ["ConversionResult", "ConvertConfig", "ConvertOptions", "SourceInfo", "convert"]
