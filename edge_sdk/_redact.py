"""Secrets out of everything edge-sdk prints: one place that knows what a secret looks like.

Two layers, because a message is built in many places and libraries echo what they were
given (a DSN in a driver's error, a URL in a connect failure):

- :func:`redact_url` at the source: wherever a broker or database URL goes into a message,
  the message names it through this function (``mqtt://user:***@host:1883``).
- :func:`redact` at the two exits: the CLI's one-line error and every log record
  (:func:`install_log_redaction`) pass through it. It redacts every URL in the text and
  every secret the process was given (:func:`add_secret`: ``--password``, passwords in
  URLs, password files), wherever it appears.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

MASK = "***"
#: Shorter secrets are redacted inside URLs only: replacing every "ab" in a log line
#: would make the log unreadable without protecting much.
_MIN_SECRET = 4
#: Query and DSN keys whose values are secrets (libpq takes ``password=`` in a URL).
_SECRET_KEYS = r"(?:password|passwd|pwd|pass|secret|token|sslpassword|api[_-]?key)"
_QUERY_SECRET = re.compile(rf"(?i)(?<![A-Za-z0-9_])({_SECRET_KEYS}=)[^&#\s'\"]*")
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URL = re.compile(rf"{_SCHEME}[^\s'\"<>]*")
#: A comma that starts the next URL of a list (``mqtt://a:1883,mqtt://b:1883``); a comma
#: inside a password does not.
_NEXT_URL = re.compile(rf",(?=\s*{_SCHEME})")

_lock = threading.Lock()
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Remember ``value`` as a secret: :func:`redact` masks it wherever it appears, for the
    rest of the process. Passwords in a URL are taken from it (give the URL)."""
    if not value:
        return
    found = [value] if "://" not in value else _url_passwords(value)
    with _lock:
        _secrets.update(s for s in found if len(s) >= _MIN_SECRET)


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of URLs) with every password masked: the one in
    the user info (``scheme://user:***@host``) and secret query parameters
    (``?password=***``). The user name, host, port and path stay readable."""
    return ",".join(_one_url(u) for u in _NEXT_URL.split(url))


def redact(text: str) -> str:
    """``text`` with every URL's password and every secret given to :func:`add_secret`
    masked."""
    out = _URL.sub(lambda m: redact_url(m.group(0)), text)
    out = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, out)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for s in known:
        if s in out:
            out = out.replace(s, MASK)
    return out


def _one_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, url)
    # The host follows the last '@' (a password may hold '@', '/' or ':'), so everything
    # before it is user info.
    cred, at, tail = rest.rpartition("@")
    if at and ":" in cred:
        rest = f"{cred.split(':', 1)[0]}:{MASK}@{tail}"
    return f"{scheme}://" + _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, rest)


def _url_passwords(text: str) -> list[str]:
    from urllib.parse import unquote

    out: list[str] = []
    for url in _NEXT_URL.split(text):
        rest = url.partition("://")[2]
        cred, at, _ = rest.rpartition("@")
        if at and ":" in cred:
            pw = cred.split(":", 1)[1]
            out += [pw, unquote(pw)]
        out += [unquote(m.group(0).split("=", 1)[1])
                for m in _QUERY_SECRET.finditer(url)]
    return [p for p in out if p]


_installed = False


def install_log_redaction() -> None:
    """Make every log record this process creates carry a redacted message and traceback
    (idempotent). The message is formatted when the record is made, which happens only for
    levels a logger has enabled."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    make = logging.getLogRecordFactory()
    plain = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        rec = make(*args, **kwargs)
        try:
            rec.msg, rec.args = redact(rec.getMessage()), None
            if rec.exc_info and rec.exc_info[0] is not None:
                rec.exc_text = redact(plain.formatException(rec.exc_info))
        except Exception:  # a message that cannot be formatted stays as logging shows it
            pass
        return rec

    logging.setLogRecordFactory(factory)


__all__ = ["MASK", "add_secret", "install_log_redaction", "redact", "redact_url"]
