"""The signed envelope shared by every document the deployment key signs.

A document is JSON ``{"signed": BODY, "signatures": [{"keyid", "sig"}]}``; each
signature (ed25519, securesystemslib) covers the canonical JSON of ``signed``, whose
``type`` names the kind of document and ``spec`` its version, so that one kind can
never stand in for another. As python-tuf's ``Metadata[T]``: the envelope is generic
and does the checks every kind shares, in one order (size and nesting before
parsing, then the signature, then the type); the bodies are plain typed classes
(:class:`~edge_sdk.trust.Deployment`, :class:`edge_sdk.profiling.ProfilingRequest`)
and a :class:`DocumentKind` says which body to expect and which errors name its
refusals. What each kind checks past that (audience, counters, limits) is its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError
from securesystemslib.exceptions import VerificationError as SslibVE
from securesystemslib.formats import encode_canonical

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..errors import VerificationError

if TYPE_CHECKING:  # the signer module loads cryptography: only when a document is verified
    from securesystemslib.signer import (  # type: ignore[attr-defined]
        Key,
        Signature,
        Signer,
    )


def format_ts(dt: datetime) -> str:
    """A timestamp as documents carry it (UTC, whole seconds)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: What :func:`format_ts` writes. Parsed by hand: ``datetime.strptime`` takes a process-wide
#: lock, and a simulator process with a hundred agents verifying at once queued on it.
_TS = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")


def canonical(data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the canonical JSON of ``signed``. Raises
    ``FormatError`` for values canonical JSON cannot hold (floats)."""
    return str(encode_canonical(dict(data))).encode()


class Body(Protocol):
    """What the envelope needs of a typed body."""

    @property
    def expires(self) -> datetime: ...

    @property
    def title(self) -> str:
        """The document as refusals name it (``deployment #7 (m 1.2)``)."""
        ...

    def to_signed(self) -> dict[str, Any]: ...


T = TypeVar("T", bound=Body)


@dataclass(frozen=True)
class DocumentKind(Generic[T]):
    """One kind of signed document: its ``signed.type``, the word refusals use for it, how
    its body is read and the errors its refusals raise (so that each names the right
    document, and a caller catches one family per kind)."""

    doc_type: str
    #: In messages: ``deployment``, ``profiling request``.
    name: str
    #: Reads a body from ``signed``, its :meth:`header` first (``Deployment.from_signed``).
    body: Callable[[Any], T]
    malformed: type[VerificationError]
    unsigned: type[VerificationError]
    expired: type[VerificationError]
    spec: int = 1
    #: Older specs still read (a document written by an older edge-sdk).
    older: tuple[int, ...] = ()

    def refuse(self, why: str) -> VerificationError:
        """A malformed-document error naming this kind."""
        return self.malformed(f"{self.name}: {why}")

    def header(self, data: Any) -> Mapping[str, Any]:
        """``data`` when it is an object of this kind and spec; raises otherwise."""
        if not isinstance(data, dict) or data.get("type") != self.doc_type:
            raise self.refuse(f"'signed.type' must be {self.doc_type!r}")
        spec = data.get("spec")
        if isinstance(spec, bool) or spec not in (self.spec, *self.older):
            raise self.refuse(f"spec {spec!r} is not supported (this edge-sdk reads spec "
                              f"{', '.join(map(str, sorted((self.spec, *self.older))))})")
        return data

    def field(self, data: Mapping[str, Any], key: str, kind: type) -> Any:
        """``data[key]`` when it is a ``kind`` (an int is never a bool); raises otherwise."""
        v = data.get(key)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise self.refuse(f"'{key}' is missing or not {kind.__name__}")
        return v

    def timestamp(self, data: Mapping[str, Any], key: str) -> datetime:
        """``data[key]`` as written by :func:`format_ts`; raises otherwise."""
        value = data.get(key)
        if not isinstance(value, str):
            raise self.refuse(f"'{key}' must be a timestamp string")
        m = _TS.fullmatch(value)
        try:
            if m is None:
                raise ValueError(value)
            y, mo, d, h, mi, sec = (int(g) for g in m.groups())
            return datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
        except ValueError as err:
            raise self.refuse(f"'{key}' {value[:40]!r} is not YYYY-MM-DDTHH:MM:SSZ") from err


def _signed_by(signed: Mapping[str, Any], sigs: Iterable[Signature], key: Key) -> str | None:
    data = canonical(signed)
    for sig in sigs:
        if sig.keyid != key.keyid:
            continue
        try:
            key.verify_signature(sig, data)
        except (UnverifiedSignatureError, SslibVE):
            continue
        return str(sig.keyid)
    return None


@dataclass(frozen=True)
class SignedDocument(Generic[T]):
    """A document whose signature by a trusted key checked: its typed ``body`` and the id of
    the key that signed it."""

    kind: DocumentKind[T]
    body: T
    keyid: str

    @classmethod
    def verify(cls, payload: bytes, key: Key, kind: DocumentKind[T]) -> SignedDocument[T]:
        """Check, in order: size and nesting (before anything else reads the payload),
        the envelope's shape, a signature by ``key`` over the canonical ``signed``, then
        the type, spec and fields of a ``kind`` body. Raises ``kind``'s errors."""
        from securesystemslib.signer import Signature  # type: ignore[attr-defined]

        try:
            doc = loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES,
                                max_depth=MESSAGE_MAX_DEPTH)
        except ValueError as err:
            raise kind.malformed(f"{kind.name} refused: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict) or \
                not isinstance(doc.get("signatures"), list):
            raise kind.malformed(
                f"{kind.name} must be a JSON object with 'signed' and 'signatures'")
        try:
            sigs = [Signature.from_dict(dict(s)) for s in doc["signatures"]]
        except (KeyError, TypeError, ValueError) as err:
            raise kind.refuse(f"malformed signature entry: {err}") from err
        signed: dict[str, Any] = doc["signed"]
        try:
            good = _signed_by(signed, sigs, key)
        except FormatError as err:  # floats and other values canonical JSON cannot hold
            raise kind.refuse(f"'signed' cannot be canonicalised: {str(err)[:120]}") from None
        if good is None:
            raise kind.unsigned(
                f"{kind.name} is not signed by the trusted deployment key {key.keyid[:12]}… "
                f"(signatures from {', '.join(s.keyid[:12] for s in sigs) or 'nobody'})")
        return cls(kind, kind.body(signed), good)

    def check_expiry(self, now: datetime) -> None:
        """Raise ``kind.expired`` unless the body is still valid at ``now``."""
        if self.body.expires <= now:
            raise self.kind.expired(
                f"{self.body.title} expired at {format_ts(self.body.expires)}")

    @staticmethod
    def sign(body: Body, signers: Iterable[Signer]) -> bytes:
        """The signed document: compact JSON, ``signed`` as the body writes it."""
        signed = body.to_signed()
        payload = canonical(signed)
        sigs = [s.sign(payload).to_dict() for s in signers]
        if not sigs:
            raise ValueError("at least one signer is needed")
        return json.dumps({"signed": signed, "signatures": sigs},
                          separators=(",", ":")).encode()
