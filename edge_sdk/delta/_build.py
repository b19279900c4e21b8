"""Building a delta on the host: tensor by tensor where the model format is known."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import zstandard

from ._apply import DeltaLimits, apply_delta, shuffle, sub_zigzag
from ._errors import DeltaError
from ._format import FRAME_MAX_OUTPUT, SHUFFLE_BLOCK, Frame, Header, Op
from ._tensors import tensor_ranges


@dataclass(frozen=True)
class DeltaConfig:
    """How the host builds deltas."""

    #: Publish no delta bigger than this fraction of the full artifact: past it, a delta
    #: saves too little to be worth a second code path on the device.
    max_ratio: float = 0.6
    #: zstd level of the frames (19: the host spends seconds so that devices save bytes).
    level: int = 19
    #: Output bytes per frame (at most 1 MiB, the device's bound).
    frame_bytes: int = FRAME_MAX_OUTPUT
    #: A generic delta (no tensor found) holds its base in memory on the device: none is
    #: built against a bigger base. Matches :attr:`DeltaLimits.max_prefix_base_bytes`.
    max_prefix_base_bytes: int = DeltaLimits().max_prefix_base_bytes

    def __post_init__(self) -> None:
        if not 0 < self.max_ratio <= 1:
            raise ValueError("DeltaConfig.max_ratio must be in (0, 1]")
        if not 1 <= self.level <= 22:
            raise ValueError("DeltaConfig.level must be 1..22")
        if not 4096 <= self.frame_bytes <= FRAME_MAX_OUTPUT:
            raise ValueError(f"DeltaConfig.frame_bytes must be 4096..{FRAME_MAX_OUTPUT}")


@dataclass(frozen=True)
class Delta:
    """A built delta: its bytes and what it does."""

    data: bytes
    #: "tensor" (tensors mapped to byte ranges) or "generic" (zstd with the base as prefix).
    method: str
    target_length: int
    #: Target bytes copied from the base, sent as differences from it, and sent as they are.
    copied: int
    diffed: int
    literal: int

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def ratio(self) -> float:
        """Delta bytes over full artifact bytes."""
        return self.size / max(1, self.target_length)


def build_delta(base: bytes, target: bytes, *, fmt: str | None,
                config: DeltaConfig | None = None) -> Delta | None:
    """The delta that rebuilds ``target`` from ``base`` (model files of format ``fmt``:
    "onnx", "ort", "tflite"; None for any other file), checked by applying it.

    Tensors found in both files under the same name and length are copied when equal
    and sent as element-wise differences when not; the bytes between them travel
    compressed. When no tensor matches, a generic delta is built instead, unless the
    base is too big for the device to hold (then None).
    """
    cfg = config or DeltaConfig()
    ops = _tensor_ops(base, target, fmt)
    if ops is not None:
        delta = _encode(base, target, ops, cfg, prefix=False)
    elif len(base) <= cfg.max_prefix_base_bytes:
        delta = _encode(base, target, [Op("literal", 0, len(target))] if target else [], cfg,
                        prefix=True)
    else:
        return None
    _check(base, target, delta)
    return delta


def _tensor_ops(base: bytes, target: bytes, fmt: str | None) -> list[Op] | None:
    if fmt is None:
        return None
    by_name = {r.name: r for r in tensor_ranges(base, fmt)}
    ops: list[Op] = []
    matched = False
    pos = 0
    for r in tensor_ranges(target, fmt):
        b = by_name.get(r.name)
        if b is None or b.length != r.length or r.offset < pos:
            continue
        if r.offset > pos:
            ops.append(Op("literal", 0, r.offset - pos))
        same = base[b.offset:b.offset + b.length] == target[r.offset:r.offset + r.length]
        kind = "copy" if same else "sub" if r.length % r.itemsize == 0 else "xor"
        ops.append(Op(kind, b.offset, r.length, r.itemsize if kind == "sub" else 1))
        matched = True
        pos = r.offset + r.length
    if not matched:
        return None
    if pos < len(target):
        ops.append(Op("literal", 0, len(target) - pos))
    return _merge(ops)


def _merge(ops: list[Op]) -> list[Op]:
    """Join neighbours that read contiguous bytes the same way (fewer, longer ops)."""
    out: list[Op] = []
    for op in ops:
        last = out[-1] if out else None
        if last is not None and last.kind == op.kind and (
                op.kind == "literal" or
                (op.kind == "copy" and last.base_offset + last.length == op.base_offset)):
            out[-1] = Op(op.kind, last.base_offset, last.length + op.length, 1)
        else:
            out.append(op)
    return out


def _encode(base: bytes, target: bytes, ops: list[Op], cfg: DeltaConfig, *,
            prefix: bool) -> Delta:
    payload = bytearray()
    pos = 0
    counts = {"copy": 0, "diff": 0, "literal": 0}
    for op in ops:
        new = target[pos:pos + op.length]
        counts["diff" if op.kind in ("xor", "sub") else op.kind] += op.length
        if op.kind == "literal":
            payload += new
        elif op.kind in ("xor", "sub"):
            old = base[op.base_offset:op.base_offset + op.length]
            diff = sub_zigzag(old, new, op.itemsize) if op.kind == "sub" else np.bitwise_xor(
                np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)).tobytes()
            for start in range(0, op.length, SHUFFLE_BLOCK):
                payload += shuffle(diff[start:start + SHUFFLE_BLOCK], op.itemsize)
        pos += op.length
    if prefix:
        params = zstandard.ZstdCompressionParameters.from_level(
            cfg.level, window_log=max(20, min(31, (len(base) + cfg.frame_bytes).bit_length())))
        cctx = zstandard.ZstdCompressor(
            dict_data=zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
            compression_params=params)
    else:
        cctx = zstandard.ZstdCompressor(level=cfg.level)
    frames, blobs = [], []
    for start in range(0, len(payload), cfg.frame_bytes):
        chunk = bytes(payload[start:start + cfg.frame_bytes])
        blob = cctx.compress(chunk)
        frames.append(Frame(len(blob), len(chunk), hashlib.sha256(blob).hexdigest()))
        blobs.append(blob)
    header = Header(hashlib.sha256(base).hexdigest(), len(base),
                    hashlib.sha256(target).hexdigest(), len(target), tuple(ops), tuple(frames),
                    prefix)
    return Delta(header.encode() + b"".join(blobs), "generic" if prefix else "tensor",
                 len(target), counts["copy"], counts["diff"], counts["literal"])


def _check(base: bytes, target: bytes, delta: Delta) -> None:
    """Apply the delta as a device would; a delta that does not rebuild its target is a bug
    here, and must never be published."""
    out = io.BytesIO()
    try:
        apply_delta(io.BytesIO(delta.data), io.BytesIO(base), out,
                    base_sha256=hashlib.sha256(base).hexdigest(),
                    target_sha256=hashlib.sha256(target).hexdigest(),
                    target_length=len(target),
                    limits=DeltaLimits(max_prefix_base_bytes=max(1, len(base))))
    except DeltaError as err:
        raise DeltaError(f"the delta built does not apply: {err}") from err
    if out.getvalue() != target:
        raise DeltaError("the delta built does not rebuild its target")
