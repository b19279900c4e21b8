"""Staged rollouts: deploy a release wave by wave, stop when a wave fails, send back.

A rollout picks its devices (named ones plus the members the operator assigned to the
groups, once they have reported a retained state — never a device that only claims a
group in its own state), orders them online first, and deploys to growing cumulative waves
(``1``, ``10%``, ``50%``, ``100%`` by default). Each wave is one signed deployment naming
its devices, followed with :class:`DeploymentWatch` until every device committed it,
failed or ran out of time. When, after a wave, more of the devices of every wave so far
failed (or stayed silent) than the rollout may lose — the rule the fleet controller's
``rollout start`` applies too (:class:`~edge_sdk.release._abort.AbortRule`) — the rollout
stops there and — unless told otherwise — signs an explicit rollback that sends every
device that had committed the new release back, per model: each model the rollout changed
to the device's earlier version of it, with a signed removal of a model it did not have.
A rollout deploys one model or a set of models, signed as one document per wave.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import EdgeError, UsageError
from ..transport import MqttConnection, Topics
from ..trust._deployment import compare_versions
from ._abort import FAILED, SILENT, AbortRule, allowed
from ._deploy import (
    DEPLOYMENT_EXPIRES_DAYS,
    clear_deployment,
    create_deployment,
    publish_deployment,
)
from ._repository import Repository
from ._watch import (
    COMMITTED,
    NO_ANSWER,
    DeploymentWatch,
    DeviceStatus,
    Outcome,
    Progress,
    describe_failures,
    fleet_status,
)

DEFAULT_WAVES = ("1", "10%", "50%", "100%")


@dataclass(frozen=True)
class RolloutConfig:
    """``waves``: cumulative sizes, a count (``"1"``) or a share of all devices (``"10%"``);
    a last wave covering everyone is added when missing. ``max_failures``: how many of
    the devices finished so far (every wave together) may fail before the rollout aborts
    — a count (``>= 1``) or a share of them (``< 1``); 0 stops at the first failure.
    ``max_silent``: the same for devices that did not answer within ``wave_timeout``
    (None: as ``max_failures``), counted apart; neither applies before ``min_finished``
    devices have finished (see :class:`~edge_sdk.release._abort.AbortRule`, the rule
    ``rollout start`` applies too).
    ``wave_timeout``: seconds each wave may take. ``rollback``: on abort, send the devices
    that committed the new release back to their previous version of each model.
    ``signed_rollback``: a rollback rollout: every wave is signed as an explicit rollback,
    so that devices on a newer version take an older one (without it such a downgrade is
    refused before any wave). Raises :class:`~edge_sdk.errors.UsageError` for a value no
    rollout runs with."""

    waves: tuple[str, ...] = DEFAULT_WAVES
    max_failures: float = 0.0
    wave_timeout: float = 600.0
    rollback: bool = True
    expires_days: float = DEPLOYMENT_EXPIRES_DAYS
    signed_rollback: bool = False
    max_silent: float | None = None
    min_finished: int = 1

    def __post_init__(self) -> None:
        if not (self.max_failures >= 0 and math.isfinite(self.max_failures)):
            raise UsageError("max failures must be >= 0")
        if not self.wave_timeout > 0:  # NaN neither
            raise UsageError("wave timeout must be > 0 seconds")
        object.__setattr__(self, "waves", check_waves(self.waves))
        if not self.expires_days > 0:
            raise UsageError("deployment expiry must be > 0 days")
        self.abort_rule()  # checks max_silent and min_finished

    def abort_rule(self) -> AbortRule:
        """The abort rule (shared with the fleet controller's rollouts) this config asks
        for."""
        silent = self.max_failures if self.max_silent is None else self.max_silent
        return AbortRule(max_failures=self.max_failures, max_silent=silent,
                         min_finished=self.min_finished)

    def allowed_failures(self, wave_size: int) -> int:
        """How many of ``wave_size`` finished devices may fail."""
        return allowed(self.max_failures, wave_size)


@dataclass(frozen=True)
class Wave:
    index: int
    devices: tuple[str, ...]
    counter: int
    outcomes: tuple[Outcome, ...]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def unanswered(self) -> list[str]:
        return [o.device for o in self.outcomes if o.result == NO_ANSWER]


@dataclass
class RolloutResult:
    #: The rollout's (first) model and version; ``models``: every model of a set.
    model: str
    version: str
    planned: list[list[str]]
    waves: list[Wave] = field(default_factory=list)
    #: Why the rollout stopped early (None when every wave went through).
    aborted: str | None = None
    #: Outcomes of the rollback deployments, and devices that could not be sent back.
    rolled_back: list[Outcome] = field(default_factory=list)
    not_rolled_back: dict[str, str] = field(default_factory=dict)
    #: Members left out because they have never reported a state.
    left_out: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.aborted is None


def check_waves(waves: Sequence[str]) -> tuple[str, ...]:
    """``waves`` as a tuple; raises :class:`UsageError` unless there is at least one and
    each is a count or a percentage :func:`plan_waves` takes."""
    if isinstance(waves, str) or not waves:
        raise UsageError("name at least one wave")
    if not all(isinstance(w, str) for w in waves):
        raise UsageError(f"waves {tuple(waves)!r}: each is a text such as '1' or '10%'")
    plan_waves(["x"], waves)
    return tuple(waves)


def plan_waves(devices: Sequence[str], waves: Sequence[str]) -> list[list[str]]:
    """Split ``devices`` (in order) into cumulative waves; every device is in exactly one."""
    total = len(devices)
    bounds: list[int] = []
    for w in waves:
        spec = w.strip()
        try:
            if spec.endswith("%"):
                pct = float(spec[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                n = math.ceil(total * pct / 100)
            else:
                n = int(spec)
                if n < 1:
                    raise ValueError
        except ValueError:
            raise UsageError(f"wave {w!r} must be a device count >= 1 or a percentage in "
                             "(0, 100] such as 10%") from None
        n = min(n, total)
        if bounds and n <= bounds[-1]:
            continue  # a wave that adds nobody (small fleets)
        bounds.append(n)
    if not bounds or bounds[-1] < total:
        bounds.append(total)
    out, start = [], 0
    for b in bounds:
        out.append(list(devices[start:b]))
        start = b
    return out


def rollout(repo: Repository, connection: MqttConnection, *, model: str | None = None,
            version: str | None = None, devices: Sequence[str] = (),
            members: Sequence[str] = (), config: RolloutConfig | None = None,
            progress: Progress | None = None, on_wave: Progress | None = None,
            models: Sequence[tuple[str, str | None]] = ()) -> RolloutResult:
    """Roll release ``model`` ``version`` (default the newest) — or the set ``models``
    (each ``(model, version or None)``, signed as one document) — out in waves to the
    named ``devices`` and to ``members`` — the devices the operator assigned to the groups
    (``FleetDB.devices(group=)``) — that have reported a state.

    Returns a :class:`RolloutResult`; it does not raise when a wave fails (see
    ``result.aborted``). ``progress(device, event)`` gets each device event;
    ``on_wave("wave", info)`` is called as each wave starts and ends. On abort each
    device is sent back per model: to its earlier version of each model the rollout
    changed, with a signed removal of each one it did not have.
    """
    cfg = config or RolloutConfig()
    if not devices and not members:
        raise UsageError("name at least one --device or --group")
    asked = list(models) or ([(model, version)] if model else [])
    if not asked:
        raise UsageError("name a --model")
    names = [n for n, _ in asked]
    if len(set(names)) != len(names):
        raise UsageError(f"--model {next(n for n in names if names.count(n) > 1)} is named "
                         "twice: a rollout deploys one version of each model")
    t = Topics.for_config(connection.config)
    rels = [repo.find(n, v) for n, v in asked]
    wanted = {r.name: r.version for r in rels}
    states = fleet_status(connection, topics=t)
    joined = {d for d in members if d in states}
    if not devices and not joined:
        raise UsageError(f"none of the {len(set(members))} device(s) assigned to the "
                         "group(s) has reported a state")
    targets = sorted(set(devices) | joined,
                     key=lambda d: (not (d in states and states[d].online), d))
    before = _models_before(states, targets, wanted)
    if not cfg.signed_rollback:
        one = len(wanted) == 1  # said as it always was: "d1 runs 2"
        newer = sorted(f"{d} runs {v if one else f'{n} {v}'}" for d, b in before.items()
                       for n, v in (b or {}).items()
                       if v is not None and compare_versions(wanted[n], v) < 0)
        if newer:
            more = f" and {len(newer) - 3} more" if len(newer) > 3 else ""
            what = ", ".join(f"{n} {v}" for n, v in wanted.items())
            raise UsageError(f"{what} is a downgrade for {len(newer)} "
                             f"device(s) ({', '.join(newer[:3])}{more}): run it with "
                             "--rollback for a signed rollback rollout")
    first = rels[0]
    result = RolloutResult(first.name, first.version, plan_waves(targets, cfg.waves),
                           left_out=sorted(set(members) - joined - set(devices)),
                           models=wanted)
    committed: list[str] = []
    unanswered: list[str] = []
    for i, wave_devices in enumerate(result.planned, 1):
        wave = _deploy_and_wait(repo, connection, t, list(wanted.items()), wave_devices,
                                cfg, progress, on_wave, i, rollback=False,
                                signed_rollback=cfg.signed_rollback)
        result.waves.append(wave)
        committed += [o.device for o in wave.outcomes if o.ok]
        unanswered += wave.unanswered
        result.aborted = abort_reason(cfg, result.waves, len(result.planned))
        if result.aborted is not None:
            break
    if result.aborted is not None and cfg.rollback:
        _roll_back(repo, connection, t, wanted, committed, unanswered, before, cfg,
                   progress, on_wave, result)
    return result


def _models_before(states: Mapping[str, DeviceStatus], targets: Sequence[str],
                   wanted: Mapping[str, str]) -> dict[str, dict[str, str | None] | None]:
    """Each target's version of each model of the rollout (None: it does not have that
    model), or None for a device whose state was not read: its models are unknown."""
    return {d: None if (s := states.get(d)) is None else {n: s.models.get(n) for n in wanted}
            for d in targets}


def rule_result(o: Outcome) -> str:
    """What the abort rule calls a device's outcome of a wave: ``committed``, ``silent``
    (no answer in time) or how it failed."""
    if o.ok:
        return COMMITTED
    if o.result == NO_ANSWER:
        return SILENT
    return o.result if o.result in FAILED else "failed"


def abort_reason(cfg: RolloutConfig, waves: Sequence[Wave], planned: int) -> str | None:
    """Why the rollout stops after the last of ``waves`` (of ``planned``), by
    :meth:`RolloutConfig.abort_rule` over every wave so far; None to go on."""
    outcomes = [o for w in waves for o in w.outcomes]
    verdict = cfg.abort_rule().verdict(rule_result(o) for o in outcomes)
    if verdict is None:
        return None
    bad = [o for o in outcomes if not o.ok]
    what = "failed" if verdict.kind == "failed" else "did not answer"
    return (f"wave {len(waves)} of {planned}: {len(bad)} of {verdict.finished} device(s) "
            f"did not commit ({verdict.count} {what}, allowed {verdict.allowed}): "
            f"{describe_failures(bad)}")


def _deploy_and_wait(repo: Repository, connection: MqttConnection, t: Topics,
                     models: Sequence[tuple[str, str]], devices: Sequence[str],
                     cfg: RolloutConfig, progress: Progress | None,
                     on_wave: Progress | None, index: int, *, rollback: bool,
                     wait_for: Sequence[str] | None = None, signed_rollback: bool = False,
                     remove: Sequence[str] = ()) -> Wave:
    """One wave of one document: ``models`` (each ``(model, version)``) and a signed
    removal of each model of ``remove`` (``rollback``: an abort's send-back to what the
    devices ran, yanked or not; ``signed_rollback``: a wave of a rollback rollout)."""
    signed = create_deployment(repo, models=models, remove=remove, fleet=t.fleet,
                               devices=devices, rollback=rollback or signed_rollback,
                               expires_days=cfg.expires_days, allow_yanked=rollback)
    counter = signed.deployment.counter
    if on_wave is not None:
        on_wave("wave", {"event": "start", "index": index, "devices": list(devices),
                         "counter": counter, "version": models[0][1] if models else None,
                         "models": [list(mv) for mv in models], "remove": list(remove),
                         "rollback": rollback})
    waited = list(devices if wait_for is None else wait_for)
    with DeploymentWatch(connection, counter, devices=waited, progress=progress,
                         topics=t, document=signed.document) as watch:
        publish_deployment(connection, signed, topics=t)
        outcomes = watch.wait(cfg.wave_timeout) if waited else []
    # Devices not waited for (offline) find the document retained when they return.
    outcomes += [Outcome(d, "sent", "retained for the device's return")
                 for d in devices if d not in waited]
    wave = Wave(index, tuple(devices), counter, tuple(outcomes))
    if on_wave is not None:
        on_wave("wave", {"event": "end", "index": index, "counter": counter,
                         "committed": sum(o.ok for o in outcomes),
                         "failed": len(wave.failed), "rollback": rollback})
    return wave


def _roll_back(repo: Repository, connection: MqttConnection, t: Topics,
               wanted: dict[str, str], committed: list[str], unanswered: list[str],
               before: Mapping[str, dict[str, str | None] | None], cfg: RolloutConfig,
               progress: Progress | None, on_wave: Progress | None,
               result: RolloutResult) -> None:
    """Send back the devices that committed, per model: each model the rollout changed
    back to the device's earlier version, a signed removal of each one it did not have.
    The ones that did not answer still hold the new deployment retained, so they get the
    rollback too — or, with none of the models before, lose the document. A device whose
    models before were unknown (no state read) is left as it is: nothing says it lacked
    the models, and a removal would take away what it may have served all along."""
    by_back: dict[tuple[tuple[str, str | None], ...], list[str]] = defaultdict(list)
    for d in committed + unanswered:
        prev = before.get(d)
        if prev is None:
            result.not_rolled_back[d] = ("its models before the rollout are unknown (no "
                                         "state was read from it): left as it is")
            continue
        back = tuple(sorted((n, prev.get(n)) for n in wanted if prev.get(n) != wanted[n]))
        if not back:
            continue  # it already served this release before the rollout
        if d in unanswered and all(v is None for v in prev.values()):
            clear_deployment(connection, t.desired(d))
            result.not_rolled_back[d] = ("it served no earlier release; its pending "
                                         "deployment was withdrawn")
            continue
        by_back[back].append(d)
    for i, (back, devs) in enumerate(sorted(by_back.items(), key=lambda kv: repr(kv[0])), 1):
        models = [(n, v) for n, v in back if v is not None]
        try:
            for n, v in models:
                repo.find(n, v, allow_yanked=True)
        except EdgeError as err:
            result.not_rolled_back |= {d: str(err) for d in devs}
            continue
        wave = _deploy_and_wait(repo, connection, t, models, devs, cfg, progress, on_wave,
                                i, rollback=True, remove=[n for n, v in back if v is None],
                                wait_for=[d for d in devs if d not in unanswered])
        result.rolled_back += wave.outcomes
