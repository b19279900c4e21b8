"""The controller's read-only fleet page and the JSON API behind it.

Two layers, as in the agent: :class:`FleetApi` turns a method and a request target into
``(status, content type, body)`` with no socket (the tests call it directly), and
:class:`WebServer` puts it on a stdlib ``ThreadingHTTPServer``. Only ``GET`` and
``HEAD``; every bound is a key of :class:`WebConfig` (connections, the time a client may
take, the length of a request target). A client's mistake is a 4xx with a one-line JSON
``{"error": ...}``; nothing a client sends ends a thread or the server.

The page is three static files shipped as package data (``_page/``): it polls the API
every 1.5 s and renders with DOM text nodes only, so nothing a device reports is ever
parsed as markup, and nothing is fetched from outside (``Content-Security-Policy:
default-src 'self'``).

Routes: ``/`` (the page), ``/static/{page.js,page.css}``, ``/api/devices`` (query
``group``, ``tag``, ``model``, ``online``), ``/api/devices/{id}`` (the device and its
history; ``limit``), ``/api/rollouts``, ``/api/rollouts/{id}``, ``/api/models``,
``/api/audit`` (``limit``), ``/api/registry`` (the registry's counts and progress, and
the devices whose reports it dropped or lost).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import sqlalchemy as sa

from ._db import FleetDB, FleetError, FleetUsageError

log = logging.getLogger("edge_sdk.fleet.web")

_JSON = "application/json"
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
           "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
           "/static/page.css": ("page.css", "text/css; charset=utf-8")}
_FILTERS = ("group", "tag", "model", "online")
_ONLINE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
}


@dataclass(frozen=True)
class WebConfig:
    """Where the page listens and what one client may hold.

    ``allow_remote`` must be set to bind anything but a loopback address: the page has no
    login, and it shows the whole fleet's inventory."""

    host: str = "127.0.0.1"
    port: int = 8700
    allow_remote: bool = False
    max_connections: int = 32
    #: Seconds a client may take to send its request line and headers.
    timeout_s: float = 10.0
    max_target_bytes: int = 2048
    max_query_fields: int = 8
    max_value_bytes: int = 256
    max_history: int = 1000
    max_audit: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FleetUsageError(f"--http port {self.port} must be in 0..65535")
        for key in ("max_connections", "max_target_bytes", "max_query_fields",
                    "max_value_bytes", "max_history", "max_audit"):
            if getattr(self, key) < 1:
                raise FleetUsageError(f"web {key} must be >= 1")
        if not self.timeout_s > 0:
            raise FleetUsageError("web timeout_s must be > 0")
        if not self.allow_remote and not is_loopback(self.host):
            raise FleetUsageError(
                f"--http {self.host}: the fleet page has no login, so it binds loopback "
                "addresses only; pass --http-allow-remote to serve it on another address")

    @classmethod
    def parse(cls, spec: str, *, allow_remote: bool = False) -> WebConfig:
        """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1)."""
        host, sep, port = spec.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", spec
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit():
            raise FleetUsageError(f"--http {spec!r} must be HOST:PORT, e.g. 127.0.0.1:8700")
        return cls(host=host, port=int(port), allow_remote=allow_remote)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addrs = {str(i[4][0]).split("%")[0] for i in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Response = tuple[int, str, bytes]


def _json_body(value: Any) -> bytes:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # a NaN or infinity a device reported: JSON.parse would reject it
        return json.dumps(_finite(value), separators=(",", ":")).encode()


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def error_body(message: str) -> bytes:
    return _json_body({"error": " ".join(message.split())})


class FleetApi:
    """The routes over one :class:`FleetDB`, scoped to one fleet (``None``: every fleet).
    :meth:`handle` never raises."""

    def __init__(self, db: FleetDB, *, fleet: str | None = None,
                 config: WebConfig | None = None) -> None:
        self.db = db
        self.fleet = fleet
        self.config = config or WebConfig()

    def handle(self, method: str, target: str) -> Response:
        try:
            return self._route(method, target)
        except _BadRequest as err:
            return err.status, _JSON, error_body(str(err))
        except FleetUsageError as err:
            return 404, _JSON, error_body(str(err))
        except (FleetError, sa.exc.SQLAlchemyError) as err:
            log.warning("fleet page: database: %s", str(err).splitlines()[0])
            return 503, _JSON, error_body("the fleet database is not available; see the "
                                          "serve log")
        except Exception:
            log.exception("fleet page: %s %s failed", method, target[:200])
            return 500, _JSON, error_body("internal error; see the serve log")

    def _route(self, method: str, target: str) -> Response:
        cfg = self.config
        if len(target) > cfg.max_target_bytes:
            raise _BadRequest(414, f"request target longer than {cfg.max_target_bytes} "
                                   "bytes (max_target_bytes)")
        if method not in ("GET", "HEAD"):
            raise _BadRequest(405, f"{method[:16]} is not allowed: the fleet page is "
                                   "read-only (GET)")
        if not target.startswith("/"):
            raise _BadRequest(400, "request target must be a path starting with /")
        parts = urlsplit(target)
        path, query = parts.path, self._query(parts.query)
        if path == "/favicon.ico":  # browsers ask; there is none
            return 204, _JSON, b""
        if path in _STATIC:
            self._no_query(query)
            name, ctype = _STATIC[path]
            return 200, ctype, resources.files(__package__).joinpath("_page", name) \
                .read_bytes()
        segs = path.split("/")[1:]
        if segs[:1] != ["api"]:
            raise _BadRequest(404, f"no page {_show(path)}; the API is under /api/")
        return 200, _JSON, _json_body(self._api(segs[1:], query))

    def _api(self, segs: list[str], q: dict[str, str]) -> Any:
        cfg = self.config
        if segs == ["devices"]:
            self._no_query(q, *_FILTERS)
            online = q.get("online", "").lower()
            if online and online not in _ONLINE:
                raise _BadRequest(400, "online must be true or false")
            return self.db.devices(fleet=self.fleet, group=q.get("group") or None,
                                   tag=q.get("tag") or None, model=q.get("model") or None,
                                   online=_ONLINE[online] if online else None)
        if len(segs) == 2 and segs[0] == "devices":
            self._no_query(q, "limit")
            dev_id = self._device_id(segs[1])
            dev = self.db.device(dev_id, fleet=self.fleet)
            if dev is None:
                raise _BadRequest(404, f"no device {dev_id!r}")
            limit = self._limit(q, 100, cfg.max_history)
            return {"device": dev,
                    "history": self.db.device_history(dev_id, limit, fleet=self.fleet)}
        if segs == ["rollouts"]:
            self._no_query(q)
            return self.db.rollouts(fleet=self.fleet)
        if len(segs) == 2 and segs[0] == "rollouts":
            self._no_query(q)
            if not (segs[1].isascii() and segs[1].isdigit() and len(segs[1]) <= 12):
                raise _BadRequest(400, f"rollout id {_show(segs[1])} must be a number")
            r = self.db.rollout(int(segs[1]))
            if self.fleet is not None and r["fleet"] != self.fleet:
                raise _BadRequest(404, f"no rollout {int(segs[1])} in fleet {self.fleet!r}")
            return r
        if segs == ["models"]:
            self._no_query(q)
            return self.db.models(fleet=self.fleet)
        if segs == ["audit"]:
            self._no_query(q, "limit")
            return self.db.audit(self._limit(q, 100, cfg.max_audit))
        if segs == ["registry"]:
            self._no_query(q)
            return {"stats": self.db.registry_stats(fleet=self.fleet),
                    "devices": self.db.ingest_stats(fleet=self.fleet, limit=100)}
        raise _BadRequest(404, f"no API route /api/{_show('/'.join(segs))}; routes: "
                               "/api/devices, /api/devices/ID, /api/rollouts, "
                               "/api/rollouts/ID, /api/models, /api/audit, /api/registry")

    def _query(self, raw: str) -> dict[str, str]:
        cfg = self.config
        try:
            pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=cfg.max_query_fields, errors="strict")
        except ValueError as err:
            raise _BadRequest(400, f"query string: more than {cfg.max_query_fields} fields "
                                   "(max_query_fields)" if "Max number" in str(err)
                              else "query string is not valid UTF-8") from None
        out: dict[str, str] = {}
        for k, v in pairs:
            if k in out:
                raise _BadRequest(400, f"query parameter {_show(k)} given twice")
            if len(v.encode()) > cfg.max_value_bytes or not v.isprintable():
                raise _BadRequest(400, f"query parameter {_show(k)}: value longer than "
                                       f"{cfg.max_value_bytes} bytes or not printable")
            out[k] = v
        return out

    @staticmethod
    def _no_query(q: dict[str, str], *allowed: str) -> None:
        extra = sorted(set(q) - set(allowed))
        if extra:
            known = ", ".join(allowed) if allowed else "none"
            raise _BadRequest(400, f"unknown query parameter {_show(extra[0])} "
                                   f"(known: {known})")

    @staticmethod
    def _limit(q: dict[str, str], default: int, top: int) -> int:
        raw = q.get("limit", "")
        if not raw:
            return default
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw[:12]) <= top:
            raise _BadRequest(400, f"limit must be a number in 1..{top}")
        return int(raw)

    @staticmethod
    def _device_id(raw: str) -> str:
        try:
            dev = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise _BadRequest(400, "device id is not valid UTF-8") from None
        if not dev or len(dev) > 128 or not dev.isprintable() or "/" in dev:
            raise _BadRequest(400, f"device id {_show(dev)} must be 1..128 printable "
                                   "characters without /")
        return dev


def _show(s: str) -> str:
    """A client's string, cut short and printable, for an error message."""
    return repr(s[:64] + ("..." if len(s) > 64 else ""))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edge-sdk-fleet"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Per read: a client that stalls mid-request (or idles on keep-alive) is dropped.
        self.connection.settimeout(self.server.api.config.timeout_s)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def _answer(self, method: str) -> None:
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if length != "0" or "Transfer-Encoding" in self.headers:
            # A body on a read-only page is a mistake; not reading it means closing.
            self.close_connection = True
            status, ctype, body = 413, _JSON, error_body("the fleet page takes no request "
                                                         "body")
        else:
            status, ctype, body = self.server.api.handle(method, self.path)
        self._send(status, ctype, body, head_only=method == "HEAD")

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def _refuse(self) -> None:
        self.close_connection = True
        self._send(405, _JSON, error_body(f"{self.command[:16]} is not allowed: the fleet "
                                          "page is read-only (GET)"), allow=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    def _send(self, status: int, ctype: str, body: bytes, *, head_only: bool = False,
              allow: bool = False) -> None:
        self.send_response(status)
        if status != 204:  # a 204 carries neither (RFC 9110)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        for k, v in _HEADERS.items():
            self.send_header(k, v)
        if allow or status == 405:
            self.send_header("Allow", "GET, HEAD")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # The stdlib's own refusals (bad request line, too long, unknown method): JSON too.
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # else the stdlib sends a bare HTTP/0.9 body
        with contextlib.suppress(OSError):
            self._send(code, _JSON, error_body(message or explain or "bad request"),
                       head_only=self.command == "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, api: FleetApi, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.api = api
        self.slots = threading.BoundedSemaphore(api.config.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nConnection: close\r\nContent-Length: "
                                + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("fleet page: connection from %s ended with an error", client_address,
                  exc_info=True)


_BUSY = error_body("too many connections to the fleet page (max_connections)")


class WebServer:
    """The fleet page on ``config.host:config.port`` in a background thread, until
    :meth:`stop`. Raises :class:`FleetError` when the address cannot be bound."""

    def __init__(self, db: FleetDB, *, fleet: str | None = None,
                 config: WebConfig | None = None) -> None:
        self.config = config or WebConfig()
        self.api = FleetApi(db, fleet=fleet, config=self.config)
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        try:
            self._server = _Server(self.api, (self.config.host, self.config.port), family)
        except OSError as err:
            raise FleetError(f"--http {self.config.host}:{self.config.port}: cannot listen: "
                             f"{err.strerror or err}") from err
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="fleet-web",
                                        daemon=True)

    @property
    def url(self) -> str:
        port = int(self._server.server_address[1])
        host = self.config.host
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["FleetApi", "WebConfig", "WebServer", "is_loopback"]
