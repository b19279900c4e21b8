"""The strict HTTP/1.1 request-head reader shared by the fleet page and the device agent.

Pure functions over text already read from a socket; each server does its own I/O and
turns :class:`HeadError` into a response with its status. A request must be unambiguous,
so that no proxy or client library in front of a server can read it differently
(request smuggling) and a broken client gets a clear 4xx instead of a guess:

- the request line is ``METHOD SP /target SP HTTP/1.x`` with single spaces: no line
  without a version (HTTP/0.9), no absolute or asterisk form, target bytes printable
  ASCII;
- lines end in CRLF; a header line is ``token ":" value`` with nothing between the name
  and the colon, never a continuation (obs-fold) and never a line without a colon;
  values hold no control characters but tab;
- headers whose repetition is ambiguous (``Content-Length``, ``Transfer-Encoding``,
  ``Host``, ...) appear at most once; others are joined with ``", "``;
- :func:`check_host` refuses a ``Host`` that does not name the server (DNS rebinding:
  a web page whose name an attacker re-points at 127.0.0.1 still sends its own name).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from http import HTTPStatus
from typing import NamedTuple

#: Headers whose repetition makes a request ambiguous (request smuggling, or two
#: different bodies depending on which copy a reader takes).
SINGLE = frozenset({"content-length", "transfer-encoding", "content-encoding", "host",
                    "inference-header-content-length", "expect", "connection"})
TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                  "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CTL = frozenset(chr(c) for c in (*range(0x20), 0x7F)) - {"\t"}
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


def reason(status: int) -> str:
    """The reason phrase of a status line (``Error`` for a code HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class HeadError(ValueError):
    """A request head a server must refuse: answer ``status`` with the message, close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str
    #: Lower-case names.
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


def parse_request_line(line: str) -> tuple[str, str, str]:
    """``(method, target, version)`` of one request line (without its CRLF)."""
    words = line.split(" ")
    if len(words) != 3 or not words[0] or not set(words[0]) <= TOKEN or \
            not words[1].startswith("/") or not _printable_ascii(words[1]):
        raise HeadError(400, f"bad request line {line[:80]!r} (expected METHOD /path "
                             "HTTP/1.1)")
    method, target, version = words
    if version not in _VERSIONS:
        if version.startswith("HTTP/") and version[5:6].isdigit():
            raise HeadError(505, f"{version[:20]} is not supported; use HTTP/1.1")
        raise HeadError(400, f"bad request line {line[:80]!r} (expected METHOD /path "
                             "HTTP/1.1)")
    return method, target, version


def parse_head(head: str) -> RequestHead:
    """The request line and headers of ``head``: everything before the blank line, as
    Latin-1 text with CRLF line ends."""
    line, _, rest = head.partition("\r\n")
    method, target, version = parse_request_line(line)
    headers: dict[str, str] = {}
    for raw in rest.split("\r\n") if rest else ():
        name, sep, value = raw.partition(":")
        if not sep or not name or not set(name) <= TOKEN:
            why = "a folded continuation line (obs-fold)" if raw[:1] in (" ", "\t") else \
                "no colon" if not sep else "the name must be a token, no space before ':'"
            raise HeadError(400, f"malformed header line {raw[:80]!r}: {why}")
        key = name.lower()
        value = value.strip(" \t")
        if not _CTL.isdisjoint(value):
            raise HeadError(400, f"header {name[:40]} holds a control character")
        if key in headers:
            if key in SINGLE:
                raise HeadError(400, f"duplicate {name} header")
            headers[key] += ", " + value
        else:
            headers[key] = value
    return RequestHead(method, target, version, headers)


def find_bare_lf(data: bytes | bytearray, start: int = 0) -> int:
    """The index of the first LF at or after ``start`` that no CR precedes, or -1."""
    i = data.find(b"\n", start)
    while i >= 0:
        if i == 0 or data[i - 1] != 0x0D:
            return i
        i = data.find(b"\n", i + 1)
    return -1


def check_host(head: RequestHead, names: Collection[str], key: str, *,
               required: bool = True) -> None:
    """Refuse a request whose ``Host`` does not name this server: 421 for a name that is
    neither an IP address, ``localhost`` (or ``*.localhost``, which browsers resolve to
    loopback themselves) nor one of ``names`` (lower case); 400 for a malformed one, and
    with ``required`` for an HTTP/1.1 request without one (a browser always sends it).
    ``key`` is the setting that adds a name, for the message. The port is not compared:
    a proxy in front may use another one."""
    value = head.headers.get("host")
    if value is None:
        if required and head.version == "HTTP/1.1":
            raise HeadError(400, "HTTP/1.1 request without a Host header")
        return
    host = host_name(value)
    if host is None:
        raise HeadError(400, f"malformed Host header {value[:80]!r}")
    if host in names or host == "localhost" or host.endswith(".localhost") or _is_ip(host):
        return
    raise HeadError(421, f"Host {value[:80]!r} does not name this server (a DNS rebinding "
                         f"attempt, or a name to add to {key})")


def host_name(value: str) -> str | None:
    """The lower-case host of a ``Host`` header value (``name``, ``name:port``,
    ``[v6]:port``), without a trailing dot; None when malformed."""
    if value.startswith("["):
        inside, sep, port = value[1:].partition("]")
        if not sep or (port and not (port[0] == ":" and _port(port[1:]))):
            return None
        return inside.lower() if _is_ip(inside) else None
    name, sep, port = value.partition(":")
    if sep and not _port(port):
        return None
    name = name.lower().removesuffix(".")
    if not name or len(name) > 253 or not set(name) <= _HOST_CHARS:
        return None
    return name


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def _port(s: str) -> bool:
    return s.isascii() and s.isdigit() and len(s) <= 5


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _printable_ascii(s: str) -> bool:
    return all(0x21 <= ord(c) <= 0x7E for c in s)


__all__ = ["SINGLE", "TOKEN", "HeadError", "RequestHead", "check_host", "find_bare_lf",
           "host_name", "parse_head", "parse_request_line"]
