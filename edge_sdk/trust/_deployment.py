"""Deployment documents (the "director" view): which artifact a device or group runs.

A deployment is a signed document (:mod:`._envelope`, ``signed.type``
``edge-deployment``). It names one model or a set of models — for each, the TUF target
path with its sha256 and length — and models to remove, a strictly increasing
``counter``, an expiry and a ``rollback`` flag. Models it does not name are untouched.
A device accepts one only if :func:`verify_deployment` passes AND the
release repository lists the same target with the same hash and length
(:class:`~edge_sdk.trust.UpdateClient` checks the second view).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..quality import Gate
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
#: Spec 2 names a set of models (and removals); spec 1, one model in flat fields, is still
#: written for one model and no removal (so older agents read it) and still read. Spec 3
#: is written only for a document with a ``shadow`` section, so that an agent that knows
#: nothing of shadow runs refuses it instead of installing the candidate for real.
SPEC = 3
_SET_SPEC = 2
_SINGLE_SPEC = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: The most models (installed and removed together) one deployment may name.
MAX_SET_MODELS = 16
_NAME_MAX = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ModelTarget:
    """One model a deployment installs: the release and the TUF target path of its model
    file with that file's sha256 and length (cross-checked with the release repository)."""

    model: str
    version: str
    target: str
    sha256: str
    length: int

    def to_signed(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "target": self.target,
                "sha256": self.sha256, "length": self.length}

    @classmethod
    def from_signed(cls, data: Any) -> ModelTarget:
        k = DEPLOYMENT
        if not isinstance(data, dict):
            raise k.refuse("each of 'models' must be an object")
        sha = k.field(data, "sha256", str)
        if not _HEX64.fullmatch(sha):
            raise k.refuse("'sha256' must be 64 lowercase hex digits")
        length = k.field(data, "length", int)
        if length < 0:
            raise k.refuse("'length' must be >= 0")
        return cls(model=_name(k.field(data, "model", str)),
                   version=_text(k.field(data, "version", str), "version"),
                   target=_text(k.field(data, "target", str), "target", 1024),
                   sha256=sha, length=length)

    def label(self) -> str:
        return f"{self.model} {self.version}"


def _text(value: str, key: str, most: int = _NAME_MAX) -> str:
    if not value or len(value) > most or _CONTROL.search(value):
        raise DEPLOYMENT.refuse(f"'{key}' must be 1 to {most} printable characters")
    return value


def _name(value: str) -> str:
    return _text(value, "model")


#: Bounds of a shadow run a deployment may ask for.
SHADOW_MAX_REQUESTS = 10_000_000
SHADOW_MAX_TIME_S = 30 * 86400


@dataclass(frozen=True)
class ShadowSpec:
    """A shadow run: install ``models`` beside the served models of the same names, never
    serve them, compare them on ``sample_rate`` of the live requests until
    ``min_requests`` were compared or ``time_limit_s`` passed, and report the figures
    (judged by ``gate`` when there is one)."""

    models: tuple[ModelTarget, ...]
    sample_rate: float = 1.0
    min_requests: int = 100
    time_limit_s: float = 3600.0
    gate: Gate | None = None

    @classmethod
    def for_gate(cls, models: tuple[ModelTarget, ...], gate: Gate) -> ShadowSpec:
        return cls(models=models, sample_rate=gate.sample_rate,
                   min_requests=gate.min_requests, time_limit_s=gate.time_limit_s, gate=gate)

    def to_signed(self) -> dict[str, Any]:
        wire = Gate("agreement", ">=", 0.0, self.min_requests, self.time_limit_s,
                    self.sample_rate).to_json()
        return {"models": [m.to_signed() for m in self.models],
                "sample_rate": wire["sample_rate"], "min_requests": self.min_requests,
                "time_limit_s": wire["time_limit_s"],
                "gate": None if self.gate is None else self.gate.to_json()}

    @classmethod
    def from_signed(cls, data: Any) -> ShadowSpec:
        k = DEPLOYMENT
        if not isinstance(data, dict):
            raise k.refuse("'shadow' must be an object")
        raw = k.field(data, "models", list)
        if not 1 <= len(raw) <= MAX_SET_MODELS:
            raise k.refuse(f"'shadow.models' must name 1 to {MAX_SET_MODELS} models")
        models = tuple(ModelTarget.from_signed(m) for m in raw)
        names = [m.model for m in models]
        if len(set(names)) != len(names):
            raise k.refuse("'shadow.models' names a model more than once")
        raw_gate = data.get("gate")
        try:
            # The run's bounds travel as a gate's do (decimal strings), checked the same.
            run = Gate.from_json({"metric": "agreement", "op": ">=", "threshold": "0",
                                  "min_requests": data.get("min_requests"),
                                  "time_limit_s": data.get("time_limit_s"),
                                  "sample_rate": data.get("sample_rate")})
            gate = None if raw_gate is None else Gate.from_json(raw_gate)
        except UsageError as err:
            raise k.refuse(f"'shadow': {err}") from err
        return cls(models=models, sample_rate=run.sample_rate, min_requests=run.min_requests,
                   time_limit_s=run.time_limit_s, gate=gate)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.model for m in self.models)

    def target_for(self, name: str) -> ModelTarget:
        """The candidate for model ``name``; KeyError when there is none."""
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    def what(self) -> str:
        gate = f", gate {self.gate.condition}" if self.gate is not None else ""
        return (f"shadow {', '.join(m.label() for m in self.models)} over "
                f"{self.min_requests} requests{gate}")


@dataclass(frozen=True)
class Deployment:
    """What a verified deployment says: install ``models`` (one, or a set installed,
    smoke-tested, swapped and rolled back together) and remove the models named in
    ``remove``, on the devices and groups named. Models it does not name are untouched."""

    fleet: str
    counter: int
    issued: datetime
    expires: datetime
    models: tuple[ModelTarget, ...] = ()
    remove: tuple[str, ...] = ()
    rollback: bool = False
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    keyid: str = ""
    #: A shadow run (spec 3): candidates to compare beside the served models, never served.
    shadow: ShadowSpec | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every model this deployment decides: those it installs, then those it removes."""
        return (*(m.model for m in self.models), *self.remove)

    @property
    def decides(self) -> tuple[str, ...]:
        """Every model this document is about: :attr:`names` and the shadowed models (a
        replayed shadow document is refused by the same per-model counters)."""
        extra = () if self.shadow is None else self.shadow.names
        return (*self.names, *(n for n in extra if n not in self.names))

    @property
    def is_set(self) -> bool:
        return len(self.names) > 1

    def target_for(self, name: str) -> ModelTarget:
        """The member installing model ``name``; KeyError when it installs none."""
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    @property
    def only(self) -> ModelTarget:
        """The one model of a single-model deployment; ValueError for a set or a removal."""
        if len(self.models) != 1 or self.remove:
            raise ValueError(f"{self.title} is not a deployment of one model")
        return self.models[0]

    # The one model's fields, for callers that deploy one model at a time (ValueError
    # for a set or a removal, like :attr:`only`).
    @property
    def model(self) -> str:
        return self.only.model

    @property
    def version(self) -> str:
        return self.only.version

    @property
    def target(self) -> str:
        return self.only.target

    @property
    def sha256(self) -> str:
        return self.only.sha256

    @property
    def length(self) -> int:
        return self.only.length

    def to_signed(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": DOC_TYPE, "spec": SPEC, "fleet": self.fleet,
            "devices": list(self.devices), "groups": list(self.groups),
            "counter": self.counter, "issued": format_ts(self.issued),
            "expires": format_ts(self.expires), "rollback": self.rollback,
        }
        if self.shadow is not None:
            out.update(models=[m.to_signed() for m in self.models], remove=list(self.remove),
                       shadow=self.shadow.to_signed())
        elif len(self.models) == 1 and not self.remove:
            out.update(self.models[0].to_signed(), spec=_SINGLE_SPEC)
        else:
            out.update(models=[m.to_signed() for m in self.models], remove=list(self.remove),
                       spec=_SET_SPEC)
        return out

    @classmethod
    def from_signed(cls, data: Any) -> Deployment:
        """The body of ``signed``; raises :class:`MalformedDeploymentError`."""
        k = DEPLOYMENT
        data = k.header(data)
        devices, groups = k.field(data, "devices", list), k.field(data, "groups", list)
        if not all(isinstance(x, str) for x in devices + groups) or not (devices or groups):
            raise k.refuse("'devices'/'groups' must be lists of ids, at least one non-empty")
        counter = k.field(data, "counter", int)
        if counter < 0:
            raise k.refuse("'counter' must be >= 0")
        if data["spec"] == _SINGLE_SPEC:
            models: tuple[ModelTarget, ...] = (ModelTarget.from_signed(data),)
            remove: tuple[str, ...] = ()
        else:
            raw_models, raw_remove = k.field(data, "models", list), k.field(data, "remove", list)
            if len(raw_models) + len(raw_remove) > MAX_SET_MODELS:
                raise k.refuse(f"names {len(raw_models) + len(raw_remove)} models, at most "
                               f"{MAX_SET_MODELS} may be deployed together")
            models = tuple(ModelTarget.from_signed(m) for m in raw_models)
            if not all(isinstance(r, str) for r in raw_remove):
                raise k.refuse("'remove' must be a list of model names")
            remove = tuple(_name(r) for r in raw_remove)
        names = [m.model for m in models] + list(remove)
        shadow = None
        if data["spec"] == SPEC:
            shadow = ShadowSpec.from_signed(k.field(data, "shadow", dict))
            clash = sorted(set(shadow.names) & set(remove))
            if clash:
                raise k.refuse(f"shadows model {', '.join(map(repr, clash))} it also removes")
        elif "shadow" in data:
            raise k.refuse(f"a 'shadow' section needs spec {SPEC}")
        if not names and shadow is None:
            raise k.refuse("names no model to install or remove")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise k.refuse(f"names model {', '.join(map(repr, twice))} more than once")
        return cls(
            fleet=k.field(data, "fleet", str), counter=counter,
            issued=k.timestamp(data, "issued"), expires=k.timestamp(data, "expires"),
            models=models, remove=remove,
            rollback=k.field(data, "rollback", bool), devices=tuple(devices),
            groups=tuple(groups), shadow=shadow,
        )

    @property
    def title(self) -> str:
        return f"deployment #{self.counter} ({self.what()})"

    def what(self) -> str:
        """The models it installs and removes, in one phrase ("det 1.1, rec 2.0, remove old"),
        and its shadow run ("shadow det 1.2 over 500 requests, gate agreement>=0.99")."""
        parts = [m.label() for m in self.models] + [f"remove {r}" for r in self.remove]
        if self.shadow is not None:
            parts.append(self.shadow.what())
        return ", ".join(parts)

    def applies_to(self, device_id: str, groups: Iterable[str] = ()) -> bool:
        return device_id in self.devices or bool(set(groups) & set(self.groups))

    def describe(self) -> str:
        who = ", ".join([*self.devices, *(f"group:{g}" for g in self.groups)])
        rb = " (signed rollback)" if self.rollback else ""
        return f"{self.what()} → {who} #{self.counter}{rb}"


#: The deployment as a kind of signed document.
DEPLOYMENT = DocumentKind(
    doc_type=DOC_TYPE, name="deployment", body=Deployment.from_signed, spec=SPEC,
    older=(_SET_SPEC, _SINGLE_SPEC), malformed=MalformedDeploymentError,
    unsigned=DeploymentSignatureError, expired=DeploymentExpiredError)


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
    last_counter: int | Mapping[str, int] | None = None,
    installed: tuple[str, str] | Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> Deployment:
    """Verify a raw ``desired`` payload for this device and return what it says.

    Checks, in order: the signed envelope (size, signature by ``key`` over the
    canonical ``signed`` part, type, fields); the fleet and that ``device_id`` or one
    of ``groups`` is named; the expiry; that ``counter`` is newer than ``last_counter``
    — the last one accepted, or per model name the counter of the deployment that last
    decided it (then only a document every one of whose models was decided by a newer
    one is refused); and, when ``installed`` (``(model, version)``, or a mapping of
    model name to installed version) holds a model it installs at a newer version, that
    the deployment is a signed ``rollback``. Raises a
    :class:`~edge_sdk.trust.DeploymentVerificationError` subclass.
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
    if isinstance(last_counter, Mapping):
        newer = {n: last_counter[n] for n in dep.decides if n in last_counter}
        if len(newer) == len(dep.decides) and all(dep.counter <= c for c in newer.values()):
            raise ReplayError(
                f"deployment counter {dep.counter} is not newer than the deployments that "
                f"last decided {', '.join(f'{n} (#{c})' for n, c in sorted(newer.items()))}: "
                "replayed or stale document refused")
    elif last_counter is not None and dep.counter <= last_counter:
        raise ReplayError(
            f"deployment counter {dep.counter} is not newer than the last accepted "
            f"{last_counter}: replayed or stale document refused")
    have = dict([installed]) if isinstance(installed, tuple) else dict(installed or {})
    for m in dep.models:
        was = have.get(m.model)
        if was is not None and not dep.rollback and compare_versions(m.version, was) < 0:
            raise DowngradeError(
                f"deployment #{dep.counter} would downgrade {m.model} from {was} to "
                f"{m.version} without a signed rollback (deploy with --rollback)")
    return dep


_PART = re.compile(r"(\d+|[A-Za-z]+)")


def _version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers compare as numbers and rank above words, so 1.10 > 1.9 and 2.0 > 2.0rc1.
    return tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in _PART.findall(v))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b``."""
    ka, kb = _version_key(a.lstrip("vV")), _version_key(b.lstrip("vV"))
    return (ka > kb) - (ka < kb)
