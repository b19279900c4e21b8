"""Wire format of the chunk protocol (request on ``repo/req``, answer on ``dev/{id}/repo/res``).

A request is a small JSON object::

    {"v": 1, "id": "<32 hex: correlation id>", "dev": "<device id>",
     "path": "metadata/timestamp.json" | "targets/<name>/<version>/<hash>.<file>",
     "off": <byte offset>, "len": <bytes per chunk, <= MAX_CHUNK>,
     "n": <optional: consecutive chunks wanted, 1..MAX_BATCH>}

The responder answers each chunk with its own message (same correlation id,
its own offset), so one small request brings up to ``n`` chunks.

A response is a fixed 42-byte binary header followed by the bytes::

    magic "EDC1" | status u8 | reserved u8 | correlation id 16 bytes |
    offset u64 | total file size u64 | payload length u32 | payload

Status ``OK`` carries file bytes ``[offset, offset + payload length)``; the
other statuses carry a UTF-8 reason. Header + payload + topic stay under
128 KiB (AWS IoT Core's limit), so :data:`MAX_CHUNK` leaves 1 KiB of room.
Integrity does not rest on this layer: every byte is checked against signed
TUF metadata once a file is complete.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import TransportError

MAGIC = b"EDC1"
HEADER = struct.Struct(">4sBB16sQQI")
MESSAGE_LIMIT = 128 * 1024
MAX_CHUNK = MESSAGE_LIMIT - 1024
DEFAULT_CHUNK = 64 * 1024
MAX_BATCH = 64

OK = 0
NOT_FOUND = 1
BAD_REQUEST = 2
SERVER_ERROR = 3

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_PATH = re.compile(r"^(metadata|targets)/[A-Za-z0-9._/-]{1,400}$")


@dataclass(frozen=True)
class ChunkRequest:
    corr: bytes
    device: str
    path: str
    offset: int
    length: int
    count: int = 1

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": 1, "id": self.corr.hex(), "dev": self.device,
                                "path": self.path, "off": self.offset, "len": self.length}
        if self.count != 1:
            data["n"] = self.count
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> ChunkRequest:
        """Parse and validate a request; raise :class:`TransportError` for anything odd."""
        try:
            data: Any = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as err:
            raise TransportError(f"chunk request is not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("v") != 1:
            raise TransportError("chunk request: expected a version 1 JSON object")
        corr, dev, path = data.get("id"), data.get("dev"), data.get("path")
        off, length = data.get("off"), data.get("len")
        if not isinstance(corr, str) or not _HEX32.match(corr):
            raise TransportError("chunk request: 'id' must be 32 hex digits")
        if not isinstance(dev, str) or not dev:
            raise TransportError("chunk request: 'dev' must be a device id")
        if not isinstance(path, str) or not is_safe_path(path):
            raise TransportError(f"chunk request: path {path!r} is not a repository file")
        if (not isinstance(off, int) or isinstance(off, bool) or off < 0
                or not isinstance(length, int) or isinstance(length, bool)
                or not 0 < length <= MAX_CHUNK):
            raise TransportError(
                f"chunk request: offset must be >= 0 and length 1..{MAX_CHUNK}")
        count = data.get("n", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BATCH:
            raise TransportError(f"chunk request: 'n' must be 1..{MAX_BATCH}")
        return cls(bytes.fromhex(corr), dev, path, off, length, count)


def is_safe_path(path: str) -> bool:
    """True for ``metadata/...`` or ``targets/...`` paths with no ``..`` or empty parts."""
    if not _PATH.match(path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass(frozen=True)
class ChunkResponse:
    status: int
    corr: bytes
    offset: int
    total: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.status, 0, self.corr, self.offset, self.total,
                           len(self.payload)) + self.payload

    @classmethod
    def decode(cls, message: bytes) -> ChunkResponse:
        if len(message) < HEADER.size:
            raise TransportError(f"chunk response too short ({len(message)} bytes)")
        magic, status, _, corr, offset, total, n = HEADER.unpack_from(message)
        if magic != MAGIC:
            raise TransportError("chunk response has a wrong magic number")
        payload = message[HEADER.size:]
        if len(payload) != n:
            raise TransportError(
                f"chunk response declares {n} payload bytes but carries {len(payload)}")
        return cls(status, corr, offset, total, payload)

    @property
    def reason(self) -> str:
        return self.payload.decode("utf-8", "replace")
