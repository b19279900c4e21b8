"""Local inference over HTTP, following the Open Inference Protocol (KServe v2).

Routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``/v2/models/{name}/infer`` (also under
``/versions/{v}``), and ``/metrics`` (Prometheus). JSON tensors and the binary
tensor extension (``Inference-Header-Content-Length``) are both accepted, so
``tritonclient.http`` works unchanged.

A request the client got wrong is answered 4xx with ``{"error": "..."}`` that
says what was expected; only a fault of the model itself is 5xx. Nothing a
client sends stops the server.

Stdlib ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive: each response is
written with one ``send`` and Nagle is off, so the overhead over an in-process
``predict`` stays a fraction of a millisecond.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_sdk import __version__
from edge_sdk.errors import InputError

from ._config import HttpConfig
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._serving import ModelSlot, Served

log = logging.getLogger("device_agent.http")

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
_PLATFORM = {"onnx": "onnxruntime_onnx", "ort": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
_JSON = "application/json"


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _no_constants(name: str) -> Any:
    raise HttpError(400, f"JSON body contains {name}, which is not valid JSON; send finite "
                         "numbers (or use the binary tensor extension)")


def datatype_of(dtype: str) -> str:
    return _FROM_NP.get(dtype, dtype.upper())


class InferenceApp:
    """The protocol logic, independent of the socket layer."""

    def __init__(self, slot: ModelSlot, metrics: Metrics, config: HttpConfig) -> None:
        self.slot = slot
        self.metrics = metrics
        self.config = config
        self._sem = threading.BoundedSemaphore(config.max_inflight)
        self._children: dict[str, tuple[Any, Any, Any, Any]] = {}

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """Return (status, content type, body, extra headers). ``headers`` has lower-case
        names."""
        path = path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        try:
            if parts[:1] == ["v2"]:
                return self._v2(method, parts[1:], headers, body)
            if parts == ["metrics"] and method == "GET":
                return 200, METRICS_CONTENT_TYPE, self.metrics.render(), {}
            raise HttpError(404, f"no route {method} {path} (see /v2/health/ready, "
                                 "/v2/models/{name}/infer, /metrics)")
        except HttpError as err:
            self.metrics.errors.labels(str(err.status)).inc()
            return err.status, _JSON, json.dumps({"error": str(err)}).encode(), {}

    def _v2(self, method: str, parts: list[str], headers: Mapping[str, str],
            body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        cur = self.slot.current
        if not parts:
            _method(method, "GET")
            return _ok({"name": "edge-sdk-agent", "version": __version__,
                        "extensions": ["binary_tensor_data"]})
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _method(method, "GET")
            if parts[1] == "ready" and cur is None:
                return 503, _JSON, b'{"error": "no model installed yet"}', {}
            return 200, _JSON, b"", {}
        if parts[0] != "models" or len(parts) < 2:
            raise HttpError(404, f"no route /v2/{'/'.join(parts)}")
        name, rest = parts[1], parts[2:]
        version: str | None = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise HttpError(404, "missing version after /versions/")
            version, rest = rest[1], rest[2:]
        served = self._model(cur, name, version)
        if not rest:
            _method(method, "GET")
            return _ok(self._metadata(served))
        if rest == ["ready"]:
            _method(method, "GET")
            return 200, _JSON, b"", {}
        if rest == ["infer"]:
            _method(method, "POST")
            return self._infer(served, headers, body)
        raise HttpError(404, f"no route /v2/models/{name}/{'/'.join(rest)}")

    def _model(self, cur: Served | None, name: str, version: str | None) -> Served:
        if cur is None:
            raise HttpError(404, f"model '{name}' is not available: no model installed yet")
        if name != cur.name:
            raise HttpError(404, f"unknown model '{name}'; this agent serves '{cur.name}'")
        if version is not None and version != cur.version:
            raise HttpError(404, f"model '{name}' version '{version}' is not served; the "
                                 f"current version is '{cur.version}'")
        return cur

    def _metadata(self, served: Served) -> dict[str, Any]:
        p = served.predictor

        def spec(s: Any) -> dict[str, Any]:
            return {"name": s.name, "datatype": datatype_of(s.dtype),
                    "shape": [d if isinstance(d, int) else -1 for d in s.shape]}

        return {"name": served.name, "versions": [served.version],
                "platform": _PLATFORM.get(p.format, p.format),
                "inputs": [spec(s) for s in p.inputs], "outputs": [spec(s) for s in p.outputs]}

    # -- infer ---------------------------------------------------------------------------

    def _children_for(self, name: str) -> tuple[Any, Any, Any, Any]:
        ch = self._children.get(name)
        if ch is None:
            m = self.metrics
            ch = (m.requests.labels(name, "ok"), m.requests.labels(name, "bad_request"),
                  m.requests.labels(name, "error"), m.latency.labels(name))
            self._children[name] = ch
        return ch

    def _infer(self, served: Served, headers: Mapping[str, str],
               body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        ok_c, bad_c, err_c, hist = self._children_for(served.name)
        if not self._sem.acquire(timeout=self.config.queue_timeout_s):
            bad_c.inc()
            raise HttpError(429, f"more than {self.config.max_inflight} requests in flight for "
                                 f"{self.config.queue_timeout_s:g} s; retry later")
        t0 = time.perf_counter()
        try:
            try:
                request, blobs = self._split(headers, body)
                feed, binary_out, wanted, req_id = self._decode(served, request, blobs)
                try:
                    outputs = served.predict(feed)
                except InputError as err:
                    raise HttpError(400, str(err)) from err
                except Exception as err:
                    err_c.inc()
                    log.error("model %s failed on a valid request: %s", served.name, err)
                    self.metrics.errors.labels("500").inc()
                    msg = f"model '{served.name}' failed: {type(err).__name__}: {err}"
                    return 500, _JSON, json.dumps({"error": " ".join(msg.split())}).encode(), {}
            except HttpError:
                bad_c.inc()
                raise
            result = self._encode(served, outputs, binary_out, wanted, req_id)
            hist.observe(time.perf_counter() - t0)
            ok_c.inc()
            return result
        finally:
            self._sem.release()

    @staticmethod
    def _split(headers: Mapping[str, str], body: bytes) -> tuple[Any, bytes]:
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

    def _decode(self, served: Served, request: Any,
                blobs: bytes) -> tuple[dict[str, np.ndarray], bool, list[tuple[str, bool]] | None,
                                       Any]:
        if not isinstance(request, dict):
            raise HttpError(400, "request body must be a JSON object with an 'inputs' list")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "request needs a non-empty 'inputs' list of "
                                 "{name, shape, datatype, data}")
        params = request.get("parameters") or {}
        if not isinstance(params, dict):
            raise HttpError(400, "'parameters' must be an object")
        specs = {s.name: s for s in served.predictor.inputs}
        feed: dict[str, np.ndarray] = {}
        offset = 0
        for i, item in enumerate(inputs):
            if not isinstance(item, dict):
                raise HttpError(400, f"inputs[{i}] must be an object {{name, shape, datatype, "
                                     "data}")
            name = item.get("name")
            if not isinstance(name, str):
                raise HttpError(400, f"inputs[{i}]: 'name' must be a string")
            spec = specs.get(name)
            if spec is None:
                raise HttpError(400, f"unknown input '{name}'; model '{served.name}' expects "
                                     + ", ".join(s.describe() for s in served.predictor.inputs))
            if name in feed:
                raise HttpError(400, f"input '{name}' given twice")
            arr, used = self._tensor(name, spec.dtype, item, blobs, offset)
            offset += used
            feed[name] = arr
        if offset != len(blobs):
            raise HttpError(400, f"binary body has {len(blobs) - offset} byte(s) no input "
                                 "claimed (check binary_data_size)")
        missing = [s.describe() for n, s in specs.items() if n not in feed]
        if missing:
            raise HttpError(400, f"missing input(s): {'; '.join(missing)}")
        binary_out = bool(params.get("binary_data_output", False))
        wanted: list[tuple[str, bool]] | None = None
        outs = request.get("outputs")
        if outs is not None:
            if not isinstance(outs, list):
                raise HttpError(400, "'outputs' must be a list of {name}")
            names = {o.name for o in served.predictor.outputs}
            wanted = []
            for j, o in enumerate(outs):
                if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                    raise HttpError(400, f"outputs[{j}] must be an object with a 'name'")
                if o["name"] not in names:
                    raise HttpError(400, f"unknown output '{o['name']}'; model "
                                         f"'{served.name}' has {', '.join(sorted(names))}")
                op = o.get("parameters") or {}
                wanted.append((o["name"], bool(op.get("binary_data", binary_out))
                               if isinstance(op, dict) else binary_out))
        return feed, binary_out, wanted, request.get("id")

    def _tensor(self, name: str, model_dtype: str, item: Mapping[str, Any], blobs: bytes,
                offset: int) -> tuple[np.ndarray, int]:
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
        if (not self.config.allow_nan and arr.dtype.kind == "f"
                and not np.isfinite(arr).all()):
            raise HttpError(400, f"input '{name}' contains NaN or Inf; this agent accepts "
                                 "finite values only (http.allow_nan)")
        return arr, used

    def _encode(self, served: Served, outputs: Mapping[str, np.ndarray], binary_out: bool,
                wanted: list[tuple[str, bool]] | None,
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
        res: dict[str, Any] = {"model_name": served.name, "model_version": served.version,
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


def _method(got: str, want: str) -> None:
    if got != want:
        raise HttpError(405, f"method {got} not allowed here; use {want}")


def _ok(obj: Any) -> tuple[int, str, bytes, dict[str, str]]:
    return 200, _JSON, json.dumps(obj).encode(), {}


_MAX_HEADER_LINE = 65536
_MAX_HEADERS = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edge-sdk-agent"
    #: Idle keep-alive connections are closed after this many seconds.
    timeout = 120
    server: _Server
    raw_requestline: bytes

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hdrs: dict[str, str] = {}

    def parse_request(self) -> bool:
        # The stdlib parses headers with the email package (~30 µs a request); requests
        # here are small and simple, so a plain line loop does, with the same limits.
        self.command = ""
        self.close_connection = True
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        words = line.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"
            self.send_error(400, f"bad request line {line[:80]!r} (expected METHOD PATH "
                                 "HTTP/1.1)")
            return False
        self.command, self.path, self.request_version = words
        hdrs: dict[str, str] = {}
        while True:
            raw = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(raw) > _MAX_HEADER_LINE or len(hdrs) >= _MAX_HEADERS:
                self.send_error(431, "request headers too large")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("iso-8859-1").partition(":")
            if not sep or not name.strip():
                self.send_error(400, f"malformed header line {raw[:80]!r}")
                return False
            hdrs[name.strip().lower()] = value.strip()
        self.hdrs = hdrs
        conn = hdrs.get("connection", "").lower()
        self.close_connection = conn == "close" or (
            self.request_version == "HTTP/1.0" and conn != "keep-alive")
        if hdrs.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        te = self.hdrs.get("transfer-encoding")
        if te is not None and te.lower() != "identity":
            self.close_connection = True
            self._reply(411, _JSON, b'{"error": "chunked bodies are not supported; send '
                                    b'Content-Length"}', {})
            return
        raw_len = self.hdrs.get("content-length")
        if raw_len is None:
            self.close_connection = True
            self._reply(411, _JSON, b'{"error": "Content-Length header required"}', {})
            return
        try:
            length = int(raw_len)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._reply(400, _JSON, b'{"error": "invalid Content-Length"}', {})
            return
        limit = self.server.app.config.max_body_bytes
        if length > limit:
            # Not reading the body: close so its bytes are not parsed as the next request.
            self.close_connection = True
            msg = {"error": f"request body of {length} bytes is over the limit of {limit} "
                            "(http.max_body_bytes)"}
            self._reply(413, _JSON, json.dumps(msg).encode(), {})
            return
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if len(body) != length:
            self.close_connection = True
            return
        self._serve(body)

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    def do_HEAD(self) -> None:
        self._not_allowed()

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # The stdlib's version answers HTML, and nothing at all to HTTP/0.9-looking lines.
        self.close_connection = True
        text = message or _REASONS.get(code, "error")
        self._reply(code, _JSON, json.dumps({"error": f"{text}"}).encode(), {})

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._reply(405, _JSON, b'{"error": "method not allowed; use GET or POST"}', {})

    def _serve(self, body: bytes) -> None:
        app = self.server.app
        try:
            status, ctype, payload, extra = app.handle(self.command or "", self.path, self.hdrs,
                                                       body)
        except Exception as err:  # a bug must not take the server down
            log.exception("unexpected error on %s %s", self.command, self.path)
            status, ctype, extra = 500, _JSON, {}
            payload = json.dumps({"error": f"internal error: {type(err).__name__}"}).encode()
        self._reply(status, ctype, payload, extra)

    def _reply(self, status: int, ctype: str, payload: bytes, extra: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                 f"Content-Type: {ctype}", f"Content-Length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: InferenceApp


class HttpServer:
    """The endpoint, served by its own threads."""

    def __init__(self, app: InferenceApp, bind: str, port: int) -> None:
        try:
            self._server = _Server((bind, port), _Handler)
        except OSError as err:
            from edge_sdk.errors import ConfigError

            raise ConfigError(f"http: cannot listen on {bind}:{port}: {err.strerror}") from err
        self._server.app = app
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="agent-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
