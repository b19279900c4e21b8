"""Deployment documents (the "director" view): which artifact a device or group runs.

A deployment is JSON ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``;
the signature (ed25519, securesystemslib) covers the canonical JSON of
``signed``. It names the TUF target path with its sha256 and length, a
strictly increasing ``counter``, an expiry and a ``rollback`` flag.
A device accepts one only if :func:`verify_deployment` passes AND the
release repository lists the same target with the same hash and length
(:class:`~edge_sdk.trust.UpdateClient` checks the second view).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError
from securesystemslib.exceptions import VerificationError as SslibVE
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import (  # type: ignore[attr-defined]
    Key,
    Signature,
    Signer,
)

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ._errors import (
    DeploymentExpiredError,
    DeploymentSignatureError,
    DowngradeError,
    MalformedDeploymentError,
    NotForThisDeviceError,
    ReplayError,
)

DOC_TYPE = "edge-deployment"
SPEC = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: What :func:`_ts` writes. Parsed by hand: ``datetime.strptime`` takes a process-wide lock,
#: and a simulator process with a hundred agents verifying at once queued on it.
_TS = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")


def _parse_ts(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise MalformedDeploymentError(f"deployment: '{field}' must be a timestamp string")
    m = _TS.fullmatch(value)
    try:
        if m is None:
            raise ValueError(value)
        y, mo, d, h, mi, sec = (int(g) for g in m.groups())
        return datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
    except ValueError as err:
        raise MalformedDeploymentError(
            f"deployment: '{field}' {value[:40]!r} is not YYYY-MM-DDTHH:MM:SSZ") from err


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
            "issued": _ts(self.issued), "expires": _ts(self.expires),
            "rollback": self.rollback,
        }

    @classmethod
    def from_signed(cls, data: Any) -> Deployment:
        if not isinstance(data, dict) or data.get("type") != DOC_TYPE:
            raise MalformedDeploymentError(f"deployment: 'signed.type' must be {DOC_TYPE!r}")
        if data.get("spec") != SPEC:
            raise MalformedDeploymentError(
                f"deployment: spec {data.get('spec')!r} is not supported (this edge-sdk reads "
                f"spec {SPEC})")

        def req(key: str, kind: type) -> Any:
            v = data.get(key)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise MalformedDeploymentError(
                    f"deployment: '{key}' is missing or not {kind.__name__}")
            return v

        devices, groups = req("devices", list), req("groups", list)
        if not all(isinstance(x, str) for x in devices + groups) or not (devices or groups):
            raise MalformedDeploymentError(
                "deployment: 'devices'/'groups' must be lists of ids, at least one non-empty")
        sha = req("sha256", str)
        if not _HEX64.fullmatch(sha):
            raise MalformedDeploymentError("deployment: 'sha256' must be 64 lowercase hex digits")
        length, counter = req("length", int), req("counter", int)
        if length < 0 or counter < 0:
            raise MalformedDeploymentError("deployment: 'length' and 'counter' must be >= 0")
        return cls(
            fleet=req("fleet", str), model=req("model", str), version=req("version", str),
            target=req("target", str), sha256=sha, length=length, counter=counter,
            issued=_parse_ts(data.get("issued"), "issued"),
            expires=_parse_ts(data.get("expires"), "expires"),
            rollback=req("rollback", bool), devices=tuple(devices), groups=tuple(groups),
        )

    def applies_to(self, device_id: str, groups: Iterable[str] = ()) -> bool:
        return device_id in self.devices or bool(set(groups) & set(self.groups))

    def describe(self) -> str:
        who = ", ".join([*self.devices, *(f"group:{g}" for g in self.groups)])
        rb = " (signed rollback)" if self.rollback else ""
        return f"{self.model} {self.version} → {who} #{self.counter}{rb}"


def _canonical(data: dict[str, Any]) -> bytes:
    return str(encode_canonical(data)).encode()


def signed_by(signed: dict[str, Any], sigs: Iterable[Signature], key: Key) -> str | None:
    """The key id of the first of ``sigs`` by ``key`` valid over the canonical ``signed``
    (None when there is none). Raises ``FormatError`` when ``signed`` cannot be
    canonicalised. Shared by every document the deployment key signs."""
    data = _canonical(signed)
    for sig in sigs:
        if sig.keyid != key.keyid:
            continue
        try:
            key.verify_signature(sig, data)
        except (UnverifiedSignatureError, SslibVE):
            continue
        return str(sig.keyid)
    return None


def sign_deployment(deployment: Deployment, signers: Iterable[Signer]) -> bytes:
    """The signed document (bytes to publish retained on the ``desired`` topic)."""
    signed = deployment.to_signed()
    payload = _canonical(signed)
    sigs = [s.sign(payload).to_dict() for s in signers]
    if not sigs:
        raise ValueError("at least one signer is needed")
    return json.dumps({"signed": signed, "signatures": sigs}, indent=None,
                      separators=(",", ":")).encode()


def parse_deployment(payload: bytes) -> tuple[dict[str, Any], list[Signature]]:
    try:
        doc = loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=MESSAGE_MAX_DEPTH)
    except ValueError as err:
        raise MalformedDeploymentError(f"deployment refused: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict) or not isinstance(
            doc.get("signatures"), list):
        raise MalformedDeploymentError(
            "deployment must be a JSON object with 'signed' and 'signatures'")
    try:
        sigs = [Signature.from_dict(dict(s)) for s in doc["signatures"]]
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedDeploymentError(f"deployment: malformed signature entry: {err}") from err
    return doc["signed"], sigs


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

    Checks, in order: the signature by ``key`` over the canonical ``signed``
    part; the fleet and that ``device_id`` or one of ``groups`` is named; the
    expiry; that ``counter`` is strictly greater than ``last_counter`` (the
    last one accepted); and, when ``installed`` = ``(model, version)`` names
    the same model at a newer version, that the deployment is a signed
    ``rollback``. Raises a :class:`~edge_sdk.trust.DeploymentVerificationError` subclass.
    """
    signed, sigs = parse_deployment(payload)
    try:
        good = signed_by(signed, sigs, key)
    except FormatError as err:  # floats and other values canonical JSON cannot hold
        raise MalformedDeploymentError(
            f"deployment: 'signed' cannot be canonicalised: {str(err)[:120]}") from None
    if good is None:
        raise DeploymentSignatureError(
            f"deployment is not signed by the trusted deployment key {key.keyid[:12]}… "
            f"(signatures from {', '.join(s.keyid[:12] for s in sigs) or 'nobody'})"
        )
    dep = replace(Deployment.from_signed(signed), keyid=good)
    if fleet is not None and dep.fleet != fleet:
        raise NotForThisDeviceError(
            f"deployment #{dep.counter} is for fleet {dep.fleet!r}, this device is in {fleet!r}")
    if not dep.applies_to(device_id, groups):
        raise NotForThisDeviceError(
            f"deployment #{dep.counter} ({dep.describe()}) does not name device {device_id!r} "
            f"or its groups {sorted(groups)}")
    when = now or datetime.now(UTC)
    if dep.expires <= when:
        raise DeploymentExpiredError(
            f"deployment #{dep.counter} ({dep.model} {dep.version}) expired at "
            f"{_ts(dep.expires)}")
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
