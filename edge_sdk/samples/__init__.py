"""Field samples: the signed request a host sends a device for inputs its model served
(:class:`SampleRequest`, :func:`sign_sample_request`, :func:`verify_sample_request`
against the device's :class:`SampleLimits`) and the device's unsigned answer
(:class:`SampleStatus`). The agent's collector is ``device_agent._samples``; the CLI is
``edge-sdk samples``.

Errors: the refusals of a request are :class:`SampleVerificationError`
(:class:`MalformedSampleRequestError`, :class:`SampleSignatureError`,
:class:`SampleRequestExpiredError`, :class:`SampleNotForThisDeviceError`,
:class:`SampleRequestTooLargeError`); an unreadable status is a
:class:`MalformedSampleStatusError`. All are :class:`~edge_sdk.errors.VerificationError`.
"""

from ._request import (
    MAX_BYTES,
    MAX_COUNT,
    RULES,
    MalformedSampleRequestError,
    MalformedSampleStatusError,
    SampleLimits,
    SampleNotForThisDeviceError,
    SampleRequest,
    SampleRequestExpiredError,
    SampleRequestTooLargeError,
    SampleSignatureError,
    SampleStatus,
    SampleVerificationError,
    sign_sample_request,
    verify_sample_request,
)

__all__ = [
    "MAX_BYTES",
    "MAX_COUNT",
    "RULES",
    "MalformedSampleRequestError",
    "MalformedSampleStatusError",
    "SampleLimits",
    "SampleNotForThisDeviceError",
    "SampleRequest",
    "SampleRequestExpiredError",
    "SampleRequestTooLargeError",
    "SampleSignatureError",
    "SampleStatus",
    "SampleVerificationError",
    "sign_sample_request",
    "verify_sample_request",
]
