"""The documents of enrolment and renewal, as they travel over MQTT.

Every byte of them comes from the network: each ``from_bytes``/``verify`` bounds the
size before parsing (:func:`~edge_sdk._json.loads_bounded`), wants exactly its keys
and types, and raises :class:`EnrolmentRefused` with one line saying what was expected.
Constructors check the same rules, so a document that was built can always be read.

- :class:`EnrolRequest` (device -> controller, through the claim account): device id,
  batch, a CSR proving possession of the device key, facts, a nonce.
- :class:`EnrolAnswer` (controller -> device, retained): pending, accepted (with the
  credentials sealed to the key), rejected, or refused (the request itself was bad).
- :class:`RenewRequest` (device -> controller, as the device): signed by the device key;
  asks for new credentials (``ack=0``) or acknowledges that it stored issue ``ack``.
- :class:`RenewHint` (controller -> device, retained on its ``cred/res`` topic): the
  credentials up to issue ``issued`` are out of date (its groups changed): renew now.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AttributeOID, NameOID

from .._json import UnsafeJsonError, loads_bounded
from ._credentials import MAX_SEALED_CHARS
from ._errors import EnrolmentRefused, IdentityError
from ._key import DeviceKey
from ._pem import describe_key, fingerprint_key, is_p256, load_public
from ._words import check_batch, check_device_id

#: An enrolment or renewal request on the wire (checked before parsing).
MAX_REQUEST_BYTES = 8 * 1024
#: An enrolment answer on the wire (sealed credentials with a CA bundle fit).
MAX_ANSWER_BYTES = 16 * 1024
#: The PEM of a CSR inside a request (a P-256 CSR is about 400 characters).
MAX_CSR_CHARS = 4 * 1024
MAX_FACTS = 32
MAX_FACT_CHARS = 128
MAX_REASON_CHARS = 200
#: Enrolment answer states.
STATES = ("pending", "accepted", "rejected", "refused")

REQUEST_TYPE = "edge-enrol-request"
ANSWER_TYPE = "edge-enrol-answer"
RENEW_TYPE = "edge-renew-request"
HINT_TYPE = "edge-renew-hint"
#: A renewal hint on the wire (an answer with credentials is always longer).
MAX_HINT_BYTES = 512
_VERSION = 1
_FACT_KEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CSR_HEAD = "-----BEGIN CERTIFICATE REQUEST-----"
_REQUEST_KEYS = frozenset({"type", "v", "device_id", "batch", "csr_pem", "facts", "nonce",
                           "sent_at"})
_ANSWER_KEYS = frozenset({"type", "v", "state", "device_id", "fingerprint", "reason",
                          "issued", "sealed", "at"})
_HINT_KEYS = frozenset({"type", "v", "device_id", "issued", "at"})
_RENEW_KEYS = frozenset({"type", "v", "device_id", "fingerprint", "nonce", "sent_at", "ack"})
#: A DER ECDSA P-256 signature is at most 72 bytes.
_MAX_SIG_BYTES = 80


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refusing(what: str, fn: Any, value: Any) -> Any:
    """``fn(value)``, its :class:`IdentityError` turned into :class:`EnrolmentRefused`."""
    try:
        return fn(value)
    except EnrolmentRefused:
        raise
    except IdentityError as err:
        raise EnrolmentRefused(f"{what}: {err}") from None


def _parse(payload: bytes, what: str, *, max_bytes: int, max_depth: int,
           keys: frozenset[str], doc_type: str | None) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EnrolmentRefused(f"{what}: expected bytes, not {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise EnrolmentRefused(
            f"{what} is {len(payload)} bytes: at most {max_bytes} are accepted")
    try:
        doc = loads_bounded(bytes(payload), max_bytes=max_bytes, max_depth=max_depth)
    except UnsafeJsonError as err:
        raise EnrolmentRefused(f"{what}: {err}") from None
    if not isinstance(doc, dict) or set(doc) != keys:
        got = ", ".join(sorted(doc)) if isinstance(doc, dict) else type(doc).__name__
        got = got if len(got) <= 60 else got[:59] + "…"
        raise EnrolmentRefused(
            f"{what}: expected an object with exactly the keys {', '.join(sorted(keys))}; "
            f"got {got}")
    if doc_type is not None and (doc.get("type") != doc_type or doc.get("v") != _VERSION):
        raise EnrolmentRefused(
            f"{what}: expected type {doc_type!r} version {_VERSION}, got "
            f"{str(doc.get('type'))[:40]!r} version {str(doc.get('v'))[:10]}")
    return doc


def _want(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str,
          expected: str) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EnrolmentRefused(f"{what}: {key!r} must be {expected}")
    return value


def _check_facts(facts: Any) -> dict[str, str]:
    if not isinstance(facts, Mapping):
        raise EnrolmentRefused("enrolment request: 'facts' must be an object of strings")
    if len(facts) > MAX_FACTS:
        raise EnrolmentRefused(
            f"enrolment request: {len(facts)} facts, at most {MAX_FACTS} are accepted")
    for k, v in facts.items():
        if not isinstance(k, str) or not _FACT_KEY.fullmatch(k):
            raise EnrolmentRefused(
                f"enrolment request: fact name {str(k)[:70]!r} must be 1-64 letters, digits, "
                "'.', '_' or '-'")
        if not isinstance(v, str) or len(v) > MAX_FACT_CHARS or not v.isprintable():
            raise EnrolmentRefused(
                f"enrolment request: fact {k!r} must be a string of at most {MAX_FACT_CHARS} "
                "printable characters")
    return dict(facts)


def _check_csr(csr_pem: Any, device_id: str, nonce: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a valid CSR for ``CN=device_id`` made for the request of
    ``nonce`` (its challengePassword); raises EnrolmentRefused."""
    if not isinstance(csr_pem, str) or len(csr_pem) > MAX_CSR_CHARS:
        raise EnrolmentRefused(
            f"enrolment request: 'csr_pem' must be a PEM CSR of at most {MAX_CSR_CHARS} "
            "characters")
    if not csr_pem.lstrip().startswith(_CSR_HEAD):
        raise EnrolmentRefused(f"enrolment request: 'csr_pem' must start with {_CSR_HEAD}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        public = csr.public_key()
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as err:
        raise EnrolmentRefused(f"enrolment request: the CSR does not parse: "
                               f"{type(err).__name__}") from None
    if not is_p256(public):
        raise EnrolmentRefused(
            f"enrolment request: key type {describe_key(public)}: expected an EC P-256 key")
    assert isinstance(public, ec.EllipticCurvePublicKey)
    try:
        algorithm = csr.signature_hash_algorithm
    except Exception:  # cryptography raises UnsupportedAlgorithm for unknown ones
        algorithm = None
    if not isinstance(algorithm, hashes.SHA256):
        raise EnrolmentRefused("enrolment request: the CSR must be signed with ECDSA SHA-256")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise EnrolmentRefused(
            "enrolment request: the CSR's signature is not valid for its key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or len(csr.subject) != 1:
        raise EnrolmentRefused("enrolment request: the CSR's subject must be exactly one CN, "
                               "the device id")
    cn = names[0].value
    if cn != device_id:
        raise EnrolmentRefused(
            f"enrolment request: CSR names {str(cn)[:70]!r}, the request topic names "
            f"{device_id!r}")
    # The nonce under the CSR's signature: a captured request cannot be sent again as a
    # new one (another nonce) by someone without the key; the controller refuses the
    # same nonce twice.
    try:
        challenge = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    except x509.AttributeNotFound:
        challenge = None
    except ValueError:  # a malformed attribute
        challenge = None
    if challenge is None or challenge.value != nonce.encode("ascii"):
        raise EnrolmentRefused("enrolment request: the CSR is not made for this request "
                               "(expected the request's nonce as its challengePassword)")
    return public


@dataclass(frozen=True)
class EnrolRequest:
    """A device's request to be enrolled, sent through the claim account of ``batch``.

    The CSR (subject ``CN=device_id``) carries the device's public key and proves it
    holds the private one. Built by :meth:`create`; read by :meth:`from_bytes`, which
    takes the batch and device id from the topic the request arrived on.
    """

    device_id: str
    batch: str
    csr_pem: str
    facts: Mapping[str, str]
    nonce: str
    sent_at: float

    def __post_init__(self) -> None:
        what = "enrolment request"
        _refusing(what, check_device_id, self.device_id)
        _refusing(what, check_batch, self.batch)
        object.__setattr__(self, "facts", _check_facts(self.facts))
        if not isinstance(self.nonce, str) or not _HEX32.fullmatch(self.nonce):
            raise EnrolmentRefused(f"{what}: 'nonce' must be 32 lowercase hex digits")
        if not _number(self.sent_at):
            raise EnrolmentRefused(f"{what}: 'sent_at' must be a finite number")
        object.__setattr__(self, "sent_at", float(self.sent_at))
        object.__setattr__(self, "_public", _check_csr(self.csr_pem, self.device_id,
                                                       self.nonce))

    @classmethod
    def create(cls, key: DeviceKey, device_id: str, batch: str,
               facts: Mapping[str, str] | None = None) -> EnrolRequest:
        """A new request for ``device_id`` with ``key`` (fresh nonce, now). Raises
        :class:`EnrolmentRefused` for anything :meth:`from_bytes` would refuse."""
        nonce = secrets.token_hex(16)
        req = cls(device_id=device_id, batch=batch,
                  csr_pem=key.csr(device_id, challenge=nonce), facts=dict(facts or {}),
                  nonce=nonce, sent_at=time.time())
        size = len(req.to_bytes())
        if size > MAX_REQUEST_BYTES:
            raise EnrolmentRefused(f"enrolment request is {size} bytes: at most "
                                   f"{MAX_REQUEST_BYTES} are accepted (fewer or shorter facts)")
        return req

    def to_bytes(self) -> bytes:
        doc = {"type": REQUEST_TYPE, "v": _VERSION, "device_id": self.device_id,
               "batch": self.batch, "csr_pem": self.csr_pem, "facts": dict(self.facts),
               "nonce": self.nonce, "sent_at": self.sent_at}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, payload: bytes, *, batch: str, device_id: str) -> EnrolRequest:
        """The request in ``payload``, which arrived on the topic of ``batch`` and
        ``device_id``. Raises :class:`EnrolmentRefused` (one line)."""
        what = "enrolment request"
        _refusing(what + " topic", check_device_id, device_id)
        _refusing(what + " topic", check_batch, batch)
        doc = _parse(payload, what, max_bytes=MAX_REQUEST_BYTES, max_depth=4,
                     keys=_REQUEST_KEYS, doc_type=REQUEST_TYPE)
        for key in ("device_id", "batch", "csr_pem", "nonce"):
            _want(doc, key, str, what, "a string")
        if doc["device_id"] != device_id:
            raise EnrolmentRefused(f"{what}: it names device {doc['device_id'][:70]!r}, the "
                                   f"request topic names {device_id!r}")
        if doc["batch"] != batch:
            raise EnrolmentRefused(f"{what}: it names batch {doc['batch'][:40]!r}, the "
                                   f"request topic names {batch!r}")
        _want(doc, "facts", dict, what, "an object of strings")
        _want(doc, "sent_at", (int, float), what, "a number")
        return cls(device_id=device_id, batch=batch, csr_pem=doc["csr_pem"],
                   facts=doc["facts"], nonce=doc["nonce"], sent_at=doc["sent_at"])

    @cached_property
    def public_pem(self) -> str:
        """The device's public key (PEM SubjectPublicKeyInfo), from the CSR."""
        public: ec.EllipticCurvePublicKey = self.__dict__["_public"]
        return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo) \
            .decode("ascii")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of the device key's DER SubjectPublicKeyInfo."""
        return fingerprint_key(self.__dict__["_public"])


def _one_line(text: str) -> str:
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[: MAX_REASON_CHARS - 1] + "…"


@dataclass(frozen=True)
class EnrolAnswer:
    """The controller's answer to an enrolment request (retained on the answer topic,
    except ``refused``).

    ``state``: ``pending`` (waiting for an operator), ``accepted`` (``sealed`` holds the
    credentials sealed to the key of ``fingerprint``; ``issued`` >= 1), ``rejected``, or
    ``refused`` (the request itself was not acceptable; ``fingerprint`` may be "").
    ``reason`` is cut to one line of at most 200 characters when built.
    """

    state: str
    device_id: str
    fingerprint: str
    reason: str = ""
    issued: int = 0
    sealed: str | None = None
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        what = "enrolment answer"
        if self.state not in STATES:
            raise EnrolmentRefused(f"{what}: 'state' must be one of {', '.join(STATES)}")
        _refusing(what, check_device_id, self.device_id)
        if not isinstance(self.fingerprint, str) or not (
                _HEX64.fullmatch(self.fingerprint)
                or (self.state == "refused" and self.fingerprint == "")):
            raise EnrolmentRefused(f"{what}: 'fingerprint' must be 64 lowercase hex digits "
                                   "('' only in a refused answer)")
        if not isinstance(self.reason, str):
            raise EnrolmentRefused(f"{what}: 'reason' must be a string")
        object.__setattr__(self, "reason", _one_line(self.reason))
        if not _count(self.issued) or (self.state == "accepted") != (self.issued > 0):
            raise EnrolmentRefused(f"{what}: 'issued' must be an integer >= 1 in an accepted "
                                   "answer and 0 otherwise")
        if self.state == "accepted":
            if not isinstance(self.sealed, str) or not 0 < len(self.sealed) <= MAX_SEALED_CHARS:
                raise EnrolmentRefused(f"{what}: an accepted answer must carry the sealed "
                                       f"credentials (1-{MAX_SEALED_CHARS} characters)")
        elif self.sealed is not None:
            raise EnrolmentRefused(f"{what}: only an accepted answer carries credentials")
        if not _number(self.at):
            raise EnrolmentRefused(f"{what}: 'at' must be a finite number")
        object.__setattr__(self, "at", float(self.at))

    def to_bytes(self) -> bytes:
        doc = {"type": ANSWER_TYPE, "v": _VERSION, "state": self.state,
               "device_id": self.device_id, "fingerprint": self.fingerprint,
               "reason": self.reason, "issued": self.issued, "sealed": self.sealed,
               "at": self.at}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, payload: bytes, *, device_id: str) -> EnrolAnswer:
        """The answer in ``payload``, which arrived on ``device_id``'s answer topic. Raises
        :class:`EnrolmentRefused` (one line). The caller still compares ``fingerprint`` to
        its own key's: an answer for another key is not for it."""
        what = "enrolment answer"
        _refusing(what + " topic", check_device_id, device_id)
        doc = _parse(payload, what, max_bytes=MAX_ANSWER_BYTES, max_depth=2,
                     keys=_ANSWER_KEYS, doc_type=ANSWER_TYPE)
        for key in ("state", "device_id", "fingerprint", "reason"):
            _want(doc, key, str, what, "a string")
        if doc["device_id"] != device_id:
            raise EnrolmentRefused(f"{what}: it names device {doc['device_id'][:70]!r}, the "
                                   f"answer topic names {device_id!r}")
        reason = doc["reason"]
        if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            raise EnrolmentRefused(f"{what}: 'reason' must be one line of at most "
                                   f"{MAX_REASON_CHARS} printable characters")
        _want(doc, "issued", int, what, "an integer")
        if doc["sealed"] is not None:
            _want(doc, "sealed", str, what, "a string or null")
        _want(doc, "at", (int, float), what, "a number")
        return cls(state=doc["state"], device_id=device_id, fingerprint=doc["fingerprint"],
                   reason=reason, issued=doc["issued"], sealed=doc["sealed"], at=doc["at"])


@dataclass(frozen=True)
class RenewHint:
    """The controller's word that the device's credentials up to issue ``issued`` no
    longer say what its account may read (an operator changed its groups): the device
    renews at once. Retained on the device's ``cred/res`` topic (which only controller
    accounts may write) until a renewal made it out of date, so a device that was
    reconnecting when it was sent still finds it; a device holding credentials newer
    than ``issued`` ignores it."""

    device_id: str
    issued: int
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        what = "renewal hint"
        _refusing(what, check_device_id, self.device_id)
        if not _count(self.issued):
            raise EnrolmentRefused(f"{what}: 'issued' must be an integer >= 0")
        if not _number(self.at):
            raise EnrolmentRefused(f"{what}: 'at' must be a finite number")
        object.__setattr__(self, "at", float(self.at))

    def to_bytes(self) -> bytes:
        return json.dumps({"type": HINT_TYPE, "v": _VERSION, "device_id": self.device_id,
                           "issued": self.issued, "at": self.at},
                          separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, payload: bytes, *, device_id: str) -> RenewHint:
        """The hint in ``payload``, which arrived on ``device_id``'s ``cred/res`` topic.
        Raises :class:`EnrolmentRefused` (one line)."""
        what = "renewal hint"
        _refusing(what + " topic", check_device_id, device_id)
        doc = _parse(payload, what, max_bytes=MAX_HINT_BYTES, max_depth=1, keys=_HINT_KEYS,
                     doc_type=HINT_TYPE)
        if doc["device_id"] != device_id:
            raise EnrolmentRefused(f"{what}: it names device {str(doc['device_id'])[:70]!r}, "
                                   f"the topic names {device_id!r}")
        _want(doc, "issued", int, what, "an integer")
        _want(doc, "at", (int, float), what, "a number")
        return cls(device_id=device_id, issued=doc["issued"], at=doc["at"])


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


@dataclass(frozen=True)
class RenewRequest:
    """A device's signed renewal request on its ``cred/req`` topic: ``ack=0`` asks for new
    credentials; ``ack=N`` says the device stored the credentials of issue N."""

    device_id: str
    fingerprint: str
    nonce: str
    sent_at: float
    ack: int = 0

    def __post_init__(self) -> None:
        what = "renewal request"
        _refusing(what, check_device_id, self.device_id)
        if not isinstance(self.fingerprint, str) or not _HEX64.fullmatch(self.fingerprint):
            raise EnrolmentRefused(f"{what}: 'fingerprint' must be 64 lowercase hex digits")
        if not isinstance(self.nonce, str) or not _HEX32.fullmatch(self.nonce):
            raise EnrolmentRefused(f"{what}: 'nonce' must be 32 lowercase hex digits")
        if not _number(self.sent_at):
            raise EnrolmentRefused(f"{what}: 'sent_at' must be a finite number")
        object.__setattr__(self, "sent_at", float(self.sent_at))
        if not _count(self.ack):
            raise EnrolmentRefused(f"{what}: 'ack' must be an integer >= 0")

    def _doc(self) -> dict[str, Any]:
        return {"type": RENEW_TYPE, "v": _VERSION, "device_id": self.device_id,
                "fingerprint": self.fingerprint, "nonce": self.nonce,
                "sent_at": self.sent_at, "ack": self.ack}

    @classmethod
    def signed(cls, key: DeviceKey, device_id: str, *, ack: int = 0,
               now: float | None = None) -> bytes:
        """A renewal request by ``device_id``, signed with ``key``: the payload to publish."""
        req = cls(device_id=device_id, fingerprint=key.fingerprint, nonce=secrets.token_hex(16),
                  sent_at=time.time() if now is None else now, ack=ack)
        doc = req._doc()
        sig = base64.b64encode(key.sign(_canonical(doc))).decode("ascii")
        return json.dumps({"doc": doc, "sig": sig}, separators=(",", ":")).encode("ascii")

    @classmethod
    def verify(cls, payload: bytes, public_pem: str, *, device_id: str, now: float,
               max_skew_s: float = 300) -> RenewRequest:
        """The request in ``payload`` (arrived on ``device_id``'s topic) if it is signed by
        the key of ``public_pem`` for ``device_id`` and sent within ``max_skew_s`` of
        ``now``. Raises :class:`EnrolmentRefused` (one line)."""
        what = "renewal request"
        _refusing(what + " topic", check_device_id, device_id)
        outer = _parse(payload, what, max_bytes=MAX_REQUEST_BYTES, max_depth=3,
                       keys=frozenset({"doc", "sig"}), doc_type=None)
        sig_text = _want(outer, "sig", str, what, "a base64 signature")
        if not isinstance(outer["doc"], dict) or set(outer["doc"]) != _RENEW_KEYS:
            raise EnrolmentRefused(
                f"{what}: 'doc' must be an object with exactly the keys {sorted(_RENEW_KEYS)}")
        doc: dict[str, Any] = outer["doc"]
        if doc["type"] != RENEW_TYPE or doc["v"] != _VERSION:
            raise EnrolmentRefused(f"{what}: expected type {RENEW_TYPE!r} version {_VERSION}")
        for key in ("device_id", "fingerprint", "nonce"):
            _want(doc, key, str, what, "a string")
        _want(doc, "sent_at", (int, float), what, "a number")
        _want(doc, "ack", int, what, "an integer")
        req = cls(device_id=doc["device_id"], fingerprint=doc["fingerprint"],
                  nonce=doc["nonce"], sent_at=doc["sent_at"], ack=doc["ack"])
        if req.device_id != device_id:
            raise EnrolmentRefused(f"{what}: it names device {req.device_id!r}, the request "
                                   f"topic names {device_id!r}")
        public = _refusing(what, load_public, public_pem)
        if req.fingerprint != fingerprint_key(public):
            raise EnrolmentRefused(f"{what}: signed for key {req.fingerprint[:16]}…, the device "
                                   f"is enrolled with key {fingerprint_key(public)[:16]}…")
        try:
            sig = base64.b64decode(sig_text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise EnrolmentRefused(f"{what}: 'sig' is not base64") from None
        if len(sig) > _MAX_SIG_BYTES:
            raise EnrolmentRefused(f"{what}: 'sig' is longer than an ECDSA P-256 signature")
        try:
            public.verify(sig, _canonical(doc), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise EnrolmentRefused(f"{what}: the signature is not valid for the device's "
                                   "enrolled key") from None
        if not abs(now - req.sent_at) <= max_skew_s:
            raise EnrolmentRefused(
                f"{what}: sent at {req.sent_at:.0f}, {now - req.sent_at:+.0f} s from the "
                f"controller's clock: at most {max_skew_s:.0f} s of skew are accepted")
        return req


__all__ = ["MAX_ANSWER_BYTES", "MAX_REQUEST_BYTES", "STATES", "EnrolAnswer", "EnrolRequest",
           "RenewRequest"]
