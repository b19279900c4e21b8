"""The HTTP/1.1 socket layer of the agent's endpoint; the protocol is in ``_protocol``.

Stdlib ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive: each response is
written with one ``send`` and Nagle is off, so the overhead over an in-process
``predict`` stays a fraction of a millisecond. Nothing a client sends stops
the server.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._protocol import InferenceApp

log = logging.getLogger("device_agent.http")
_JSON = "application/json"


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
