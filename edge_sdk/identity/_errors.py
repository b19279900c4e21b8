"""The identity domain's errors: one root, one refusal class for hostile documents."""

from __future__ import annotations

from ..errors import EdgeError


class IdentityError(EdgeError):
    """A device key, sealed credentials or an identity document could not be used."""


class EnrolmentRefused(IdentityError):
    """An enrolment request, an answer or a renewal request failed a check. The message is
    one line saying what was expected."""


__all__ = ["EnrolmentRefused", "IdentityError"]
