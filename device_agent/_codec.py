"""The tensor codec of the Open Inference Protocol: JSON tensors and the binary tensor
extension, both ways. Pure functions; a request the client got wrong raises
:class:`HttpError` with a 4xx status and a message saying what was expected."""

from __future__ import annotations

import json
import math
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


def split_body(headers: Mapping[str, str], body: bytes) -> tuple[Any, bytes]:
    hlen = headers.get("inference-header-content-length")
    blobs = b""
    if hlen is not None:
        try:
            n = int(hlen)
        except ValueError:
            raise HttpError(400, f"Inference-Header-Content-Length {hlen!r} is not an "
                                 "integer") from None
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


def decode_tensor(name: str, model_dtype: str, item: Mapping[str, Any], blobs: bytes,
            offset: int, allow_nan: bool) -> tuple[np.ndarray, int]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HttpError(400, f"input '{name}': 'shape' must be a list of non-negative ints")
    datatype = item.get("datatype")
    want = datatype_of(model_dtype)
    if datatype != want:
        raise HttpError(400, f"input '{name}': datatype {datatype!r} does not match the "
                             f"model, which expects {want}")
    count = math.prod(shape)
    iparams = item.get("parameters") or {}
    if not isinstance(iparams, dict):
        raise HttpError(400, f"input '{name}': 'parameters' must be an object")
    size = iparams.get("binary_data_size")
    used = 0
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(blobs):
            raise HttpError(400, f"input '{name}': binary_data_size {size!r} does not fit "
                                 f"the {len(blobs) - offset} binary byte(s) left")
        raw = blobs[offset:offset + size]
        used = size
        if want == "BYTES":
            arr = _unpack_bytes(name, raw, count)
        else:
            dt = _TO_NP[want]
            if size != count * dt.itemsize:
                raise HttpError(400, f"input '{name}': {size} binary bytes for shape {shape} "
                                     f"of {want} (expected {count * dt.itemsize})")
            arr = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt, copy=False)
        arr = arr.reshape(shape)
    else:
        if "data" not in item:
            raise HttpError(400, f"input '{name}': needs 'data' (or binary_data_size)")
        arr = _from_json(name, want, item["data"], count)
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
            entry["data"] = ([_text(v) for v in arr.reshape(-1).tolist()]
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



def _from_json(name: str, want: str, data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if want == "BYTES":
        flat = _flatten(name, data)
        if not all(isinstance(v, str) for v in flat):
            raise HttpError(400, f"input '{name}': BYTES data must be strings")
        arr = np.array(flat, dtype=object)
    else:
        try:
            arr = np.array(data)
        except ValueError:
            arr = np.array(_flatten(name, data))
        if arr.dtype == object:
            arr = np.array(_flatten(name, data))
        kind = arr.dtype.kind
        dt = _TO_NP[want]
        if arr.size and kind not in ("b" if want == "BOOL" else "iu" if dt.kind in "iu"
                                     else "iuf"):
            raise HttpError(400, f"input '{name}': data must be "
                                 f"{'true/false' if want == 'BOOL' else 'numbers'} for {want}, "
                                 f"got {_kind_name(kind)}")
        if dt.kind in "iu" and arr.size:
            info = np.iinfo(dt)  # type: ignore[type-var]
            if int(arr.min()) < info.min or int(arr.max()) > info.max:
                raise HttpError(400, f"input '{name}': values outside the {want} range")
        arr = arr.astype(dt).reshape(-1)
    if arr.size != count:
        raise HttpError(400, f"input '{name}': {arr.size} value(s) in 'data' but 'shape' "
                             f"holds {count}")
    return arr


def _flatten(name: str, data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            if isinstance(v, dict) or v is None:
                raise HttpError(400, f"input '{name}': 'data' must hold only numbers "
                                     "(or nested lists of them)")
            out.append(v)
        else:
            stack.pop()
    return out


def _kind_name(kind: str) -> str:
    return {"f": "floats", "b": "booleans", "U": "strings", "O": "mixed values",
            "i": "integers", "u": "integers"}.get(kind, kind)


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
        items.append(raw[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    if len(items) != count:
        raise HttpError(400, f"input '{name}': {len(items)} BYTES element(s) for a shape "
                             f"holding {count}")
    return np.array(items, dtype=object)


def _pack_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1).tolist():
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(len(b).to_bytes(4, "little") + b)
    return b"".join(parts)


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)

