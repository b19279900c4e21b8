"""Build the candidate models of one conversion: fp32-optimized, fp16, int8 dynamic
and int8 static (QDQ) variants, each honouring an op-type exclusion list. Models
that gather from a float table (word embeddings) also get dynamic variants with
the table in int8 (:func:`gather_tables`).

``build_candidates(fp32_path, work_dir, schemes, calibration=..., exclude_ops=...,
config=CandidateConfig())`` returns a list of :class:`Candidate`; a variant
that fails to build is returned with ``error`` set (never raised), so the
report can say why it is missing. :func:`count_weights` tells whether a
quantization changed anything (``Candidate.noop``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._internal import one_line

from ._data import Samples

SCHEMES = ("none", "fp16", "int8-dynamic", "int8-static")
# The Gemm → MatMul rewrite before dynamic quantization renames each weight so.
MATMUL_SUFFIX = "_matmul"
_INT8 = ("int8-dynamic", "int8-static")


@dataclass(frozen=True)
class CandidateConfig:
    """Which variants to try. The defaults cover what mattered in measurements:
    per-channel vs per-tensor, MatMul-only dynamic (CNN Conv layers run slower as
    ConvInteger on CPUs without VNNI) and several calibration methods."""

    dynamic_variants: tuple[tuple[str, bool, bool], ...] = (
        # (suffix, matmul_only, per_channel)
        ("", False, False),
        ("-pc", False, True),
        ("-matmul", True, False),
        ("-matmul-pc", True, True),
    )
    # Built only when the model gathers rows from a float initializer (an embedding
    # table, most of a text encoder's bytes): MatMul per-channel as "-matmul-pc", the
    # table int8 with one scale ("tensor") or one per row ("row"). Either way the int8
    # rows are gathered first and only they are dequantized, not the whole table.
    gather_variants: tuple[tuple[str, str], ...] = (
        # (suffix, table granularity)
        ("-matmul-pc-gather", "tensor"),
        ("-matmul-pc-gather-row", "row"),
    )
    # ...and only when those tables hold at least this fraction of the float weight
    # bytes: a small lookup table is not worth two more candidates to measure.
    gather_min_fraction: float = 0.05
    static_methods: tuple[str, ...] = ("minmax", "percentile", "entropy")
    # Per-tensor weights also for these methods: smaller (no per-channel scales and
    # int32 bias zero points), often as fast, sometimes less accurate.
    static_per_tensor_methods: tuple[str, ...] = ("minmax",)
    max_calibration_samples: int = 256


@dataclass
class Candidate:
    name: str
    scheme: str  # none | fp16 | int8-dynamic | int8-static
    path: Path | None
    description: str
    error: str | None = None
    quantized_weights: int = 0
    total_weights: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    # Not built for want of calibration data: reported as skipped, not as failed.
    needs_calibration: bool = False

    @property
    def noop(self) -> bool:
        """An int8 scheme that quantized no weight: it is fp32 under another name."""
        return self.scheme in _INT8 and self.error is None and self.quantized_weights == 0

    def as_tuple(self) -> tuple[str, Path, str]:
        assert self.path is not None
        return (self.name, self.path, self.scheme)


def count_weights(path: Path) -> tuple[int, int, int]:
    """(int8 weight tensors, float16 weight tensors, float32 weight tensors) in a model,
    subgraphs included. A weight is an initializer with at least 2 dims."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    kinds = {
        onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8",
        onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.FLOAT: "fp32",
    }
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            kind = kinds.get(init.data_type)
            if kind and len(init.dims) >= 2 and int(np.prod(init.dims)) > 1:
                counts[kind] += 1
    return counts["int8"], counts["fp16"], counts["fp32"]


def op_types(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for g in _graphs(model.graph) for n in g.node}


def _graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


class _Reader:
    """CalibrationDataReader over in-memory feeds (duck-typed: ORT only calls these)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def set_range(self, start_index: int, end_index: int) -> None:  # pragma: no cover
        self._feeds = self._feeds[start_index:end_index]
        self._i = 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers log advice and print progress; keep the CLI output clean."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    # With a handler present, logging.warning() does not call basicConfig(), which
    # would leave a stderr handler on the root logger for the rest of the process.
    null = logging.NullHandler()
    root.addHandler(null)
    sink = io.StringIO()
    # The quantizers' own sessions log "Removing initializer ..." through onnxruntime's
    # default logger (warning level, 2, unless changed); the candidates are verified anyway.
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        ort.set_default_logger_severity(2)
        root.removeHandler(null)
        root.setLevel(old)


def build_candidates(
    fp32_path: Path,
    work_dir: Path,
    schemes: Sequence[str],
    *,
    calibration: Samples | None,
    exclude_ops: Sequence[str] = (),
    config: CandidateConfig | None = None,
) -> list[Candidate]:
    """Candidates for ``schemes`` (a subset of SCHEMES). ``fp32_path`` is the
    graph-optimized float model; it is the "none" candidate itself."""
    cfg = config or CandidateConfig()
    _, _, total = count_weights(fp32_path)
    out: list[Candidate] = []
    if "none" in schemes:
        out.append(Candidate("fp32", "none", fp32_path, "float32, graph-optimized",
                             total_weights=total))
    model_ops = op_types(fp32_path)
    excluded = set(exclude_ops)
    if "fp16" in schemes:
        out.append(_fp16(fp32_path, work_dir / "fp16.onnx", excluded, total))
    if "int8-dynamic" in schemes:
        out.extend(_dynamic_variants(fp32_path, work_dir, model_ops, excluded, cfg, total))
    if "int8-static" in schemes:
        if calibration is None:
            out.append(Candidate("int8-static", "int8-static", None, "static QDQ",
                                 error="needs calibration data (--calibration)",
                                 total_weights=total, needs_calibration=True))
        else:
            feeds = calibration.feeds[: cfg.max_calibration_samples]
            for method in cfg.static_methods:
                out.append(static_candidate(fp32_path, work_dir, method, True, feeds, excluded,
                                            total))
            for method in cfg.static_per_tensor_methods:
                out.append(static_candidate(fp32_path, work_dir, method, False, feeds, excluded,
                                            total))
    return out


#: Ops whose float inputs are scales and zero points fixed by the spec's types (a
#: dequantized int8 TFLite keeps them around its inputs and outputs): left in float32.
_FP16_KEEP = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _fp16(src: Path, dst: Path, excluded: set[str], total: int) -> Candidate:
    desc = "float16 weights and compute, float32 inputs/outputs"
    try:
        import onnx
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        model = onnx.load(str(src))
        with _quiet():
            converted = convert_float_to_float16(
                model, keep_io_types=True,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | _FP16_KEEP | excluded),
            )
        onnx.save(converted, str(dst))
    except Exception as err:
        return Candidate("fp16", "fp16", None, desc, error=one_line(err), total_weights=total)
    _, f16, _ = count_weights(dst)
    return Candidate("fp16", "fp16", dst, desc, quantized_weights=f16, total_weights=total)


def _dynamic_variants(
    src: Path, work_dir: Path, model_ops: set[str], excluded: set[str],
    cfg: CandidateConfig, total: int,
) -> list[Candidate]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    out: list[Candidate] = []
    seen: set[tuple[frozenset[str], bool]] = set()
    gemm_src = matmul_source(src, work_dir, model_ops)
    ops_after = op_types(gemm_src)
    for suffix, matmul_only, per_channel in cfg.dynamic_variants:
        wanted = {"MatMul", "Attention"} if matmul_only else set(IntegerOpsRegistry)
        wanted -= excluded
        effective = frozenset(wanted & ops_after)
        name = f"int8-dynamic{suffix}"
        desc = ("int8 dynamic, " + ("MatMul only" if matmul_only else "all supported ops")
                + (", per-channel" if per_channel else ", per-tensor"))
        key = (effective, per_channel)
        # Same effect as a variant already built (or nothing to quantize): building it
        # again would only add noise to the timing. The no-op case is kept once so the
        # report can say that dynamic quantization does nothing for this model.
        if (not effective or key in seen) and (effective or any(c.noop for c in out)):
            continue
        seen.add(key)
        dst = work_dir / f"{name}.onnx"
        try:
            quantize_dynamic_int8(gemm_src, dst, sorted(wanted), per_channel)
        except Exception as err:
            out.append(Candidate(name, "int8-dynamic", None, desc, error=one_line(err),
                                 total_weights=total))
            continue
        q, _, _ = count_weights(dst)
        out.append(Candidate(name, "int8-dynamic", dst, desc, quantized_weights=q,
                             total_weights=total,
                             params={"op_types": sorted(wanted), "per_channel": per_channel}))
    if "Gather" not in excluded:
        out.extend(_gather_variants(gemm_src, work_dir, ops_after, excluded, cfg, total))
    return out


def matmul_source(src: Path, work_dir: Path, model_ops: set[str]) -> Path:
    """The model the dynamic quantizer is given: ``src`` with Gemm rewritten as MatMul+Add
    (weights renamed ``<name>`` + :data:`MATMUL_SUFFIX`), or ``src`` itself. Written once
    per ``work_dir`` and source name."""
    if "Gemm" not in model_ops:
        return src
    # The dynamic quantizer has no Gemm kernel; MLPs exported as Gemm would be
    # silently left float. Rewritten as MatMul+Add they quantize.
    dst = work_dir / f"{src.stem}-matmul.onnx"
    if dst.exists():
        return dst
    try:
        _gemm_to_matmul(src, dst)
    except Exception:
        return src
    return dst


def quantize_dynamic_int8(src: Path, dst: Path, op_types: Sequence[str], per_channel: bool,
                      overrides: Mapping[str, Any] | None = None) -> None:
    """onnxruntime's dynamic int8 quantizer, int8 weights, constant MatMul inputs only;
    ``overrides`` are its ``TensorQuantOverrides`` (fixed scales and zero points)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra: dict[str, Any] = {"MatMulConstBOnly": True}
    if overrides:
        extra["TensorQuantOverrides"] = dict(overrides)
    with _quiet():
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
            weight_type=QuantType.QInt8, extra_options=extra,
        )


def gather_tables(model: Any, *, per_row: bool = False) -> list[str]:
    """Float32 initializers (2+ dims) of the main graph read only as the data input of
    main-graph Gather nodes (with axis 0 and 2 dims when ``per_row``): the tables whose
    rows can be stored int8 and dequantized after the Gather."""
    import onnx
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer
             if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    top = {id(n) for n in graph.node}
    fit: dict[str, bool] = {}
    for g in _graphs(graph):
        for node in g.node:
            for k, name in enumerate(node.input):
                if name not in inits:
                    continue
                axis = next((helper.get_attribute_value(a) for a in node.attribute
                             if a.name == "axis"), 0)
                ok = (node.op_type == "Gather" and k == 0 and id(node) in top
                      and (not per_row or (axis == 0 and len(inits[name].dims) == 2)))
                fit[name] = fit.get(name, True) and ok
    outputs = {o.name for o in graph.output}
    return [name for name, ok in fit.items() if ok and name not in outputs]


def _gather_variants(
    src: Path, work_dir: Path, model_ops: set[str], excluded: set[str],
    cfg: CandidateConfig, total: int,
) -> list[Candidate]:
    import onnx

    model = onnx.load(str(src))
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer
             if i.data_type == onnx.TensorProto.FLOAT}
    floats = sum(sizes.values())
    out: list[Candidate] = []
    for suffix, granularity in cfg.gather_variants:
        tables = gather_tables(model, per_row=granularity == "row")
        if not tables or sum(sizes[t] for t in tables) < cfg.gather_min_fraction * floats:
            continue
        name = f"int8-dynamic{suffix}"
        wanted = sorted(({"MatMul", "Attention"} - excluded) & model_ops)
        desc = (f"int8 dynamic, {'MatMul per-channel, ' if wanted else ''}Gather table"
                f"{'s' if len(tables) > 1 else ''} int8 "
                + ("per row" if granularity == "row" else "per tensor"))
        dst = work_dir / f"{name}.onnx"
        try:
            staged = work_dir / f"{name}-tables.onnx"
            onnx.save(int8_gather_tables(model, tables, per_row=granularity == "row"),
                      str(staged))
            if wanted:
                quantize_dynamic_int8(staged, dst, wanted, per_channel=True)
            else:
                staged.replace(dst)
        except Exception as err:
            out.append(Candidate(name, "int8-dynamic", None, desc, error=one_line(err),
                                 total_weights=total))
            continue
        q, _, _ = count_weights(dst)
        out.append(Candidate(name, "int8-dynamic", dst, desc, quantized_weights=q,
                             total_weights=total,
                             params={"op_types": [*wanted, "Gather"], "per_channel": True,
                                     "gather_tables": granularity}))
    return out


def table_scale(w: np.ndarray, *, per_row: bool) -> np.ndarray:
    """The symmetric int8 scale of a gather table: max |w| / 127, one (shape ()) or one
    per row (shape (rows, 1)); 1.0 where the table (row) is all zeros."""
    amax = (np.max(np.abs(w), axis=1, keepdims=True) if per_row
            else np.array(np.max(np.abs(w)) if w.size else 0.0))
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def int8_gather_tables(model: Any, tables: Sequence[str], *, per_row: bool,
                       scales: Mapping[str, np.ndarray] | None = None) -> Any:
    """A copy of ``model`` with each of ``tables`` (see :func:`gather_tables`) stored
    as symmetric int8 and one float scale per tensor, or per row. Each Gather then
    reads int8 rows and only those rows are dequantized: ``DequantizeLinear`` after
    the Gather (per tensor), or ``Cast`` times the gathered row scales (per row).
    ``scales`` fixes a table's scale (shaped as :func:`table_scale` returns it); values
    beyond its range are clipped to ±127."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    taken = ({i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
             | {n.name for n in graph.node} | {i.name for i in graph.input})

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    wanted = set(tables)
    quantized: dict[str, tuple[str, str]] = {}
    kept = []
    for init in graph.initializer:
        if init.name not in wanted:
            kept.append(init)
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        fixed = (scales or {}).get(init.name)
        scale = (table_scale(w, per_row=per_row) if fixed is None
                 else np.asarray(fixed, np.float32))
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        qname, sname = fresh(init.name + "_int8"), fresh(init.name + "_scale")
        kept += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)]
        quantized[init.name] = (qname, sname)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Gather" or node.input[0] not in quantized:
            continue
        qname, sname = quantized[node.input[0]]
        out = node.output[0]
        rows = fresh(out + "_int8")
        node.input[0] = qname
        node.output[0] = rows
        label = node.name or out
        if per_row:
            row_scales, floats = fresh(out + "_row_scale"), fresh(out + "_float")
            nodes += [
                helper.make_node("Gather", [sname, node.input[1]], [row_scales], axis=0,
                                 name=fresh(label + "_scale")),
                helper.make_node("Cast", [rows], [floats], to=onnx.TensorProto.FLOAT,
                                 name=fresh(label + "_cast")),
                helper.make_node("Mul", [floats, row_scales], [out], name=fresh(label + "_dq")),
            ]
        else:
            nodes.append(helper.make_node("DequantizeLinear", [rows, sname], [out],
                                          name=fresh(label + "_dq")))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def static_name(method: str, per_channel: bool) -> str:
    return f"int8-static-{method}" + ("" if per_channel else "-pt")


def static_candidate(
    src: Path, work_dir: Path, method: str, pc: bool, feeds: Sequence[dict[str, np.ndarray]],
    excluded: set[str], total: int, *, name: str | None = None, description: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> Candidate:
    """One static QDQ candidate; ``overrides`` are onnxruntime's ``TensorQuantOverrides``."""
    name = name or static_name(method, pc)
    desc = f"int8 static QDQ, {method} calibration" + (
        ", per-channel" if pc else ", per-tensor") + description
    dst = work_dir / f"{name}.onnx"
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.registry import QDQRegistry

        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
        wanted = sorted(set(QDQRegistry) - excluded)
        with _quiet():
            quantize_static(
                str(src), str(dst), _Reader(feeds),
                quant_format=QuantFormat.QDQ, per_channel=pc,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=wanted, calibrate_method=calib,
                extra_options={"CalibMaxIntermediateOutputs": None,
                               **({"TensorQuantOverrides": dict(overrides)} if overrides
                                  else {})},
            )
    except Exception as err:
        return Candidate(name, "int8-static", None, desc, error=one_line(err), total_weights=total)
    q, _, _ = count_weights(dst)
    return Candidate(name, "int8-static", dst, desc, quantized_weights=q, total_weights=total,
                     params={"calibration": method, "per_channel": pc,
                             "calibration_samples": len(feeds)})


def _gemm_to_matmul(src: Path, dst: Path) -> None:
    """Rewrite Gemm(A, B const, C) with alpha=beta=1, transA=0 as MatMul(A, B') + C."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    changed = False
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transA", 0) == 0
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            w = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
            wname = node.input[1] + MATMUL_SUFFIX
            graph.initializer.append(numpy_helper.from_array(w, wname))
            out = node.output[0]
            if len(node.input) > 2 and node.input[2]:
                mm = out + "_mm"
                nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm],
                                              name=(node.name or out) + "_matmul"))
                nodes.append(helper.make_node("Add", [mm, node.input[2]], [out],
                                              name=(node.name or out) + "_bias"))
            else:
                nodes.append(helper.make_node("MatMul", [node.input[0], wname], [out],
                                              name=(node.name or out) + "_matmul"))
            changed = True
        else:
            nodes.append(node)
    if not changed:
        raise ValueError("no rewritable Gemm")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for g in _graphs(graph) for n in g.node for i in n.input}
    used |= {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


__all__ = ["MATMUL_SUFFIX", "SCHEMES", "Candidate", "CandidateConfig", "build_candidates",
           "count_weights", "gather_tables", "int8_gather_tables", "matmul_source", "op_types",
           "quantize_dynamic_int8", "static_candidate", "static_name", "table_scale"]
