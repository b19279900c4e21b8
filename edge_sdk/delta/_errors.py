"""The delta domain's one exception."""

from __future__ import annotations

from ..errors import VerificationError


class DeltaError(VerificationError):
    """A delta is malformed, names another base, or does not rebuild its target. The
    device then fetches the full artifact instead; nothing is installed from it."""
