"""The controller's fleet page and the JSON API behind it: read-only, but for operators
who sign in to approve, pause, resume and abort rollouts.

Two layers, as in the agent: :class:`FleetApi` turns a :class:`Request` into an
:class:`Answer` with no socket (the tests call it directly), and
:class:`WebServer` puts it on a socket with the strict request reader the agent uses too
(``edge_sdk._http``: no HTTP/0.9 line, no repeated ``Content-Length``, no folded or
colon-less header line, a ``Host`` that names this server). ``GET`` and ``HEAD``, and
``POST`` for sign-in and actions with a JSON body of at most ``max_body_bytes``
(Content-Length required, no chunked body); every bound is a key of :class:`WebConfig`
(connections in all and per client address, the time a whole request may take, header,
target and body bytes). A client's mistake is a 4xx with a one-line JSON ``{"error":
...}``; nothing a client sends ends a thread or the server.

The page is three static files shipped as package data (``_page/``): it polls the API
every 1.5 s and renders with DOM text nodes only, so nothing a device reports is ever
parsed as markup, and nothing is fetched from outside (``Content-Security-Policy:
default-src 'self'``).

Routes: ``/`` (the page), ``/static/{page.js,page.css}``, ``/api/devices`` (query
``group``, ``tag``, ``model``, ``online``, ``drifting``), ``/api/devices/{id}`` (the
device, its history and its updates: how each was downloaded, whether it was rolled
back; ``limit``), ``/api/rollouts``, ``/api/rollouts/{id}``, ``/api/models`` (with
``yanked``/``yank_reason`` from the release repository when the server has one),
``/api/audit`` (``limit``), ``/api/registry`` (the registry's counts and progress, and
the devices whose reports it dropped or lost), ``/api/warnings`` (what the operator must
act on: release metadata about to expire that serve cannot re-sign), ``/api/enrolments``
(devices that asked to enrol: ``state``, default pending, ``limit``; with the counts per
state), ``/api/session`` (who is signed in, the CSRF token, whether sign-in is offered
and why not).

Sign-in (accounts and sessions: ``_operators``): ``POST /api/login`` (``{"name",
"password"}``) sets the session cookie (``HttpOnly; SameSite=Strict``, ``Secure`` behind
a TLS proxy) and answers the CSRF token; ``POST /api/logout``; ``POST
/api/rollouts/{id}/{approve,pause,resume,abort}`` (abort: ``{"reason"}``) run
:func:`command_rollout`, as the CLI does, audit-logged with the operator as actor;
``POST /api/enrolments/{id}/{accept,reject}`` (reject: ``{"reason"}``) accept or reject
a device's enrolment as ``edge-sdk device accept|reject`` does. Each
of those needs the session (else 401) and ``X-CSRF-Token`` (else 403); a browser's
``Origin`` must name this page and its ``Sec-Fetch-Site`` be ``same-origin`` (else 403).
Wrong passwords back off per account and per client address (429 with ``Retry-After``;
no thread sleeps). The page is plain HTTP, so sign-in is offered only on a loopback
address or when ``behind_tls_proxy`` says a TLS proxy fronts it; reading needs no
sign-in, as before.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from .._http import (
    HeadError,
    check_host,
    find_bare_lf,
    host_name,
    parse_head,
    parse_request_line,
    reason,
)
from ..errors import EdgeError
from . import _enrol as enrol
from . import _operators as ops
from ._manage import command_rollout
from ._store import DatabaseError, FleetDB, FleetError, FleetUsageError

#: Yanked releases, ``(model, version) -> reason`` (None: no reason given).
Yanked = Callable[[], Mapping[tuple[str, str], str | None]]

log = logging.getLogger("edge_sdk.fleet.web")

_JSON = "application/json"
_STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
           "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
           "/static/page.css": ("page.css", "text/css; charset=utf-8")}
_FILTERS = ("group", "tag", "model", "online", "drifting")
_ONLINE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Trusted Types: a browser that knows them refuses any string-to-markup sink, so even
    # a future slip in the page cannot parse a device's string as HTML.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'; "
                               "require-trusted-types-for 'script'; trusted-types 'none'",
}


@dataclass(frozen=True)
class WebConfig:
    """Where the page listens and what one client may hold.

    ``allow_remote`` must be set to bind anything but a loopback address: reading the page
    needs no sign-in, and it shows the whole fleet's inventory. Signing in (to act on
    rollouts) is offered on a loopback address, or with ``behind_tls_proxy`` (the page is
    plain HTTP: a password and a session cookie must not cross a network in the clear; the
    cookie is then ``Secure``). ``allowed_hosts`` are the names the
    page may be reached by besides IP addresses, ``localhost`` and ``host`` (a request
    naming any other ``Host`` is refused: DNS rebinding); behind a proxy, the name the
    proxy forwards."""

    host: str = "127.0.0.1"
    port: int = 8700
    allow_remote: bool = False
    allowed_hosts: tuple[str, ...] = ()
    #: Connections at once (each holds a thread); more are answered 503.
    max_connections: int = 32
    #: Connections at once from one address (IPv6: one /64); more are answered 429.
    #: Behind a proxy every client shares its address: raise it to max_connections.
    max_connections_per_client: int = 8
    #: Kernel queue of connections not yet accepted. Too small a queue (socketserver's 5)
    #: drops the SYNs of a burst, and those clients wait for a retransmit (1 s and more).
    listen_backlog: int = 128
    #: Seconds a whole request (request line and headers) may take to arrive, counted
    #: from the connection's start or its previous answer; also bounds sending an answer.
    timeout_s: float = 10.0
    max_header_bytes: int = 8192
    max_target_bytes: int = 2048
    max_query_fields: int = 8
    max_value_bytes: int = 256
    max_history: int = 1000
    max_audit: int = 1000
    #: Bytes of a POST body (sign-in, an action); Content-Length is required.
    max_body_bytes: int = 4096
    #: A TLS proxy fronts the page (serve --http-behind-tls-proxy): sign-in is offered on
    #: any address and the session cookie is Secure.
    behind_tls_proxy: bool = False
    #: Seconds a session lasts at most, and without use.
    session_ttl_s: float = 12 * 3600.0
    session_idle_s: float = 1800.0
    #: Wrong passwords per account and per client address before the backoff starts,
    #: its first lock window (doubling with each further one) and its longest.
    login_free_failures: int = 3
    login_backoff_s: float = 1.0
    login_backoff_max_s: float = 900.0
    #: Passwords checked at once (each scrypt run: 32 MiB, ~0.1 s of a core); more wait.
    login_concurrency: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FleetUsageError(f"--http port {self.port} must be in 0..65535")
        for key in ("max_connections", "max_connections_per_client", "listen_backlog",
                    "max_header_bytes",
                    "max_target_bytes", "max_query_fields", "max_value_bytes", "max_history",
                    "max_audit", "max_body_bytes", "login_concurrency"):
            if getattr(self, key) < 1:
                raise FleetUsageError(f"web {key} must be >= 1")
        for name in self.allowed_hosts:
            if host_name(name) != name.lower().removesuffix(".") or ":" in name:
                raise FleetUsageError(f"--http-allow-host {name!r} must be a host name "
                                      "(no port, no scheme), e.g. fleet.example.com")
        object.__setattr__(self, "allowed_hosts",
                           tuple(n.lower().removesuffix(".") for n in self.allowed_hosts))
        for key in ("timeout_s", "session_ttl_s", "session_idle_s", "login_backoff_s",
                    "login_backoff_max_s"):
            if not getattr(self, key) > 0:
                raise FleetUsageError(f"web {key} must be > 0")
        if self.login_free_failures < 0:
            raise FleetUsageError("web login_free_failures must be >= 0")
        if not self.allow_remote and not is_loopback(self.host):
            raise FleetUsageError(
                f"--http {self.host}: anyone who reaches the fleet page reads it without "
                "signing in, so it binds loopback addresses only; pass --http-allow-remote "
                "to serve it on another address")

    @classmethod
    def parse(cls, spec: str, *, allow_remote: bool = False,
              allowed_hosts: tuple[str, ...] = (), behind_tls_proxy: bool = False) -> WebConfig:
        """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1)."""
        host, sep, port = spec.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", spec
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit():
            raise FleetUsageError(f"--http {spec!r} must be HOST:PORT, e.g. 127.0.0.1:8700")
        return cls(host=host, port=int(port), allow_remote=allow_remote,
                   allowed_hosts=allowed_hosts, behind_tls_proxy=behind_tls_proxy)


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
    def __init__(self, status: int, message: str, *,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


Response = tuple[int, str, bytes]


@dataclass(frozen=True)
class Request:
    """One request as :class:`FleetApi` sees it: ``headers`` with lower-case names,
    ``client`` the peer's address."""

    method: str
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str = "127.0.0.1"


class Answer(NamedTuple):
    status: int
    ctype: str
    body: bytes
    #: Headers beyond the fixed ones (``Set-Cookie``, ``Retry-After``, ``Allow``).
    headers: tuple[tuple[str, str], ...] = ()


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
    :meth:`handle` never raises. ``yanked`` reads the yanked releases (``serve`` reads its
    repository) for ``/api/models``."""

    def __init__(self, db: FleetDB, *, fleet: str | None = None,
                 config: WebConfig | None = None,
                 warnings: Callable[[], list[dict[str, Any]]] | None = None,
                 yanked: Yanked | None = None,
                 throttle: ops.LoginThrottle | None = None) -> None:
        """``warnings``: what ``/api/warnings`` lists (each a dict with a ``message``)."""
        self.db = db
        self.fleet = fleet
        self.config = cfg = config or WebConfig()
        self.warnings = warnings
        self.yanked = yanked
        self.throttle = throttle or ops.LoginThrottle(
            free=cfg.login_free_failures, base_s=cfg.login_backoff_s,
            max_s=cfg.login_backoff_max_s)
        #: Password checks at once: each scrypt run holds 32 MiB and a core for ~0.1 s, and
        #: the backoff is read and updated under it, so requests sent in parallel cannot
        #: all pass the check before the first failure is counted.
        self._checking = threading.BoundedSemaphore(cfg.login_concurrency)
        #: Why sign-in is not offered, or None.
        self.no_sign_in = None if cfg.behind_tls_proxy or is_loopback(cfg.host) else (
            f"sign-in is off: the page is plain HTTP on {cfg.host}, a network address; "
            "put a TLS proxy in front and pass --http-behind-tls-proxy")

    def handle(self, method: str, target: str) -> Response:
        """A bodiless request from loopback (the read-only routes)."""
        status, ctype, body, _ = self.serve(Request(method, target))
        return status, ctype, body

    def serve(self, req: Request) -> Answer:
        try:
            return self._route(req)
        except _BadRequest as err:
            return Answer(err.status, _JSON, error_body(str(err)), err.headers)
        except FleetUsageError as err:
            return Answer(404, _JSON, error_body(str(err)))
        except (FleetError, DatabaseError) as err:
            log.warning("fleet page: database: %s", str(err).splitlines()[0])
            return Answer(503, _JSON, error_body("the fleet database is not available; "
                                                 "see the serve log"))
        except Exception:
            log.exception("fleet page: %s %s failed", req.method, req.target[:200])
            return Answer(500, _JSON, error_body("internal error; see the serve log"))

    def _route(self, req: Request) -> Answer:
        cfg = self.config
        method, target = req.method, req.target
        if len(target) > cfg.max_target_bytes:
            raise _BadRequest(414, f"request target longer than {cfg.max_target_bytes} "
                                   "bytes (max_target_bytes)")
        if not target.startswith("/"):
            raise _BadRequest(400, "request target must be a path starting with /")
        parts = urlsplit(target)
        path = parts.path
        if method == "POST":
            return self._post(req, path, parts.query)
        if method not in ("GET", "HEAD"):
            raise _BadRequest(405, f"{method[:16]} is not allowed: the fleet page is "
                                   "read-only (GET) but for sign-in and rollout actions "
                                   "(POST)")
        if path in _POSTS or _action(path) is not None or _decision(path) is not None:
            raise _BadRequest(405, f"{method} {_show(path)} is not allowed: use POST",
                              headers=(("Allow", "POST"),))
        if path == "/api/session":
            self._no_query(self._query(parts.query))
            return Answer(200, _JSON, _json_body(self._session_doc(req)))
        if path == "/favicon.ico":  # browsers ask; there is none
            return Answer(204, _JSON, b"")
        if path in _STATIC:
            # A query on the page itself (a link's tracking tail, a typo) is ignored: the
            # page must open whatever follows its path.
            name, ctype = _STATIC[path]
            return Answer(200, ctype, resources.files(__package__).joinpath("_page", name)
                          .read_bytes())
        segs = path.split("/")[1:]
        if segs[:1] != ["api"]:
            raise _BadRequest(404, f"no page {_show(path)}; the API is under /api/")
        return Answer(200, _JSON, _json_body(self._api(segs[1:], self._query(parts.query))))

    def _api(self, segs: list[str], q: dict[str, str]) -> Any:
        cfg = self.config
        if segs == ["devices"]:
            self._no_query(q, *_FILTERS)
            online = q.get("online", "").lower()
            if online and online not in _ONLINE:
                raise _BadRequest(400, "online must be true or false")
            drifting = q.get("drifting", "").lower()
            if drifting and drifting not in _ONLINE:
                raise _BadRequest(400, "drifting must be true or false")
            return self.db.devices(fleet=self.fleet, group=q.get("group") or None,
                                   tag=q.get("tag") or None, model=q.get("model") or None,
                                   online=_ONLINE[online] if online else None,
                                   drifting=_ONLINE[drifting] if drifting else None)
        if len(segs) == 2 and segs[0] == "devices":
            self._no_query(q, "limit")
            dev_id = self._device_id(segs[1])
            dev = self.db.device(dev_id, fleet=self.fleet)
            if dev is None:
                raise _BadRequest(404, f"no device {dev_id!r}")
            limit = self._limit(q, 100, cfg.max_history)
            return {"device": dev,
                    "history": self.db.device_history(dev_id, limit, fleet=self.fleet),
                    "updates": self.db.device_updates(dev_id, min(limit, 50),
                                                      fleet=self.fleet)}
        if segs == ["rollouts"]:
            self._no_query(q)
            return self.db.rollouts(fleet=self.fleet)
        if len(segs) == 2 and segs[0] == "rollouts":
            self._no_query(q)
            if not (segs[1].isascii() and segs[1].isdigit() and len(segs[1]) <= 12):
                raise _BadRequest(400, f"rollout id {_show(segs[1])} must be a number")
            return self._rollout(int(segs[1]))
        if segs == ["models"]:
            self._no_query(q)
            return self._models()
        if segs == ["audit"]:
            self._no_query(q, "limit")
            return self.db.audit(self._limit(q, 100, cfg.max_audit))
        if segs == ["registry"]:
            self._no_query(q)
            return {"stats": self.db.registry_stats(fleet=self.fleet),
                    "devices": self.db.ingest_stats(fleet=self.fleet, limit=100)}
        if segs == ["warnings"]:
            self._no_query(q)
            return self.warnings() if self.warnings is not None else []
        if segs == ["enrolments"]:
            self._no_query(q, "state", "limit")
            state = q.get("state") or "pending"
            if state not in _ENROL_STATES:
                raise _BadRequest(400, f"state must be one of {', '.join(_ENROL_STATES)}")
            rows = self.db.enrolments(self.fleet, state,
                                      limit=self._limit(q, 200, _MAX_ENROL_ROWS))
            return {"counts": self.db.enrolment_counts(self.fleet),
                    "enrolments": [{k: r[k] for k in _ENROL_SHOWN} for r in rows]}
        raise _BadRequest(404, f"no API route /api/{_show('/'.join(segs))}; routes: "
                               "/api/devices, /api/devices/ID, /api/rollouts, "
                               "/api/rollouts/ID, /api/models, /api/audit, /api/registry, "
                               "/api/warnings, /api/enrolments")

    def _rollout(self, rid: int) -> dict[str, Any]:
        """Rollout ``rid`` of the page's fleet, else 404 (naming neither the database nor
        another fleet: a page reader learns nothing about either)."""
        where = f" in fleet {self.fleet!r}" if self.fleet is not None else ""
        try:
            r = self.db.rollout(rid)
        except FleetUsageError:
            raise _BadRequest(404, f"no rollout {rid}{where}") from None
        if self.fleet is not None and r["fleet"] != self.fleet:
            raise _BadRequest(404, f"no rollout {rid}{where}")
        return r

    def _models(self) -> list[dict[str, Any]]:
        rows = self.db.models(fleet=self.fleet)
        if self.yanked is None:
            return rows
        try:
            gone: Mapping[tuple[str, str], str | None] | None = self.yanked()
        except EdgeError as err:  # the page still shows the devices; null: unknown
            log.warning("fleet page: cannot read the yanked releases: %s", err)
            gone = None
        for r in rows:
            key = (r["model"], r["version"])
            r["yanked"] = None if gone is None else key in gone
            r["yank_reason"] = gone.get(key) if gone is not None else None
        return rows

    # -- sign-in and actions (POST) --------------------------------------------------------

    def _post(self, req: Request, path: str, query: str) -> Answer:
        action = _action(path)
        decision = _decision(path)
        if path not in _POSTS and action is None and decision is None:
            allow = "GET, HEAD" if path in _STATIC or path.startswith("/api/") else None
            raise _BadRequest(405 if allow else 404,
                              f"POST {_show(path)} is not allowed" if allow else
                              f"no page {_show(path)}",
                              headers=(("Allow", allow),) if allow else ())
        self._no_query(self._query(query))
        self._same_origin(req)
        doc = self._json_request(req)
        if path == "/api/login":
            return self._login(req, doc)
        session = self._session(req)
        if session is None:
            raise _BadRequest(401, "not signed in (or the session ended): sign in first")
        token = req.headers.get("x-csrf-token", "")
        if not (token.isascii() and hmac.compare_digest(token.encode(), session.csrf.encode())):
            raise _BadRequest(403, "missing or wrong X-CSRF-Token header: reload the page")
        if path == "/api/logout":
            ops.close_session(self.db, _cookie(req) or "")
            self.db.record_audit(session.operator, "operator.logout", {"address": req.client})
            return Answer(200, _JSON, _json_body({"operator": None}),
                          (("Set-Cookie", self._cookie_header("", 0)),))
        if decision is not None:
            return self._decide(session, decision[0], decision[1], doc)
        assert action is not None
        return self._act(session, action[0], action[1], doc)

    def _login(self, req: Request, doc: dict[str, Any]) -> Answer:
        if self.no_sign_in:
            raise _BadRequest(403, self.no_sign_in)
        name, password = doc.get("name"), doc.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or set(doc) - {
                "name", "password"}:
            raise _BadRequest(400, 'sign-in takes {"name": "...", "password": "..."}')
        keys = (f"name {name[:ops.MAX_NAME + 1]}", f"address {_client_key(req.client)}")
        self._refuse_locked(keys)  # a locked client does not queue for a check
        if not self._checking.acquire(timeout=self.config.timeout_s):
            raise _BadRequest(503, "too many sign-ins at once; retry in a moment")
        try:
            self.throttle.forget_idle()
            self._refuse_locked(keys)  # again: a failure may have counted meanwhile
            ok = len(name) <= ops.MAX_NAME and len(password) <= ops.MAX_PASSWORD and \
                ops.authenticate(self.db, name, password)
            if not ok:
                self.throttle.failed(*keys)
                log.warning("fleet page: wrong name or password from %s", req.client)
                raise _BadRequest(401, "wrong name or password")
            self.throttle.succeeded(*keys)
        finally:
            self._checking.release()
        token = ops.open_session(self.db, name, req.client, self.config.session_ttl_s)
        self.db.record_audit(name, "operator.login", {"address": req.client})
        return Answer(200, _JSON, _json_body({"operator": name,
                                              "csrf": ops.csrf_token(token)}),
                      (("Set-Cookie", self._cookie_header(token,
                                                          self.config.session_ttl_s)),))

    def _refuse_locked(self, keys: tuple[str, ...]) -> None:
        wait = math.ceil(self.throttle.wait(*keys))
        if wait > 0:
            raise _BadRequest(429, f"too many wrong passwords: try again in {wait} s",
                              headers=(("Retry-After", str(wait)),))

    def _act(self, session: ops.Session, rid: int, command: str,
             doc: dict[str, Any]) -> Answer:
        allowed = {"reason"} if command == "abort" else set()
        if set(doc) - allowed:
            raise _BadRequest(400, f"{command} takes " + ('{"reason": "..."} or {}'
                                                          if allowed else "{}"))
        reason = doc.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 200
                                   or not reason.isprintable()):
            raise _BadRequest(400, "reason must be up to 200 printable characters")
        self._rollout(rid)
        note: dict[str, Any] = {"via": "page"}
        if reason:
            note["reason"] = reason
        try:
            command_rollout(self.db, rid, command, session.operator, note=note)
        except FleetUsageError as err:
            raise _BadRequest(409, str(err)) from None
        return Answer(202, _JSON, _json_body({"rollout": rid, "command": command,
                                              "by": session.operator}))

    def _decide(self, session: ops.Session, raw_id: str, command: str,
                doc: dict[str, Any]) -> Answer:
        """Accept or reject a device's enrolment, as ``edge-sdk device accept|reject``
        does (reject: ``{"reason"}`` optional), with the operator as the actor."""
        device = self._device_id(raw_id)
        allowed = {"reason"} if command == "reject" else set()
        if set(doc) - allowed:
            raise _BadRequest(400, f"{command} takes " + ('{"reason": "..."} or {}'
                                                          if allowed else "{}"))
        reason = doc.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise _BadRequest(400, "reason must be a string")
        if self.fleet is None:
            raise _BadRequest(409, "this page shows every fleet: accept or reject with "
                                   "'edge-sdk device accept|reject ID --fleet F'")
        try:
            if command == "accept":
                enrol.accept_devices(self.db, self.fleet, [device], actor=session.operator,
                                     via="page")
            else:
                enrol.reject_devices(self.db, self.fleet, [device], reason=reason,
                                     actor=session.operator, via="page")
        except FleetUsageError as err:
            raise _BadRequest(409, str(err)) from None
        return Answer(202, _JSON, _json_body({"device": device, "command": command,
                                              "by": session.operator}))

    def _session(self, req: Request) -> ops.Session | None:
        token = _cookie(req)
        if not token or self.no_sign_in:
            return None
        return ops.find_session(self.db, token, self.config.session_idle_s)

    def _session_doc(self, req: Request) -> dict[str, Any]:
        session = self._session(req)
        offered = self.no_sign_in is None and ops.has_operators(self.db)
        return {"operator": session.operator if session else None,
                "csrf": session.csrf if session else None,
                "sign_in": offered,
                "why": self.no_sign_in or (None if offered else
                                           "no operators: 'edge-sdk operator add NAME'")}

    def _cookie_header(self, token: str, max_age: float) -> str:
        secure = "; Secure" if self.config.behind_tls_proxy else ""
        return f"{_COOKIE}={token}; Path=/; Max-Age={int(max_age)}; HttpOnly; " \
               f"SameSite=Strict{secure}"

    def _same_origin(self, req: Request) -> None:
        """Refuse a POST a browser says came from another site or origin (the CSRF token
        is the rule; this is a second one that costs nothing)."""
        site = req.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin":
            raise _BadRequest(403, f"Sec-Fetch-Site {_show(site)}: only the page itself "
                                   "may sign in or act")
        origin = req.headers.get("origin")
        if origin is not None:
            host = req.headers.get("host", "").lower()
            if origin.lower() not in (f"http://{host}", f"https://{host}"):
                raise _BadRequest(403, f"Origin {_show(origin)} is not this page's "
                                       f"({_show(host)}): only the page itself may sign in "
                                       "or act")

    def _json_request(self, req: Request) -> dict[str, Any]:
        cfg = self.config
        ctype = req.headers.get("content-type", "")
        kind, _, params = ctype.partition(";")
        charset = params.strip().lower()
        if kind.strip().lower() != _JSON or charset not in ("", "charset=utf-8"):
            raise _BadRequest(415, f"Content-Type {_show(ctype)}: send application/json")
        if len(req.body) > cfg.max_body_bytes:
            raise _BadRequest(413, f"request body over {cfg.max_body_bytes} bytes "
                                   "(max_body_bytes)")
        try:
            doc = json.loads(req.body.decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError):
            raise _BadRequest(400, "the request body is not JSON") from None
        except RecursionError:  # "[[[[…": nested deeper than the decoder's stack
            raise _BadRequest(400, "the request body is JSON nested too deep") from None
        if not isinstance(doc, dict):
            raise _BadRequest(400, "the request body must be a JSON object")
        return doc

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


_COOKIE = "edge_session"
_POSTS = frozenset({"/api/login", "/api/logout"})
#: ``/api/enrolments``: its ``state`` values, and the keys of each row it answers.
_ENROL_STATES = ("pending", "accepted", "rejected", "revoked")
_MAX_ENROL_ROWS = 1000
_ENROL_SHOWN = ("fleet", "device_id", "batch", "state", "fingerprint", "facts", "requests",
                "conflicts", "requested_at", "updated_at", "decided_by", "decided_at",
                "reason")
_COMMANDS = frozenset({"approve", "pause", "resume", "abort"})


def _action(path: str) -> tuple[int, str] | None:
    """``(rollout id, command)`` of ``/api/rollouts/ID/COMMAND``, else None."""
    segs = path.split("/")
    if len(segs) == 5 and segs[1:3] == ["api", "rollouts"] and segs[4] in _COMMANDS:
        if not (segs[3].isascii() and segs[3].isdigit() and len(segs[3]) <= 12):
            raise _BadRequest(400, f"rollout id {_show(segs[3])} must be a number")
        return int(segs[3]), segs[4]
    return None


_DECISIONS = frozenset({"accept", "reject"})


def _decision(path: str) -> tuple[str, str] | None:
    """``(device id as in the path, accept|reject)`` of ``/api/enrolments/ID/COMMAND``,
    else None."""
    segs = path.split("/")
    if len(segs) == 5 and segs[1:3] == ["api", "enrolments"] and segs[4] in _DECISIONS:
        return segs[3], segs[4]
    return None


def _cookie(req: Request) -> str | None:
    """The session token in the request's ``Cookie`` header, or None."""
    for part in req.headers.get("cookie", "").replace(",", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == _COOKIE and value:
            return value
    return None


def _show(s: str) -> str:
    """A client's string, cut short and printable, for an error message."""
    return repr(s[:64] + ("..." if len(s) > 64 else ""))


#: Methods HTTP defines: refused as 405 (with ``Allow``); anything else is 501.
_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def _response(status: int, ctype: str, body: bytes, *, close: bool,
              head_only: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    if status != 204:  # a 204 carries neither (RFC 9110)
        lines += [f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in _HEADERS.items()]
    lines += [f"{k}: {v}" for k, v in extra]
    given = {k.lower() for k, _ in extra}
    if status == 405 and "allow" not in given:
        lines.append("Allow: GET, HEAD")
    if status in (429, 503) and "retry-after" not in given:
        lines.append("Retry-After: 1")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 204 else head + body


class _Closed(Exception):
    """The peer went away: close without answering."""


class _Connection(socketserver.BaseRequestHandler):
    """One client connection, on its own thread, until it closes or breaks a rule.

    Every request must arrive whole (request line and headers) within ``timeout_s`` of
    the connection opening or the previous answer: a deadline, not a per-read timeout,
    so a client trickling a byte at a time is cut off like one that sends nothing."""

    server: _Server
    request: socket.socket

    def handle(self) -> None:
        self.buf = bytearray()
        try:
            while self._one():
                pass
        except _Closed:
            pass
        except HeadError as err:
            self._fail(err.status, str(err))
        except Exception:  # a bug must not end more than this connection
            log.exception("fleet page: connection from %s failed", self.client_address[0])
            self._fail(500, "internal error; see the serve log")

    def _one(self) -> bool:
        """Read and answer one request; False when the connection is to close."""
        cfg = self.server.api.config
        deadline = time.monotonic() + cfg.timeout_s
        head = self._read_head(deadline)
        if head is None:
            return False
        req = parse_head(head)
        check_host(req, self.server.hosts, "allowed_hosts (serve --http-allow-host)")
        if req.method not in ("GET", "HEAD", "POST"):
            raise HeadError(405 if req.method in _METHODS else 501,
                            f"{req.method[:16]} is not allowed: the fleet page is read-only "
                            "(GET) but for sign-in and rollout actions (POST)")
        length = req.headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            raise HeadError(400, f"invalid Content-Length {length[:40]!r}; expected ASCII "
                                 "digits")
        # Not reading a body means closing: its bytes must not be read as a request.
        size = int(length[:20]) if length else 0
        if req.method != "POST" and (size or "transfer-encoding" in req.headers):
            raise HeadError(413, f"the fleet page takes no request body with {req.method}")
        if "transfer-encoding" in req.headers:
            raise HeadError(411, "send the body with Content-Length, not Transfer-Encoding")
        if req.method == "POST" and length is None:
            raise HeadError(411, "POST needs a Content-Length header")
        if size > cfg.max_body_bytes:
            raise HeadError(413, f"request body over {cfg.max_body_bytes} bytes "
                                 "(max_body_bytes)")
        while len(self.buf) < size:
            if not self._recv(deadline):
                raise HeadError(408, "request body not received within "
                                     f"{cfg.timeout_s:g} s (timeout_s)")
        body = bytes(self.buf[:size])
        del self.buf[:size]
        ans = self.server.api.serve(Request(req.method, req.target, req.headers, body,
                                            str(self.client_address[0])))
        keep = req.keep_alive
        self._send(_response(ans.status, ans.ctype, ans.body, close=not keep,
                             head_only=req.method == "HEAD", extra=ans.headers),
                   cfg.timeout_s)
        return keep

    def _read_head(self, deadline: float) -> str | None:
        """The next request head (up to its blank line) as Latin-1 text; None when the
        client closed or sent nothing before ``deadline``."""
        cfg = self.server.api.config
        limit, buf = cfg.max_header_bytes, self.buf
        scanned, line_ok = 0, False
        while True:
            while not line_ok and buf[:2] == b"\r\n":  # empty lines before a request
                del buf[:2]                              # line are ignored (RFC 9112)
                scanned = 0
            end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
            lf = find_bare_lf(buf, max(0, scanned - 1))
            if lf >= 0 and (end < 0 or lf < end):  # in the head, not in what follows it
                raise HeadError(400, "lines must end in CRLF (a bare LF was sent)")
            if not line_ok and (eol := buf.find(b"\r\n", 0, limit + 2)) >= 0:
                # Checked as soon as it is complete: a line with no version is answered
                # now, not once the client gives up waiting for headers.
                parse_request_line(bytes(buf[:eol]).decode("latin-1"))
                line_ok = True
            if end >= 0 or len(buf) > limit:
                break
            scanned = len(buf)
            if not self._recv(deadline):
                return None
        if end < 0 or end > limit:
            if not line_ok:
                raise HeadError(414, f"request line over {limit} bytes (max_header_bytes)")
            raise HeadError(431, f"request headers over {limit} bytes (max_header_bytes)")
        head = bytes(buf[:end]).decode("latin-1")
        del buf[:end + 4]
        return head

    def _recv(self, deadline: float) -> bool:
        """Append what the peer sends next to ``buf``. False when it closed, or sent
        nothing of a request before the deadline; 408 when a request was under way."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.request.settimeout(left)
            data = self.request.recv(65536)
        except TimeoutError:
            if not self.buf:
                return False  # idle: closed quietly
            raise HeadError(408, "request not received within "
                                 f"{self.server.api.config.timeout_s:g} s (timeout_s)") from None
        except OSError:
            raise _Closed() from None
        if not data:
            if self.buf:
                raise _Closed()
            return False
        self.buf += data
        return True

    def _send(self, data: bytes, timeout: float) -> None:
        # On Python >= 3.5 the timeout bounds the whole sendall: a client that does not
        # read its answer cannot hold the thread either.
        self.request.settimeout(timeout)
        try:
            self.request.sendall(data)
        except OSError:
            raise _Closed() from None

    def _fail(self, status: int, message: str) -> None:
        """Answer ``status`` and close; what the client still sends is read for a moment
        first, as closing with unread bytes resets the connection and can drop the
        answer before the client reads it."""
        log.debug("fleet page: %s from %s: %s", status, self.client_address[0], message)
        try:
            self._send(_response(status, _JSON, error_body(message), close=True), 1.0)
            self.request.shutdown(socket.SHUT_WR)
            until = time.monotonic() + 1.0
            while (left := until - time.monotonic()) > 0:
                self.request.settimeout(left)
                if not self.request.recv(65536):
                    break
        except (OSError, _Closed):
            pass


def _client_key(host: str) -> str:
    """The address a per-client cap counts: IPv4 as is, IPv6 by its /64 (one host holds a
    whole /64, so counting single addresses would not cap anyone)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, api: FleetApi, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self.api = api
        cfg = api.config
        host = cfg.host.lower().removesuffix(".")
        self.hosts = frozenset({*cfg.allowed_hosts, host})
        self._lock = threading.Lock()
        self._open = 0
        self._per_client: dict[str, int] = {}
        self.request_queue_size = cfg.listen_backlog  # read by listen() in __init__
        super().__init__(address, _Connection)

    def process_request(self, request: Any, client_address: Any) -> None:
        cfg = self.api.config
        key = _client_key(str(client_address[0]))
        with self._lock:
            if self._open >= cfg.max_connections:
                refusal: bytes | None = _BUSY
            elif self._per_client.get(key, 0) >= cfg.max_connections_per_client:
                refusal = _CLIENT_BUSY
            else:
                refusal = None
                self._open += 1
                self._per_client[key] = self._per_client.get(key, 0) + 1
        if refusal is not None:
            _refuse(request, refusal)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._release(key)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(_client_key(str(client_address[0])))

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def _release(self, key: str) -> None:
        with self._lock:
            self._open -= 1
            n = self._per_client.get(key, 0) - 1
            if n > 0:
                self._per_client[key] = n
            else:
                self._per_client.pop(key, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("fleet page: connection from %s ended with an error", client_address,
                  exc_info=True)


def _refuse(sock: socket.socket, answer: bytes) -> None:
    """Answer a connection over a cap without reading it and without blocking the
    accepting thread."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(answer)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)  # unread bytes at close would reset the connection


_BUSY = _response(503, _JSON, error_body("too many connections to the fleet page "
                                         "(max_connections); retry later"), close=True)
_CLIENT_BUSY = _response(429, _JSON, error_body(
    "too many connections from your address to the fleet page "
    "(max_connections_per_client); retry later"), close=True)


class WebServer:
    """The fleet page on ``config.host:config.port`` in a background thread, until
    :meth:`stop`. Raises :class:`FleetError` when the address cannot be bound."""

    def __init__(self, db: FleetDB, *, fleet: str | None = None,
                 config: WebConfig | None = None,
                 warnings: Callable[[], list[dict[str, Any]]] | None = None,
                 yanked: Yanked | None = None) -> None:
        self.config = config or WebConfig()
        self.api = FleetApi(db, fleet=fleet, config=self.config, warnings=warnings,
                            yanked=yanked)
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

    @property
    def connections(self) -> int:
        """Connections admitted and not yet closed (each holds a thread)."""
        return self._server.open_connections

    def start(self) -> WebServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        started = self._thread.ident is not None  # shutdown() waits for a running loop
        if started:
            self._server.shutdown()
        self._server.server_close()
        if started:
            self._thread.join(5)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Answer", "FleetApi", "Request", "WebConfig", "WebServer", "is_loopback"]
