"""Field sample requests (host → device) and the device's status answers (device → host).

A sample request asks one device's agent to keep up to ``count`` of the inputs its
model serves that match a ``rule`` (``disagreement`` with a shadow model,
``low_confidence``, ``drift`` from the reference the artifact carries, ``random``)
and to bundle them for the host to pull. It is signed by the deployment key in the
same envelope as a deployment and a profiling request, with its own ``signed.type``
(``edge-samples-request``): no verifier takes one of the others for it. Freshness and
addressing are the profiling request's (:func:`~edge_sdk.profiling._request.check_addressed`):
a random ``id``, an expiry at most ``max_ttl_s`` ahead of the device's clock; the agent
refuses ids it has seen. Canonical JSON has no floats: ``threshold`` is a decimal string.

The device answers on ``dev/{id}/samples/res`` with a :class:`SampleStatus` (unsigned:
it is the device's own word, and the bundle's sha256 in it is what the host checks the
pulled bytes against).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._json import MESSAGE_MAX_DEPTH, loads_bounded
from ..errors import VerificationError
from ..profiling._request import check_addressed, decimal_field
from ..trust._envelope import DocumentKind, SignedDocument, format_ts
from ..trust._errors import ExpiredError, SignatureError

if TYPE_CHECKING:
    from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]

REQUEST_TYPE = "edge-samples-request"
SPEC = 1
RULES = ("disagreement", "low_confidence", "drift", "random")
#: The most samples one request may ask for, and the largest bundle.
MAX_COUNT = 1000
MAX_BYTES = 64 * 1024 * 1024
#: Largest ``threshold`` (``random``: requests drawn from; ``drift``: a z bound).
MAX_THRESHOLD = 1e9
STATES = ("collecting", "ready", "refused", "expired")
#: A status message is small; anything larger is not one.
STATUS_MAX_BYTES = 4096
_ID = re.compile(r"[0-9a-f]{16,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SampleVerificationError(VerificationError):
    """Root of the refusals of a sample request."""


class MalformedSampleRequestError(SampleVerificationError):
    """The request is not JSON of the expected shape (or another document type)."""


class SampleSignatureError(SampleVerificationError, SignatureError):
    """The request is not signed by the trusted deployment key."""


class SampleRequestExpiredError(SampleVerificationError, ExpiredError):
    """The request has expired, or claims a lifetime longer than the device allows."""


class SampleNotForThisDeviceError(SampleVerificationError):
    """The request names another device or fleet."""


class SampleRequestTooLargeError(SampleVerificationError):
    """The request asks more than the device's limits (bytes of the request, samples,
    bundle bytes)."""


class MalformedSampleStatusError(VerificationError):
    """A status message on ``samples/res`` that is not one."""


@dataclass(frozen=True)
class SampleRequest:
    """What a verified sample request says.

    ``threshold``: ``low_confidence`` keeps inputs whose top score (classify) or best
    detection score (detect) is below it; ``drift`` keeps inputs whose distance from the
    reference is above it; ``random`` draws ``count`` uniformly (reservoir) from the next
    ``threshold`` requests (0: from every request until it expires); ``disagreement``
    ignores it."""

    fleet: str
    device: str
    id: str
    issued: datetime
    expires: datetime
    model: str
    rule: str
    count: int
    max_bytes: int
    outputs: bool = False
    threshold: float = 0.0
    keyid: str = ""

    def to_signed(self) -> dict[str, Any]:
        return {
            "type": REQUEST_TYPE, "spec": SPEC, "fleet": self.fleet, "device": self.device,
            "id": self.id, "issued": format_ts(self.issued),
            "expires": format_ts(self.expires), "model": self.model, "rule": self.rule,
            "count": self.count, "max_bytes": self.max_bytes, "outputs": self.outputs,
            "threshold": _decimal(self.threshold),
        }

    @property
    def title(self) -> str:
        return f"sample request {self.id[:12]}"

    @classmethod
    def from_signed(cls, data: Any) -> SampleRequest:
        """The body of ``signed``; raises :class:`MalformedSampleRequestError`."""
        k = SAMPLE_REQUEST
        data = k.header(data)
        rid = k.field(data, "id", str)
        if not _ID.fullmatch(rid):
            raise k.refuse("'id' must be 16-64 lowercase hex digits")
        model = k.field(data, "model", str)
        if not _NAME.fullmatch(model):
            raise k.refuse("'model' must be a model name (1-128 letters, digits, '.', '_', "
                           "'-')")
        rule = k.field(data, "rule", str)
        if rule not in RULES:
            raise k.refuse(f"'rule' must be one of {', '.join(RULES)}")
        count, max_bytes = k.field(data, "count", int), k.field(data, "max_bytes", int)
        if not 1 <= count <= MAX_COUNT:
            raise k.refuse(f"'count' must be 1..{MAX_COUNT}")
        if not 1 <= max_bytes <= MAX_BYTES:
            raise k.refuse(f"'max_bytes' must be 1..{MAX_BYTES}")
        threshold = decimal_field(data.get("threshold"), "threshold", k, 0.0, MAX_THRESHOLD)
        if rule == "random" and threshold and (threshold != int(threshold) or
                                               threshold < count):
            raise k.refuse("'threshold' of a random rule is the number of requests to draw "
                           "from: 0 or a whole number >= 'count'")
        return cls(
            fleet=k.field(data, "fleet", str), device=k.field(data, "device", str), id=rid,
            issued=k.timestamp(data, "issued"), expires=k.timestamp(data, "expires"),
            model=model, rule=rule, count=count, max_bytes=max_bytes,
            outputs=k.field(data, "outputs", bool), threshold=threshold)


#: The sample request as a kind of signed document.
SAMPLE_REQUEST = DocumentKind(
    doc_type=REQUEST_TYPE, name="sample request", body=SampleRequest.from_signed, spec=SPEC,
    malformed=MalformedSampleRequestError, unsigned=SampleSignatureError,
    expired=SampleRequestExpiredError)


def _decimal(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def sign_sample_request(request: SampleRequest, signers: Iterable[Signer]) -> bytes:
    """The signed document to publish (retained) on the device's ``samples/req`` topic."""
    return SignedDocument.sign(request, signers)


@dataclass(frozen=True)
class SampleLimits:
    """What a device accepts (the agent's ``[samples]`` section fills it)."""

    max_request_bytes: int = 8 * 1024
    max_count: int = MAX_COUNT
    max_bytes: int = MAX_BYTES
    #: A request may not claim to stay valid longer than this ahead of the device's clock
    #: (it waits retained for an offline device: a week by default).
    max_ttl_s: float = 7 * 24 * 3600.0


def verify_sample_request(
    payload: bytes, key: Key, *, device_id: str, fleet: str,
    limits: SampleLimits | None = None, now: datetime | None = None,
) -> SampleRequest:
    """Verify a raw sample request for this device and return what it says.

    Checks, in order: the size (before parsing), the signed envelope (signature by
    ``key``, document type and shape), fleet and device, the expiry (and a lifetime at
    most ``limits.max_ttl_s`` ahead), and the device's limits on count and bytes. Raises
    a :class:`SampleVerificationError` subclass. Replayed ids are the caller's to refuse.
    """
    lim = limits or SampleLimits()
    if len(payload) > lim.max_request_bytes:
        raise SampleRequestTooLargeError(
            f"sample request is {len(payload)} bytes, over the device's limit of "
            f"{lim.max_request_bytes} (samples.max_request_bytes)")
    doc = SignedDocument.verify(payload, key, SAMPLE_REQUEST)
    req = replace(doc.body, keyid=doc.keyid)
    check_addressed(doc, device_id=device_id, fleet=fleet, max_ttl_s=lim.max_ttl_s,
                    ttl_key="samples.max_ttl_s", now=now,
                    wrong_device=SampleNotForThisDeviceError)
    if req.count > lim.max_count or req.max_bytes > lim.max_bytes:
        raise SampleRequestTooLargeError(
            f"{req.title} asks {req.count} samples in {req.max_bytes} bytes, over the "
            f"device's limits of {lim.max_count} (samples.max_count) and {lim.max_bytes} "
            "(samples.max_bytes)")
    return req


@dataclass(frozen=True)
class SampleStatus:
    """The device's word on one request (``samples/res``). ``sha256`` and ``size`` (``bytes`` in
    JSON) are the bundle's once ``state`` is ``ready``; ``reason`` is one line (why refused, why a
    bundle holds fewer than asked)."""

    id: str
    state: str
    count: int = 0
    size: int = 0
    sha256: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "count": self.count,
                "bytes": self.size, "sha256": self.sha256, "reason": self.reason}

    @classmethod
    def from_bytes(cls, payload: bytes) -> SampleStatus:
        """Parse a status message (hostile: bounded, fields checked, reason cut)."""
        try:
            doc = loads_bounded(payload, max_bytes=STATUS_MAX_BYTES,
                                max_depth=min(2, MESSAGE_MAX_DEPTH))
        except ValueError as err:
            raise MalformedSampleStatusError(f"sample status refused: {err}") from err
        if not isinstance(doc, dict):
            raise MalformedSampleStatusError("sample status must be a JSON object")
        rid, state = doc.get("id"), doc.get("state")
        count, size = doc.get("count", 0), doc.get("bytes", 0)
        sha, reason = doc.get("sha256", ""), doc.get("reason", "")
        if not isinstance(rid, str) or not (_ID.fullmatch(rid) or rid == "0" * 16):
            raise MalformedSampleStatusError("sample status: 'id' must be 16-64 hex digits")
        if state not in STATES:
            raise MalformedSampleStatusError(
                f"sample status: 'state' must be one of {', '.join(STATES)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**53
                   for v in (count, size)):
            raise MalformedSampleStatusError("sample status: 'count' and 'bytes' must be "
                                             "integers >= 0")
        if not isinstance(sha, str) or (sha and not _HEX64.fullmatch(sha)):
            raise MalformedSampleStatusError("sample status: 'sha256' must be 64 hex digits")
        if not isinstance(reason, str):
            raise MalformedSampleStatusError("sample status: 'reason' must be a string")
        line = " ".join(reason.split())
        return cls(rid, str(state), count, size, sha, line[:300])
