"""Public keys of devices: EC P-256 only, named by the sha256 of their DER SubjectPublicKeyInfo."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from ._errors import IdentityError

#: A P-256 public key PEM is 178 characters; anything far larger is not one.
MAX_PUBLIC_PEM_CHARS = 1024


def describe_key(key: Any) -> str:
    """What kind of key ``key`` is, for a refusal: ``RSA-2048``, ``EC secp384r1``, ``Ed25519``."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


def is_p256(key: Any) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) \
        and isinstance(key.curve, ec.SECP256R1)


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def fingerprint_key(key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(spki_der(key)).hexdigest()


def load_public(public_pem: str) -> ec.EllipticCurvePublicKey:
    """The EC P-256 public key of a PEM SubjectPublicKeyInfo; raises :class:`IdentityError`."""
    if not isinstance(public_pem, str) or len(public_pem) > MAX_PUBLIC_PEM_CHARS:
        raise IdentityError(
            f"public key must be a PEM text of at most {MAX_PUBLIC_PEM_CHARS} characters")
    try:
        key = load_pem_public_key(public_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as err:
        raise IdentityError(f"public key is not a PEM public key: {type(err).__name__}") \
            from None
    if not is_p256(key):
        raise IdentityError(f"key type {describe_key(key)}: expected an EC P-256 key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def fingerprint_of(public_pem: str) -> str:
    """sha256 hex of the DER SubjectPublicKeyInfo of a P-256 public key given as PEM."""
    return fingerprint_key(load_public(public_pem))


__all__ = ["describe_key", "fingerprint_key", "fingerprint_of", "is_p256", "load_public",
           "spki_der"]
