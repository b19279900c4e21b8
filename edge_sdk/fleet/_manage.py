"""The operator API: what ``edge-sdk rollout``, ``edge-sdk device`` and the fleet page's
signed-in actions do to the record — start a rollout, queue a command for it (pause,
resume, abort, approve), set and remove devices' assignments — each in one transaction
with its audit entry; and the audit log's actor.

The controller (:mod:`._controller`) carries the records out; the rows are the store's
(:mod:`._store`); a command changes a rollout only through the state machine
(:mod:`._machine`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeError
from ..release._deploy import _deployed_versions, last_deployment
from ..release._repository import Repository
from ..transport._config import check_topic_word
from ..trust._deployment import MAX_SET_MODELS, compare_versions
from . import _machine as m
from . import _store as store
from ._assign import AssignmentChange, device_id
from ._members import members
from ._select import MAX_GROUPS, MAX_TAGS, check_selector, operator_part, selects
from ._store import FleetDB, FleetUsageError, valid_id

# -- rollouts ------------------------------------------------------------------------------

def start_rollout(db: FleetDB, *, fleet: str, model: str = "", version: str = "",
                  selector: Mapping[str, Sequence[str]], spec: m.RolloutSpec,
                  actor: str, repo: Repository | None = None,
                  models: Sequence[tuple[str, str]] = ()) -> int:
    """Create a rollout record (the controller picks it up) of ``model`` at ``version``,
    or of the set ``models`` (each ``(model, version)``, signed as one document). Raises
    :class:`FleetUsageError` when the selector matches no registered device, or when
    a version is older than what one of them runs or was last sent (by a rollout, or
    signed in ``repo``): a downgrade, which only a rollback rollout
    (``spec.signed_rollback``) deploys; :func:`check_selector`'s errors for a malformed
    selector or id."""
    pairs = check_rollout_models(models or ((model, version),))
    model, version = pairs[0]
    check_selector(fleet, selector)
    sel = {k: list(v) for k, v in selector.items() if v}
    if not sel:
        raise FleetUsageError("name at least one --group, --tag or --device")
    if not operator_part(sel):
        raise FleetUsageError(
            f"the selector {_describe(sel)} names only hardware facts, which devices report "
            "about themselves: hw.KEY=VALUE narrows a selection; name --group, --tag or "
            "--device too")
    found = members(db, fleet, sel, model=model)
    if not found:
        raise FleetUsageError(f"the selector {_describe(sel)} matches no device registered in "
                              f"fleet {fleet!r}{_claimed(db, fleet, sel)} (see 'edge-sdk "
                              "status --db ...')")
    _refuse_held(db, fleet, found)
    if not spec.signed_rollback:
        for name, ver in pairs:
            _refuse_downgrade(db, fleet, name, ver, found, repo)
    with db.begin() as c:
        rid = store.insert_rollout(c, fleet=fleet, model=model, version=version,
                                   selector=sel, spec=spec, actor=actor, models=pairs)
        db.record_audit(actor, "rollout.start", {
            "rollout": rid, "fleet": fleet, "model": model, "version": version,
            **({"models": [list(p) for p in pairs]} if len(pairs) > 1 else {}),
            "selector": sel, **spec.to_json()}, conn=c)
    return rid


def check_rollout_models(models: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The ``(model, version)`` pairs of a rollout, checked: at least one, each name once,
    at most :data:`~edge_sdk.trust.MAX_SET_MODELS`. Raises :class:`FleetUsageError`."""
    pairs = tuple((str(n), str(v)) for n, v in models)
    names = [n for n, _ in pairs]
    if not pairs or not all(n and v for n, v in pairs):
        raise FleetUsageError("name a --model and its version")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FleetUsageError(f"--model {twice[0]} is named twice: a rollout deploys one "
                              "version of each model")
    if len(pairs) > MAX_SET_MODELS:
        raise FleetUsageError(f"a rollout deploys at most {MAX_SET_MODELS} models as one set "
                              f"({len(pairs)} named)")
    return pairs


def _refuse_downgrade(db: FleetDB, fleet: str, model: str, version: str,
                      found: Mapping[str, m.Member], repo: Repository | None) -> None:
    newer: dict[str, str] = {}  # device -> the newest version of the model it has or was sent

    def seen(device: str, mdl: object, ver: object) -> None:
        if mdl == model and isinstance(ver, str) and compare_versions(version, ver) < 0 \
                and (device not in newer or compare_versions(ver, newer[device]) > 0):
            newer[device] = ver

    for d, mem in found.items():
        seen(d, model, mem.versions().get(model))
        if repo is not None:
            for name, was in _deployed_versions(last_deployment(repo, d)).items():
                seen(d, name, was)
    for device, mdl, ver in store.desired_versions(db, fleet, found):
        seen(device, mdl, ver)
    if newer:
        some = ", ".join(f"{d} has {v}" for d, v in sorted(newer.items())[:3])
        more = f" and {len(newer) - 3} more" if len(newer) > 3 else ""
        raise FleetUsageError(f"{model} {version} for {len(newer)} selected device(s) ({some}"
                              f"{more}) is a downgrade: start it with --rollback for a signed "
                              "rollback rollout")


def _refuse_held(db: FleetDB, fleet: str, found: Mapping[str, m.Member]) -> None:
    """Refuse a selection with devices another active rollout holds (each device has one
    ``desired`` topic: a second rollout's document would replace the first's, which then
    times out and aborts). A rollout not planned yet holds every device it selects."""
    states: list[m.RolloutState] = []
    planned: dict[str, int] = {}
    for rid in store.active_rollouts(db, fleet):
        with db.read() as c:
            st = store.load_state(c, rid)
        if st.waves:
            states.append(st)
            continue
        for d in members(db, fleet, store.rollout_selector(db, rid), model=st.model):
            planned.setdefault(d, rid)
    held = m.holders(states)
    for d, rid in planned.items():
        held[d] = min(rid, held.get(d, rid))
    taken = sorted(d for d in found if d in held)
    if not taken:
        return
    ids = sorted({held[d] for d in taken})
    some = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
    raise FleetUsageError(
        f"{len(taken)} selected device(s) ({some}) are in active rollout(s) "
        f"{', '.join(f'#{r}' for r in ids)}, and a device is in one active rollout at a "
        "time: update several models together with one set rollout (--model A=1 --model "
        f"B=2), or wait for {' and '.join(f'#{r}' for r in ids)} to finish or abort it "
        f"('edge-sdk rollout abort {ids[0]}')")


def _describe(sel: Mapping[str, Sequence[str]]) -> str:
    return " ".join(f"{k}={','.join(v)}" for k, v in sel.items())


def _claimed(db: FleetDB, fleet: str, sel: Mapping[str, Sequence[str]]) -> str:
    """Why the selector may match no one: devices that only report those groups or tags."""
    as_reported = {**sel, "devices": []}
    claim = [d["id"] for d in db.devices(fleet=fleet) if d["registered"] and selects(
        as_reported, {**d, "groups": d["reported_groups"], "tags": d["reported_tags"]})]
    if not claim:
        return ""
    more = f" and {len(claim) - 3} more" if len(claim) > 3 else ""
    return (f"; {len(claim)} device(s) report it about themselves ({', '.join(claim[:3])}"
            f"{more}), which selects no one: assign them with 'edge-sdk device set DEVICE "
            "--group G --tag K=V'")


def command_rollout(db: FleetDB, rollout_id: int, command: str, actor: str, *,
                    note: Mapping[str, Any] | None = None) -> None:
    """Queue ``pause``/``resume``/``abort`` for the controller, or ``approve``: the
    ``resume`` of a rollout the controller held after a wave (``pause_after_wave``),
    refused for any other. Audit-logged as ``rollout.COMMAND`` by ``actor`` with ``note``
    added to its parameters. Raises :class:`FleetUsageError` for an unknown rollout or
    one the command does not apply to."""
    if not valid_id(rollout_id):
        raise FleetUsageError(f"no rollout {rollout_id}")
    with db.begin() as c:
        state = store.lock_rollout(c, rollout_id)
        if state is None:
            raise FleetUsageError(f"no rollout {rollout_id}")
        # What the rollout will be once the queued commands are applied: the controller's
        # own transitions (_machine.step), not a copy of them.
        for earlier in store.pending_commands(c, rollout_id):
            try:
                state, _ = m.step(state, m.Command(earlier.command, time.time(),
                                                   earlier.actor))
            except m.IllegalEvent:
                continue  # a row not written by this code: the controller skips it too
        status = state.status
        queued = command
        if command == "approve":
            if status == "paused" and state.held:
                queued = "resume"
            else:
                raise FleetUsageError(f"cannot approve rollout {rollout_id}: it is {status}, "
                                      "not waiting for approval after a wave")
        try:
            m.check_command(status, queued)
        except m.CommandRefused as err:
            raise FleetUsageError(f"cannot {command} rollout {rollout_id}: {err}") from None
        store.queue_command(c, rollout_id, queued, actor)
        db.record_audit(actor, f"rollout.{command}", {"rollout": rollout_id, **(note or {})},
                        conn=c)


# -- devices -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AssignResult:
    """What :func:`assign_devices` did: each named device's assignment afterwards,
    the ones it changed, and the ones that have not reported yet."""

    assignments: dict[str, dict[str, Any]]
    changed: tuple[str, ...]
    unregistered: tuple[str, ...]


def assign_devices(db: FleetDB, *, fleet: str, changes: Mapping[str, AssignmentChange],
                   actor: str, source: str | None = None) -> AssignResult:
    """Apply each device's change in one transaction and record one ``device.set`` audit
    entry (with every changed device's new groups and tags). A device that has not
    reported yet gets its assignment now and is selected once it registers. Raises
    :class:`FleetUsageError`, writing nothing, for a bad id or an assignment over the
    limits."""
    try:
        check_topic_word(fleet, "fleet")
    except EdgeError as err:
        raise FleetUsageError(str(err)) from None
    if not changes:
        raise FleetUsageError("name at least one device (or --file)")
    for d, ch in changes.items():
        device_id(d)
        if ch.empty:
            raise FleetUsageError(f"nothing to change for {d}: give --group, --tag, "
                                  "--remove-group, --remove-tag or --replace")
    with db.begin() as c:
        after, changed, registered = apply_assignments(c, fleet, changes, actor=actor)
        if changed:
            common = _common(changes)
            db.record_audit(actor, "device.set", {
                "fleet": fleet, "count": len(changed),
                **({"change": common.describe()} if common is not None else {}),
                **({"file": source} if source else {}),
                "devices": {d: after[d] for d in changed}}, conn=c)
    return AssignResult(after, tuple(changed), tuple(sorted(set(changes) - registered)))


def apply_assignments(c: store.Connection, fleet: str,
                      changes: Mapping[str, AssignmentChange], *, actor: str,
                      ) -> tuple[dict[str, dict[str, Any]], list[str], set[str]]:
    """Apply each device's change inside transaction ``c`` (no audit entry). Returns each
    device's assignment afterwards, the devices it changed, and which are registered.
    Raises :class:`FleetUsageError` for an assignment over the limits."""
    now = time.time()
    after: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    current, registered = store.assignments(c, fleet, changes)
    inserts, updates = [], []
    for d in sorted(changes):
        old = current.get(d, ([], {}))
        groups, tags = changes[d].apply(*old)
        if len(groups) > MAX_GROUPS or len(tags) > MAX_TAGS:
            raise FleetUsageError(f"{d}: {len(groups)} groups and {len(tags)} tags; at "
                                  f"most {MAX_GROUPS} and {MAX_TAGS}")
        after[d] = {"groups": groups, "tags": tags}
        if d in current and (groups, tags) == (sorted(old[0]), old[1]):
            continue
        changed.append(d)
        row = {"groups": groups, "tags": tags, "updated": now, "updated_by": actor}
        if d in current:
            updates.append({"k_id": d, **row})
        else:
            inserts.append({"fleet": fleet, "id": d, **row})
    store.write_assignments(c, fleet, inserts, updates)
    return after, changed, registered


def _common(changes: Mapping[str, AssignmentChange]) -> AssignmentChange | None:
    """The one change every device got, if they all got the same."""
    first = next(iter(changes.values()))
    return first if all(ch == first for ch in changes.values()) else None


@dataclass(frozen=True)
class RemoveResult:
    """What :func:`remove_devices` deleted, and the active rollouts the devices are in
    (they stay in them: a rollout's record is not rewritten)."""

    devices: tuple[str, ...]
    events: int
    active_rollouts: dict[str, list[int]]


def remove_devices(db: FleetDB, *, fleet: str, device_ids: Sequence[str],
                   actor: str) -> RemoveResult:
    """Delete the devices' registry rows, assignments and history (their events) in one
    transaction, with one ``device.remove`` audit entry. Rollout records keep the device
    (what was signed for whom stays on record). A removed device that reports again
    registers again, unassigned. Raises :class:`FleetUsageError`, deleting nothing, when
    a device is neither registered nor assigned in ``fleet``."""
    ids = sorted({device_id(d) for d in device_ids})
    if not ids:
        raise FleetUsageError("name at least one device")
    with db.begin() as c:
        known = store.known_devices(c, fleet, ids)
        unknown = [d for d in ids if d not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise FleetUsageError(f"no device {', '.join(unknown[:5])}{more} in fleet "
                                  f"{fleet!r}; nothing removed")
        events, active = store.delete_devices(c, fleet, ids)
        db.record_audit(actor, "device.remove", {
            "fleet": fleet, "devices": ids, "events": events,
            **({"active_rollouts": active} if active else {})}, conn=c)
    return RemoveResult(tuple(ids), events, active)


# -- the audit log ---------------------------------------------------------------------------

def actor_name(operator: str | None) -> str:
    """``--operator``, else ``EDGE_OPERATOR``, else the OS user."""
    if operator:
        return operator
    env = os.environ.get("EDGE_OPERATOR")
    if env:
        return env
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def audit(db_url: str, actor: str, action: str, params: Mapping[str, Any]) -> None:
    """Append one operator action to the audit log of the database at ``db_url``."""
    with FleetDB.open(db_url) as db:
        db.record_audit(actor, action, params)


__all__ = ["AssignResult", "RemoveResult", "actor_name", "assign_devices", "audit",
           "command_rollout", "remove_devices", "start_rollout"]
