"""Names of the identity protocol: device ids, claim batches, claim account user names."""

from __future__ import annotations

import hashlib

from ..errors import ConfigError
from ..transport._config import check_topic_word
from ._errors import IdentityError

#: A claim batch is one topic level, and short: it is part of a broker user name.
MAX_BATCH_CHARS = 32
#: Claim accounts are named so; no device id can start with ``_``.
CLAIM_PREFIX = "_claim-"
#: A claim is this many broker accounts ("sessions") by default, at most
#: :data:`MAX_CLAIM_SESSIONS`: all with the claim's password and role. The broker names a
#: connection after its user (``use_username_as_clientid``), so one account would let each
#: device of a batch close the enrolment exchange of the one before it.
DEFAULT_CLAIM_SESSIONS = 16
MAX_CLAIM_SESSIONS = 256


def check_batch(batch: str) -> str:
    """``batch`` if it is a valid claim batch (one topic level, at most 32 characters);
    raises :class:`IdentityError` otherwise."""
    if not isinstance(batch, str):
        raise IdentityError(f"claim batch must be a string, not {type(batch).__name__}")
    if len(batch) > 64:
        raise IdentityError(f"claim batch {batch[:32]!r}… is {len(batch)} characters: at most "
                            f"{MAX_BATCH_CHARS} are allowed")
    try:
        check_topic_word(batch, "claim batch")
    except ConfigError as err:
        raise IdentityError(str(err)) from None
    if len(batch) > MAX_BATCH_CHARS:
        raise IdentityError(
            f"claim batch {batch[:40]!r} is {len(batch)} characters: "
            f"at most {MAX_BATCH_CHARS} are allowed")
    return batch


def check_claim_sessions(sessions: int, what: str = "claim sessions") -> int:
    """``sessions`` if a claim can have that many accounts (1 to
    :data:`MAX_CLAIM_SESSIONS`); raises :class:`IdentityError` otherwise."""
    if not isinstance(sessions, int) or isinstance(sessions, bool) or \
            not 1 <= sessions <= MAX_CLAIM_SESSIONS:
        raise IdentityError(f"{what}: expected a whole number from 1 to "
                            f"{MAX_CLAIM_SESSIONS}, not {sessions!r}")
    return sessions


def claim_username(batch: str, session: int = 0) -> str:
    """The broker user name of session ``session`` of the claim of ``batch``:
    ``_claim-<batch>`` for session 0, ``_claim<k>-<batch>`` for k >= 1 (a batch may hold
    '-', the session number never does: the names cannot collide)."""
    batch = check_batch(batch)
    if not isinstance(session, int) or isinstance(session, bool) or \
            not 0 <= session < MAX_CLAIM_SESSIONS:
        raise IdentityError(f"claim session must be a whole number from 0 to "
                            f"{MAX_CLAIM_SESSIONS - 1}, not {session!r}")
    return CLAIM_PREFIX + batch if session == 0 else f"_claim{session}-{batch}"


def claim_session(device_id: str, sessions: int) -> int:
    """The claim session device ``device_id`` uses when the claim has ``sessions``: the
    same on every start, spread evenly over the batch (sha256 of the id, modulo)."""
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % check_claim_sessions(sessions)


def check_device_id(device_id: str) -> str:
    """``device_id`` if it can name a device (one topic level, not starting with ``_``);
    raises :class:`IdentityError` otherwise."""
    if not isinstance(device_id, str):
        raise IdentityError(f"device id must be a string, not {type(device_id).__name__}")
    if device_id.startswith("_"):
        raise IdentityError(
            f"device id {device_id[:64]!r} starts with '_': such names are claim accounts")
    if len(device_id) > 64:
        raise IdentityError(f"device id {device_id[:64]!r}… is {len(device_id)} characters: "
                            "at most 64 are allowed")
    try:
        return check_topic_word(device_id, "device id")
    except ConfigError as err:
        raise IdentityError(str(err)) from None


__all__ = ["CLAIM_PREFIX", "DEFAULT_CLAIM_SESSIONS", "MAX_BATCH_CHARS", "MAX_CLAIM_SESSIONS",
           "check_batch", "check_claim_sessions", "check_device_id", "claim_session",
           "claim_username"]
