"""Signing keys on disk: ``KEYDIR/{role}/{keyid}.pem`` (PKCS#8, mode 0600) + ``.pub.json``.

Keys never live inside a repository directory; :func:`check_outside` enforces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import (  # type: ignore[attr-defined]
    CryptoSigner,
    SSlibKey,
)

from .._fs import atomic_write_bytes
from ..errors import ConfigError, UsageError

DEPLOYMENT_ROLE = "deployment"


def check_outside(keydir: Path, repo: Path) -> None:
    """Refuse a key directory inside (or equal to) the repository directory."""
    k, r = keydir.resolve(), repo.resolve()
    if k == r or k.is_relative_to(r):
        raise UsageError(
            f"key directory {keydir} is inside the repository {repo}; private keys must "
            "never be published: choose a directory outside it"
        )


class KeyStore:
    """Ed25519 keys by role in one directory (created 0700)."""

    def __init__(self, keydir: str | os.PathLike[str]) -> None:
        self.dir = Path(keydir)

    def generate(self, role: str) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        key = signer.public_key
        rdir = self.dir / role
        rdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        os.chmod(rdir, 0o700)
        pem = rdir / f"{key.keyid}.pem"
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_bytes)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_bytes(rdir / f"{key.keyid}.pub.json",
                           json.dumps(key.to_dict(), indent=2).encode())
        return signer

    def signers(self, role: str) -> list[CryptoSigner]:
        """Every private key held for ``role`` (possibly none)."""
        rdir = self.dir / role
        out: list[CryptoSigner] = []
        if not rdir.is_dir():
            return out
        for pem in sorted(rdir.glob("*.pem")):
            keyid = pem.name[: -len(".pem")]
            try:
                pub = SSlibKey.from_dict(
                    keyid, json.loads((rdir / f"{keyid}.pub.json").read_text()))
                priv = load_pem_private_key(pem.read_bytes(), None)
                out.append(CryptoSigner(priv, pub))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{pem}: unreadable signing key: {err}") from err
        return out

    def signer(self, role: str, keyid: str) -> CryptoSigner | None:
        for s in self.signers(role):
            if s.public_key.keyid == keyid:
                return s
        return None

    def retire(self, role: str, keyid: str) -> None:
        """Move a replaced key to ``KEYDIR/retired/{role}/`` (kept, never used for signing)."""
        src = self.dir / role
        dst = self.dir / "retired" / role
        dst.mkdir(parents=True, exist_ok=True)
        for suffix in (".pem", ".pub.json"):
            p = src / f"{keyid}{suffix}"
            if p.exists():
                os.replace(p, dst / p.name)

    def public_key_path(self, role: str) -> Path:
        return self.dir / f"{role}.pub.json"


def load_public_key(path: str | os.PathLike[str]) -> SSlibKey:
    """Read a public key file written by :meth:`KeyStore.export_public` (``{keyid, ...}``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return SSlibKey.from_dict(data["keyid"], {k: v for k, v in data.items() if k != "keyid"})
    except FileNotFoundError:
        raise ConfigError(f"{p}: public key file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{p}: not a public key file: {err}") from err


def public_key_bytes(key: SSlibKey) -> bytes:
    """The public key file content read by :func:`load_public_key`."""
    return json.dumps({"keyid": key.keyid, **key.to_dict()}, indent=2).encode() + b"\n"


def parse_public_key(data: bytes | str, where: str = "public key") -> SSlibKey:
    try:
        d = json.loads(data)
        return SSlibKey.from_dict(d["keyid"], {k: v for k, v in d.items() if k != "keyid"})
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}: not a public key: {err}") from err
