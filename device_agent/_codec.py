"""The tensor codec of the Open Inference Protocol: JSON tensors and the binary tensor
extension, both ways. Pure functions; a request the client got wrong raises
:class:`HttpError` with a 4xx status and a message saying what was expected."""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

_TO_NP = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_FROM_NP = {v.name: k for k, v in _TO_NP.items()}
_FROM_NP["str"] = "BYTES"
# Keyed by the dtype object: ``dtype.name`` costs microseconds per call on the hot path.
_FROM_DTYPE: dict[np.dtype[Any], str] = {v: k for k, v in _TO_NP.items()}
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_JSON = "application/json"


class HttpError(Exception):
    """A request error carrying the HTTP status it is answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _no_constants(name: str) -> Any:
    raise HttpError(400, f"JSON body contains {name}, which is not valid JSON; send finite "
                         "numbers (or use the binary tensor extension)")


def datatype_of(dtype: str) -> str:
    return _FROM_NP.get(dtype, dtype.upper())


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``int()`` also takes ``1_0``, ``+1``, `` 1`` and other scripts'
    digits, which a length header must not."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def decompress(encoding: str, body: bytes, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate), never inflating past ``limit`` bytes:
    a small bomb is refused with 413 before it takes the memory."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif enc == "deflate":
        # RFC 9110's deflate is the zlib format (what tritonclient sends); some clients
        # send a raw deflate stream, which has no zlib header.
        zlib_header = len(body) >= 2 and body[0] & 0x0F == 8 and \
            (body[0] << 8 | body[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
    else:
        raise HttpError(415, f"Content-Encoding {_short(encoding)} is not supported; send "
                             "gzip, deflate or an uncompressed body")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as err:
        raise HttpError(400, f"request body is not valid {enc} data ({err})") from None
    if len(out) > limit:
        raise HttpError(413, f"request body inflates past the limit of {limit} bytes "
                             "(http.max_body_bytes)")
    if not d.eof or d.unused_data:
        raise HttpError(400, f"request body is not one complete {enc} stream")
    return out


def split_body(headers: Mapping[str, str], body: bytes) -> tuple[Any, bytes]:
    hlen = headers.get("inference-header-content-length")
    blobs = b""
    if hlen is not None:
        if not is_decimal(hlen):
            raise HttpError(400, f"Inference-Header-Content-Length {_short(hlen)} is not a "
                                 "decimal integer")
        n = int(hlen)
        if not 0 <= n <= len(body):
            raise HttpError(400, f"Inference-Header-Content-Length {n} is outside the body "
                                 f"of {len(body)} bytes")
        body, blobs = body[:n], body[n:]
    if not body:
        raise HttpError(400, "empty request body; expected a JSON object with 'inputs'")
    try:
        request = json.loads(body, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise HttpError(400, "request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise HttpError(400, f"invalid JSON body: {err.msg} at line {err.lineno} column "
                             f"{err.colno}") from None
    except RecursionError:
        raise HttpError(400, "invalid JSON body: nested too deeply") from None
    return request, blobs


#: numpy's limit on dimensions; a deeper shape is a client error, never a 500.
MAX_DIMS = 64
#: Largest element count a shape may describe once zero dims are ignored (numpy refuses
#: more even for an empty array).
_MAX_ELEMENTS = 2**62


def check_shape(name: str, shape: Any) -> int:
    """Return the element count of a client's ``shape``; 400 unless numpy can hold it."""
    if not isinstance(shape, list) or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise HttpError(400, f"input '{name}': 'shape' must be a list of non-negative ints")
    if len(shape) > MAX_DIMS:
        raise HttpError(400, f"input '{name}': shape has {len(shape)} dims; at most "
                             f"{MAX_DIMS} are supported")
    if math.prod(d or 1 for d in shape) > _MAX_ELEMENTS:
        raise HttpError(400, f"input '{name}': shape {_short(shape)} is too large")
    return math.prod(shape)


def decode_tensor(name: str, model_dtype: str, item: Mapping[str, Any], blobs: bytes,
                  offset: int, allow_nan: bool) -> tuple[np.ndarray, int]:
    """Decode one entry of ``inputs`` (JSON ``data`` or its slice of ``blobs``); return the
    array and the number of binary bytes it used."""
    shape = item.get("shape")
    count = check_shape(name, shape)
    assert isinstance(shape, list)
    datatype = item.get("datatype")
    want = datatype_of(model_dtype)
    if datatype != want:
        raise HttpError(400, f"input '{name}': datatype {_short(datatype)} does not match "
                             f"the model, which expects {want}")
    iparams = item.get("parameters") or {}
    if not isinstance(iparams, dict):
        raise HttpError(400, f"input '{name}': 'parameters' must be an object")
    size = iparams.get("binary_data_size")
    used = 0
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(blobs):
            raise HttpError(400, f"input '{name}': binary_data_size {_short(size)} does not "
                                 f"fit the {len(blobs) - offset} binary byte(s) left")
        raw = blobs[offset:offset + size]
        used = size
        if want == "BYTES":
            arr = _unpack_bytes(name, raw, count)
        else:
            dt = _TO_NP[want]
            if size != count * dt.itemsize:
                raise HttpError(400, f"input '{name}': {size} binary bytes for shape "
                                     f"{_short(shape)} of {want} (expected "
                                     f"{count * dt.itemsize})")
            arr = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt, copy=False)
            if want == "BOOL" and arr.size and int(arr.view(np.uint8).max()) > 1:
                raise HttpError(400, f"input '{name}': binary BOOL bytes must be 0 or 1")
    else:
        if "data" not in item:
            raise HttpError(400, f"input '{name}': needs 'data' (or binary_data_size)")
        arr = _from_json(name, want, item["data"], shape, count)
    arr = arr.reshape(shape)
    if (not allow_nan and arr.dtype.kind == "f"
            and not np.isfinite(arr).all()):
        raise HttpError(400, f"input '{name}' contains NaN or Inf; this agent accepts "
                             "finite values only (http.allow_nan)")
    return arr, used


def encode_response(model_name: str, model_version: str, outputs: Mapping[str, np.ndarray],
                    binary_out: bool, wanted: list[tuple[str, bool]] | None,
                    req_id: Any) -> tuple[int, str, bytes, dict[str, str]]:
    order = wanted if wanted is not None else [(n, binary_out) for n in outputs]
    res_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in order:
        arr = np.asarray(outputs[name])
        dt = _FROM_DTYPE.get(arr.dtype, "BYTES" if arr.dtype.kind in "OUS" else None)
        if dt is None:
            raise HttpError(400, f"output '{name}' has dtype {arr.dtype} that KServe v2 "
                                 "cannot carry")
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            raw = _pack_bytes(arr) if dt == "BYTES" else \
                np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = ([_text(name, v) for v in arr.reshape(-1).tolist()]
                             if dt == "BYTES" else arr.reshape(-1).tolist())
        res_outputs.append(entry)
    res: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": res_outputs}
    if req_id is not None:
        res["id"] = req_id
    head = _ENCODER.encode(res).encode()
    if not blobs:
        return 200, _JSON, head, {}
    return 200, "application/octet-stream", head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head))}



_KIND_NAMES = {bool: "booleans", int: "integers", float: "floats", str: "strings",
               dict: "objects", list: "lists nested deeper than the shape",
               type(None): "nulls"}


def _from_json(name: str, want: str, data: Any, shape: list[int], count: int) -> np.ndarray:
    # Only exact types pass: numpy would silently turn [true, 1.5] into floats and a ragged
    # nesting into a flat list that happens to have the right length.
    flat = data if isinstance(data, list) else [data]
    types = set(map(type, flat))
    if list in types:
        level: list[Any] = [flat]
        for depth, dim in enumerate(shape):
            if not all(type(x) is list and len(x) == dim for x in level):
                raise HttpError(400, f"input '{name}': nested 'data' does not follow shape "
                                     f"{_short(shape)} at depth {depth}; nest it exactly "
                                     "as the shape, or send it flat")
            level = list(itertools.chain.from_iterable(level))
        flat = level
        types = set(map(type, flat))
    if len(flat) != count:
        raise HttpError(400, f"input '{name}': {len(flat)} value(s) in 'data' but 'shape' "
                             f"holds {count}")
    allowed: set[type]
    if want == "BOOL":
        allowed, what = {bool}, "true/false"
    elif want == "BYTES":
        allowed, what = {str}, "strings"
    elif _TO_NP[want].kind in "iu":
        allowed, what = {int}, "whole numbers"
    else:
        allowed, what = {int, float}, "numbers"
    bad = types - allowed
    if bad:
        got = ", ".join(sorted(_KIND_NAMES.get(t, t.__name__) for t in bad))
        raise HttpError(400, f"input '{name}': data must be {what} for {want}, got {got}")
    if want == "BYTES":
        try:
            "".join(flat).encode("utf-8")
        except UnicodeEncodeError as err:
            raise HttpError(400, f"input '{name}': BYTES data holds a lone surrogate "
                                 f"({err.object[err.start:err.end]!a}); strings must be "
                                 "valid Unicode") from None
        return np.array(flat, dtype=object).reshape(-1)
    dt = _TO_NP[want]
    if dt.kind in "iu" and flat:
        info = np.iinfo(dt)  # type: ignore[type-var]
        if min(flat) < info.min or max(flat) > info.max:
            raise HttpError(400, f"input '{name}': values outside the {want} range")
    try:
        return np.array(flat, dtype=dt if dt.kind in "biu" else np.float64).astype(
            dt, copy=False)
    except OverflowError:
        raise HttpError(400, f"input '{name}': a number is too large for {want}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unpack_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    items: list[str] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise HttpError(400, f"input '{name}': truncated BYTES element length")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if pos + n > len(raw):
            raise HttpError(400, f"input '{name}': BYTES element runs past the binary data")
        if len(items) == count:
            break
        try:
            # Strict: the runtime's string tensors are UTF-8 text, and a replaced byte
            # would reach the model (and come back) silently altered.
            items.append(raw[pos:pos + n].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise HttpError(400, f"input '{name}': BYTES element {len(items)} is not valid "
                                 f"UTF-8 (byte {err.start}); onnxruntime string tensors carry "
                                 "UTF-8 text only") from None
        pos += n
    if len(items) != count or pos != len(raw):
        got = f"more than {count}" if pos != len(raw) else str(len(items))
        raise HttpError(400, f"input '{name}': {got} BYTES element(s) for a shape holding "
                             f"{count}")
    return np.array(items, dtype=object).reshape(-1)


def _pack_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1).tolist():
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(len(b).to_bytes(4, "little") + b)
    return b"".join(parts)


def _text(name: str, v: Any) -> str:
    if not isinstance(v, bytes):
        return str(v)
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, f"output '{name}' holds bytes that are not UTF-8, which JSON "
                             "cannot carry; ask for it with binary_data") from None

