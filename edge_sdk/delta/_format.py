"""The delta file: a bounded header, then zstd frames.

::

    offset  size  field
    0       8     magic b"EDGEDLTA"
    8       4     format version (u32 little-endian), 1
    12      4     header length H (u32 little-endian), at most DeltaLimits.max_header_bytes
    16      H     header: UTF-8 JSON (below)
    16+H    ...   the frames, back to back, in the order the header lists them

The header::

    {"base":   {"sha256": HEX, "length": N},
     "target": {"sha256": HEX, "length": N},
     "prefix": false,
     "ops":    [[KIND, BASE_OFFSET, LENGTH, ITEMSIZE], ...],
     "frames": [[COMPRESSED_BYTES, OUTPUT_BYTES, SHA256_OF_COMPRESSED], ...]}

The ops write the target file from its first byte to its last, in order:

- ``copy``: the target's next LENGTH bytes are the base's bytes at BASE_OFFSET.
- ``literal``: the next LENGTH bytes of the payload.
- ``xor``: the base's LENGTH bytes at BASE_OFFSET, XORed with the next LENGTH bytes of
  the payload.
- ``sub``: the base's LENGTH bytes at BASE_OFFSET read as little-endian unsigned
  integers of ITEMSIZE bytes (LENGTH a multiple of it), each plus the next payload
  element, zigzag-decoded (0, -1, 1, -2, ... are sent as 0, 1, 2, 3, ...), modulo
  2**(8*ITEMSIZE). An int8 weight that moved by one step costs a 1 or a 2; a float32
  weight that moved a little keeps its sign, exponent and high mantissa bits, so the
  difference of its bit patterns is a small integer. Unlike XOR, a carry does not
  scatter set bits.

``xor`` and ``sub`` payloads are byte-shuffled per block of :data:`SHUFFLE_BLOCK` bytes
with ITEMSIZE: the first byte of every element, then every second byte, and so on (the
bytes after the last whole element of a block stay in place), so that the mostly-zero
high bytes of the differences sit together for zstd.

The payload is the concatenation of the frames' outputs: independent zstd frames of
at most :data:`FRAME_MAX_OUTPUT` bytes each, every one named with its compressed size,
its output size and the sha256 of its compressed bytes (checked before it is
decompressed). ``prefix`` true means the frames were compressed with the whole base
as a zstd raw-content dictionary: the generic binary delta for files whose tensors
could not be mapped; applying it holds the base in memory.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from .._json import UnsafeJsonError, loads_bounded
from ._errors import DeltaError

MAGIC = b"EDGEDLTA"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sII")
#: Bytes before the header.
PREAMBLE_BYTES = _FIXED.size
#: A frame's output never exceeds this: the payload reader holds one frame at a time.
FRAME_MAX_OUTPUT = 1 << 20
#: zstd's worst case for an incompressible frame is a little over its input.
FRAME_MAX_COMPRESSED = FRAME_MAX_OUTPUT + (64 << 10)
#: Byte-shuffle block of ``xor`` and ``sub`` payloads (a multiple of every item size).
SHUFFLE_BLOCK = 1 << 20
OP_KINDS = ("copy", "literal", "xor", "sub")
ITEMSIZES = (1, 2, 4, 8)
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Op:
    kind: str
    base_offset: int
    length: int
    itemsize: int = 1

    def to_json(self) -> list[Any]:
        return [self.kind, self.base_offset, self.length, self.itemsize]


@dataclass(frozen=True)
class Frame:
    compressed: int
    output: int
    sha256: str

    def to_json(self) -> list[Any]:
        return [self.compressed, self.output, self.sha256]


@dataclass(frozen=True)
class Header:
    base_sha256: str
    base_length: int
    target_sha256: str
    target_length: int
    ops: tuple[Op, ...]
    frames: tuple[Frame, ...]
    prefix: bool = False

    @property
    def payload_bytes(self) -> int:
        return sum(f.output for f in self.frames)

    @property
    def frames_bytes(self) -> int:
        return sum(f.compressed for f in self.frames)

    def encode(self) -> bytes:
        import json

        doc = {"base": {"sha256": self.base_sha256, "length": self.base_length},
               "target": {"sha256": self.target_sha256, "length": self.target_length},
               "prefix": self.prefix, "ops": [o.to_json() for o in self.ops],
               "frames": [f.to_json() for f in self.frames]}
        body = json.dumps(doc, separators=(",", ":")).encode()
        return _FIXED.pack(MAGIC, FORMAT_VERSION, len(body)) + body

    @classmethod
    def decode(cls, preamble: bytes, read: Any, *, max_header_bytes: int, max_ops: int,
               max_frames: int) -> Header:
        """Parse a header: ``preamble`` is the first :data:`PREAMBLE_BYTES` bytes and
        ``read(n)`` returns the next ``n``. Every field is checked, so that applying
        needs no further validation beyond the frames' hashes."""
        if len(preamble) != PREAMBLE_BYTES:
            raise DeltaError(f"delta is {len(preamble)} bytes long, shorter than its preamble")
        magic, version, hlen = _FIXED.unpack(preamble)
        if magic != MAGIC:
            raise DeltaError("not an edge-sdk delta (bad magic)")
        if version != FORMAT_VERSION:
            raise DeltaError(f"delta format {version} is not supported (this agent reads "
                             f"format {FORMAT_VERSION})")
        if hlen > max_header_bytes:
            raise DeltaError(f"delta header is {hlen} bytes, over the limit of "
                             f"{max_header_bytes}")
        body = read(hlen)
        if len(body) != hlen:
            raise DeltaError("delta is truncated inside its header")
        try:
            doc = loads_bounded(body, max_bytes=max_header_bytes, max_depth=4)
        except UnsafeJsonError as err:
            raise DeltaError(f"delta header: {err}") from None
        return cls._from_doc(doc, max_ops=max_ops, max_frames=max_frames)

    @classmethod
    def _from_doc(cls, doc: Any, *, max_ops: int, max_frames: int) -> Header:
        if not isinstance(doc, dict):
            raise DeltaError("delta header is not a JSON object")
        base, target = (_side(doc.get(k), k) for k in ("base", "target"))
        prefix = doc.get("prefix", False)
        ops_doc, frames_doc = doc.get("ops"), doc.get("frames")
        if not isinstance(prefix, bool) or not isinstance(ops_doc, list) or \
                not isinstance(frames_doc, list):
            raise DeltaError("delta header needs 'prefix' (bool), 'ops' and 'frames' (lists)")
        if len(ops_doc) > max_ops or len(frames_doc) > max_frames:
            raise DeltaError(f"delta header lists {len(ops_doc)} ops and {len(frames_doc)} "
                             f"frames, over the limits of {max_ops} and {max_frames}")
        ops = tuple(_op(o, base[1]) for o in ops_doc)
        frames = tuple(_frame(f) for f in frames_doc)
        written = sum(o.length for o in ops)
        if written != target[1]:
            raise DeltaError(f"delta ops write {written} bytes, the target is {target[1]}")
        consumed = sum(o.length for o in ops if o.kind != "copy")
        produced = sum(f.output for f in frames)
        if consumed != produced:
            raise DeltaError(f"delta ops read {consumed} payload bytes, its frames hold "
                             f"{produced}")
        return cls(base[0], base[1], target[0], target[1], ops, frames, prefix)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48


def _side(v: Any, key: str) -> tuple[str, int]:
    if not isinstance(v, dict) or not isinstance(v.get("sha256"), str) or \
            not _HEX64.fullmatch(v["sha256"]) or not _is_count(v.get("length")):
        raise DeltaError(f"delta header '{key}' needs a hex sha256 and a length")
    return v["sha256"], int(v["length"])


def _op(v: Any, base_length: int) -> Op:
    if not (isinstance(v, list) and len(v) == 4 and v[0] in OP_KINDS and
            all(_is_count(x) for x in v[1:]) and v[3] in ITEMSIZES and v[2] > 0):
        raise DeltaError(f"delta op {str(v)[:60]} is not [kind, base_offset, length, itemsize]")
    op = Op(v[0], v[1], v[2], v[3])
    if op.kind == "sub" and op.length % op.itemsize:
        raise DeltaError(f"delta sub op of {op.length} bytes is not whole {op.itemsize}-byte "
                         "items")
    if op.kind != "literal" and op.base_offset + op.length > base_length:
        raise DeltaError(f"delta op reads base bytes {op.base_offset}..{op.base_offset + op.length}"
                         f" past the base's {base_length}")
    return op


def _frame(v: Any) -> Frame:
    if not (isinstance(v, list) and len(v) == 3 and _is_count(v[0]) and _is_count(v[1]) and
            isinstance(v[2], str) and _HEX64.fullmatch(v[2]) and
            0 < v[1] <= FRAME_MAX_OUTPUT and 0 < v[0] <= FRAME_MAX_COMPRESSED):
        raise DeltaError(f"delta frame {str(v)[:60]} is not [compressed, output <= "
                         f"{FRAME_MAX_OUTPUT}, sha256]")
    return Frame(v[0], v[1], v[2])
