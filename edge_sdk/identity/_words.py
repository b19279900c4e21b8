"""Names of the identity protocol: device ids, claim batches, claim account user names."""

from __future__ import annotations

from ..errors import ConfigError
from ..transport._config import check_topic_word
from ._errors import IdentityError

#: A claim batch is one topic level, and short: it is part of a broker user name.
MAX_BATCH_CHARS = 32
#: Claim accounts are named so; no device id can start with ``_``.
CLAIM_PREFIX = "_claim-"


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


def claim_username(batch: str) -> str:
    """The broker user name of the claim account of ``batch``: ``_claim-<batch>``."""
    return CLAIM_PREFIX + check_batch(batch)


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


__all__ = ["CLAIM_PREFIX", "MAX_BATCH_CHARS", "check_batch", "check_device_id",
           "claim_username"]
