"""Wire format of the chunk protocol (request on ``dev/{id}/repo/req``, answer on
``dev/{id}/repo/res``).

A request is a small JSON object, published by a device on its own request topic::

    {"v": 1, "id": "<32 hex: correlation id>",
     "path": "metadata/timestamp.json" | "targets/<name>/<version>/<hash>.<file>",
     "off": <byte offset, 0..MAX_OFFSET>, "len": <bytes per chunk, 1..MAX_CHUNK>,
     "n": <optional: consecutive chunks wanted, 1..MAX_BATCH>,
     "rto": <optional: the device's retransmit timeout in ms, 1..MAX_RTO_MS>}

There is no device field: who asks is the request topic's device level, which
the broker's ACL ties to the client's credentials (an old ``"dev"`` key is
ignored). The responder answers each chunk with its own message (same
correlation id, its own offset), so one small request brings up to ``n`` chunks.
``rto`` says how long the device waits for an answer before it may ask again: a
request for a chunk the responder sent less than that long ago is a premature
retry, and the responder drops it (the first answer is still on its way).

A response is a fixed 42-byte binary header followed by the bytes::

    magic "EDC1" | status u8 | reserved u8 | correlation id 16 bytes |
    offset u64 | total file size u64 | payload length u32 | payload

Status ``OK`` carries file bytes ``[offset, offset + payload length)``; the
other statuses carry a UTF-8 reason. ``BAD_REQUEST`` answers a request that
is malformed or out of range (an offset past the end of the file, say).
``SLOW_DOWN`` means the device is over its rate or in-flight budget: the
chunks of that request from ``offset`` on were not sent, and ``total`` holds
the milliseconds to wait before asking for them again. Header + payload +
topic stay under 128 KiB (AWS IoT Core's limit), so :data:`MAX_CHUNK` leaves
1 KiB of room. Integrity does not rest on this layer: every byte is checked
against signed TUF metadata once a file is complete.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard

from .._json import MESSAGE_MAX_BYTES, loads_bounded
from ..errors import TransportError

MAGIC = b"EDC1"
HEADER = struct.Struct(">4sBB16sQQI")
MESSAGE_LIMIT = 128 * 1024
MAX_CHUNK = MESSAGE_LIMIT - 1024
#: The largest chunk a device asks for by default (``FetchConfig.chunk_size``): the
#: largest there is. The pace picks smaller ones on slow links; on fast ones every
#: message costs about the same CPU on both ends whatever its size, so fewer, larger
#: ones carry more (loopback: 0.67x of a raw paho loop at 64 KiB, about 1x here).
DEFAULT_CHUNK = MAX_CHUNK
MAX_BATCH = 64
MAX_RTO_MS = 600_000
#: The largest offset a request may name: every JSON parser reads it exactly, and
#: offset + MAX_BATCH * MAX_CHUNK still fits the response's u64 (and an off_t).
MAX_OFFSET = 2**53 - 1

OK = 0
NOT_FOUND = 1
BAD_REQUEST = 2
SERVER_ERROR = 3
SLOW_DOWN = 4

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_PATH = re.compile(r"^([a-z]{1,16})/[A-Za-z0-9._/-]{1,400}$")
#: The first path level of a release repository's files (what a responder serves).
REPO_ROOTS = ("metadata", "targets")


class ChunkRequestError(TransportError):
    """A request the responder refuses; ``corr`` is its correlation id (zeros if unreadable)."""

    def __init__(self, message: str, corr: bytes = bytes(16)) -> None:
        super().__init__(message)
        self.corr = corr


@dataclass(frozen=True)
class ChunkRequest:
    corr: bytes
    path: str
    offset: int
    length: int
    count: int = 1
    rto_ms: int | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": 1, "id": self.corr.hex(), "path": self.path,
                                "off": self.offset, "len": self.length}
        if self.count != 1:
            data["n"] = self.count
        if self.rto_ms is not None:
            data["rto"] = self.rto_ms
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes, *, roots: tuple[str, ...] = REPO_ROOTS) -> ChunkRequest:
        """Parse and validate a request; raise :class:`TransportError` for anything odd
        (a :class:`ChunkRequestError` carrying the correlation id once that is known).
        ``roots``: the first path levels this side serves (a device's sample bundles are
        ``samples/ID``)."""
        try:
            # A request is one flat object: depth 1 is all it may have.
            data: Any = loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=1)
        except ValueError as err:
            raise TransportError(f"chunk request refused: {err}") from err
        if not isinstance(data, dict) or data.get("v") != 1:
            raise TransportError("chunk request: expected a version 1 JSON object")
        corr, path = data.get("id"), data.get("path")
        off, length = data.get("off"), data.get("len")
        if not isinstance(corr, str) or not _HEX32.fullmatch(corr):
            raise ChunkRequestError("chunk request: 'id' must be 32 hex digits")
        cid = bytes.fromhex(corr)
        if not isinstance(path, str) or not is_safe_path(path, roots):
            raise ChunkRequestError(
                f"chunk request: path {str(path)[:80]!r} is not a file served here", cid)
        if not _is_int(off) or not 0 <= off <= MAX_OFFSET:
            raise ChunkRequestError(
                f"chunk request: offset {_short(off)} must be an integer 0..{MAX_OFFSET}", cid)
        if not _is_int(length) or not 0 < length <= MAX_CHUNK:
            raise ChunkRequestError(
                f"chunk request: length {_short(length)} must be an integer 1..{MAX_CHUNK}",
                cid)
        count = data.get("n", 1)
        if not _is_int(count) or not 1 <= count <= MAX_BATCH:
            raise ChunkRequestError(
                f"chunk request: 'n' {_short(count)} must be an integer 1..{MAX_BATCH}", cid)
        rto = data.get("rto")
        if rto is not None and (not _is_int(rto) or not 1 <= rto <= MAX_RTO_MS):
            raise ChunkRequestError(
                f"chunk request: 'rto' {_short(rto)} must be an integer 1..{MAX_RTO_MS} ms", cid)
        return cls(cid, path, off, length, count, rto)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    # A reason goes back over MQTT: never echo a huge number or string in full.
    if _is_int(value) and value.bit_length() > 72:
        return f"<{value.bit_length()}-bit integer>"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}..."


def is_safe_path(path: str, roots: tuple[str, ...] = REPO_ROOTS) -> bool:
    """True for paths under one of ``roots`` (``metadata/...`` or ``targets/...``) with
    no ``..`` or empty parts."""
    m = _PATH.fullmatch(path)
    if m is None or m.group(1) not in roots:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass(frozen=True)
class ChunkResponse:
    #: The statuses, for code outside this module (a device answering for its bundles).
    OK: ClassVar[int] = OK
    NOT_FOUND: ClassVar[int] = NOT_FOUND
    BAD_REQUEST: ClassVar[int] = BAD_REQUEST
    SLOW_DOWN: ClassVar[int] = SLOW_DOWN

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
