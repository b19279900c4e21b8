"""Profiling requests (host → device): signed, bounded, checked against a device's limits.

A profiling request asks one device's agent to time candidate models that the
host built, without installing them. It is signed by the deployment key in the
same envelope as a deployment (:class:`~edge_sdk.trust._envelope.SignedDocument`),
but its ``signed.type`` is ``edge-profiling-request``: a deployment verifier refuses
it and :func:`verify_profiling_request` refuses a deployment, so neither can stand
in for the other. The model bytes, the sample input and the host's outputs on it
travel as TUF targets under :data:`PROFILING_PREFIX` in the release repository,
fetched and verified like any target; a ``profiling/`` target is never a release
(no manifest), so it can never be installed.

Freshness: a request carries a random ``id`` and an expiry at most
``max_ttl_s`` ahead of the device's clock; the agent refuses expired ones and
ids it has already seen. Canonical JSON has no floats, so the tolerances travel
as decimal strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..errors import VerificationError
from ..trust._envelope import DocumentKind, SignedDocument, format_ts
from ..trust._errors import ExpiredError, SignatureError

if TYPE_CHECKING:
    from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]

REQUEST_TYPE = "edge-profiling-request"
SPEC = 1
#: Target paths of profiling files start so (never a release; the agent never installs one).
PROFILING_PREFIX = "profiling/"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{16,64}")
_RAW_ID = re.compile(rb'"id":"([0-9a-f]{16,64})"')
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TARGET = re.compile(r"profiling/[0-9a-f]{16,64}/[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_ROUNDS = 20
#: The largest per-candidate ``spread`` a request may carry.
MAX_SPREAD = 1e6


class ProfilingVerificationError(VerificationError):
    """Root of the refusals of a profiling request."""


class MalformedProfilingRequestError(ProfilingVerificationError):
    """The request is not JSON of the expected shape (or the wrong document type)."""


class ProfilingSignatureError(ProfilingVerificationError, SignatureError):
    """The request is not signed by the trusted deployment key."""


class ProfilingRequestExpiredError(ProfilingVerificationError, ExpiredError):
    """The request has expired, or claims a lifetime longer than the device allows."""


class ProfilingNotForThisDeviceError(ProfilingVerificationError):
    """The request names another device or fleet."""


class ProfilingRequestTooLargeError(ProfilingVerificationError):
    """The request exceeds a limit of the device (bytes, candidates, candidate size, runs)."""


@dataclass(frozen=True)
class FileRef:
    """One signed profiling target: path, sha256 and length."""

    target: str
    sha256: str
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "sha256": self.sha256, "length": self.length}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> FileRef:
        if not isinstance(doc, dict):
            raise MalformedProfilingRequestError(f"profiling request: {where} must be an object")
        t, sha, n = doc.get("target"), doc.get("sha256"), doc.get("length")
        if not isinstance(t, str) or not _TARGET.fullmatch(t) or ".." in t:
            raise MalformedProfilingRequestError(
                f"profiling request: {where}.target must be a path under {PROFILING_PREFIX}")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise MalformedProfilingRequestError(
                f"profiling request: {where}.sha256 must be 64 lowercase hex digits")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise MalformedProfilingRequestError(
                f"profiling request: {where}.length must be an integer >= 0")
        return cls(t, sha, n)


@dataclass(frozen=True)
class ProfileCandidate:
    """One model to time: its file, and the host's outputs of it on the sample (.npz)."""

    name: str
    model: FileRef
    expected: FileRef
    #: How far two correct runtimes may differ on this candidate's outputs (absolute; a
    #: quantized candidate's distance from the float model on the sample: x86 and ARM
    #: round quantized arithmetic differently). A device within it still matches; None:
    #: the request's ``atol`` alone. Agents before it ignore the key (the stricter check).
    spread: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.to_json(),
                "expected": self.expected.to_json(),
                **({"spread": repr(float(self.spread))} if self.spread is not None else {})}


@dataclass(frozen=True)
class ProfilingRequest:
    """What a verified profiling request says."""

    fleet: str
    device: str
    id: str
    issued: datetime
    expires: datetime
    sample: FileRef
    candidates: tuple[ProfileCandidate, ...]
    runs: int = 50
    warmup: int = 5
    #: Fresh sessions per candidate, ``runs`` split between them: the median latency is
    #: the median of their medians (a session's thread placement can make one slow).
    rounds: int = 3
    #: A device output matches the host's when ``|dev - host| <= atol + rtol * max|host|``.
    rtol: float = 1e-2
    atol: float = 1e-4
    keyid: str = ""

    def to_signed(self) -> dict[str, Any]:
        return {
            "type": REQUEST_TYPE, "spec": SPEC, "fleet": self.fleet, "device": self.device,
            "id": self.id, "issued": format_ts(self.issued),
            "expires": format_ts(self.expires),
            "sample": self.sample.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "runs": self.runs, "warmup": self.warmup, "rounds": self.rounds,
            "rtol": repr(float(self.rtol)), "atol": repr(float(self.atol)),
        }

    @property
    def total_bytes(self) -> int:
        return self.sample.length + sum(c.model.length + c.expected.length
                                        for c in self.candidates)

    @property
    def title(self) -> str:
        return f"profiling request {self.id[:12]}"

    @classmethod
    def from_signed(cls, data: Any) -> ProfilingRequest:
        """The body of ``signed``; raises :class:`MalformedProfilingRequestError`."""
        k = PROFILING_REQUEST
        data = k.header(data)
        rid = k.field(data, "id", str)
        if not _ID.fullmatch(rid):
            raise k.refuse("'id' must be 16-64 lowercase hex digits")
        cands_raw = k.field(data, "candidates", list)
        cands = []
        for i, c in enumerate(cands_raw):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or \
                    not _NAME.fullmatch(c["name"]):
                raise k.refuse(f"candidates[{i}].name must be 1-64 letters, digits, "
                               "'.', '_' or '-'")
            cands.append(ProfileCandidate(
                c["name"], FileRef.from_json(c.get("model"), f"candidates[{i}].model"),
                FileRef.from_json(c.get("expected"), f"candidates[{i}].expected"),
                None if c.get("spread") is None else
                _tolerance(c["spread"], f"candidates[{i}].spread", MAX_SPREAD)))
        if len({c.name for c in cands}) != len(cands):
            raise k.refuse("candidate names repeat")
        runs, warmup = k.field(data, "runs", int), k.field(data, "warmup", int)
        rounds = k.field(data, "rounds", int)
        if runs < 1 or warmup < 0 or not 1 <= rounds <= min(runs, MAX_ROUNDS):
            raise k.refuse(f"'runs' must be >= 1, 'warmup' >= 0 and 'rounds' 1..{MAX_ROUNDS} "
                           "(at most 'runs')")
        return cls(
            fleet=k.field(data, "fleet", str), device=k.field(data, "device", str), id=rid,
            issued=k.timestamp(data, "issued"), expires=k.timestamp(data, "expires"),
            sample=FileRef.from_json(data.get("sample"), "sample"), candidates=tuple(cands),
            runs=runs, warmup=warmup, rounds=rounds, rtol=_tolerance(data.get("rtol"), "rtol"),
            atol=_tolerance(data.get("atol"), "atol"),
        )


#: The profiling request as a kind of signed document.
PROFILING_REQUEST = DocumentKind(
    doc_type=REQUEST_TYPE, name="profiling request", body=ProfilingRequest.from_signed, spec=SPEC,
    malformed=MalformedProfilingRequestError, unsigned=ProfilingSignatureError,
    expired=ProfilingRequestExpiredError)


def _tolerance(value: Any, key: str, high: float = 1.0) -> float:
    return decimal_field(value, key, PROFILING_REQUEST, 0.0, high)


def sign_profiling_request(request: ProfilingRequest, signers: Iterable[Signer]) -> bytes:
    """The signed document to publish on the device's profiling request topic."""
    return SignedDocument.sign(request, signers)


@dataclass(frozen=True)
class ProfilingLimits:
    """What a device accepts (the agent's ``[profiling]`` section fills it)."""

    max_request_bytes: int = 32 * 1024
    max_candidates: int = 16
    max_candidate_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    max_runs: int = 1000
    max_warmup: int = 100
    #: A request may not claim to stay valid longer than this ahead of the device's clock.
    max_ttl_s: float = 3600.0


def verify_profiling_request(
    payload: bytes, key: Key, *, device_id: str, fleet: str,
    limits: ProfilingLimits | None = None, now: datetime | None = None,
) -> ProfilingRequest:
    """Verify a raw profiling request for this device and return what it says.

    Checks, in order: the size against ``limits`` (before parsing), the signed
    envelope (signature by ``key`` over the canonical ``signed`` part, document type
    and shape), fleet and device, the
    expiry (and a lifetime at most ``limits.max_ttl_s`` ahead), and the limits on
    candidates, bytes and runs. Raises a :class:`ProfilingVerificationError` subclass.
    Replayed ids are the caller's to refuse (it keeps the ids it has seen).
    """
    lim = limits or ProfilingLimits()
    if len(payload) > lim.max_request_bytes:
        raise ProfilingRequestTooLargeError(
            f"profiling request is {len(payload)} bytes, over the device's limit of "
            f"{lim.max_request_bytes} (profiling.max_request_bytes)")
    doc = SignedDocument.verify(payload, key, PROFILING_REQUEST)
    req = replace(doc.body, keyid=doc.keyid)
    check_addressed(doc, device_id=device_id, fleet=fleet, max_ttl_s=lim.max_ttl_s,
                    ttl_key="profiling.max_ttl_s", now=now,
                    wrong_device=ProfilingNotForThisDeviceError)
    if not req.candidates:
        raise MalformedProfilingRequestError("profiling request names no candidate")
    if len(req.candidates) > lim.max_candidates:
        raise ProfilingRequestTooLargeError(
            f"profiling request has {len(req.candidates)} candidates, over the device's "
            f"limit of {lim.max_candidates} (profiling.max_candidates)")
    for c in req.candidates:
        if c.model.length > lim.max_candidate_bytes:
            raise ProfilingRequestTooLargeError(
                f"candidate {c.name} is {c.model.length} bytes, over the device's limit of "
                f"{lim.max_candidate_bytes} (profiling.max_candidate_bytes)")
    if req.total_bytes > lim.max_total_bytes:
        raise ProfilingRequestTooLargeError(
            f"profiling request needs {req.total_bytes} bytes, over the device's limit of "
            f"{lim.max_total_bytes} (profiling.max_total_bytes)")
    if req.runs > lim.max_runs or req.warmup > lim.max_warmup:
        raise ProfilingRequestTooLargeError(
            f"profiling request asks {req.runs} runs and {req.warmup} warm-up runs, over the "
            f"device's limits of {lim.max_runs} and {lim.max_warmup}")
    return req


class _Addressed(Protocol):
    fleet: str
    device: str
    id: str

    @property
    def expires(self) -> datetime: ...

    @property
    def title(self) -> str: ...


def check_addressed(doc: SignedDocument[Any], *, device_id: str, fleet: str,
                    max_ttl_s: float, ttl_key: str, now: datetime | None,
                    wrong_device: type[VerificationError]) -> None:
    """The freshness and addressing checks every device request shares (profiling,
    field samples): for this fleet and device, not expired at ``now``, and not claiming
    to stay valid more than ``max_ttl_s`` ahead (``ttl_key`` names that setting).
    Raises ``wrong_device`` or the document kind's expired error."""
    req: _Addressed = doc.body
    if req.fleet != fleet or req.device != device_id:
        raise wrong_device(
            f"{doc.kind.name} {req.id[:12]} is for {req.device!r} in fleet {req.fleet!r}, "
            f"this is {device_id!r} in {fleet!r}")
    when = now or datetime.now(UTC)
    doc.check_expiry(when)
    if req.expires > when + timedelta(seconds=max_ttl_s):
        raise doc.kind.expired(
            f"{req.title} claims to be valid until {format_ts(req.expires)}, "
            f"more than {max_ttl_s:g} s ahead ({ttl_key})")


def decimal_field(value: Any, key: str, kind: DocumentKind[Any], low: float,
                  high: float) -> float:
    """A decimal string (canonical JSON has no floats) between ``low`` and ``high``;
    raises ``kind``'s malformed error naming ``key``."""
    try:
        x = float(value) if isinstance(value, str) and len(value) <= 32 else math.nan
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and low <= x <= high):
        raise kind.refuse(f"'{key}' must be a decimal string between {low:g} and {high:g}")
    return x


def claimed_request_id(payload: bytes, max_bytes: int) -> str | None:
    """The id an unverified request says it has, to address a refusal (None if unreadable)."""
    try:
        doc = loads_bounded(payload, max_bytes=max_bytes, max_depth=MESSAGE_MAX_DEPTH)
        rid = doc["signed"]["id"]
    except (ValueError, KeyError, TypeError):
        # Too big or broken: the id as the host writes it, if it is there, so that the
        # refusal still reaches the request it answers.
        m = _RAW_ID.search(payload[:MESSAGE_MAX_BYTES])
        return m.group(1).decode() if m else None
    return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None
