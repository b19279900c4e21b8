"""Operator accounts and sign-in sessions of the fleet page (schema 7).

An operator is made with ``edge-sdk operator add NAME``; the password is stored as a
scrypt hash (stdlib :func:`hashlib.scrypt`, a random 16-byte salt per account, the cost
parameters kept in the stored string so they can be raised later):
``scrypt$N$r$p$SALT$KEY`` (base64). Checking compares in constant time, and a name that
is no operator costs the same scrypt run as a wrong password, so neither the answer nor
its time says which of the two was wrong.

A session is a random 256-bit token in the browser's cookie; the database keeps only its
sha256 (``operator_sessions.id``), so a copy of the database signs no one in. A session
ends at ``expires`` (absolute), after ``idle_s`` without use, at sign-out, and when its
operator is removed, disabled or given a new password. The CSRF token a page must send
with every action is derived from the session token (HMAC), so it needs no storage and
is worthless without the cookie.

:class:`LoginThrottle` is the backoff after wrong passwords: per account and per client
address, the first ``free`` failures cost nothing, then each one doubles a lock window
(``base_s``, 2×, 4× … up to ``max_s``) in which that account or address is answered "try
again in N s" without the password being checked. It lives in memory (a restarted
``serve`` forgets it) and never sleeps: the caller answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _store as store
from ._store import FleetDB, FleetUsageError, engine_url

log = logging.getLogger("edge_sdk.fleet.operators")

#: scrypt cost: 2**15 × 8 × 128 bytes = 32 MiB and about 0.1 s per check on a small CPU.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
MAX_NAME = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


def check_name(name: str) -> str:
    """``name`` if it can name an operator (it is the audit log's actor), else one line."""
    if not 1 <= len(name) <= MAX_NAME or not set(name) <= _NAME_CHARS:
        raise FleetUsageError(f"operator name {name[:80]!r} must be 1..{MAX_NAME} letters, "
                              "digits or . _ @ -")
    return name


def check_new_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise FleetUsageError(f"the password must have {MIN_PASSWORD}..{MAX_PASSWORD} "
                              "characters")
    if not password.isprintable():
        raise FleetUsageError("the password must hold printable characters only")
    return password


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r + (1 << 20))


def hash_password(password: str) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$SALT$KEY``."""
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def check_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare). A malformed or
    out-of-range stored value never matches."""
    try:
        kind, n, r, p, salt, key = stored.split("$")
        ni, ri, pi = int(n), int(r), int(p)
        if kind != "scrypt" or not (2 <= ni <= 2**20 and 1 <= ri <= 32 and 1 <= pi <= 16):
            return False
        want = base64.b64decode(key, validate=True)
        got = _scrypt(password, base64.b64decode(salt, validate=True), ni, ri, pi)
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy() -> str:
    """A hash no password is known for: checked when the name is no operator, so that an
    unknown name takes as long as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


# -- accounts ------------------------------------------------------------------------------

def _owner_only(db: FleetDB) -> None:
    """Make a SQLite fleet database (and its WAL files) readable by its owner only once it
    holds a password hash: another local user could copy the hashes and guess at them
    offline, with no backoff. A server database (PostgreSQL) has its own access rules."""
    url = engine_url(db.url)
    if not url.startswith("sqlite:///"):
        return
    path = url[len("sqlite:///"):]
    for p in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(p).st_mode
            if mode & 0o077:
                os.chmod(p, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as err:  # another user's file: say so, the account still works
            log.warning("cannot make %s readable by its owner only: %s", p, err.strerror)


def add_operator(db: FleetDB, name: str, password: str, actor: str) -> None:
    """Make an operator. Raises :class:`FleetUsageError` when the name is taken."""
    check_name(name)
    stored = hash_password(check_new_password(password))
    with db.begin() as c:
        if store.operator_exists(c, name):
            raise FleetUsageError(f"operator {name!r} exists; 'edge-sdk operator passwd "
                                  f"{name}' sets a new password")
        store.insert_operator(c, name, stored, actor)
        db.record_audit(actor, "operator.add", {"name": name}, conn=c)
    _owner_only(db)


def set_password(db: FleetDB, name: str, password: str, actor: str) -> None:
    """A new password for ``name``; its sessions end."""
    stored = hash_password(check_new_password(password))
    with db.begin() as c:
        if not store.update_operator(c, name, stored=stored):
            raise FleetUsageError(f"no operator {name[:80]!r}")
        store.end_sessions(c, name)
        db.record_audit(actor, "operator.passwd", {"name": name}, conn=c)
    _owner_only(db)


def set_disabled(db: FleetDB, name: str, disabled: bool, actor: str) -> None:
    """Disable (its sessions end, it cannot sign in) or enable ``name``."""
    with db.begin() as c:
        if not store.update_operator(c, name, disabled=disabled):
            raise FleetUsageError(f"no operator {name[:80]!r}")
        if disabled:
            store.end_sessions(c, name)
        db.record_audit(actor, "operator.disable" if disabled else "operator.enable",
                        {"name": name}, conn=c)


def remove_operator(db: FleetDB, name: str, actor: str) -> None:
    """Remove ``name``; its sessions end at once."""
    with db.begin() as c:
        store.end_sessions(c, name)
        if not store.delete_operator(c, name):
            raise FleetUsageError(f"no operator {name[:80]!r}")
        db.record_audit(actor, "operator.remove", {"name": name}, conn=c)


def list_operators(db: FleetDB) -> list[dict[str, Any]]:
    """Every operator (never the hash) with its number of live sessions."""
    return store.list_operators(db)


def has_operators(db: FleetDB) -> bool:
    return store.has_operators(db)


def authenticate(db: FleetDB, name: str, password: str) -> bool:
    """Whether ``name`` is an enabled operator and ``password`` is its password. Costs one
    scrypt run either way. A name no operator can have (``check_name``: say a lone
    surrogate from a JSON escape, which no database driver can encode) is not looked up."""
    row = None
    if 1 <= len(name) <= MAX_NAME and set(name) <= _NAME_CHARS:
        row = store.operator_hash(db, name)
    stored = row.hash if row is not None else _dummy()
    ok = check_password(stored, password)
    return ok and row is not None and not row.disabled


# -- sessions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    operator: str
    csrf: str


def _session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(token: str) -> str:
    """The CSRF token of the session whose cookie holds ``token``."""
    return hmac.new(token.encode(), b"edge-sdk fleet page csrf", hashlib.sha256).hexdigest()


def open_session(db: FleetDB, name: str, address: str, ttl_s: float) -> str:
    """A new session of ``name``: the token for its cookie. Expired sessions go."""
    token = secrets.token_urlsafe(32)
    store.insert_session(db, _session_id(token), name, address, ttl_s)
    return token


def find_session(db: FleetDB, token: str, idle_s: float) -> Session | None:
    """The live session ``token`` names (its use noted), or None: unknown, expired, idle
    too long, or its operator gone or disabled."""
    if not 20 <= len(token) <= 128 or not token.isascii():  # tokens are base64url
        return None
    sid, now = _session_id(token), time.time()
    row = store.session(db, sid)
    if row is None or row.disabled or row.expires <= now or row.last_used + idle_s <= now:
        return None
    if now - row.last_used > min(30.0, idle_s / 10):  # not a write for every poll
        store.touch_session(db, sid, now)
    return Session(operator=row.operator, csrf=csrf_token(token))


def close_session(db: FleetDB, token: str) -> None:
    store.delete_session(db, _session_id(token))


# -- backoff after wrong passwords --------------------------------------------------------

class LoginThrottle:
    """Per-key failure counts and lock windows (keys: an account, a client address).
    Thread-safe; holds at most ``max_keys`` keys (see :meth:`_evict`)."""

    def __init__(self, *, free: int = 3, base_s: float = 1.0, max_s: float = 900.0,
                 max_keys: int = 10000, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s = free, base_s, max_s
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        #: key -> (failures, locked until, last failure)
        self._keys: dict[str, tuple[int, float, float]] = {}

    def wait(self, *keys: str) -> float:
        """Seconds until any of ``keys`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            return max([0.0, *(self._keys.get(k, (0, 0.0, 0.0))[1] - now for k in keys)])

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for k in keys:
                n = self._keys.pop(k, (0, 0.0, 0.0))[0] + 1
                over = n - self.free
                until = now + min(self.max_s, self.base_s * 2 ** min(over - 1, 40)) \
                    if over > 0 else 0.0
                self._keys[k] = (n, until, now)  # re-inserted: the newest at the end
            if len(self._keys) > self.max_keys:
                self._evict(now)

    def _evict(self, now: float) -> None:
        """Forget keys down to ``max_keys``: the oldest whose lock has ended first, so a
        flood of new names or addresses cannot push a locked key out and end its lock;
        locked ones (the oldest first) only when every key is locked."""
        over = len(self._keys) - self.max_keys
        for k in [k for k, (_, until, _) in self._keys.items() if until <= now][:over]:
            del self._keys[k]
        while len(self._keys) > self.max_keys:
            del self._keys[next(iter(self._keys))]

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._keys.pop(k, None)

    def forget_idle(self) -> None:
        """Drop keys whose lock ended and that failed nothing for ``max_s``."""
        now = self.clock()
        with self._lock:
            for k, (_, until, last) in list(self._keys.items()):
                if until <= now and last + self.max_s <= now:
                    del self._keys[k]


__all__ = ["LoginThrottle", "Session", "add_operator", "authenticate", "check_name",
           "check_password", "close_session", "csrf_token", "find_session",
           "has_operators", "hash_password", "list_operators", "open_session",
           "remove_operator", "set_disabled", "set_password"]
