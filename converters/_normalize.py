"""Load, check and normalize an ONNX model; graph optimization with onnxruntime.

Real exports get things wrong that break quantizers silently: weights held in
``Constant`` nodes (nothing gets quantized), duplicate opset imports (the
quantizer crashes), opsets too old for per-channel quantization. Each fix is
recorded as one human-readable line for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_sdk._internal import one_line, runtime_load_error_text
from edge_sdk.errors import ConversionError, UsageError

# Per-channel QDQ needs opset >= 13; older models are upgraded to TARGET_OPSET.
MIN_OPSET = 13
TARGET_OPSET = 17


def load_checked(path: Path) -> Any:
    """Read ``path`` as an ONNX ModelProto; one-line errors for bad files."""
    import onnx

    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise ConversionError(
            f"{path}: not an ONNX model or truncated ({one_line(err)})"
        ) from err
    if not model.opset_import or not model.graph.node or not model.graph.output:
        raise ConversionError(
            f"{path}: not an ONNX model (no graph, opset imports or outputs could be read; "
            "the file may be truncated or of another kind)"
        )
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as err:
            raise ConversionError(
                f"{path}: external weight data could not be read: {one_line(err)}"
            ) from err
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ConversionError(f"{path}: invalid ONNX model: {one_line(err)}") from err
    return model


def normalize(model: Any) -> tuple[Any, list[str]]:
    """Return (normalized model, list of fixes applied). Raises ConversionError."""
    import onnx

    fixes: list[str] = []
    merged = _merge_opsets(model)
    if merged:
        fixes.append(merged)
    moved = _constants_to_initializers(model.graph)
    if moved:
        fixes.append(f"moved {moved} weight(s) from Constant nodes to initializers")
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
            fixes.append(f"upgraded opset {opset} → {TARGET_OPSET} for the quantizer")
        except Exception as err:
            fixes.append(
                f"opset {opset} could not be upgraded ({one_line(err)}); "
                "per-channel quantization may be unavailable"
            )
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as err:
        fixes.append(f"shape inference failed ({one_line(err)}); continuing without it")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ConversionError(f"model is invalid after normalization: {one_line(err)}") from err
    return model, fixes


def default_opset(model: Any) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _merge_opsets(model: Any) -> str | None:
    seen: dict[str, int] = {}
    dupes = False
    for imp in model.opset_import:
        dom = "" if imp.domain == "ai.onnx" else imp.domain
        if dom in seen:
            dupes = True
        seen[dom] = max(seen.get(dom, 0), int(imp.version))
    if not dupes:
        return None
    del model.opset_import[:]
    for dom, ver in seen.items():
        imp = model.opset_import.add()
        imp.domain = dom
        imp.version = ver
    return "merged duplicate opset imports (" + ", ".join(
        f"{d or 'ai.onnx'} v{v}" for d, v in seen.items()) + ")"


def _constants_to_initializers(graph: Any) -> int:
    """Move tensor-valued Constant nodes of the main graph into initializers."""
    keep = []
    moved = 0
    existing = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            tensor = _constant_tensor(node)
            out = node.output[0]
            if tensor is not None and out not in existing:
                tensor.name = out
                graph.initializer.append(tensor)
                existing.add(out)
                moved += 1
                continue
        keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    # Initializers that are also listed as graph inputs hide weights from the
    # quantizer (it treats them as overridable); such inputs are dropped.
    names = {i.name for i in graph.initializer}
    shadow = [i for i in graph.input if i.name in names]
    if shadow:
        kept = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept)
    return moved


def _constant_tensor(node: Any) -> Any:
    import numpy as np
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            t = type(attr.t)()
            t.CopyFrom(attr.t)
            return t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None


def optimize(src: Path, dst: Path, *, level: str = "basic") -> None:
    """Save onnxruntime's graph-optimized version of ``src`` to ``dst``.

    ``basic`` keeps standard ONNX ops only (constant folding, redundant node
    elimination), so the result stays portable and quantizable; hardware
    specific fusions happen again when the device loads the model.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ConversionError(
            f"onnxruntime cannot load the model: {runtime_load_error_text(err)}"
        ) from err


def to_ort_format(src: Path, dst: Path) -> None:
    """Write ``src`` in ORT format, the way onnxruntime's converter tool does
    (all optimizations except the x86-only NCHWc layout, so it runs on ARM too)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])
    except Exception as err:
        raise ConversionError(f"conversion to ORT format failed: {one_line(err)}") from err


__all__ = ["default_opset", "load_checked", "normalize", "optimize", "to_ort_format"]
