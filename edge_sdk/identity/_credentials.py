"""Broker credentials of a device, and their sealing (ECIES) to the device's key.

The controller seals :class:`Credentials` to the P-256 public key the device enrolled
with: an ephemeral P-256 key, ECDH, HKDF-SHA256 and AES-256-GCM. The HKDF ``info`` —
also the GCM associated data — names the device id and the key's fingerprint, so a
sealed answer replayed to another device, or to the same id enrolled with another key,
does not open.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import load_der_public_key

from .._json import UnsafeJsonError, loads_bounded
from ..transport._config import _TOPIC_WORD
from ._errors import IdentityError
from ._pem import fingerprint_key, is_p256, load_public, spki_der
from ._words import check_device_id

#: The JSON of one :class:`Credentials` (a CA bundle of a few certificates fits).
MAX_CREDENTIALS_BYTES = 8 * 1024
#: A sealed text: the credentials encrypted, base64 in JSON in base64 (~1.8x) plus the key.
MAX_SEALED_CHARS = 16 * 1024
MAX_PASSWORD_CHARS = 256
MAX_GROUPS = 64
_INFO = b"edge-sdk credentials v1|"
_KEYS = frozenset({"username", "password", "issued", "expires_at", "groups", "ca_pem"})
_SEALED_KEYS = frozenset({"epk", "nonce", "ct"})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _printable(text: str) -> bool:
    return all(" " < c < "\x7f" for c in text)


@dataclass(frozen=True)
class Credentials:
    """A device's broker account (``username`` is the device id) and when it expires.

    ``issued`` counts the passwords issued to this device (1 for the first one);
    ``groups`` are the device's groups (topics it reads); ``ca_pem`` is the CA bundle the
    device should trust for the broker, or None. Checked on construction: raises
    :class:`IdentityError`.
    """

    username: str
    password: str = field(repr=False)
    issued: int
    expires_at: float
    groups: tuple[str, ...] = ()
    ca_pem: str | None = None

    def __post_init__(self) -> None:
        check_device_id(self.username)
        if not isinstance(self.password, str) or \
                not 1 <= len(self.password) <= MAX_PASSWORD_CHARS or \
                not _printable(self.password):
            raise IdentityError(f"credentials: password must be 1-{MAX_PASSWORD_CHARS} "
                                "printable ASCII characters without spaces")
        if not isinstance(self.issued, int) or isinstance(self.issued, bool) or self.issued < 0:
            raise IdentityError("credentials: 'issued' must be an integer >= 0")
        if not _number(self.expires_at):
            raise IdentityError("credentials: 'expires_at' must be a finite number")
        object.__setattr__(self, "expires_at", float(self.expires_at))
        if isinstance(self.groups, str | bytes) or not isinstance(self.groups, list | tuple):
            raise IdentityError("credentials: 'groups' must be a list of group names")
        groups = tuple(self.groups)
        if len(groups) > MAX_GROUPS or len(set(groups)) != len(groups) or not all(
                isinstance(g, str) and _TOPIC_WORD.fullmatch(g) for g in groups):
            raise IdentityError(f"credentials: 'groups' must be at most {MAX_GROUPS} distinct "
                                "group names (one topic level each)")
        object.__setattr__(self, "groups", groups)
        if self.ca_pem is not None:
            _check_ca(self.ca_pem)

    def to_json(self) -> str:
        """The credentials as one JSON text (what :meth:`from_json` reads)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password,
                "issued": self.issued, "expires_at": self.expires_at,
                "groups": list(self.groups), "ca_pem": self.ca_pem}

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> Credentials:
        """Credentials from :meth:`to_json`'s text (or bytes, or its parsed dict): bounded
        to :data:`MAX_CREDENTIALS_BYTES`, exact keys and types. Raises :class:`IdentityError`."""
        if isinstance(data, Mapping):
            doc: Any = data
        else:
            raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            try:
                doc = loads_bounded(raw, max_bytes=MAX_CREDENTIALS_BYTES, max_depth=2)
            except UnsafeJsonError as err:
                raise IdentityError(f"credentials: {err}") from None
        if not isinstance(doc, Mapping) or set(doc) != _KEYS:
            raise IdentityError(
                f"credentials: expected an object with exactly the keys {sorted(_KEYS)}")
        for k in ("username", "password"):
            if not isinstance(doc[k], str):
                raise IdentityError(f"credentials: {k!r} must be a string")
        if not isinstance(doc["groups"], list):
            raise IdentityError("credentials: 'groups' must be a list of group names")
        if doc["ca_pem"] is not None and not isinstance(doc["ca_pem"], str):
            raise IdentityError("credentials: 'ca_pem' must be a PEM text or null")
        return cls(username=doc["username"], password=doc["password"], issued=doc["issued"],
                   expires_at=doc["expires_at"], groups=tuple(doc["groups"]),
                   ca_pem=doc["ca_pem"])


def _check_ca(ca_pem: Any) -> None:
    from cryptography import x509

    if not isinstance(ca_pem, str) or len(ca_pem) > MAX_CREDENTIALS_BYTES // 2:
        raise IdentityError(f"credentials: 'ca_pem' must be a PEM text of at most "
                            f"{MAX_CREDENTIALS_BYTES // 2} characters")
    try:
        x509.load_pem_x509_certificates(ca_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise IdentityError("credentials: 'ca_pem' is not a PEM bundle of certificates") \
            from None


def _info(device_id: str, fingerprint: str) -> bytes:
    return _INFO + device_id.encode("ascii") + b"|" + fingerprint.encode("ascii")


def _derive(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise IdentityError(f"sealed credentials: {what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise IdentityError(f"sealed credentials: {what} is not base64") from None


def seal(creds: Credentials, public_pem: str, *, device_id: str) -> str:
    """``creds`` encrypted so that only the holder of ``public_pem``'s private key, as
    ``device_id``, can open them (:meth:`DeviceKey.open <edge_sdk.identity.DeviceKey.open>`).
    Raises :class:`IdentityError` (not a P-256 key, credentials for another user name,
    credentials too large)."""
    check_device_id(device_id)
    if creds.username != device_id:
        raise IdentityError(f"credentials for user {creds.username!r} cannot be sealed to "
                            f"device {device_id!r}")
    plain = creds.to_json().encode("utf-8")
    if len(plain) > MAX_CREDENTIALS_BYTES:
        raise IdentityError(f"credentials are {len(plain)} bytes, over the limit of "
                            f"{MAX_CREDENTIALS_BYTES} (is the CA bundle too large?)")
    public = load_public(public_pem)
    info = _info(device_id, fingerprint_key(public))
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    key = _derive(ephemeral.exchange(ec.ECDH(), public), info)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, plain, info)
    doc = {"epk": _b64(spki_der(ephemeral.public_key())), "nonce": _b64(nonce), "ct": _b64(ct)}
    return _b64(json.dumps(doc, separators=(",", ":")).encode("ascii"))


def unseal(private: ec.EllipticCurvePrivateKey, sealed: str, *, device_id: str) -> Credentials:
    """Reverse :func:`seal` with the device's private key. Raises :class:`IdentityError`."""
    check_device_id(device_id)
    if not isinstance(sealed, str) or len(sealed) > MAX_SEALED_CHARS:
        raise IdentityError(f"sealed credentials must be a text of at most {MAX_SEALED_CHARS} "
                            "characters")
    try:
        doc = loads_bounded(_unb64(sealed, "the text"), max_bytes=MAX_SEALED_CHARS,
                            max_depth=1)
    except UnsafeJsonError as err:
        raise IdentityError(f"sealed credentials: {err}") from None
    if not isinstance(doc, dict) or set(doc) != _SEALED_KEYS:
        raise IdentityError(
            f"sealed credentials: expected an object with exactly the keys {sorted(_SEALED_KEYS)}")
    nonce, ct = _unb64(doc["nonce"], "'nonce'"), _unb64(doc["ct"], "'ct'")
    if len(nonce) != 12 or len(ct) < 16:
        raise IdentityError("sealed credentials: 'nonce' must be 12 bytes and 'ct' at least 16")
    try:
        epk = load_der_public_key(_unb64(doc["epk"], "'epk'"))
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError("sealed credentials: 'epk' is not a DER public key") from None
    if not is_p256(epk):
        raise IdentityError("sealed credentials: 'epk' is not an EC P-256 key")
    assert isinstance(epk, ec.EllipticCurvePublicKey)
    info = _info(device_id, fingerprint_key(private.public_key()))
    key = _derive(private.exchange(ec.ECDH(), epk), info)
    try:
        plain = AESGCM(key).decrypt(nonce, ct, info)
    except InvalidTag:
        raise IdentityError(
            f"sealed credentials do not open: sealed for another key or device than "
            f"{device_id!r}, or altered") from None
    creds = Credentials.from_json(plain)
    if creds.username != device_id:
        raise IdentityError(f"sealed credentials name user {creds.username!r}, expected the "
                            f"device id {device_id!r}")
    return creds


__all__ = ["MAX_CREDENTIALS_BYTES", "MAX_SEALED_CHARS", "Credentials", "seal", "unseal"]
