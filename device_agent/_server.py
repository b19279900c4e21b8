"""The HTTP/1.1 socket layer of the agent's endpoint; the protocol is in ``_protocol``.

A small strict reader, not the stdlib's ``http.server``: a request must be
unambiguous (one ``Content-Length`` of ASCII digits, HTTP/1.0 or 1.1, no folded
or space-padded header names; the head parser is ``edge_sdk._http``, shared with
the fleet page), so no two parsers can read it differently. Every resource a
client can hold is bounded by a key of ``[http]``: connections
(``max_connections``, each one thread), the names a ``Host`` header may carry
(``allowed_hosts``: DNS rebinding), the time to send a whole request
(``request_timeout_s``, not per read), idle keep-alive (``idle_timeout_s``),
header bytes (``max_header_bytes``), one body (``max_body_bytes``) and all
bodies held at once (``max_buffered_bytes``). A cap that is hit is answered at
once with a status and a message naming the key; nothing a client sends stops
the server.

Keep-alive, Nagle off and one ``send`` per response keep the overhead over an
in-process ``predict`` a fraction of a millisecond.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import selectors
import socket
import threading
import time

from edge_sdk._internal import HeadError, check_host, parse_head, reason
from edge_sdk.errors import ConfigError

from ._budget import Budget
from ._codec import is_decimal
from ._config import HttpConfig
from ._protocol import InferenceApp

log = logging.getLogger("device_agent.http")
_JSON = "application/json"
_CHUNK = 256 * 1024


class _Refused(Exception):
    """Answer ``status`` with ``message`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Closed(Exception):
    """The peer went away (or the server is stopping): close without answering."""


def _response(status: int, ctype: str, payload: bytes, extra: dict[str, str],
              close: bool, head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}",
             f"Content-Type: {ctype}", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


def _error(status: int, message: str) -> bytes:
    return _response(status, _JSON, json.dumps({"error": message}).encode(), {}, True)


class _Connection:
    """One client connection, served by its own thread until it closes."""

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.cfg = server.config
        self.buf = bytearray()

    def serve(self) -> None:
        try:
            while not self.server.stopping:
                if not self._one():
                    break
        except _Closed:
            pass
        except _Refused as err:
            self._send_error(err.status, str(err))
        except Exception as err:  # a bug must not take the server down
            log.error("http connection failed: %s: %s", type(err).__name__, err)
            log.debug("traceback", exc_info=True)
            self._send_error(500, f"internal error: {type(err).__name__}")

    def _send_error(self, status: int, message: str) -> None:
        self.server.count_error(status)
        self.server.release(self.sock)
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(_error(status, message))
            # Closing with unread bytes resets the connection, which can drop the answer
            # before the client reads it: read a little of what it is still sending first.
            self.sock.shutdown(socket.SHUT_WR)
            until = time.monotonic() + 1.0
            while (left := until - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass

    # -- reading -------------------------------------------------------------------------

    def _recv(self, deadline: float, what: str) -> None:
        """Append what the peer sends next to ``buf``; 408 once ``deadline`` passes."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refused(408, what)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(_CHUNK)
        except TimeoutError:
            raise _Refused(408, what) from None
        except OSError:
            raise _Closed() from None
        if not data:
            raise _Closed()
        self.buf += data

    def _one(self) -> bool:
        """Read and answer one request; False when the connection is to close."""
        cfg = self.cfg
        if not self.buf:
            # Idle between requests: closed quietly when nothing starts in time.
            try:
                self._recv(time.monotonic() + cfg.idle_timeout_s, "idle")
            except _Refused:
                return False
        deadline = time.monotonic() + cfg.request_timeout_s
        late = (f"request not received within {cfg.request_timeout_s:g} s "
                "(http.request_timeout_s)")
        limit = cfg.max_header_bytes
        scanned = 0
        while (end := self.buf.find(b"\r\n\r\n", max(0, scanned - 3))) < 0:
            if len(self.buf) > limit:
                break
            scanned = len(self.buf)
            self._recv(deadline, late)
        if end < 0 or end > limit:
            line_end = self.buf.find(b"\r\n", 0, limit + 2)
            if line_end < 0 or line_end > limit:
                raise _Refused(414, f"request line over {limit} bytes "
                                    "(http.max_header_bytes)")
            raise _Refused(431, f"request headers over {limit} bytes (http.max_header_bytes)")
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        try:
            req = parse_head(head)
            # Not required: local tools and probes may omit it; a browser never does.
            check_host(req, self.server.hosts, "http.allowed_hosts", required=False)
        except HeadError as err:
            raise _Refused(err.status, str(err)) from None
        method, target, version, headers = req
        keep = req.keep_alive
        body = self._body(method, version, headers, deadline, late)
        try:
            status, ctype, payload, extra = self.server.app.handle(method, target, headers,
                                                                   body)
        finally:
            self.server.buffered.release(len(body))
        del body
        if method == "HEAD":
            keep = False
        if not keep:
            self.server.release(self.sock)
        self.sock.settimeout(cfg.request_timeout_s)
        try:
            self.sock.sendall(_response(status, ctype, payload, extra, not keep,
                                        head_only=method == "HEAD"))
        except OSError:
            return False
        return keep

    def _body(self, method: str, version: str, headers: dict[str, str], deadline: float,
              late: str) -> bytes:
        cfg = self.cfg
        if "transfer-encoding" in headers:
            raise _Refused(411, "chunked bodies are not supported; send Content-Length")
        raw_len = headers.get("content-length")
        if raw_len is None:
            if method == "POST":
                raise _Refused(411, "Content-Length header required")
            return b""
        if not is_decimal(raw_len):
            raise _Refused(400, f"invalid Content-Length {raw_len[:40]!r}; expected ASCII "
                                "digits")
        length = int(raw_len)
        if length > cfg.max_body_bytes:
            # Not reading the body: closing keeps its bytes from being read as a request.
            raise _Refused(413, f"request body of {length} bytes is over the limit of "
                                f"{cfg.max_body_bytes} (http.max_body_bytes)")
        if not self.server.buffered.acquire(length):
            raise _Refused(503, f"request bodies being received at once are over "
                                f"{cfg.max_buffered_bytes} bytes (http.max_buffered_bytes); "
                                "retry later")
        try:
            have = min(len(self.buf), length)
            body = bytearray(length)
            body[:have] = self.buf[:have]
            del self.buf[:have]
            if have < length and version == "HTTP/1.1" and \
                    headers.get("expect", "").lower() == "100-continue":
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            view = memoryview(body)
            while have < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Refused(408, late)
                self.sock.settimeout(left)
                try:
                    n = self.sock.recv_into(view[have:], min(length - have, _CHUNK))
                except TimeoutError:
                    raise _Refused(408, late) from None
                except OSError:
                    raise _Closed() from None
                if not n:
                    raise _Closed()
                have += n
            view.release()
        except BaseException:
            self.server.buffered.release(length)
            raise
        # Read into one buffer of the declared size: no copy of the body is made here.
        return body  # type: ignore[return-value]


class HttpServer:
    """The endpoint: one accepting thread, one thread per connection (capped)."""

    def __init__(self, app: InferenceApp, bind: str, port: int) -> None:
        self.app = app
        self.config: HttpConfig = app.config
        self.buffered = Budget(self.config.max_buffered_bytes)
        #: Names a Host header may carry besides addresses and localhost (DNS rebinding).
        self.hosts = frozenset(n.lower().removesuffix(".")
                               for n in (*self.config.allowed_hosts, bind))
        self.stopping = False
        try:
            self._sock = socket.create_server((bind, port),
                                              backlog=self.config.listen_backlog)
        except OSError as err:
            raise ConfigError(f"http: cannot listen on {bind}:{port}: {err.strerror}") from err
        self._sock.setblocking(False)
        self._lock = threading.Condition()
        self._conns: set[socket.socket] = set()
        #: Accepted connections waiting for a thread, and the threads (all, and waiting).
        self._pending: collections.deque[socket.socket] = collections.deque()
        self._workers = self._idle = 0
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._sock.getsockname()[0]}:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def release(self, conn: socket.socket) -> None:
        """Stop counting ``conn`` against ``max_connections``: it is closing. Done before
        its last answer is sent, as a client may reconnect as soon as it has read it."""
        with self._lock:
            self._conns.discard(conn)

    def count_error(self, status: int) -> None:
        self.app.metrics.errors.labels(str(status)).inc()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="agent-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping = True
        if self._thread is not None:
            self._thread.join(5)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._lock.notify_all()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            while not self.stopping:
                if not sel.select(0.2):
                    continue
                while not self.stopping:  # all that are queued, one select for a burst
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        break
                    conn.setblocking(True)
                    self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            full = len(self._conns) >= self.config.max_connections
            if not full:
                self._conns.add(conn)
                self._pending.append(conn)
                # Threads are kept and reused (starting one costs more than a small
                # request). A closing connection no longer counts against the cap while
                # it sends its last answer, hence up to twice the cap in threads.
                spawn = self._idle < len(self._pending) and \
                    self._workers < 2 * self.config.max_connections
                if spawn:
                    self._workers += 1
                else:
                    self._lock.notify()
        if full:
            # Answered without reading the request, and without blocking this thread.
            self.count_error(503)
            try:
                conn.setblocking(False)
                conn.send(_error(503, f"more than {self.config.max_connections} connections "
                                      "open (http.max_connections); retry later"))
                conn.shutdown(socket.SHUT_WR)
                # Closing with unread bytes would reset the connection and could drop the
                # answer before the client reads it.
                conn.recv(65536)
            except OSError:
                pass
            conn.close()
            return
        if spawn:
            threading.Thread(target=self._work, name="agent-http-conn", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
                while not self._pending and not self.stopping:
                    self._lock.wait()
                self._idle -= 1
                if self.stopping:
                    self._workers -= 1
                    return
                conn = self._pending.popleft()
            try:
                _Connection(self, conn).serve()
            finally:
                self.release(conn)
                with contextlib.suppress(OSError):
                    conn.close()

    def __repr__(self) -> str:
        return f"HttpServer({self.url}, {self.connections} connection(s))"
