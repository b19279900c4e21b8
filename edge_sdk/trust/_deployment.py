"""Deployment documents (the "director" view): which artifact a device or group runs.

A deployment is a signed document (:mod:`._envelope`, ``signed.type``
``edge-deployment``). It names the TUF target path with its sha256 and length, a
strictly increasing ``counter``, an expiry and a ``rollback`` flag.
A device accepts one only if :func:`verify_deployment` passes AND the
release repository lists the same target with the same hash and length
(:class:`~edge_sdk.trust.UpdateClient` checks the second view).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._envelope import DocumentKind, SignedDocument, format_ts
from ._errors import (
    DeploymentExpiredError,
    DeploymentSignatureError,
    DowngradeError,
    MalformedDeploymentError,
    NotForThisDeviceError,
    ReplayError,
)

if TYPE_CHECKING:
    from securesystemslib.signer import Key, Signer  # type: ignore[attr-defined]

DOC_TYPE = "edge-deployment"
SPEC = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Deployment:
    """What a verified deployment says. ``target`` is the TUF target path of the model file."""

    fleet: str
    model: str
    version: str
    target: str
    sha256: str
    length: int
    counter: int
    issued: datetime
    expires: datetime
    rollback: bool = False
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    keyid: str = ""

    def to_signed(self) -> dict[str, Any]:
        return {
            "type": DOC_TYPE, "spec": SPEC, "fleet": self.fleet,
            "devices": list(self.devices), "groups": list(self.groups),
            "model": self.model, "version": self.version, "target": self.target,
            "sha256": self.sha256, "length": self.length, "counter": self.counter,
            "issued": format_ts(self.issued), "expires": format_ts(self.expires),
            "rollback": self.rollback,
        }

    @classmethod
    def from_signed(cls, data: Any) -> Deployment:
        """The body of ``signed``; raises :class:`MalformedDeploymentError`."""
        k = DEPLOYMENT
        data = k.header(data)
        devices, groups = k.field(data, "devices", list), k.field(data, "groups", list)
        if not all(isinstance(x, str) for x in devices + groups) or not (devices or groups):
            raise k.refuse("'devices'/'groups' must be lists of ids, at least one non-empty")
        sha = k.field(data, "sha256", str)
        if not _HEX64.fullmatch(sha):
            raise k.refuse("'sha256' must be 64 lowercase hex digits")
        length, counter = k.field(data, "length", int), k.field(data, "counter", int)
        if length < 0 or counter < 0:
            raise k.refuse("'length' and 'counter' must be >= 0")
        return cls(
            fleet=k.field(data, "fleet", str), model=k.field(data, "model", str),
            version=k.field(data, "version", str), target=k.field(data, "target", str),
            sha256=sha, length=length, counter=counter,
            issued=k.timestamp(data, "issued"), expires=k.timestamp(data, "expires"),
            rollback=k.field(data, "rollback", bool), devices=tuple(devices),
            groups=tuple(groups),
        )

    @property
    def title(self) -> str:
        return f"deployment #{self.counter} ({self.model} {self.version})"

    def applies_to(self, device_id: str, groups: Iterable[str] = ()) -> bool:
        return device_id in self.devices or bool(set(groups) & set(self.groups))

    def describe(self) -> str:
        who = ", ".join([*self.devices, *(f"group:{g}" for g in self.groups)])
        rb = " (signed rollback)" if self.rollback else ""
        return f"{self.model} {self.version} → {who} #{self.counter}{rb}"


#: The deployment as a kind of signed document.
DEPLOYMENT = DocumentKind(
    doc_type=DOC_TYPE, name="deployment", body=Deployment.from_signed, spec=SPEC,
    malformed=MalformedDeploymentError, unsigned=DeploymentSignatureError,
    expired=DeploymentExpiredError)


def sign_deployment(deployment: Deployment, signers: Iterable[Signer]) -> bytes:
    """The signed document (bytes to publish retained on the ``desired`` topic)."""
    return SignedDocument.sign(deployment, signers)


def verify_deployment(
    payload: bytes,
    key: Key,
    *,
    device_id: str,
    groups: Iterable[str] = (),
    fleet: str | None = None,
    last_counter: int | None = None,
    installed: tuple[str, str] | None = None,
    now: datetime | None = None,
) -> Deployment:
    """Verify a raw ``desired`` payload for this device and return what it says.

    Checks, in order: the signed envelope (size, signature by ``key`` over the
    canonical ``signed`` part, type, fields); the fleet and that ``device_id`` or one
    of ``groups`` is named; the expiry; that ``counter`` is strictly greater than
    ``last_counter`` (the last one accepted); and, when ``installed`` = ``(model,
    version)`` names the same model at a newer version, that the deployment is a
    signed ``rollback``. Raises a :class:`~edge_sdk.trust.DeploymentVerificationError`
    subclass.
    """
    doc = SignedDocument.verify(payload, key, DEPLOYMENT)
    dep = replace(doc.body, keyid=doc.keyid)
    if fleet is not None and dep.fleet != fleet:
        raise NotForThisDeviceError(
            f"deployment #{dep.counter} is for fleet {dep.fleet!r}, this device is in {fleet!r}")
    if not dep.applies_to(device_id, groups):
        raise NotForThisDeviceError(
            f"deployment #{dep.counter} ({dep.describe()}) does not name device {device_id!r} "
            f"or its groups {sorted(groups)}")
    doc.check_expiry(now or datetime.now(UTC))
    if last_counter is not None and dep.counter <= last_counter:
        raise ReplayError(
            f"deployment counter {dep.counter} is not newer than the last accepted "
            f"{last_counter}: replayed or stale document refused")
    if installed is not None and installed[0] == dep.model and not dep.rollback and \
            compare_versions(dep.version, installed[1]) < 0:
        raise DowngradeError(
            f"deployment #{dep.counter} would downgrade {dep.model} from {installed[1]} to "
            f"{dep.version} without a signed rollback (deploy with --rollback)")
    return dep


_PART = re.compile(r"(\d+|[A-Za-z]+)")


def _version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers compare as numbers and rank above words, so 1.10 > 1.9 and 2.0 > 2.0rc1.
    return tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in _PART.findall(v))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b``."""
    ka, kb = _version_key(a.lstrip("vV")), _version_key(b.lstrip("vV"))
    return (ka > kb) - (ka < kb)
