"""The operator's view of the fleet, read from what the agents report over MQTT.

Every agent keeps a retained ``state`` message (online, the models it serves, the
previous model, its last update results, the groups it says it follows, the download
running) and
sends ``events`` as an update goes through its stages, and ``progress`` events while it
downloads.
:func:`fleet_status` reads the retained states;
:class:`DeploymentWatch` follows one deployment (by its counter) until every
targeted device has committed it or failed, and is subscribed *before* the
deployment is published so that no report can slip past it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..errors import DeploymentError
from ..transport import MqttConnection, Topics

#: Terminal results an agent reports for a deployment; only the first one is success.
COMMITTED = "committed"
FAILED_RESULTS = ("rolled_back", "failed", "refused")
#: What :meth:`DeploymentWatch.wait` says of a device that did not report in time.
NO_ANSWER = "no answer"
#: The most models read from one state report (what an agent may be set to serve:
#: its ``limits.max_models`` is at most this; a deployment decides at most 16 names, but a
#: device serves the models of many), the longest name and version kept (no deployment
#: names a longer one), and how many of its newest update results are read (each names
#: at most 16 models): a device wrote the report, so all are bounded.
MAX_MODELS = 64
#: The most model names read from one update result (the names one deployment decides).
MAX_RESULT_MODELS = 16
MAX_MODEL_NAME = 128
MAX_MODEL_VERSION = 128
MAX_RESULTS = 8
_MAX_WORD = 64
_MAX_REASON = 2000
_PHASES = ("trial", "committed")
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ModelStatus:
    """One model a device serves, as its state reports it. ``phase``: ``trial`` (still in
    its health window) or ``committed``; None when the report does not say."""

    name: str
    version: str
    sha256: str | None = None
    phase: str | None = None

    @property
    def label(self) -> str:
        """``det 1.1``, and `` (trial)`` after it while on trial."""
        return f"{self.name} {self.version}" + (" (trial)" if self.phase == "trial" else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "phase": self.phase}


@dataclass(frozen=True)
class UpdateResult:
    """How a device ended deployment ``deployment`` (one of its reported ``results``):
    ``result`` is ``committed`` or one of :data:`FAILED_RESULTS` (or a word a newer agent
    uses); ``models``: the names it was about, when the report says."""

    deployment: int
    result: str
    reason: str | None = None
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceStatus:
    """One device as its retained ``state`` message describes it."""

    device: str
    online: bool
    #: ``(name, version)`` of the served model, and the same as one label.
    model_ref: tuple[str, str] | None
    model: str | None
    previous: str | None
    phase: str | None
    deployment: int
    last_result: str | None
    last_reason: str | None
    last_deployment: int | None
    #: How the device downloaded the last update's model ("delta from 1.0 (N bytes)").
    last_download: str | None
    #: The groups the device says it follows: shown as reported, never used to select it.
    groups: tuple[str, ...]
    ts: float | None
    raw: dict[str, Any]
    #: The download running when the state was sent (a ``progress`` event's fields).
    transfer: dict[str, Any] | None = None
    #: Every model it serves, name -> version (``model`` is the one swapped in last).
    models: dict[str, str] = field(default_factory=dict)
    #: The same with sha256 and phase, sorted by name.
    served: tuple[ModelStatus, ...] = ()
    #: Its newest update results, newest last (at most :data:`MAX_RESULTS`).
    results: tuple[UpdateResult, ...] = ()

    @property
    def models_label(self) -> str | None:
        """``det 1.1, ocr 2.0 (trial)``; None when it serves none."""
        return ", ".join(m.label for m in self.served) or None

    def ref_of(self, name: str) -> tuple[str, str] | None:
        """``(name, version)`` of model ``name`` on the device, None when it has none: what
        a rollout of that model changes."""
        version = self.models.get(name)
        return None if version is None else (name, version)

    def result_of(self, counter: int) -> UpdateResult | None:
        """How the device ended deployment ``counter``, if its state says: from its
        ``results`` (several deployments back to back each keep theirs), else from
        ``last_update`` (older agents report only the last)."""
        for r in reversed(self.results):
            if r.deployment == counter:
                return r
        if self.last_deployment == counter and self.last_result is not None:
            return UpdateResult(counter, self.last_result, self.last_reason)
        return None

    def label_of(self, names: Sequence[str]) -> str | None:
        """What the device serves of the models ``names`` (``det 1.1``); for none named,
        the model it swapped in last."""
        if not names:
            return self.model
        return ", ".join(f"{n} {self.models[n]}" for n in names if n in self.models) or None

    @classmethod
    def parse(cls, device: str, payload: bytes) -> DeviceStatus | None:
        """``None`` for an empty (cleared) or malformed message."""
        try:
            doc = _loads(payload) if payload else None
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        lu = doc.get("last_update")
        last: dict[str, Any] = lu if isinstance(lu, dict) else {}
        groups = doc.get("groups")
        ref = _model_ref(doc.get("model"))
        phase = doc.get("phase") if isinstance(doc.get("phase"), str) else None
        served = _served(doc.get("models"), doc.get("model"), phase)
        return cls(
            device=device,
            online=doc.get("online") is True,
            model_ref=ref,
            model=_model_label(ref),
            previous=_model_label(_model_ref(doc.get("previous"))),
            phase=phase,
            deployment=_int(doc.get("deployment")) or 0,
            last_result=last.get("result") if isinstance(last.get("result"), str) else None,
            last_reason=last.get("reason") if isinstance(last.get("reason"), str) else None,
            last_deployment=_int(last.get("deployment")),
            last_download=last.get("download") if isinstance(last.get("download"), str)
            else None,
            groups=tuple(g for g in groups if isinstance(g, str))
            if isinstance(groups, list) else (),
            ts=doc.get("ts") if isinstance(doc.get("ts"), (int, float)) else None,
            raw=doc,
            transfer=doc["transfer"] if isinstance(doc.get("transfer"), dict) else None,
            models={m.name: m.version for m in served},
            served=served,
            results=_results(doc.get("results")),
        )


def _loads(payload: bytes) -> Any:
    # Reports come from devices: bounded, so no report can end the network thread.
    return loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=MESSAGE_MAX_DEPTH)


def _model_ref(m: object) -> tuple[str, str] | None:
    if isinstance(m, dict) and isinstance(m.get("name"), str) and m.get("version") is not None:
        return m["name"], str(m["version"])
    return None


def _word(v: object, limit: int) -> str | None:
    """``v`` when it is a non-empty string of at most ``limit`` printable characters (no
    control character, no lone surrogate), else None."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if isinstance(v, str) and 0 < len(v) <= limit and v.isprintable():
        return v
    return None


def _one_model(m: object, phase: object = None) -> ModelStatus | None:
    if not isinstance(m, dict) or not isinstance(m.get("name"), str):
        return None
    name = _word(m.get("name"), MAX_MODEL_NAME)
    version = _word(m.get("version"), MAX_MODEL_VERSION)
    if name is None or version is None:
        return None
    sha = m.get("sha256")
    said = m.get("phase", phase)
    return ModelStatus(
        name, version,
        sha if isinstance(sha, str) and len(sha) == 64 and _HEX.issuperset(sha) else None,
        said if isinstance(said, str) and said in _PHASES else None)


def _served(models: object, model: object, phase: str | None) -> tuple[ModelStatus, ...]:
    """The models a state reports: its ``models`` list, else (an older agent) its one
    ``model`` in the device's phase. Malformed entries and repeated names are left out,
    and at most :data:`MAX_MODELS` are read."""
    if not isinstance(models, list):
        one = _one_model(model, phase)
        return () if one is None else (one,)
    found: dict[str, ModelStatus] = {}
    for m in models:
        one = _one_model(m)
        if one is not None and one.name not in found:
            found[one.name] = one
            if len(found) >= MAX_MODELS:
                break
    return tuple(found[n] for n in sorted(found))


def _results(results: object) -> tuple[UpdateResult, ...]:
    """The newest :data:`MAX_RESULTS` well-formed entries of a state's ``results``."""
    if not isinstance(results, list):
        return ()
    out: list[UpdateResult] = []
    for r in results[-MAX_RESULTS:]:
        if not isinstance(r, dict):
            continue
        counter, result = _int(r.get("deployment")), r.get("result")
        if counter is None or counter < 0 or not isinstance(result, str) \
                or _word(result, _MAX_WORD) is None:
            continue
        reason = r.get("reason")
        said = r.get("models")
        names = (_word(x.get("name") if isinstance(x, dict) else x, MAX_MODEL_NAME)
                 for x in (said[:MAX_RESULT_MODELS] if isinstance(said, list) else ()))
        out.append(UpdateResult(counter, result,
                                reason[:_MAX_REASON] if isinstance(reason, str) else None,
                                tuple(n for n in names if n is not None)))
    return tuple(out)


def _model_label(ref: tuple[str, str] | None) -> str | None:
    return None if ref is None else f"{ref[0]} {ref[1]}"


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _device_of(topic: str) -> str:
    # {prefix}/{fleet}/dev/{device}/{leaf}
    return topic.split("/")[3]


def fleet_status(connection: MqttConnection, *, topics: Topics | None = None,
                 settle: float = 0.5, timeout: float = 5.0) -> dict[str, DeviceStatus]:
    """Every device's retained state in the connection's fleet, by device id.

    Retained messages arrive right after the subscription is acknowledged; the read
    ends once none has come for ``settle`` seconds (or after ``timeout``).
    """
    t = topics or Topics.for_config(connection.config)
    found: dict[str, DeviceStatus] = {}
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_state(topic: str, payload: bytes) -> None:
        status = DeviceStatus.parse(_device_of(topic), payload)
        with lock:
            if status is not None:
                found[status.device] = status
            last[0] = time.monotonic()

    sub = connection.subscribe(t.every_device("state"), on_state)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if time.monotonic() - last[0] >= settle:
                    break
            time.sleep(0.02)
    finally:
        sub.cancel()
    with lock:
        return dict(sorted(found.items()))


@dataclass(frozen=True)
class Outcome:
    """How one device ended a deployment: ``committed``, one of :data:`FAILED_RESULTS`,
    or ``no answer`` when the wait ran out."""

    device: str
    result: str
    reason: str | None = None
    model: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == COMMITTED


Progress = Callable[[str, dict[str, Any]], None]


class DeploymentWatch:
    """Follow deployment number ``counter`` on ``devices`` and on ``members``.

    Create it (it subscribes) before publishing the deployment, then call
    :meth:`wait`. ``members``: the devices the operator assigned to the deployment's
    groups (``FleetDB.devices(group=)``); each is followed once its retained state shows
    it exists (one that never reported is not waited for). What a device's state says
    about its own groups never makes it a target.
    ``progress(device, event)`` is called for each event of this deployment.

    A refusal counts against this deployment only when it names it: by its verified
    counter, or — for a message the device could not verify, whose claimed counter
    means nothing — by the digest of ``document``, the exact bytes published. Refusals
    of other messages (garbage someone else put on the topic) are not this deployment's.
    """

    def __init__(self, connection: MqttConnection, counter: int, *,
                 devices: Iterable[str] = (), members: Iterable[str] = (),
                 progress: Progress | None = None, topics: Topics | None = None,
                 document: bytes | None = None, groups: Iterable[str] = ()) -> None:
        self.counter = counter
        #: The groups the deployment was published to (a member not following any of
        #: them never sees it: said at once, and as its reason).
        self.groups = tuple(groups)
        #: How agents name the published document in refusals (sha256, 32 hex digits).
        self.digest = None if document is None else hashlib.sha256(document).hexdigest()[:32]
        self.devices = set(devices)
        self.members = set(members)
        self._progress = progress
        self._t = topics or Topics.for_config(connection.config)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.states: dict[str, DeviceStatus] = {}
        self.outcomes: dict[str, Outcome] = {}
        self._last_message = time.monotonic()
        self._subs = [
            connection.subscribe(self._t.every_device("state"), self._on_state),
            connection.subscribe(self._t.every_device("events"), self._on_event),
        ]

    def close(self) -> None:
        for s in self._subs:
            s.cancel()

    def __enter__(self) -> DeploymentWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def targets(self) -> set[str]:
        """The named devices plus every member that has reported a state."""
        with self._lock:
            return self._targets()

    def _targets(self) -> set[str]:
        return self.devices | (self.members & self.states.keys())

    # -- handlers (network thread) -----------------------------------------------------------

    def _on_state(self, topic: str, payload: bytes) -> None:
        status = DeviceStatus.parse(_device_of(topic), payload)
        with self._changed:
            self._last_message = time.monotonic()
            if status is None:
                return
            self.states[status.device] = status
            if status.device not in self._targets() or status.device in self.outcomes:
                return
            # The state names the deployments its results are about (its last few, and
            # its last one); nothing else (phase, counter, the order of messages) says
            # what became of this one.
            done = status.result_of(self.counter)
            if done is not None and (done.result == COMMITTED
                                     or done.result in FAILED_RESULTS):
                reason = None if done.result == COMMITTED else done.reason
                self.outcomes[status.device] = Outcome(status.device, done.result, reason,
                                                       status.label_of(done.models))
            self._changed.notify_all()

    def _on_event(self, topic: str, payload: bytes) -> None:
        try:
            doc = _loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("event") == "heartbeat":
            return
        device = _device_of(topic)
        dep = doc.get("deployment")
        # ``version``: what older agents called the counter in events (still read).
        counter = _int(dep.get("counter", dep.get("version"))) if isinstance(dep, dict) \
            else None
        sent = doc.get("payload")
        digest = sent.get("sha256") if isinstance(sent, dict) else None
        kind = doc.get("event")
        with self._changed:
            if device not in self._targets():
                return
            mine = counter == self.counter or (
                kind == "refused" and self.digest is not None and digest == self.digest)
            if not mine:
                return
            # ``retry``: a transient failure (broker or responder away); the agent goes on.
            if kind in FAILED_RESULTS and not doc.get("retry") and device not in self.outcomes:
                reason = doc.get("reason")
                self.outcomes[device] = Outcome(device, str(kind),
                                                reason if isinstance(reason, str) else None)
            self._changed.notify_all()
        if self._progress is not None:
            self._progress(device, doc)

    # -- waiting -----------------------------------------------------------------------------

    def _unfollowed(self, device: str) -> str | None:
        """Why ``device``, a member reached only through :attr:`groups`, cannot see this
        deployment: its state says it follows none of them (its agent config lacks them)."""
        st = self.states.get(device)
        if device in self.devices or not self.groups or st is None \
                or set(st.groups) & set(self.groups):
            return None
        return (f"the device does not follow group {', '.join(self.groups)} (its agent "
                f"config's groups: {', '.join(st.groups) or 'none'}; add the group there)")

    def wait(self, timeout: float, *, settle: float = 0.5,
             notice: Callable[[str], None] | None = None) -> list[Outcome]:
        """Block until every target has an outcome or ``timeout`` passes; one
        :class:`Outcome` per target (``no answer`` for those still pending).
        ``notice(line)`` is told at once of each target that cannot see the deployment.

        Raises :class:`DeploymentError` when there is nobody to wait for (no device named,
        and none of the members has reported).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            # Let the retained states arrive before deciding which members exist.
            while self.members and time.monotonic() - self._last_message < settle \
                    and time.monotonic() < deadline:
                self._changed.wait(0.05)
            targets = self._targets()
            if not targets:
                raise DeploymentError(
                    f"none of the {len(self.members)} device(s) assigned to the group(s) has "
                    "reported a state; nothing to wait for")
            for d in sorted(targets):
                why = self._unfollowed(d)
                if why is not None and notice is not None:
                    notice(f"{d}: {why}")
            while True:
                targets = self._targets()
                if targets <= set(self.outcomes):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            out = []
            for d in sorted(targets):
                if d in self.outcomes:
                    out.append(self.outcomes[d])
                    continue
                st = self.states.get(d)
                why = self._unfollowed(d)
                if why is not None:
                    out.append(Outcome(d, NO_ANSWER, why, st.model if st else None))
                    continue
                where = ("has never reported" if st is None else
                         "is offline" if not st.online else f"is in phase {st.phase}")
                out.append(Outcome(d, NO_ANSWER, f"the device {where}",
                                   st.model if st else None))
            return out


def describe_transfer(report: dict[str, Any]) -> str:
    """``downloading adder 2: 40% (410 KiB of 1.0 MiB) at 118 kB/s, about 5 s left`` from
    a ``progress`` event or a state's ``transfer`` (devices wrote it: checked)."""
    done, total = _int(report.get("bytes")), _int(report.get("total"))
    rate, eta = report.get("rate_bytes_s"), report.get("eta_s")
    dep = report.get("deployment")
    what = (f" {dep.get('name')} {dep.get('artifact_version')}"
            if isinstance(dep, dict) else "")
    text = f"downloading{what}"
    if done is not None and total:
        text += f": {100 * done // total}% ({_size(done)} of {_size(total)})"
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
        text += f" at {_size(rate)}/s"
    if isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0:
        text += f", about {_duration(eta)} left"
    return text


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def describe_failures(bad: Sequence[Outcome], shown: int = 3) -> str:
    """``dev result (reason); ...`` for the first ``shown`` outcomes, then how many more."""
    text = "; ".join(f"{o.device} {o.result}" + (f" ({o.reason})" if o.reason else "")
                     for o in bad[:shown])
    return text + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")


def require_success(outcomes: list[Outcome], counter: int) -> None:
    """Raise :class:`DeploymentError` (one line) unless every outcome is a commit."""
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise DeploymentError(f"deployment {counter} did not succeed on {len(bad)} of "
                              f"{len(outcomes)} device(s): {describe_failures(bad)}")


__all__ = ["COMMITTED", "FAILED_RESULTS", "MAX_MODELS", "NO_ANSWER", "DeploymentWatch",
           "DeviceStatus", "ModelStatus", "Outcome", "UpdateResult", "describe_failures",
           "describe_transfer", "fleet_status", "require_success"]
