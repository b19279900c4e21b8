"""Reuse a base artifact's int8 parameters: ``edge-sdk convert SRC --base V1``.

An int8 tensor is stored as ``q = clip(round(x / scale) + zero_point)``. Quantized with
v1's scales and zero points, a weight v2 did not change gives v1's bytes exactly, and a
weight a fine-tune moved a little gives values within a step or two of v1's: what a
tensor-aware XOR delta compresses to a few percent. With its own scales nearly every
byte of a fine-tuned tensor changes.

- :meth:`Base.from_artifact` reads v1's parameters from its ONNX graph: the int8/uint8
  initializers onnxruntime's quantizers write (``<w>_quantized`` next to ``<w>_scale``
  and ``<w>_zero_point``: static QDQ and dynamic weights), the gather tables
  :func:`~converters._candidates.int8_gather_tables` writes (``<w>_int8``, ``<w>_scale``)
  and the activation scales of static QDQ (the ``QuantizeLinear`` nodes). It refuses, in
  one line, what is not an int8 ONNX edge-sdk artifact.
- :func:`build_base_candidate` builds v1's chosen candidate again on the new model with
  v1's parameters wherever they still fit: onnxruntime takes fixed scales and zero
  points through the ``TensorQuantOverrides`` extra option, in quantize_static and
  quantize_dynamic alike; gather tables take them in ``int8_gather_tables``. A tensor
  gets its own scale (per channel, or per table row, only those channels or rows) where
  its values pass v1's range by more than the tolerance (:func:`fit`), or where its own
  scale would keep more bytes identical to v1's (all its weights grew or shrank alike).
  Static activations keep v1's scale while their new calibrated range fits it. The
  candidate's ``params["base"]`` says what was reused and, tensor by tensor, what was
  not and why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, EdgeError, UsageError

from ._candidates import (
    MATMUL_SUFFIX,
    Candidate,
    CandidateConfig,
    count_weights,
    gather_tables,
    int8_gather_tables,
    matmul_source,
    op_types,
    quantize_dynamic_int8,
    static_candidate,
)
from ._data import Samples

INT8_SCHEMES = ("int8-dynamic", "int8-static")
QUANT_SUFFIX = "_quantized"  # onnxruntime's quantized initializer
TABLE_SUFFIX = "_int8"  # int8_gather_tables' int8 table
SCALE_SUFFIX = "_scale"
ZERO_POINT_SUFFIX = "_zero_point"
BASE_SUFFIX = "-base"  # the candidate built with a base's parameters


@dataclass(frozen=True, eq=False)
class TensorQuant:
    """One tensor's int8 parameters, ``x ≈ scale * (q - zero_point)``.

    ``scale`` (float32) and ``zero_point`` (int8 or uint8) have shape () per tensor,
    (C,) per channel along ``axis``, or (rows, 1) per gather-table row (``axis`` 0).
    ``shape`` is the quantized tensor's (() for an activation); ``quantized`` its int8
    values, when read from a model."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    shape: tuple[int, ...] = ()
    quantized: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def channels(self) -> int:
        return int(self.scale.size)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The representable float range, per channel (shape (channels,))."""
        info = np.iinfo(self.zero_point.dtype)
        s = self.scale.astype(np.float64).reshape(-1)
        z = self.zero_point.astype(np.float64).reshape(-1)
        return (info.min - z) * s, (info.max - z) * s

    def excess(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """How far the range [lo, hi] (per channel) passes this one, as a fraction of
        this one's half-width; 0 where it fits."""
        blo, bhi = self.bounds()
        half = np.maximum((bhi - blo) / 2, np.finfo(np.float64).tiny)
        out: np.ndarray = np.maximum(np.maximum(hi - bhi, blo - lo), 0.0) / half
        return out

    def value_excess(self, values: np.ndarray) -> np.ndarray:
        lo, hi = channel_range(values, self.axis)
        return self.excess(lo, hi)

    def same_as(self, other: TensorQuant) -> bool:
        return (self.axis == other.axis and self.zero_point.dtype == other.zero_point.dtype
                and self.scale.size == other.scale.size
                and self.scale.astype(np.float32).tobytes()
                == other.scale.astype(np.float32).tobytes()
                and self.zero_point.tobytes() == other.zero_point.tobytes())

    def override(self) -> list[dict[str, Any]]:
        """This tensor's entry in onnxruntime's ``TensorQuantOverrides``."""
        from onnxruntime.quantization import QuantType

        qtype = QuantType.QInt8 if self.zero_point.dtype == np.int8 else QuantType.QUInt8
        s = self.scale.astype(np.float32).reshape(-1)
        z = self.zero_point.reshape(-1)
        # 0-d float32 and int8/uint8 arrays, not Python numbers: onnxruntime divides by the
        # scale as given (the base's bytes came from a float32 one) and takes the zero
        # point's dtype and .squeeze() from it.
        out: list[dict[str, Any]] = [{"scale": np.array(s[i], np.float32),
                                      "zero_point": np.array(z[i], z.dtype)}
                                     for i in range(s.size)]
        out[0]["quant_type"] = qtype
        if self.axis is not None:
            out[0]["axis"] = self.axis
        return out

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """``values`` quantized with these parameters, as onnxruntime's quantize_nparray
        does it (float32 division, round half to even, clipped to the type)."""
        s, z = self._broadcast(values.ndim)
        info = np.iinfo(self.zero_point.dtype)
        q = np.clip(np.round(values.astype(np.float32) / s) + z, info.min, info.max)
        out: np.ndarray = q.astype(self.zero_point.dtype)
        return out

    def same_values(self, values: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Per channel, how many of ``values`` quantize to the same bytes as ``other``."""
        eq = (self.quantize(values) == other).astype(np.int64)
        if self.axis is None:
            return np.array([eq.sum()])
        return np.asarray(np.moveaxis(eq, self.axis, 0).reshape(eq.shape[self.axis], -1)
                          .sum(axis=1))

    def own(self, values: np.ndarray) -> TensorQuant:
        """Parameters of the same layout fitted to ``values`` alone, as the quantizers
        compute them: int8 symmetric (max |x| / 127), uint8 per tensor asymmetric."""
        lo, hi = channel_range(values, self.axis)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        if self.zero_point.dtype == np.int8:
            amax = np.maximum(-lo, hi)
            scale = np.where(amax > 0, amax / 127.0, 1.0)
            zp = np.zeros(scale.shape, np.int8)
        else:
            span = hi - lo
            scale = np.where(span > 0, span / 255.0, 1.0)
            zp = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        return TensorQuant(scale.astype(np.float32).reshape(self.scale.shape),
                           zp.reshape(self.scale.shape), self.axis, self.shape)

    def with_channels(self, other: TensorQuant, channels: np.ndarray) -> TensorQuant:
        """These parameters with ``channels`` taken from ``other``."""
        scale = self.scale.astype(np.float32).reshape(-1).copy()
        zp = self.zero_point.reshape(-1).copy()
        scale[channels] = other.scale.reshape(-1)[channels]
        zp[channels] = other.zero_point.reshape(-1)[channels]
        return TensorQuant(scale.reshape(self.scale.shape), zp.reshape(self.scale.shape),
                           self.axis, self.shape)

    def _broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scale.astype(np.float32)
        z = self.zero_point.astype(np.float32)
        if self.axis is None or self.scale.ndim == 2:
            return s, z
        shape = [1] * ndim
        shape[self.axis] = -1
        return s.reshape(shape), z.reshape(shape)


def channel_range(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of ``values`` per slice along ``axis`` (one pair when ``axis`` is None)."""
    v = np.asarray(values, np.float64)
    rows = v.reshape(1, -1) if axis is None else np.moveaxis(v, axis, 0).reshape(
        v.shape[axis], -1)
    if rows.shape[1] == 0:
        zeros = np.zeros(rows.shape[0])
        return zeros, zeros
    return rows.min(axis=1), rows.max(axis=1)


def read_quantization(model: Any) -> tuple[dict[str, TensorQuant], dict[str, TensorQuant]]:
    """(weights, activations): the int8 parameters of a quantized ONNX graph, keyed by the
    float tensor's name. Main graph only: the quantizers leave subgraphs float."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    kinds = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8}
    weights: dict[str, TensorQuant] = {}
    for name, init in inits.items():
        dtype = kinds.get(init.data_type)
        key = next((name[: -len(s)] for s in (QUANT_SUFFIX, TABLE_SUFFIX)
                    if name.endswith(s) and len(name) > len(s)), None)
        if dtype is None or key is None or key + SCALE_SUFFIX not in inits:
            continue
        scale = numpy_helper.to_array(inits[key + SCALE_SUFFIX]).astype(np.float32)
        zname = key + ZERO_POINT_SUFFIX
        zp = (numpy_helper.to_array(inits[zname]) if zname in inits
              else np.zeros(scale.shape, dtype))
        if zp.shape != scale.shape or zp.dtype != dtype or scale.ndim > 2:
            continue
        dims = tuple(int(d) for d in init.dims)
        weights[key] = TensorQuant(scale, zp, _axis(dims, scale, users.get(name, [])), dims,
                                   numpy_helper.to_array(init))
    activations: dict[str, TensorQuant] = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in inits:
            continue
        sname, zname = node.input[1], node.input[2]
        if not sname.endswith(SCALE_SUFFIX) or sname not in inits or zname not in inits:
            continue
        key = sname[: -len(SCALE_SUFFIX)]
        scale, zp = numpy_helper.to_array(inits[sname]), numpy_helper.to_array(inits[zname])
        # A Gather's output shares its table's parameters; those are the table's.
        if key in weights or scale.size != 1 or zp.dtype not in (np.int8, np.uint8):
            continue
        activations[key] = TensorQuant(scale.astype(np.float32).reshape(()), zp.reshape(()))
    return weights, activations


def _axis(dims: tuple[int, ...], scale: np.ndarray, users: Sequence[Any]) -> int | None:
    if scale.ndim == 0:
        return None
    if scale.ndim == 2 or not dims:  # per-row table scales, shape (rows, 1)
        return 0
    from onnx import helper

    for node in users:
        if node.op_type == "DequantizeLinear":
            axis = next((int(helper.get_attribute_value(a)) for a in node.attribute
                         if a.name == "axis"), 1)
            return axis % len(dims)
    # Dynamic quantization records no axis: the one dimension that fits, else the
    # quantizer's own choice (ConvInteger: output channels; MatMul: the last axis).
    fits = [a for a, d in enumerate(dims) if d == scale.size]
    if len(fits) == 1:
        return fits[0]
    return 0 if any(n.op_type == "ConvInteger" for n in users) else len(dims) - 1


def float_initializers(model: Any) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT}


def check_base(path: Path, *, to: str, quantize: str,
               calibration: Path | None) -> edge_sdk.Artifact:
    """The base artifact at ``path``, after checking it can serve these options; raises
    :class:`UsageError` with a one-line diagnosis."""
    try:
        art = edge_sdk.Artifact.from_dir(path)
    except EdgeError as err:
        raise UsageError(f"--base {err}") from err
    fmt, scheme = art.manifest.format, art.manifest.quantization
    if fmt != "onnx":
        raise UsageError(f"base {path} is in {fmt} format; --base reads the int8 parameters "
                         "of an ONNX artifact (convert the base with --to onnx)")
    if scheme not in INT8_SCHEMES:
        raise UsageError(f"base {path} is not int8 (quantization {scheme}): it has no scales "
                         "to reuse; drop --base, or convert the base with --quantize "
                         "int8-static or int8-dynamic")
    if to != "onnx":
        raise UsageError(f"--base needs --to onnx (got --to {to}): the base is ONNX, and a "
                         "delta needs both versions in one format")
    if quantize not in ("auto", scheme):
        raise UsageError(f"base {path} is {scheme}; --quantize {quantize} cannot reuse its "
                         f"parameters (pass --quantize {scheme} or auto, or drop --base)")
    if scheme == "int8-static" and calibration is None:
        raise UsageError(f"base {path} is int8-static: pass --calibration too (activations "
                         "the base has no scale for, or that outgrew it, are calibrated)")
    return art


@dataclass(frozen=True, eq=False)
class Base:
    """The int8 parameters of a base artifact (v1) and how its model was quantized."""

    path: Path
    name: str
    version: str
    sha256: str
    scheme: str  # int8-static | int8-dynamic
    candidate: str  # the base's chosen candidate
    params: Mapping[str, Any]  # that candidate's build parameters, from the base's report
    weights: Mapping[str, TensorQuant]
    activations: Mapping[str, TensorQuant]

    @classmethod
    def from_artifact(cls, path: str | os.PathLike[str], *, to: str = "onnx",
                      quantize: str = "auto", calibration: Path | None = None) -> Base:
        """Read the base at ``path``; :class:`UsageError` if it cannot serve as one."""
        root = Path(path)
        art = check_base(root, to=to, quantize=quantize, calibration=calibration)
        import onnx

        try:
            model = onnx.load(str(art.model_path))
        except Exception as err:
            raise UsageError(f"base {root}: its model does not load as ONNX "
                             f"({one_line(err)})") from err
        weights, activations = read_quantization(model)
        if not weights:
            raise UsageError(f"base {root} holds no int8 weight tensors written by edge-sdk "
                             "convert; there is nothing to reuse")
        conversion = art.manifest.extra.get("conversion")
        chosen = conversion.get("chosen") if isinstance(conversion, Mapping) else None
        row = next((c for c in art.read_report().get("candidates") or []
                    if isinstance(c, Mapping) and c.get("name") == chosen), None)
        params = row.get("params") if row is not None else None
        if not isinstance(chosen, str) or not isinstance(params, Mapping) or (
                row is not None and row.get("scheme") != art.manifest.quantization):
            raise UsageError(f"base {root} does not record how it was quantized (no conversion "
                             "record in manifest.json and report.json); use an artifact made "
                             "by edge-sdk convert")
        return cls(root, art.manifest.name, art.manifest.version, art.manifest.sha256,
                   art.manifest.quantization, chosen, dict(params), weights, activations)

    @property
    def candidate_name(self) -> str:
        """The name of the candidate built with these parameters (a base that was itself
        converted with --base keeps one suffix)."""
        return self.candidate.removesuffix(BASE_SUFFIX) + BASE_SUFFIX

    def matches(self, name: str, shape: Sequence[int]) -> bool:
        """Whether the base has parameters for the new model's float tensor ``name`` of
        ``shape`` (under that name, or as the dynamic quantizer's transposed MatMul
        rewrite of it)."""
        shape = tuple(shape)
        tq = self.weights.get(name)
        if tq is not None and tq.shape == shape:
            return True
        tq = self.weights.get(name + MATMUL_SUFFIX)
        return tq is not None and tq.shape == shape[::-1]

    def check_matches(self, weights: Mapping[str, Sequence[int]]) -> None:
        """Raise :class:`UsageError` unless some of ``weights`` (name → shape) are in the
        base."""
        if not any(self.matches(n, s) for n, s in weights.items()):
            raise UsageError(f"base {self.path} has no tensor named like the new model's "
                             "weights (with their shapes); was it converted from the same "
                             "architecture?")

    def unmatched(self, weights: Mapping[str, Sequence[int]]) -> list[str]:
        return [n for n, s in weights.items() if not self.matches(n, s)]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "version": self.version,
                "sha256": self.sha256, "scheme": self.scheme, "candidate": self.candidate}


@dataclass
class Reuse:
    """What one candidate takes from the base: onnxruntime's overrides, gather-table
    scales, and per tensor the parameters asked for or why it has its own."""

    base: Base
    tolerance: float
    overrides: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    planned: dict[str, TensorQuant] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    planned_activations: dict[str, TensorQuant] = field(default_factory=dict)
    why_activations: dict[str, str] = field(default_factory=dict)

    def plan_weights(self, values: Mapping[str, np.ndarray], *, tables: bool = False) -> None:
        """Decide for every float tensor in ``values`` the base has parameters for."""
        for name, v in values.items():
            bq = self.base.weights.get(name)
            if bq is None:
                continue
            tq, why = fit(v, bq, self.tolerance)
            if why is not None:
                self.why[name] = why
            if tq is None:
                continue
            self.planned[name] = tq
            if tables:
                self.tables[name] = tq.scale
            else:
                self.overrides[name] = tq.override()

    def plan_activations(self, own: Mapping[str, TensorQuant]) -> None:
        """Keep the base's scale for each activation whose newly calibrated range (``own``,
        from the candidate built without the base) fits it."""
        for name, mine in own.items():
            bq = self.base.activations.get(name)
            if bq is None:
                continue
            lo, hi = mine.bounds()
            ex = float(bq.excess(lo, hi).max())
            if ex > self.tolerance:
                blo, bhi = bq.bounds()
                self.why_activations[name] = (
                    f"calibrated range [{lo[0]:.4g}, {hi[0]:.4g}] passes the base's "
                    f"[{blo[0]:.4g}, {bhi[0]:.4g}] by {ex:.1%} (tolerance "
                    f"{self.tolerance:.1%})")
                continue
            self.planned_activations[name] = bq
            self.overrides[name] = bq.override()

    def report(self, model_path: Path, *, static: bool) -> dict[str, Any]:
        """What the built model at ``model_path`` took from the base, checked on its graph
        (a parameter onnxruntime did not keep is reported, not assumed)."""
        import onnx

        got_w, got_a = read_quantization(onnx.load(str(model_path), load_external_data=False))
        weights = _tally(got_w, self.planned, self.why, self.base.weights)
        # Tensors the base quantized that the new model does not (removed, renamed, or
        # left float now).
        weights["base_only"] = sorted(k for k in self.base.weights if k not in got_w)
        out: dict[str, Any] = {**self.base.describe(), "tolerance": self.tolerance,
                               "weights": weights}
        if static:
            out["activations"] = _tally(got_a, self.planned_activations,
                                        self.why_activations, self.base.activations)
        else:
            out["activations"] = None  # dynamic: quantized at run time, nothing to reuse
        return out


def fit(values: np.ndarray, base: TensorQuant,
        tolerance: float) -> tuple[TensorQuant | None, str | None]:
    """The base's parameters for ``values`` where they serve: ``(params, None)`` when they
    do everywhere; ``(params, why)`` with some channels (table rows) given their own
    scale; ``(None, why)`` when the whole tensor gets its own.

    A channel gets its own scale when its values pass the base's range by more than
    ``tolerance`` (a fraction of that range; values within it are clipped), or when its
    own scale would keep more bytes identical to the base's (every weight of it grew or
    shrank alike: the base's scale would shift them all)."""
    if tuple(values.shape) != base.shape:
        return None, f"shape {list(base.shape)} in the base, {list(values.shape)} now"
    ex = base.value_excess(values)
    over = ex > tolerance
    mine = base.own(values)
    closer = np.zeros_like(over)
    if base.quantized is not None and base.quantized.shape == values.shape:
        closer = ~over & (mine.same_values(values, base.quantized)
                          > base.same_values(values, base.quantized))
    if not (over.any() or closer.any()):
        return base, None
    reasons = []
    if over.any():
        reasons.append(f"values pass the base's range by up to {float(ex.max()):.1%} "
                       f"(tolerance {tolerance:.1%})")
    if closer.any():
        reasons.append(f"{'its' if base.axis is None else 'their'} own scale keeps more "
                       "bytes identical to the base's")
    if base.axis is None:
        return None, "; ".join(reasons)
    unit = "rows" if base.scale.ndim == 2 else "channels"
    parts = [f"{int(n.sum())} of {base.channels} {unit}: {why}"
             for n, why in zip((m for m in (over, closer) if m.any()), reasons, strict=True)]
    return base.with_channels(mine, np.flatnonzero(over | closer)), (
        "; ".join(parts) + "; those got their own scale")


def _tally(got: Mapping[str, TensorQuant], planned: Mapping[str, TensorQuant],
           why: Mapping[str, str], base: Mapping[str, TensorQuant]) -> dict[str, Any]:
    reused: list[str] = []
    own: list[dict[str, str]] = []
    new: list[str] = []
    for name, tq in sorted(got.items()):
        if name in why:
            own.append({"tensor": name, "why": why[name]})
        elif name in planned and tq.same_as(planned[name]):
            reused.append(name)
        elif name in base:
            own.append({"tensor": name, "why": "onnxruntime changed the scale (e.g. to keep "
                        "an int32 bias in range)"})
        else:
            new.append(name)
    return {"reused": len(reused), "total": len(got), "own_scale": own, "new": new}


def build_base_candidate(
    base: Base,
    fp32_path: Path,
    work_dir: Path,
    built: Sequence[Candidate],
    *,
    calibration: Samples | None,
    exclude_ops: Sequence[str] = (),
    config: CandidateConfig | None = None,
    tolerance: float = 0.01,
) -> Candidate:
    """The base's chosen candidate, built again on ``fp32_path`` with the base's parameters
    where they fit (see the module docstring). ``built`` are the candidates built without
    the base: the static one with the base's settings gives the new calibrated ranges.
    Never raises: a candidate that fails has ``error`` set."""
    cfg = config or CandidateConfig()
    _, _, total = count_weights(fp32_path)
    name = base.candidate_name
    try:
        if base.scheme == "int8-static":
            return _static_base(base, name, fp32_path, work_dir, built, calibration,
                                set(exclude_ops), cfg, tolerance, total)
        return _dynamic_base(base, name, fp32_path, work_dir, set(exclude_ops), tolerance,
                             total)
    except Exception as err:
        return Candidate(name, base.scheme, None, f"{base.candidate} with the base's scales",
                         error=one_line(err), total_weights=total)


def _suffix(base: Base) -> str:
    return f", scales of base {base.name} {base.version} where they fit"


def _static_base(base: Base, name: str, fp32_path: Path, work_dir: Path,
                 built: Sequence[Candidate], calibration: Samples | None, excluded: set[str],
                 cfg: CandidateConfig, tolerance: float, total: int) -> Candidate:
    import onnx

    if calibration is None:
        return Candidate(name, "int8-static", None, "static QDQ with the base's scales",
                         error="needs calibration data (--calibration)", total_weights=total,
                         needs_calibration=True)
    method = str(base.params.get("calibration", "minmax"))
    pc = bool(base.params.get("per_channel", True))
    feeds = calibration.feeds[: cfg.max_calibration_samples]
    own = next((c for c in built if c.scheme == "int8-static" and c.path is not None
                and c.error is None and c.params.get("calibration") == method
                and c.params.get("per_channel") == pc and "base" not in c.params), None)
    if own is None:
        own = static_candidate(fp32_path, work_dir, method, pc, feeds, excluded, total,
                               name=name + "-own")
        if own.path is None:
            raise ConversionError(own.error or "the calibration model could not be built")
    _, own_activations = read_quantization(onnx.load(str(own.path)))
    floats = float_initializers(onnx.load(str(fp32_path)))
    reuse = Reuse(base, tolerance)
    reuse.plan_weights(floats)
    reuse.plan_activations(own_activations)
    cand = static_candidate(fp32_path, work_dir, method, pc, feeds, excluded, total, name=name,
                            description=_suffix(base), overrides=reuse.overrides)
    if cand.path is not None and cand.error is None:
        cand.params["base"] = reuse.report(cand.path, static=True)
    return cand


def _dynamic_base(base: Base, name: str, fp32_path: Path, work_dir: Path,
                  excluded: set[str], tolerance: float, total: int) -> Candidate:
    import onnx

    granularity = base.params.get("gather_tables")
    pc = bool(base.params.get("per_channel", False))
    ops = sorted({str(t) for t in base.params.get("op_types") or []
                  if not (granularity and t == "Gather")} - excluded)
    src = matmul_source(fp32_path, work_dir, op_types(fp32_path))
    reuse = Reuse(base, tolerance)
    if granularity:
        model = onnx.load(str(src))
        per_row = granularity == "row"
        tables = gather_tables(model, per_row=per_row)
        if not tables:
            raise ConversionError("the new model gathers from no float table; the base's "
                                  "int8 tables have no counterpart")
        floats = float_initializers(model)
        reuse.plan_weights({t: floats[t] for t in tables}, tables=True)
        staged = work_dir / f"{name}-tables.onnx"
        onnx.save(int8_gather_tables(model, tables, per_row=per_row, scales=reuse.tables),
                  str(staged))
        src = staged
    reuse.plan_weights(float_initializers(onnx.load(str(src))))
    dst = work_dir / f"{name}.onnx"
    if ops:
        quantize_dynamic_int8(src, dst, ops, pc, reuse.overrides)
    else:
        shutil.copyfile(src, dst)
    q, _, _ = count_weights(dst)
    desc = (f"int8 dynamic, {', '.join(ops) or 'no ops'}"
            + (", per-channel" if pc else ", per-tensor")
            + (f", Gather tables int8 per {'row' if granularity == 'row' else 'tensor'}"
               if granularity else "") + _suffix(base))
    params: dict[str, Any] = {"op_types": [*ops, *(["Gather"] if granularity else [])],
                              "per_channel": pc}
    if granularity:
        params["gather_tables"] = granularity
    params["base"] = reuse.report(dst, static=False)
    return Candidate(name, "int8-dynamic", dst, desc, quantized_weights=q, total_weights=total,
                     params=params)


__all__ = ["BASE_SUFFIX", "INT8_SCHEMES", "Base", "Reuse", "TensorQuant", "build_base_candidate",
           "channel_range", "check_base", "fit", "float_initializers", "read_quantization"]
