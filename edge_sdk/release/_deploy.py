"""Sign deployments with the deployment key and publish them retained on ``desired`` topics."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .._fs import atomic_write_bytes
from ..errors import ConfigError, UsageError
from ..transport import MqttConnection, Topics
from ..trust._deployment import (
    MAX_SET_MODELS,
    Deployment,
    ModelTarget,
    ShadowSpec,
    compare_versions,
    sign_deployment,
)
from ..trust._errors import MalformedDeploymentError
from ..trust._keys import DEPLOYMENT_ROLE
from ._repository import Repository


@dataclass(frozen=True)
class SignedDeployment:
    deployment: Deployment
    document: bytes

    def topics(self, topics: Topics) -> list[str]:
        """The retained ``desired`` topics this document belongs on."""
        return ([topics.desired(d) for d in self.deployment.devices]
                + [topics.group_desired(g) for g in self.deployment.groups])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# How long a signed deployment document stays valid unless the operator says otherwise.
DEPLOYMENT_EXPIRES_DAYS = 30.0


def create_deployment(repo: Repository, *, fleet: str, model: str | None = None,
                      version: str | None = None,
                      models: Sequence[tuple[str, str | None]] = (),
                      remove: Sequence[str] = (), devices: Sequence[str] = (),
                      groups: Sequence[str] = (), rollback: bool = False,
                      expires_days: float = DEPLOYMENT_EXPIRES_DAYS,
                      allow_yanked: bool = False,
                      shadow: Sequence[tuple[str, str | None]] = (),
                      shadow_run: ShadowSpec | None = None) -> SignedDeployment:
    """Sign a deployment for devices/groups: install release ``model`` (``version`` or the
    newest not yanked), or the set ``models`` (``(name, version or None)`` each: installed,
    swapped and rolled back together), and remove the models named in ``remove``.

    The counter is strictly increasing per repository (kept in
    ``REPO/deployments/counter``). Deploying an older version of a model than the last
    one sent to the same device or group needs ``rollback=True``. A yanked
    ``version`` is refused unless ``allow_yanked`` (an aborted rollout sending devices
    back to what they ran).

    ``shadow`` (``(name, version or None)`` each) makes it a shadow document: those
    releases are installed beside the served models of the same names and compared on live
    requests, never served, for the run ``shadow_run`` describes (its ``models`` are
    replaced by the releases found here; None: 100 requests within an hour, no gate). The
    served ``models`` may then be empty. A shadow release is never a downgrade: nothing
    swaps to it.
    """
    if not devices and not groups:
        raise UsageError("name at least one --device or --group")
    wanted = ([(model, version)] if model is not None else []) + list(models)
    names = [n for n, _ in wanted] + list(remove)
    if not names and not shadow:
        raise UsageError("name at least one model to deploy or remove")
    if len({n for n, _ in shadow}) != len(shadow):
        raise UsageError("a model is shadowed more than once")
    if set(remove) & {n for n, _ in shadow}:
        raise UsageError("a model cannot be shadowed and removed by one deployment")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"model {', '.join(twice)} is named more than once")
    if len(names) > MAX_SET_MODELS:
        raise UsageError(f"{len(names)} models named; at most {MAX_SET_MODELS} may be "
                         "deployed together")
    topics = Topics(fleet)
    for d in devices:
        topics.desired(d)  # validates the id as a topic level
    for g in groups:
        topics.group_desired(g)
    if expires_days <= 0:
        raise UsageError("deployment expiry must be > 0 days")
    rels = [repo.find(n, v, allow_yanked=allow_yanked) for n, v in wanted]
    run = None
    if shadow:
        cands = tuple(ModelTarget(r.name, r.version, r.path, r.sha256, r.length)
                      for r in (repo.find(n, v) for n, v in shadow))
        base = shadow_run or ShadowSpec(models=cands)
        run = ShadowSpec(models=cands, sample_rate=base.sample_rate,
                         min_requests=base.min_requests, time_limit_s=base.time_limit_s,
                         gate=base.gate)
    signers = repo.keys.signers(DEPLOYMENT_ROLE)
    if not signers:
        raise ConfigError(f"{repo.keys.dir}: no deployment key (was it made by "
                          "'edge-sdk release init'?)")
    ddir = repo.path / "deployments"
    with _locked(ddir / ".lock"):
        last = {f"dev-{d}": _last(ddir, f"dev-{d}") for d in devices} | {
            f"grp-{g}": _last(ddir, f"grp-{g}") for g in groups}
        if not rollback:
            for who, prev in last.items():
                was = _deployed_versions(prev)
                for rel in rels:
                    if rel.name in was and compare_versions(rel.version, was[rel.name]) < 0:
                        raise UsageError(
                            f"{who[4:]} was last deployed {rel.name} {was[rel.name]}; "
                            f"deploying {rel.version} is a downgrade and needs --rollback")
        cpath = ddir / "counter"
        try:
            counter = int(cpath.read_text().strip() or 0) + 1 if cpath.exists() else 1
        except ValueError as err:
            raise ConfigError(f"{cpath}: corrupt deployment counter") from err
        now = datetime.now(UTC).replace(microsecond=0)
        dep = Deployment(
            fleet=fleet, counter=counter, issued=now,
            expires=now + timedelta(days=expires_days),
            models=tuple(ModelTarget(rel.name, rel.version, rel.path, rel.sha256, rel.length)
                         for rel in rels),
            remove=tuple(remove), rollback=rollback,
            devices=tuple(devices), groups=tuple(groups),
            keyid=signers[0].public_key.keyid, shadow=run,
        )
        try:
            # Read back as a device reads it: nothing is signed that every device refuses.
            Deployment.from_signed(dep.to_signed())
        except MalformedDeploymentError as err:
            raise UsageError(str(err)) from err
        doc = sign_deployment(dep, signers[:1])
        atomic_write_bytes(cpath, f"{counter}\n".encode())
        for who in last:
            atomic_write_bytes(ddir / f"{who}.json", doc)
            _record_steps(ddir, who, dep)
    return SignedDeployment(dep, doc)


#: Kept per device or group (``dev-ID.steps``): per model, the versions deployed there in
#: order (null: removed), the newest last, for ``deploy --rollback`` without a version.
_STEPS_SUFFIX = ".steps"
#: How many steps are kept per model.
STEPS_KEPT = 16


def _steps(ddir: Path, who: str) -> dict[str, list[str | None]]:
    try:
        got = json.loads((ddir / f"{who}{_STEPS_SUFFIX}").read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(got, dict):
        return {}
    return {k: [x if isinstance(x, str) else None for x in v] for k, v in got.items()
            if isinstance(k, str) and isinstance(v, list)}


def _record_steps(ddir: Path, who: str, dep: Deployment) -> None:
    """Add what ``dep`` does to each model to ``who``'s steps; a signed rollback to a
    version deployed there before goes back to that step (what came after it is undone)."""
    steps = _steps(ddir, who)
    for name, version in [*((m.model, m.version) for m in dep.models),
                          *((r, None) for r in dep.remove)]:
        seq = steps.setdefault(name, [])
        if dep.rollback and version is not None and version in seq:
            del seq[len(seq) - seq[::-1].index(version):]
        elif not seq or seq[-1] != version:
            seq.append(version)
        del seq[:-STEPS_KEPT]
    atomic_write_bytes(ddir / f"{who}{_STEPS_SUFFIX}", json.dumps(steps).encode())


def previous_versions(repo: Repository, names: Sequence[str], *, devices: Sequence[str] = (),
                      groups: Sequence[str] = ()) -> dict[str, str]:
    """For each model of ``names``, the version deployed to the devices/groups before the
    one they were last deployed (for a model removed since: the one removed), which
    ``deploy --rollback`` without a version goes back to. Raises :class:`UsageError`
    when one of them has no such version, or when they differ."""
    ddir = repo.path / "deployments"
    who = [f"dev-{d}" for d in devices] + [f"grp-{g}" for g in groups]
    out: dict[str, str] = {}
    for name in names:
        found: dict[str, list[str]] = {}
        for w in who:
            seq = _steps(ddir, w).get(name, [])
            if seq and seq[-1] is not None:
                seq = seq[:-1]  # in effect now: go back past it
            earlier = [v for v in seq if v is not None]
            if not earlier:
                raise UsageError(f"{w[4:]} was deployed no earlier version of {name}: name "
                                 f"the one to go back to (--model {name}=VERSION)")
            found.setdefault(earlier[-1], []).append(w[4:])
        if len(found) > 1:
            said = "; ".join(f"{v} for {', '.join(ws)}" for v, ws in sorted(found.items()))
            raise UsageError(f"the earlier version of {name} differs ({said}): deploy them "
                             f"apart or name the version (--model {name}=VERSION)")
        out[name] = next(iter(found))
    return out


#: Where :func:`_last` puts the version of each model deployed there now (from the
#: steps; a repository from before them has the last document's fields only).
_HISTORY_KEY = "deployed"


def _deployed_versions(prev: dict[str, object] | None) -> dict[str, str]:
    """Model name → the version last deployed to one device or group (from its file)."""
    if not prev:
        return {}
    out: dict[str, str] = {}
    hist = prev.get(_HISTORY_KEY)
    if isinstance(hist, dict):
        out.update({k: v for k, v in hist.items() if isinstance(k, str) and isinstance(v, str)})
    if isinstance(prev.get("model"), str) and isinstance(prev.get("version"), str):
        out[str(prev["model"])] = str(prev["version"])
    members, removed = prev.get("models"), prev.get("remove")
    for m in members if isinstance(members, list) else []:
        if isinstance(m, dict) and isinstance(m.get("model"), str) and \
                isinstance(m.get("version"), str):
            out[m["model"]] = m["version"]
    for r in removed if isinstance(removed, list) else []:
        if isinstance(r, str):
            out.pop(r, None)
    return out


def _last(ddir: Path, who: str) -> dict[str, object] | None:
    """The ``signed`` part of the last document kept for ``who``, with the versions of
    every model deployed there so far under :data:`_HISTORY_KEY`."""
    p = ddir / f"{who}.json"
    if not p.exists():
        return None
    try:
        signed = json.loads(p.read_bytes())["signed"]
        if not isinstance(signed, dict):
            return None
    except (OSError, ValueError, KeyError):
        return None
    now = {name: seq[-1] for name, seq in _steps(ddir, who).items()
           if seq and seq[-1] is not None}
    return {**signed, _HISTORY_KEY: now} if now else signed


def last_deployment(repo: Repository, device: str) -> dict[str, object] | None:
    """The ``signed`` part of the last deployment signed for ``device`` in ``repo`` (its
    ``model``, ``version``, ``counter``...), or None."""
    return _last(repo.path / "deployments", f"dev-{device}")


def last_document(repo: Repository, device: str) -> bytes | None:
    """The bytes of the last deployment document signed for ``device`` in ``repo``."""
    try:
        return (repo.path / "deployments" / f"dev-{device}.json").read_bytes()
    except OSError:
        return None


def publish_deployment(connection: MqttConnection, signed: SignedDeployment, *,
                       topics: Topics | None = None, timeout: float = 10.0) -> list[str]:
    """Publish the document retained (QoS 1) on every ``desired`` topic it names and wait
    for the broker's acknowledgements. Returns the topics."""
    t = topics or Topics.for_config(connection.config)
    if signed.deployment.fleet != t.fleet:
        raise UsageError(f"deployment is for fleet {signed.deployment.fleet!r} but the "
                         f"connection is configured for {t.fleet!r}")
    out = signed.topics(t)
    for topic in out:
        connection.publish_wait(topic, signed.document, qos=1, retain=True, timeout=timeout)
    return out


def clear_deployment(connection: MqttConnection, topic: str, *, timeout: float = 10.0) -> None:
    """Remove a retained document (publish an empty retained message) and wait up to
    ``timeout`` seconds for the broker's acknowledgement (:class:`TransportError`)."""
    connection.publish_wait(topic, b"", qos=1, retain=True, timeout=timeout)


def deployment_state(repo: Repository) -> dict[str, object]:
    """The last counter and the last document per device/group (for status displays)."""
    ddir = repo.path / "deployments"
    out: dict[str, object] = {}
    for p in sorted(ddir.glob("*.json")):
        out[p.stem] = _last(ddir, p.stem)
    cpath = ddir / "counter"
    out["counter"] = int(cpath.read_text().strip()) if cpath.exists() else 0
    return out


__all__ = ["SignedDeployment", "clear_deployment", "create_deployment", "deployment_state",
           "previous_versions", "publish_deployment"]
