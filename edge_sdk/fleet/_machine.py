"""A rollout's progress as a pure state machine: ``step(state, event) -> (state, effects)``.

No I/O here. The controller feeds events (a tick with the registry's view of the
devices, an operator command, a signed deployment), saves the returned state in the
database, and only then carries out the effects (sign, publish, clear). Because a
device's signed document is in the saved state before it is published, a controller
killed at any moment and restarted republishes the same document instead of signing a
second, conflicting one (:class:`Restarted` → :class:`Publish` for each sent device,
:class:`Clear` for each withdrawn one). :func:`desired` says, from a device's saved
progress alone, what its retained ``desired`` topic must hold.

Device statuses: ``pending`` (in a wave, not yet sent) → ``signing`` → ``sent`` →
``committed`` | ``failed`` | ``rolled_back`` | ``refused`` | ``silent`` (no answer
within the wave timeout). A device that has not answered its document within
``republish_s`` is sent the same document again, every ``republish_s``: a broker's
acknowledgement does not prove that it kept the retained copy a device reconnecting
later reads. On abort, devices that may hold the new release get ``rollback_status``
``signing`` → ``sent`` → ``committed`` / ``failed`` / ``silent``, or ``withdrawn`` (no
earlier release; its pending document is cleared) / ``skipped``.

A gated rollout (:attr:`RolloutSpec.gate`) first runs the new release in shadow on each
device: ``pending`` → ``shadow_signing`` → ``shadowing`` (a signed shadow document: the
device serves its before-versions and compares the rollout's targets beside them) → the
device's shadow result, whose figures the controller judges again with the rollout's
gate (the device's verdict word is not trusted): passed → ``pending`` again with
``shadow_verdict`` set, then promoted by the usual ``signing`` → ``sent`` → ...; failed
→ ``gate_failed`` (a failure for the abort rule, the figures in ``reason``); not enough
traffic → ``no_traffic`` (or promoted), as :attr:`RolloutSpec.gate_no_traffic` says. A
shadowing device with no result within the gate's time limit plus the wave timeout is
``silent``; an abort while it shadows signs it a plain document of its before-versions,
which ends its run (``cancelled``, with a ``rollback_status`` for that document).

A rollout deploys one model at a version, or a set of models signed as one document
(:attr:`RolloutState.models`). Each device's "before" is per model
(:attr:`DeviceProgress.before_models`: its version of each model of the rollout when it
was planned in, None for a model it did not have); an abort's send-back is per model:
one signed document puts each changed model back to the device's earlier version and
removes (a signed removal) each model it did not have.

An event that cannot follow the state (a signature nobody asked for, an unknown command)
raises :class:`IllegalEvent`: the controller's record would be wrong, so nothing is
applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UsageError
from ..quality import Gate, ShadowFigures
from ..release._abort import FAILED, AbortRule
from ..release._abort import FINISHED as FINISHED
from ..release._rollout import check_waves, plan_waves
from ._errors import FleetError, FleetUsageError

#: The device statuses that end its part in a wave, and the bad ones among them: the
#: abort rule's (``edge_sdk.release._abort``, shared with ``rollout run``).
BAD = FAILED
#: What a device reports when its shadow run ends (besides a failure of :data:`BAD`).
SHADOW_RESULTS = ("shadow_passed", "shadow_failed", "shadow_insufficient")
#: A gated device's statuses before it is promoted, and the two its gate can end it in.
SHADOW_STATUSES = ("shadow_signing", "shadowing")
GATE_FAILED = "gate_failed"
NO_TRAFFIC = "no_traffic"
#: What a device without enough shadow traffic counts as (``--gate-no-traffic``): a
#: failure, finished (neither failed nor promoted), or promoted as if it passed.
NO_TRAFFIC_POLICIES = ("fail", "skip", "promote")
#: Every status that ends a device's part in its wave.
DONE = (*FINISHED, GATE_FAILED, NO_TRAFFIC, "cancelled")


@dataclass(frozen=True)
class RolloutSpec:
    """What the operator asked for. ``waves``: cumulative counts or percentages of the
    devices the selector matches at the start. ``rate``: devices per minute (0: no
    limit): no 60 s holds more than ``rate`` first deployments (a fractional rate rounds
    down, but at least one), spread out by a token bucket of ten seconds' worth. Abort
    when, over at least ``min_finished`` finished devices, the share that failed or
    rolled back exceeds ``max_failure_rate`` or the share that stayed silent exceeds
    ``max_silent_rate`` (:meth:`abort_rule`: the rule ``rollout run`` applies too; every
    wave so far counts). ``republish_s``: how long a sent device may stay without an
    answer before its document is published again (and again after as long; 0: never).
    ``signed_rollback``: a rollback rollout (``--rollback``): every wave's deployment is
    signed as an explicit rollback, so that devices on a newer version take the older
    one (``rollback`` is what an abort does: send committed devices back).

    Raises :class:`~edge_sdk.errors.UsageError` (one line, naming the ``edge-sdk rollout
    start`` option) for a value no rollout can run with."""

    waves: tuple[str, ...] = ("1", "10%", "50%", "100%")
    rate: float = 0.0
    wave_timeout: float = 600.0
    max_failure_rate: float = 0.0
    max_silent_rate: float = 0.0
    min_finished: int = 1
    pause_after_wave: bool = False
    rollback: bool = True
    republish_s: float = 30.0
    signed_rollback: bool = False
    #: Shadow each device first and promote it only when its figures pass (None: no gate).
    gate: Gate | None = None
    #: What a device without enough shadow traffic counts as: one of
    #: :data:`NO_TRAFFIC_POLICIES`.
    gate_no_traffic: str = "skip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "waves", check_waves(self.waves))  # a list: a tuple
        if self.gate is not None and not isinstance(self.gate, Gate):
            raise UsageError("--gate must be a gate such as 'agreement>=0.99 over 500 "
                             "requests'")
        if self.gate_no_traffic not in NO_TRAFFIC_POLICIES:
            raise UsageError(f"--gate-no-traffic must be one of "
                             f"{', '.join(NO_TRAFFIC_POLICIES)}")
        if not (self.wave_timeout > 0 and self.rate >= 0):  # NaN is neither
            raise UsageError("--wave-timeout must be > 0 and --rate >= 0")
        if math.isinf(self.rate):
            raise UsageError("--rate must be a finite number of devices per minute")
        for name, v in (("--max-failure-rate", self.max_failure_rate),
                        ("--max-silent-rate", self.max_silent_rate)):
            if not 0 <= v < 1:
                raise UsageError(f"{name} must be in [0, 1)")
        if not self.republish_s >= 0:
            raise UsageError("republish_s must be >= 0 seconds (0: never)")
        self.abort_rule()  # checks --min-finished

    def abort_rule(self) -> AbortRule:
        """The abort rule (shared with ``rollout run``) this spec asks for."""
        return AbortRule(max_failures=self.max_failure_rate,
                         max_silent=self.max_silent_rate, min_finished=self.min_finished)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["waves"] = list(self.waves)
        d["gate"] = None if self.gate is None else self.gate.to_json()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RolloutSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "waves" in known:
            # Recorded before an empty list was refused: it planned one wave of everyone.
            known["waves"] = tuple(known["waves"]) or ("100%",)
        if known.get("gate") is not None:
            known["gate"] = Gate.from_json(known["gate"])
        return cls(**known)


@dataclass
class DeviceProgress:
    wave: int
    status: str = "pending"
    reason: str | None = None
    counter: int | None = None
    document: str | None = None
    sent_at: float | None = None
    finished_at: float | None = None
    before_model: str | None = None
    before_version: str | None = None
    rollback_counter: int | None = None
    rollback_document: str | None = None
    rollback_status: str | None = None
    rollback_sent_at: float | None = None
    #: The device's version of each model of the rollout before it (None: it had none);
    #: None in a record saved before sets existed (see :meth:`RolloutState.before`).
    before_models: dict[str, str | None] | None = None
    #: A gated rollout's shadow document for the device (its counter, the signed bytes,
    #: when it was sent), the figures of its shadow result (``ShadowFigures`` JSON) and
    #: the gate's verdict on them: ``passed``, ``failed``, ``insufficient``, or
    #: ``unchanged`` (it already ran the rollout's versions: nothing to judge).
    shadow_counter: int | None = None
    shadow_document: str | None = None
    shadow_sent_at: float | None = None
    shadow_figures: dict[str, Any] | None = None
    shadow_verdict: str | None = None


def _progress(wave: int, member: Member, wanted: Mapping[str, str]) -> DeviceProgress:
    have = member.versions()
    first = next(iter(wanted))
    return DeviceProgress(wave=wave, before_model=first, before_version=have.get(first),
                          before_models={name: have.get(name) for name in wanted})


@dataclass
class RolloutState:
    id: int
    model: str
    version: str
    spec: RolloutSpec
    status: str = "pending"  # pending running paused aborting completed aborted
    wave: int = 0  # current wave, 1-based; 0 before planning
    waves: int = 0
    reason: str | None = None
    devices: dict[str, DeviceProgress] = field(default_factory=dict)
    tokens: float = 0.0
    tokens_at: float = 0.0
    approved: int = 0  # the last wave whose pause the operator resumed
    held: bool = False  # paused by the controller after a wave (manual approval)
    looked_at: float = 0.0  # the previous tick's time (_republish)
    #: A set rollout: every ``(model, version)`` it deploys, signed as one document
    #: (``model``/``version`` are its first). Empty: the one model ``model`` at ``version``.
    models: tuple[tuple[str, str], ...] = ()

    def wanted(self) -> dict[str, str]:
        """Model name -> the version this rollout deploys, for every model of it."""
        return dict(self.models) if self.models else {self.model: self.version}

    def before(self, device: str) -> dict[str, str | None]:
        """The device's version of each model of the rollout before it (None: it did not
        have that model). A record saved before sets existed kept only the one model the
        device served: it had the rollout's model if that was it."""
        p = self.devices[device]
        if p.before_models is not None:
            return dict(p.before_models)
        return {name: p.before_version if p.before_model == name else None
                for name in self.wanted()}


# -- events --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """The registry's view of a device the selector matches."""

    online: bool
    model: str | None
    version: str | None
    #: Every model the device serves, name -> version (None: only ``model`` is known,
    #: an older agent's or registry's view).
    models: Mapping[str, str] | None = None

    def versions(self) -> dict[str, str]:
        """Name -> version of every model the device serves."""
        if self.models is not None:
            return dict(self.models)
        return {self.model: self.version} if self.model and self.version else {}


@dataclass(frozen=True)
class Report:
    """What a device said about deployment ``counter``: a terminal result."""

    device: str
    counter: int
    result: str
    reason: str | None = None
    #: A shadow result's figures (``ShadowFigures`` JSON as the device sent it).
    figures: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Tick:
    now: float
    members: Mapping[str, Member]
    reports: Sequence[Report] = ()
    #: Every report the registry received before this time is among ``reports`` (None:
    #: ``now``). A device times out only when the registry has heard everything up to
    #: its deadline: a registry that is behind never makes an honest device silent.
    heard_until: float | None = None
    #: Devices an operator revoked (``edge-sdk device revoke``): those of the rollout
    #: that have not answered leave it ("cancelled"). A revoked device cannot connect,
    #: and its silence must neither hold a wave nor abort the rollout.
    revoked: frozenset[str] = frozenset()
    #: Device -> the deployment counter of the shadow run its state says is running: a
    #: shadowing device that names its shadow document's has it, and is not sent it again
    #: (a run may last the gate's whole time limit).
    shadow_runs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    command: str  # pause resume abort
    now: float
    actor: str = ""


@dataclass(frozen=True)
class Signed:
    devices: tuple[str, ...]
    counter: int
    document: str
    rollback: bool
    now: float
    #: The shadow document of a gated rollout.
    shadow: bool = False


@dataclass(frozen=True)
class SignFailed:
    devices: tuple[str, ...]
    reason: str
    rollback: bool
    now: float
    shadow: bool = False


@dataclass(frozen=True)
class Restarted:
    now: float


Event = Tick | Command | Signed | SignFailed | Restarted


# -- effects -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sign:
    """Sign one document for ``devices``: the rollout's model at ``version``, or, when
    ``models``/``remove`` are given, each ``(model, version)`` of ``models`` and a signed
    removal of each model of ``remove`` (``version`` is then the first model's, or None)."""

    devices: tuple[str, ...]
    version: str | None
    rollback: bool
    models: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    #: A shadow document: ``models`` are what the devices serve (their before-versions)
    #: and ``shadow`` each ``(model, version)`` to run beside them under the rollout's
    #: gate.
    shadow: tuple[tuple[str, str], ...] = ()

    def targets(self, model: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """``(models, remove)`` to sign, ``model`` being the rollout's."""
        if self.models or self.remove:
            return self.models, self.remove
        return ((model, self.version),) if self.version is not None else (), ()


@dataclass(frozen=True)
class Publish:
    devices: tuple[str, ...]
    document: str
    #: Publish even where the broker seems to hold it already (a re-send: a retained copy
    #: acknowledged, and even delivered live, may not have been stored).
    again: bool = False


@dataclass(frozen=True)
class Clear:
    device: str


Effect = Sign | Publish | Clear


@dataclass(frozen=True)
class Desired:
    """What a device's retained ``desired`` topic must hold because of a rollout: the signed
    ``document`` (deployment ``counter``, of the rollout's model at ``version``), or
    nothing (``document`` None: cleared; ``counter`` is the withdrawn deployment's)."""

    document: str | None
    counter: int | None
    version: str | None


def desired(state: RolloutState, device: str) -> Desired | None:
    """What ``device``'s retained ``desired`` topic must hold in ``state``: its rollback
    once signed, nothing once withdrawn, else the document it was sent; None while the
    rollout has put nothing there (pending, cancelled before it was signed)."""
    p = state.devices[device]
    if p.rollback_status == "withdrawn":
        return Desired(None, p.counter, None)
    if p.rollback_document is not None:
        return Desired(p.rollback_document, p.rollback_counter,
                       state.before(device).get(state.model))
    if p.document is not None:
        return Desired(p.document, p.counter, state.version)
    if p.shadow_document is not None:  # it serves its before-versions meanwhile
        return Desired(p.shadow_document, p.shadow_counter, state.before(device).get(
            state.model))
    return None


def holds(state: RolloutState, device: str) -> bool:
    """Whether ``state`` may still put a document on ``device``'s ``desired`` topic (one
    topic per device: a second rollout's would replace it): the device is pending, being
    signed or sent there; or it took (or did not answer) the release and an abort would
    send it back; or its send-back is under way. A device whose part is over (failed,
    rolled back, refused, cancelled, sent back) is held no more, nor is any device of a
    finished rollout."""
    p = state.devices.get(device)
    if p is None or state.status in ("completed", "aborted"):
        return False
    if p.rollback_status in ("pending", "signing", "sent"):
        return True
    if state.status == "aborting":
        return False  # no send-back is due to it: this rollout sends it nothing more
    if p.status in ("pending", "signing", "sent", *SHADOW_STATUSES):
        return True
    return (state.spec.rollback and p.status in ("committed", "silent")
            and p.rollback_status is None and bool(_send_back(state, device)))


def holders(states: Sequence[RolloutState]) -> dict[str, int]:
    """Device -> the oldest (lowest id) of ``states`` that :func:`holds` it."""
    out: dict[str, int] = {}
    for st in sorted(states, key=lambda s: s.id):
        for d in st.devices:
            if d not in out and holds(st, d):
                out[d] = st.id
    return out


class CommandRefused(FleetUsageError):
    """An operator command that does not apply in the rollout's current status."""


class IllegalEvent(FleetError):
    """An event that cannot follow the rollout's state (the caller has a bug or a corrupt
    record); :func:`step` applies nothing."""


COMMANDS = ("pause", "resume", "abort")


def check_command(status: str, command: str) -> None:
    """Raise :class:`CommandRefused` (with the reason) unless ``command`` applies."""
    if command not in COMMANDS:
        raise CommandRefused(f"unknown command {command!r}")
    if status in ("completed", "aborted"):
        raise CommandRefused(f"it is already {status}")
    if command == "pause" and status == "paused":
        raise CommandRefused("it is already paused")
    if command == "resume" and status != "paused":
        raise CommandRefused(f"it is {status}, not paused")
    if command == "abort" and status == "aborting":
        raise CommandRefused("it is already aborting")


def step(state: RolloutState, event: Event) -> tuple[RolloutState, list[Effect]]:
    """Apply ``event``; return the new state and the effects to carry out after saving it.
    Raises :class:`IllegalEvent` (``state`` is left as it was)."""
    _check(state, event)
    s = copy.deepcopy(state)
    fx: list[Effect] = []
    if isinstance(event, Restarted):
        _restart(s, fx)
    elif isinstance(event, Command):
        _command(s, event, fx)
    elif isinstance(event, Signed):
        _signed(s, event, fx)
    elif isinstance(event, SignFailed):
        _sign_failed(s, event)
    else:
        _tick(s, event, fx)
    return s, fx


def _check(s: RolloutState, e: Event) -> None:
    if isinstance(e, Command) and e.command not in COMMANDS:
        raise IllegalEvent(f"rollout {s.id}: unknown command {e.command!r}")
    if isinstance(e, Signed | SignFailed):
        what = "rollback " if e.rollback else ""
        for d in e.devices:
            p = s.devices.get(d)
            if p is None:
                raise IllegalEvent(f"rollout {s.id}: {what}signature for {d}, which is not "
                                   "in the rollout")
            got = p.rollback_status if e.rollback else p.status
            if got != ("shadow_signing" if e.shadow else "signing"):
                # A second document for a device that has one would be a conflicting
                # deployment: refuse it rather than overwrite the record.
                raise IllegalEvent(f"rollout {s.id}: {what}signature for {d}, which is "
                                   f"{got}, not waiting for one")


def _restart(s: RolloutState, fx: list[Effect]) -> None:
    # Signed and saved but perhaps never published: publish the same bytes again. Withdrawn
    # and saved but perhaps never cleared: clear again (an aborted release left retained
    # would be installed by its device).
    # Only what the topic must hold now (:func:`desired`): never a document that a rollback
    # or a withdrawal has replaced.
    by_doc: dict[str, list[str]] = {}
    for d, p in sorted(s.devices.items()):
        if p.rollback_status == "withdrawn":
            fx.append(Clear(d))
        elif p.rollback_document is not None:
            if p.rollback_status == "sent":
                by_doc.setdefault(p.rollback_document, []).append(d)
        elif p.status == "sent" and p.document:
            by_doc.setdefault(p.document, []).append(d)
        elif p.status == "shadowing" and p.shadow_document:
            by_doc.setdefault(p.shadow_document, []).append(d)
        # Asked to sign, but no signed document saved: none was published; sign anew.
        if p.status in ("signing", "shadow_signing"):
            p.status = "pending"
        if p.rollback_status == "signing":
            p.rollback_status = "pending"
    fx += [Publish(tuple(devs), doc) for doc, devs in by_doc.items()]


def _command(s: RolloutState, e: Command, fx: list[Effect]) -> None:
    try:
        check_command(s.status, e.command)
    except CommandRefused:
        return  # raced with the rollout's own progress (finished meanwhile): nothing to do
    if e.command == "pause":
        s.status = "paused"
        s.held = False
        s.reason = f"paused by {e.actor}" if e.actor else "paused"
    elif e.command == "resume":
        s.status = "running"
        s.approved = s.wave if s.held else s.approved
        s.held = False
        s.reason = None
    else:
        _abort(s, f"aborted by {e.actor}" if e.actor else "aborted by the operator", fx)


def _signed(s: RolloutState, e: Signed, fx: list[Effect]) -> None:
    for d in e.devices:
        p = s.devices[d]
        if e.rollback:
            p.rollback_counter, p.rollback_document = e.counter, e.document
            p.rollback_status, p.rollback_sent_at = "sent", e.now
        elif e.shadow:
            p.shadow_counter, p.shadow_document = e.counter, e.document
            p.status, p.shadow_sent_at = "shadowing", e.now
        else:
            p.counter, p.document, p.status, p.sent_at = e.counter, e.document, "sent", e.now
    fx.append(Publish(e.devices, e.document))


def _sign_failed(s: RolloutState, e: SignFailed) -> None:
    for d in e.devices:
        p = s.devices[d]
        if e.rollback:
            p.rollback_status = "skipped"
        else:
            why = f"its shadow document could not be signed: {e.reason}" if e.shadow \
                else e.reason
            p.status, p.reason, p.finished_at = "failed", why, e.now
    if not e.rollback and s.status == "running":
        s.reason = f"signing failed: {e.reason}"


def _tick(s: RolloutState, e: Tick, fx: list[Effect]) -> None:
    _record(s, e)
    if s.waves == 0 and s.status in ("pending", "running", "paused"):
        order = sorted(e.members, key=lambda d: (not e.members[d].online, d))
        if not order:
            s.status, s.reason = "aborted", "the selector matches no device"
            return
        plan = plan_waves(order, s.spec.waves)
        for i, wave in enumerate(plan, 1):
            for d in wave:
                s.devices[d] = _progress(i, e.members[d], s.wanted())
        s.wave, s.waves = 1, len(plan)
        s.status = "running" if s.status == "pending" else s.status
        s.tokens, s.tokens_at = max(1.0, s.spec.rate / 6), e.now
    heard = e.now if e.heard_until is None else min(e.now, e.heard_until)
    if s.status == "aborting":
        _tick_abort(s, e.now, fx, heard)
        return
    if s.status not in ("running", "paused"):
        return
    # Dynamic: a device that joins the selector while the rollout runs joins this wave.
    for d, m in sorted(e.members.items()):
        if d not in s.devices:
            s.devices[d] = _progress(s.wave, m, s.wanted())
    for d in sorted(e.revoked & s.devices.keys()):
        p = s.devices[d]
        if p.status in ("pending", "sent", "shadowing"):
            p.status, p.reason, p.finished_at = "cancelled", "the device was revoked", e.now
    _timeouts(s, e.now, heard)
    if _should_abort(s, fx):
        return
    _republish(s, e.now, fx, forward=True, running=e.shadow_runs)
    if s.status == "paused":
        return
    if all(p.status in DONE for p in s.devices.values() if p.wave <= s.wave):
        if s.wave >= s.waves:
            s.status, s.reason = "completed", None
            return
        if s.spec.pause_after_wave and s.approved < s.wave:
            s.status, s.held = "paused", True
            s.reason = f"waiting for approval after wave {s.wave} of {s.waves}"
            return
        s.wave += 1
    _send(s, e.now, fx)


def _record(s: RolloutState, e: Tick) -> None:
    for r in e.reports:
        p = s.devices.get(r.device)
        if p is None:
            continue
        if p.status == "sent" and r.counter == p.counter:
            if r.result not in FINISHED:
                continue  # a shadow word about a plain document: not its answer
            p.status, p.finished_at = r.result, e.now
            if r.result != "committed":
                p.reason = r.reason
            elif p.shadow_verdict != "insufficient":  # else: why it was promoted anyway
                p.reason = None
        elif p.status == "shadowing" and r.counter == p.shadow_counter:
            _judge(s, p, r, e.now)
        elif p.rollback_status == "sent" and r.counter == p.rollback_counter:
            p.rollback_status = "committed" if r.result == "committed" else "failed"
            if r.result != "committed":
                p.reason = f"rollback {r.result}: {r.reason}"


def _judge(s: RolloutState, p: DeviceProgress, r: Report, now: float) -> None:
    """A shadowing device's result: a failure to install or verify the shadow, else its
    figures judged again with the rollout's gate (not the device's word for them)."""
    if r.result in BAD:
        p.status, p.finished_at = "failed", now
        p.reason = f"shadow {r.result.replace('_', ' ')}: {r.reason or 'no reason given'}"
        return
    gate = s.spec.gate
    figures = ShadowFigures.from_json(r.figures if isinstance(r.figures, Mapping) else {})
    p.shadow_figures = figures.to_json()
    if gate is None:  # a record no gated rollout wrote: nothing to judge by
        p.shadow_verdict, p.status = "passed", "pending"
        return
    verdict = gate.judge(figures)
    p.shadow_verdict = verdict.outcome
    if verdict.outcome == "passed":
        p.status, p.reason = "pending", None  # promoted by the next send
    elif verdict.outcome == "failed":
        p.status, p.reason, p.finished_at = GATE_FAILED, verdict.why, now
    else:
        _no_traffic(s, p, verdict.why, now)


def _no_traffic(s: RolloutState, p: DeviceProgress, why: str, now: float) -> None:
    p.shadow_verdict = p.shadow_verdict or "insufficient"
    if s.spec.gate_no_traffic == "promote":
        p.status, p.reason = "pending", f"{why} (promoted: --gate-no-traffic promote)"
    else:
        p.status, p.reason, p.finished_at = NO_TRAFFIC, why, now


def _rule_status(s: RolloutState, p: DeviceProgress) -> str:
    """What the abort rule counts a device's status as: a failed gate fails; too little
    shadow traffic fails or (skip) only finishes, as the operator chose."""
    if p.status == GATE_FAILED:
        return "failed"
    if p.status == NO_TRAFFIC:
        return "failed" if s.spec.gate_no_traffic == "fail" else "committed"
    return p.status


def _timeouts(s: RolloutState, now: float, heard: float) -> None:
    for p in s.devices.values():
        if p.status == "sent" and p.sent_at is not None \
                and heard - p.sent_at > s.spec.wave_timeout:
            p.status, p.finished_at = "silent", now
            p.reason = f"no answer within {s.spec.wave_timeout:g} s"
        elif p.status == "shadowing" and p.shadow_sent_at is not None:
            # Its run may take the gate's whole time limit before it answers.
            limit = (s.spec.gate.time_limit_s if s.spec.gate else 0.0) + s.spec.wave_timeout
            if heard - p.shadow_sent_at > limit:
                p.status, p.finished_at = "silent", now
                p.reason = f"no shadow result within {limit:g} s"


def _should_abort(s: RolloutState, fx: list[Effect]) -> bool:
    verdict = s.spec.abort_rule().verdict(_rule_status(s, p) for p in s.devices.values())
    if verdict is None:
        return False
    what = "failed" if verdict.kind == "failed" else "did not answer"
    why = f"{verdict.count} of {verdict.finished} finished device(s) {what}"
    reasons = sorted({p.reason for p in s.devices.values()
                      if p.reason and _rule_status(s, p) in (*BAD, "silent")})
    if reasons:
        why += " (" + "; ".join(reasons[:3]) + ")"
    _abort(s, f"wave {s.wave} of {s.waves}: {why}", fx)
    return True


def _abort(s: RolloutState, why: str, fx: list[Effect]) -> None:
    s.status, s.reason, s.held = "aborting", why, False
    for d, p in sorted(s.devices.items()):
        if p.status in ("pending", "signing", "shadow_signing"):
            p.status, p.reason = "cancelled", "the rollout was aborted before it got here"
            continue
        if p.status == "shadowing":
            # It never swapped: a plain document of what it serves ends its shadow run.
            p.status = "cancelled"
            p.reason = "the rollout was aborted while it shadowed: its run was ended"
            p.rollback_status = "pending"
            continue
        holds_new = p.status in ("committed", "sent", "silent")
        if not holds_new or not s.spec.rollback:
            continue
        if not _send_back(s, d):
            continue  # it already served this release before the rollout
        if p.status != "committed" and not any(v is not None for v in s.before(d).values()):
            # It had none of the rollout's models and never said it took them: take the
            # document back rather than sign a removal.
            p.rollback_status = "withdrawn"
            fx.append(Clear(d))
            continue
        p.rollback_status = "pending"
    _rollback_signs(s, fx)


def _republish(s: RolloutState, now: float, fx: list[Effect], *, forward: bool,
               running: Mapping[str, int] | None = None) -> None:
    """Publish again the document of each device that has not answered it, at
    ``republish_s``, twice that, ... after it was sent (rollback documents only, with
    ``forward`` False: an aborting rollout sends nothing forward again). A QoS 1
    acknowledgement is no proof that the broker kept the retained copy: a NATS cluster
    acknowledges a retained publish during a JetStream leader election and logs "unable
    to store retained message", so a device that was reconnecting then never reads its
    document. The same bytes are idempotent for an agent (it skips a document it has
    handled and says its state again). Each tick republishes the devices whose age
    crossed a multiple of ``republish_s`` since the previous tick (``looked_at``). A
    shadow document goes out again only until the device says its run is under way
    (``running``: device -> the counter of its running shadow run)."""
    every, before = s.spec.republish_s, s.looked_at
    s.looked_at = now
    if every <= 0:
        return

    def due(sent_at: float | None) -> bool:
        if sent_at is None or now - sent_at < every:
            return False
        return (now - sent_at) // every > max(0.0, before - sent_at) // every

    by_doc: dict[str, list[str]] = {}
    for d, p in sorted(s.devices.items()):
        if forward and p.status == "sent" and p.document and due(p.sent_at):
            by_doc.setdefault(p.document, []).append(d)
        if forward and p.status == "shadowing" and p.shadow_document \
                and (running or {}).get(d) != p.shadow_counter and due(p.shadow_sent_at):
            by_doc.setdefault(p.shadow_document, []).append(d)
        if p.rollback_status == "sent" and p.rollback_document and due(p.rollback_sent_at):
            by_doc.setdefault(p.rollback_document, []).append(d)
    fx += [Publish(tuple(devs), doc, again=True) for doc, devs in by_doc.items()]


def _tick_abort(s: RolloutState, now: float, fx: list[Effect], heard: float) -> None:
    _rollback_signs(s, fx)
    _republish(s, now, fx, forward=False)
    for p in s.devices.values():
        if p.rollback_status == "sent" and p.rollback_sent_at is not None \
                and heard - p.rollback_sent_at > s.spec.wave_timeout:
            p.rollback_status = "silent"
    if all(p.rollback_status not in ("pending", "signing", "sent")
           for p in s.devices.values()):
        s.status = "aborted"


def _send_back(s: RolloutState, device: str) -> dict[str, str | None]:
    """What an abort sends ``device`` back to: each model of the rollout whose version
    the rollout changed, at the device's earlier version (None: removed). A device that
    was only ever sent its shadow document never had the new models: it is sent what it
    serves, which ends its shadow run."""
    if s.devices[device].document is None and s.devices[device].shadow_document:
        return {n: v for n, v in sorted(s.before(device).items()) if v is not None}
    wanted = s.wanted()
    return {n: v for n, v in sorted(s.before(device).items()) if v != wanted.get(n)}


def _rollback_signs(s: RolloutState, fx: list[Effect]) -> None:
    """One rollback deployment per distinct send-back (for one model: per earlier
    version), for devices still to send back."""
    by_back: dict[tuple[tuple[str, str | None], ...], list[str]] = {}
    for d, p in sorted(s.devices.items()):
        if p.rollback_status == "pending":
            by_back.setdefault(tuple(_send_back(s, d).items()), []).append(d)
            p.rollback_status = "signing"
    for back, devs in sorted(by_back.items(), key=lambda kv: repr(kv[0])):
        models = tuple((n, v) for n, v in back if v is not None)
        remove = tuple(n for n, v in back if v is None)
        if not s.models and models:  # one model, back to a version: as ever
            fx.append(Sign(tuple(devs), models[0][1], True))
        else:
            fx.append(Sign(tuple(devs), models[0][1] if models else None, True,
                           models=models, remove=remove))


def _send(s: RolloutState, now: float, fx: list[Effect]) -> None:
    pending = [d for d, p in sorted(s.devices.items())
               if p.status == "pending" and p.wave <= s.wave]
    gated = s.spec.gate is not None
    # Judged by the gate (or nothing to judge): promoted now, outside the rate, which
    # paces first deployments (for a gated rollout, its shadow documents).
    promote = [d for d in pending if gated and s.devices[d].shadow_verdict is not None]
    fresh = [d for d in pending if d not in promote]
    if fresh and s.spec.rate > 0:
        cap = max(1.0, s.spec.rate / 6)  # at most ten seconds' worth in one burst
        s.tokens = min(cap, s.tokens + (now - s.tokens_at) * s.spec.rate / 60)
        s.tokens_at = now
        # The bucket alone would allow its burst on top of a minute's worth.
        recent = sum(1 for p in s.devices.values() if p.status in (
            "signing", "shadow_signing") or _sent_within(_first_sent(s, p), now, 60))
        n = min(math.floor(s.tokens), max(1, math.floor(s.spec.rate)) - recent)
        fresh = fresh[:max(n, 0)]
        s.tokens -= len(fresh)
    if gated:
        promote += _shadow(s, fresh, now, fx)
        fresh = []
    todo = sorted(fresh + promote)
    if not todo:
        return
    for d in todo:
        s.devices[d].status = "signing"
    fx.append(Sign(tuple(todo), s.version, False, models=s.models))


def _sent_within(at: float | None, now: float, seconds: float) -> bool:
    return at is not None and now - at < seconds


def _first_sent(s: RolloutState, p: DeviceProgress) -> float | None:
    """When the device was sent the rollout's first document (its shadow, if gated)."""
    if s.spec.gate is not None and p.shadow_sent_at is not None:
        return p.shadow_sent_at
    return p.sent_at


def _shadow(s: RolloutState, devices: Sequence[str], now: float,
            fx: list[Effect]) -> list[str]:
    """Sign shadow documents for ``devices``, one per distinct before-versions; returns
    the ones to promote at once instead: those that run the rollout's versions already
    (nothing to judge) and, with ``--gate-no-traffic promote``, those that serve none of
    its models (nothing to compare with)."""
    wanted = s.wanted()
    by_doc: dict[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]],
                 list[str]] = {}
    now_promote: list[str] = []
    for d in devices:
        p = s.devices[d]
        before = s.before(d)
        served = tuple((n, v) for n, v in sorted(before.items()) if v is not None)
        new = tuple((n, wanted[n]) for n, v in served if v != wanted[n])
        if not served:
            _no_traffic(s, p, f"serves no {', '.join(sorted(wanted))}: nothing to compare "
                              "with", now)
            if p.status == "pending":
                now_promote.append(d)
        elif not new:
            p.shadow_verdict = "unchanged"
            now_promote.append(d)
        else:
            by_doc.setdefault((served, new), []).append(d)
    for (served, new), devs in sorted(by_doc.items()):
        for d in devs:
            s.devices[d].status = "shadow_signing"
        fx.append(Sign(tuple(devs), served[0][1], False, models=served, shadow=new))
    return now_promote
