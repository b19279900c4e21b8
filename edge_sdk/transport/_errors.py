"""Transfer failures that are also verification failures (refused, nothing installed)."""

from __future__ import annotations

from ..errors import TransportError, VerificationError


class EndlessDataError(VerificationError):
    """The repository offered more bytes than the signed length or the configured maximum."""


class SlowRetrievalError(TransportError, VerificationError):
    """A chunk did not arrive after every retry: the responder is gone, or stalls on purpose.

    It is both a :class:`TransportError` (retry later) and a :class:`VerificationError`
    (the transfer was refused and nothing was installed).
    """


class RemoteNotFoundError(TransportError):
    """The repository responder does not have the requested file."""
