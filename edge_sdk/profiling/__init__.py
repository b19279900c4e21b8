"""On-device profiling: the documents host and device exchange, and the profiler seam.

The host asks a device to time candidate models (``convert --profile-on``,
``bench --on``) with a :class:`ProfilingRequest` signed by the deployment key
(:func:`sign_profiling_request`); the device checks it against its
:class:`ProfilingLimits` with :func:`verify_profiling_request` and answers with an
unsigned :class:`ProfilingResult` (:class:`CandidateTiming` per candidate) that the
host reads with :func:`parse_profiling_result`. :class:`DeviceProfiler` is what a
conversion calls to get those figures.

This is neither :mod:`edge_sdk.trust` (which owns keys, the signed envelope and
releases; a request only uses its envelope) nor :mod:`edge_sdk.release` (host
only): both the host and the device agent read these documents.

Errors: the refusals of a request are :class:`ProfilingVerificationError`
(:class:`MalformedProfilingRequestError`, :class:`ProfilingSignatureError`,
:class:`ProfilingRequestExpiredError`, :class:`ProfilingNotForThisDeviceError`,
:class:`ProfilingRequestTooLargeError`); an unreadable result is a
:class:`MalformedProfilingResultError`. All are
:class:`~edge_sdk.errors.VerificationError`.
"""

from ._profiler import DeviceProfiler
from ._request import (
    FileRef,
    MalformedProfilingRequestError,
    ProfileCandidate,
    ProfilingLimits,
    ProfilingNotForThisDeviceError,
    ProfilingRequest,
    ProfilingRequestExpiredError,
    ProfilingRequestTooLargeError,
    ProfilingSignatureError,
    ProfilingVerificationError,
    claimed_request_id,
    sign_profiling_request,
    verify_profiling_request,
)
from ._result import (
    CandidateTiming,
    MalformedProfilingResultError,
    ProfilingResult,
    parse_profiling_result,
)

__all__ = [
    "CandidateTiming",
    "DeviceProfiler",
    "FileRef",
    "MalformedProfilingRequestError",
    "MalformedProfilingResultError",
    "ProfileCandidate",
    "ProfilingLimits",
    "ProfilingNotForThisDeviceError",
    "ProfilingRequest",
    "ProfilingRequestExpiredError",
    "ProfilingRequestTooLargeError",
    "ProfilingResult",
    "ProfilingSignatureError",
    "ProfilingVerificationError",
    "claimed_request_id",
    "parse_profiling_result",
    "sign_profiling_request",
    "verify_profiling_request",
]
