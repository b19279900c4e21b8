"""The device key: an EC P-256 key made on the device that never leaves it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import AttributeOID, NameOID

from .._fs import atomic_write_bytes
from ._credentials import Credentials, unseal
from ._errors import IdentityError
from ._pem import describe_key, fingerprint_key, is_p256
from ._words import check_device_id


def _private_again(path: Path) -> None:
    """Make a key file others can read (restored from a backup, copied with a loose
    umask) 0600 again; a file we cannot change is left as it is (not ours to fix)."""
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


#: A P-256 PKCS#8 PEM is 241 bytes; a key file far larger is not one.
MAX_KEY_FILE_BYTES = 4096


class DeviceKey:
    """The device's identity: an EC P-256 private key. Its public half is enrolled; broker
    credentials are sealed to it (:meth:`open`); renewal requests are signed with it."""

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        if not is_p256(private):
            raise IdentityError(f"key type {describe_key(private)}: expected an EC P-256 key")
        self._private = private

    def __repr__(self) -> str:
        return f"DeviceKey({self.fingerprint[:16]}…)"

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> DeviceKey:
        """The key of an unencrypted PEM (PKCS#8 or SEC1); raises :class:`IdentityError`."""
        if len(pem) > MAX_KEY_FILE_BYTES:
            raise IdentityError(f"device key is {len(pem)} bytes: not a P-256 PEM key "
                                f"(at most {MAX_KEY_FILE_BYTES})")
        try:
            private = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise IdentityError(f"device key is not an unencrypted PEM private key: "
                                f"{type(err).__name__}") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"key type {describe_key(private)}: expected an EC P-256 key")
        return cls(private)  # which refuses other curves

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> DeviceKey:
        """The key stored at ``path``; a new one written there (PKCS#8 PEM, mode 0600, its
        directory created 0700) if there is none. Raises :class:`IdentityError` for a file
        that is not a P-256 key (never replaced: it is the device's identity)."""
        target = Path(path)
        try:
            # Bounded (from_pem refuses the longer): a link to /dev/zero put there must
            # not fill the agent's memory.
            with open(target, "rb") as f:
                data = f.read(MAX_KEY_FILE_BYTES + 1)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise IdentityError(f"{target}: cannot read the device key: {err.strerror}") \
                from None
        else:
            try:
                key = cls.from_pem(data)
            except IdentityError as err:
                raise IdentityError(f"{target}: {err}") from None
            _private_again(target)
            return key
        key = cls.generate()
        try:
            if not target.parent.is_dir():
                target.parent.mkdir(mode=0o700, parents=True)
                os.chmod(target.parent, 0o700)
            atomic_write_bytes(target, key.private_pem())
            os.chmod(target, 0o600)
        except OSError as err:
            raise IdentityError(f"{target}: cannot write the device key: {err.strerror}") \
                from None
        return key

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for the key file only)."""
        return self._private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def public_pem(self) -> str:
        return self._private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the DER SubjectPublicKeyInfo of the public key."""
        return fingerprint_key(self._private.public_key())

    def csr(self, device_id: str, *, challenge: str | None = None) -> str:
        """A PEM certificate signing request for subject ``CN=device_id``, signed SHA-256;
        ``challenge`` (an enrolment request's nonce) goes in its challengePassword
        attribute, under the signature: the proof of possession is then good for that
        one request only."""
        check_device_id(device_id)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        builder = x509.CertificateSigningRequestBuilder().subject_name(name)
        if challenge is not None:
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD,
                                            challenge.encode("ascii"))
        req = builder.sign(self._private, hashes.SHA256())
        return req.public_bytes(Encoding.PEM).decode("ascii")

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature of ``data``, DER encoded."""
        return self._private.sign(data, ec.ECDSA(hashes.SHA256()))

    def open(self, sealed: str, *, device_id: str) -> Credentials:
        """The credentials :func:`~edge_sdk.identity.seal` sealed to this key for
        ``device_id``. Raises :class:`IdentityError` (sealed for another key or id, altered,
        malformed)."""
        return unseal(self._private, sealed, device_id=device_id)


__all__ = ["MAX_KEY_FILE_BYTES", "DeviceKey"]
