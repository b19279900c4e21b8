"""Transfer failures: transient ones (:class:`TransportError`: retry later) and the one
that is an attack (:class:`EndlessDataError`, a :class:`VerificationError`: refused)."""

from __future__ import annotations

from ..errors import TransportError, VerificationError


class EndlessDataError(VerificationError):
    """The repository offered more bytes than the signed length or the configured maximum."""


class SlowRetrievalError(TransportError):
    """A chunk did not arrive after every retry: the responder is gone, or stalls on purpose.

    Transient, like every :class:`TransportError`: nothing was installed, the partial
    download is kept, and the next attempt resumes it. A stall cannot make the device
    install anything, so it is not a :class:`VerificationError`.
    """


class RemoteNotFoundError(TransportError):
    """The repository responder does not have the requested file."""
