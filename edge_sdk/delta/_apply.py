"""Applying a delta on the device: streamed, verified, with memory bounded by one frame."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import zstandard

from ._errors import DeltaError
from ._format import FRAME_MAX_OUTPUT, PREAMBLE_BYTES, SHUFFLE_BLOCK, Frame, Header

_IO_BLOCK = 1 << 20


@dataclass(frozen=True)
class DeltaLimits:
    """What a device accepts in a delta. The defaults keep apply memory near 8 MiB at any
    model size, except for a generic (``prefix``) delta, which holds its base."""

    #: The JSON header's size; a model with a few thousand tensors needs ~200 KB.
    max_header_bytes: int = 2 << 20
    max_ops: int = 65536
    max_frames: int = 65536
    #: A generic delta decompresses against the whole base in memory: bigger bases are
    #: refused (and the full artifact fetched instead).
    max_prefix_base_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_ops", "max_frames", "max_prefix_base_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"DeltaLimits.{name} must be >= 1")


def read_header(delta: BinaryIO, limits: DeltaLimits | None = None) -> Header:
    """The checked header of the delta ``delta`` is positioned at the start of."""
    lim = limits or DeltaLimits()
    return Header.decode(delta.read(PREAMBLE_BYTES), delta.read,
                         max_header_bytes=lim.max_header_bytes, max_ops=lim.max_ops,
                         max_frames=lim.max_frames)


def apply_delta(delta: BinaryIO, base: BinaryIO, out: BinaryIO, *, base_sha256: str,
                target_sha256: str, target_length: int, limits: DeltaLimits | None = None,
                progress: Callable[[int], None] | None = None) -> None:
    """Rebuild the target from ``base`` and the delta read from ``delta``, writing it to
    ``out`` (positioned where the target starts) while hashing it.

    ``base_sha256`` is the sha256 of the base the caller holds (verified when it was
    installed); ``target_sha256`` and ``target_length`` are what signed metadata says
    the result must be. Raises :class:`DeltaError` when the delta names another base or
    target, is malformed, a frame does not match its hash, or the result is not the
    signed target; ``out`` then holds a partial result the caller discards.
    ``progress(n)`` is told the bytes written so far after every block.
    """
    lim = limits or DeltaLimits()
    h = read_header(delta, lim)
    if h.base_sha256 != base_sha256:
        raise DeltaError(f"delta is made against base sha256 {h.base_sha256[:16]}…, but the "
                         f"base here is {base_sha256[:16]}…")
    if h.target_sha256 != target_sha256 or h.target_length != target_length:
        raise DeltaError(f"delta rebuilds sha256 {h.target_sha256[:16]}… ({h.target_length} "
                         f"bytes), the signed target is {target_sha256[:16]}… "
                         f"({target_length} bytes)")
    base_length = base.seek(0, 2)
    if base_length != h.base_length:
        raise DeltaError(f"delta expects a base of {h.base_length} bytes, the base here has "
                         f"{base_length}")
    payload = _Payload(delta, h.frames, _decompressor(h, base, lim))
    digest = hashlib.sha256()
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        out.write(data)
        digest.update(data)
        written += len(data)
        if progress is not None:
            progress(written)

    for op in h.ops:
        for start in range(0, op.length, SHUFFLE_BLOCK):
            n = min(SHUFFLE_BLOCK, op.length - start)
            if op.kind == "literal":
                emit(payload.read(n))
                continue
            old = _read_at(base, op.base_offset + start, n)
            if op.kind == "copy":
                emit(old)
                continue
            diff = unshuffle(payload.read(n), op.itemsize)
            if op.kind == "xor":
                emit(np.bitwise_xor(np.frombuffer(old, np.uint8),
                                    np.frombuffer(diff, np.uint8)).tobytes())
            else:
                emit(add_zigzag(old, diff, op.itemsize))
    if delta.read(1):
        raise DeltaError("delta has bytes after its last frame")
    if written != target_length or digest.hexdigest() != target_sha256:
        raise DeltaError(f"delta rebuilt {written} bytes with sha256 {digest.hexdigest()[:16]}…"
                         f", not the signed target {target_sha256[:16]}…")


def shuffle(data: bytes, itemsize: int) -> bytes:
    """Byte planes of ``data``'s whole elements, then its tail (see the format notes)."""
    if itemsize == 1:
        return data
    whole = len(data) // itemsize * itemsize
    planes = np.frombuffer(data, np.uint8, whole).reshape(-1, itemsize).T
    return planes.tobytes() + data[whole:]


def unshuffle(data: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return data
    whole = len(data) // itemsize * itemsize
    elems: bytes = np.frombuffer(data, np.uint8, whole).reshape(itemsize, -1).T.tobytes()
    return elems + data[whole:] if whole < len(data) else elems


def _uint(itemsize: int) -> np.dtype[Any]:
    return np.dtype(f"<u{itemsize}")


def sub_zigzag(old: bytes, new: bytes, itemsize: int) -> bytes:
    """``new - old`` per element (mod 2**bits), zigzag-encoded (see the format notes)."""
    dt = _uint(itemsize)
    d = np.frombuffer(new, dt) - np.frombuffer(old, dt)
    top = np.array(8 * itemsize - 1, dt)
    return bytes(((d << np.array(1, dt)) ^ (np.array(0, dt) - (d >> top))).tobytes())


def add_zigzag(old: bytes, diff: bytes, itemsize: int) -> bytes:
    """The inverse of :func:`sub_zigzag`: ``old`` plus the decoded differences (in place,
    so that a block needs two arrays of its size, not six)."""
    dt = _uint(itemsize)
    z = np.frombuffer(diff, dt).copy()
    sign = z & np.array(1, dt)
    z >>= np.array(1, dt)
    np.negative(sign, out=sign)
    z ^= sign
    del sign
    z += np.frombuffer(old, dt)
    out: bytes = z.tobytes()
    return out


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise DeltaError(f"the base ended at byte {offset + len(data)}, the delta reads to "
                         f"{offset + n}")
    return data


def _decompressor(h: Header, base: BinaryIO, lim: DeltaLimits) -> zstandard.ZstdDecompressor:
    if not h.prefix:
        return zstandard.ZstdDecompressor()
    if h.base_length > lim.max_prefix_base_bytes:
        raise DeltaError(f"a generic delta needs its {h.base_length}-byte base in memory, over "
                         f"the limit of {lim.max_prefix_base_bytes} "
                         "(DeltaLimits.max_prefix_base_bytes)")
    d = zstandard.ZstdCompressionDict(_read_at(base, 0, h.base_length),
                                      dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=d, max_window_size=1 << 31)


class _Payload:
    """The frames' outputs as one stream, one frame in memory at a time."""

    def __init__(self, delta: BinaryIO, frames: tuple[Frame, ...],
                 dctx: zstandard.ZstdDecompressor) -> None:
        self._delta = delta
        self._frames = iter(frames)
        self._dctx = dctx
        self._buf = b""
        self._pos = 0
        self._index = -1

    def read(self, n: int) -> bytes:
        parts = []
        while n:
            if self._pos == len(self._buf):
                self._next()
            take = self._buf[self._pos:self._pos + n]
            self._pos += len(take)
            n -= len(take)
            parts.append(take)
        return b"".join(parts)

    def _next(self) -> None:
        frame = next(self._frames, None)
        self._index += 1
        if frame is None:  # the header checks sums; a bug, or a header/ops mismatch
            raise DeltaError("delta ops read past the last frame")
        data = self._delta.read(frame.compressed)
        if len(data) != frame.compressed:
            raise DeltaError(f"delta is truncated in frame {self._index}")
        if hashlib.sha256(data).hexdigest() != frame.sha256:
            raise DeltaError(f"delta frame {self._index} does not match its sha256")
        try:
            # A frame that names its size is decompressed to that size whatever the
            # limit says, so the size is checked first.
            size = zstandard.frame_content_size(data)
            if size not in (-1, frame.output):
                raise DeltaError(f"delta frame {self._index} says it holds {size} bytes, its "
                                 f"header says {frame.output}")
            out = self._dctx.decompress(data, max_output_size=FRAME_MAX_OUTPUT)
        except zstandard.ZstdError as err:
            raise DeltaError(f"delta frame {self._index} does not decompress: {err}") from None
        if len(out) != frame.output:
            raise DeltaError(f"delta frame {self._index} holds {len(out)} bytes, its header "
                             f"says {frame.output}")
        self._buf, self._pos = out, 0
