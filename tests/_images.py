"""Image files for the answer tests: PNG/JPEG of an array, and a PNG bomb whose header
declares more pixels than any limit while its pixel data is not decodable at all (so
that an answer naming the size proves the size was checked before decoding)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def save(path: Path, img: np.ndarray) -> Path:
    path.write_bytes(encode(img, "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"))
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int = 100, height: int = 100_000) -> bytes:
    """A PNG header declaring ``width`` x ``height`` RGB pixels, followed by an IDAT that
    is not zlib data: decoding it fails, reading its header does not."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"not zlib")
            + _chunk(b"IEND", b""))


#: An 8x8 RGB PNG, written out so that a process without Pillow can send one.
PNG_8X8 = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + bytes(range(24))
                                                    for _ in range(8))))
           + _chunk(b"IEND", b""))
