"""Rollout records in the database: the rows of a rollout's state machine, its command
queue, and the record of every device's retained ``desired`` topic.

:func:`load_state` and :func:`save_state` map :class:`~.._machine.RolloutState` to the
``rollouts`` and ``rollout_devices`` rows; :func:`save_desired` writes, in the same
transaction, what each device's ``desired`` topic must hold because of it. The rest are
the queries the operator API and the controller's loop run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from .. import _machine as m
from .._retained import digest
from ._db import FleetDB
from ._enrolments import revoked_ids
from ._schema import (
    ACTIVE_STATUSES,
    Record,
    chunks,
    device_assignments,
    device_desired,
    device_events,
    devices,
    enrolments,
    json_text,
    json_value,
    model_versions,
    registry_stats,
    rollout_commands,
    rollout_devices,
    rollouts,
)

_DEVICE_FIELDS = [f for f in m.DeviceProgress.__dataclass_fields__ if f != "wave"]
#: Fields kept as JSON text.
_JSON_FIELDS = ("before_models", "shadow_figures")


# -- what a selector can match -------------------------------------------------------------

def selectable_devices(db: FleetDB, fleet: str, *,
                       hardware: bool) -> Iterable[dict[str, Any]]:
    """Every registered device of ``fleet`` as a selector sees it: ``id``, the operator's
    ``groups`` and ``tags``, ``online``, ``model``, ``version`` (the model it swapped in
    last), ``models`` (every model it serves, name -> version), and (with ``hardware``)
    its reported ``hardware`` facts, else ``{}``. A revoked device (in the registry or
    its enrolment) is none of them."""
    # Read on every poll: only the columns a selector looks at, never the state document
    # (most of a row's bytes). Hardware facts are parsed only for a hw. filter.
    a = device_assignments
    cols = [devices.c.id, a.c.groups, a.c.tags, devices.c.online, devices.c.model,
            devices.c.version, devices.c.models,
            *([devices.c.hardware] if hardware else [])]
    q = sa.select(*cols).select_from(devices.outerjoin(
        a, (a.c.fleet == devices.c.fleet) & (a.c.id == devices.c.id)))
    e = enrolments.c
    revoked = sa.exists().where((e.fleet == devices.c.fleet) & (e.device_id == devices.c.id)
                                & (e.state == "revoked"))
    q = q.where((devices.c.fleet == fleet) & devices.c.revoked_at.is_(None) & ~revoked)
    with db.read() as c:
        rows = list(c.execute(q.order_by(devices.c.id)))
    for r in rows:
        yield {"id": r.id, "groups": json_value(r.groups, []), "tags": json_value(r.tags, {}),
               "hardware": json_value(r.hardware, {}) if hardware else {},
               "online": bool(r.online), "model": r.model, "version": r.version,
               "models": model_versions(r.models)}


def revoked_devices(db: FleetDB, fleet: str) -> frozenset[str]:
    """The devices of ``fleet`` an operator revoked (in the registry or the enrolment
    record): a running rollout lets go of those that have not answered."""
    with db.read() as c:
        return frozenset(revoked_ids(c, fleet))


def desired_versions(db: FleetDB, fleet: str,
                     device_ids: Iterable[str]) -> list[tuple[str, str | None, str | None]]:
    """``(device, model, version)`` of what each device's ``desired`` topic was last given."""
    out: list[tuple[str, str | None, str | None]] = []
    d = device_desired.c
    with db.read() as c:
        for part in chunks(sorted(device_ids), 500):
            out += [(r.device, r.model, r.version) for r in c.execute(
                sa.select(d.device, d.model, d.version).where(
                    (d.fleet == fleet) & d.device.in_(part)))]
    return out


# -- rollout and command rows --------------------------------------------------------------

def insert_rollout(c: Connection, *, fleet: str, model: str, version: str,
                   selector: Mapping[str, Any], spec: m.RolloutSpec, actor: str,
                   models: Sequence[tuple[str, str]] = ()) -> int:
    """A new ``pending`` rollout row (the controller plans it); returns its id. ``models``:
    a set rollout's every ``(model, version)`` (``model``/``version``: its first)."""
    now = time.time()
    machine = {"models": [list(mv) for mv in models]} if len(models) > 1 else {}
    rid = c.execute(rollouts.insert().values(
        fleet=fleet, model=model, version=version, selector=json_text(selector),
        config=json_text(spec.to_json()), status="pending", wave=0, waves=0,
        created=now, updated=now, created_by=actor, machine=json_text(machine),
    ).returning(rollouts.c.id)).scalar_one()
    return int(rid)


def lock_rollout(c: Connection, rollout_id: int) -> m.RolloutState | None:
    """The rollout's status and controller fields (no devices), its row locked for the
    transaction; None when there is no such rollout."""
    row = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)
                    .with_for_update()).mappings().first()
    return None if row is None else _header(row)


def pending_commands(c: Connection, rollout_id: int) -> list[Record]:
    """The rollout's queued commands not applied yet (``seq``, ``command``, ``actor``), in
    the order queued."""
    rc = rollout_commands.c
    return list(c.execute(sa.select(rc.seq, rc.command, rc.actor).where(
        (rc.rollout == rollout_id) & rc.done.is_(None)).order_by(rc.seq)))


def queue_command(c: Connection, rollout_id: int, command: str, actor: str) -> None:
    c.execute(rollout_commands.insert().values(rollout=rollout_id, command=command,
                                               actor=actor, created=time.time()))


def command_done(c: Connection, seq: int) -> None:
    c.execute(rollout_commands.update().where(rollout_commands.c.seq == seq)
              .values(done=time.time()))


def active_rollouts(db: FleetDB, fleet: str) -> list[int]:
    """Ids of the fleet's rollouts the controller still has work to do for."""
    with db.read() as c:
        ids = c.execute(sa.select(rollouts.c.id).where(
            (rollouts.c.fleet == fleet) & rollouts.c.status.in_(ACTIVE_STATUSES))
            .order_by(rollouts.c.id)).scalars().all()
    return [int(r) for r in ids]


def rollout_selector(db: FleetDB, rollout_id: int) -> dict[str, Any]:
    with db.read() as c:
        got = json_value(c.execute(sa.select(rollouts.c.selector).where(
            rollouts.c.id == rollout_id)).scalar_one(), {})
    return got if isinstance(got, dict) else {}


# -- the state machine's rows --------------------------------------------------------------

def _header(h: RowMapping) -> m.RolloutState:
    extra = json_value(h["machine"], {})
    return m.RolloutState(
        id=h["id"], model=h["model"], version=h["version"],
        spec=m.RolloutSpec.from_json(json_value(h["config"], {})), status=h["status"],
        wave=h["wave"], waves=h["waves"], reason=h["reason"],
        tokens=float(extra.get("tokens", 0.0)), tokens_at=float(extra.get("tokens_at", 0.0)),
        approved=int(extra.get("approved", 0)), held=bool(extra.get("held", False)),
        looked_at=float(extra.get("looked_at", 0.0)),
        models=tuple((str(n), str(v)) for n, v in extra.get("models", ())))


def _before_models(text: str | None) -> dict[str, str | None] | None:
    got = json_value(text, None)
    if not isinstance(got, dict):
        return None  # a row saved before schema 8: its one before_model/before_version
    return {str(k): v if isinstance(v, str) else None for k, v in got.items()}


def _figures(text: str | None) -> dict[str, Any] | None:
    got = json_value(text, None)
    return got if isinstance(got, dict) else None


_LOAD_JSON = {"before_models": _before_models, "shadow_figures": _figures}


def load_state(c: Connection, rollout_id: int) -> m.RolloutState:
    h = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().one()
    st = _header(h)
    for r in c.execute(sa.select(rollout_devices).where(
            rollout_devices.c.rollout == rollout_id)).mappings():
        p = m.DeviceProgress(wave=r["wave"])
        for f in _DEVICE_FIELDS:
            if f in r:
                setattr(p, f, _LOAD_JSON[f](r[f]) if f in _JSON_FIELDS else r[f])
        st.devices[r["device"]] = p
    return st


def save_state(c: Connection, st: m.RolloutState, old: m.RolloutState | None) -> None:
    c.execute(rollouts.update().where(rollouts.c.id == st.id).values(
        status=st.status, wave=st.wave, waves=st.waves, reason=st.reason, updated=time.time(),
        machine=json_text({"tokens": st.tokens, "tokens_at": st.tokens_at,
                           "approved": st.approved, "held": st.held,
                           "looked_at": st.looked_at,
                           **({"models": [list(mv) for mv in st.models]}
                              if st.models else {})})))
    for d, p in st.devices.items():
        before = old.devices.get(d) if old is not None else None
        if before == p:
            continue
        row = {f: getattr(p, f) for f in _DEVICE_FIELDS}
        for f in _JSON_FIELDS:
            row[f] = None if row[f] is None else json_text(row[f])
        row["wave"] = p.wave
        exists = before is not None or c.execute(sa.select(rollout_devices.c.device).where(
            (rollout_devices.c.rollout == st.id) & (rollout_devices.c.device == d))
        ).first() is not None
        if exists:
            c.execute(rollout_devices.update().where(
                (rollout_devices.c.rollout == st.id) & (rollout_devices.c.device == d))
                .values(**row))
        else:
            c.execute(rollout_devices.insert().values(rollout=st.id, device=d, **row))


def save_desired(c: Connection, fleet: str, st: m.RolloutState, old: m.RolloutState | None,
                 *, backfill: bool = False) -> None:
    """Record, unpublished, what each device's retained ``desired`` topic must hold where
    ``st`` changed it from ``old``; with ``backfill``, only where nothing is recorded yet (a
    rollout saved by an edge-sdk that kept no such record)."""
    now = time.time()
    recorded: set[str] = set()
    if backfill:
        for part in chunks(sorted(st.devices), 500):
            recorded.update(c.execute(sa.select(device_desired.c.device).where(
                (device_desired.c.fleet == fleet) & device_desired.c.device.in_(part))
            ).scalars())
    for d in st.devices:
        if d in recorded:
            continue
        want = m.desired(st, d)
        if want is None:
            continue
        if not backfill and old is not None and d in old.devices \
                and m.desired(old, d) == want:
            continue
        doc = want.document
        key = (device_desired.c.fleet == fleet) & (device_desired.c.device == d)
        if doc is None and want.counter is not None:
            # Withdrawing a document another rollout has replaced since: leave its newer one.
            now_counter = c.execute(sa.select(device_desired.c.counter).where(key)).scalar()
            if now_counter is not None and now_counter > want.counter:
                continue
        values = {"document": doc, "digest": None if doc is None else digest(doc.encode()),
                  "counter": want.counter, "model": None if doc is None else st.model,
                  "version": want.version, "rollout": st.id, "changed": now,
                  "published": None}
        if backfill:
            c.execute(device_desired.insert().values(fleet=fleet, device=d, seq=1, **values))
            continue
        done = c.execute(device_desired.update().where(key).values(
            seq=device_desired.c.seq + 1, **values))
        if done.rowcount == 0:
            c.execute(device_desired.insert().values(fleet=fleet, device=d, seq=1, **values))


# -- what the controller's loop reads ------------------------------------------------------

def heard_until(db: FleetDB, fleet: str) -> float | None:
    """The registry's progress (``caught_up``) in ``fleet``, if it has any."""
    with db.read() as c:
        got = c.execute(sa.select(registry_stats.c.caught_up).where(
            registry_stats.c.fleet == fleet)).scalar()
    return None if got is None else float(got)


def reports(db: FleetDB, fleet: str, waiting: Mapping[str, set[int]]) -> list[m.Report]:
    """What the devices in ``waiting`` reported about the deployments (counters) each waits
    for: a finished update (or an ended shadow run, with its figures) among its newest
    results or its last one (a device given two deployments back to back keeps both),
    or the newest bad event per device and counter."""
    out: list[m.Report] = []
    counters = sorted({n for s in waiting.values() for n in s})
    with db.read() as c:
        for d in c.execute(sa.select(devices.c.id, devices.c.last_deployment,
                                     devices.c.last_result, devices.c.last_reason,
                                     devices.c.results).where(
                (devices.c.fleet == fleet) & devices.c.id.in_(list(waiting)))):
            said = {x["deployment"]: (x.get("result"), x.get("reason"), x.get("shadow"))
                    for x in json_value(d.results, []) if isinstance(x, dict)
                    and isinstance(x.get("deployment"), int)
                    and x["deployment"] in waiting[d.id]}
            if d.last_deployment in waiting[d.id]:
                figures = said.get(d.last_deployment, (None, None, None))[2]
                said[d.last_deployment] = (d.last_result, d.last_reason, figures)
            out += [m.Report(d.id, n, result, reason if isinstance(reason, str) else None,
                             figures if isinstance(figures, dict) else None)
                    for n, (result, reason, figures) in sorted(said.items())
                    if result in m.FINISHED or result in m.SHADOW_RESULTS]
        # Only the newest bad event per waiting device and counter it waits for: rows a
        # device files under other counters, or many under one, are never read.
        ev = device_events
        newest = sa.select(sa.func.max(ev.c.seq)).where(
            (ev.c.fleet == fleet) & ev.c.device.in_(list(waiting))
            & ev.c.deployment.in_(counters) & ev.c.kind.in_(m.BAD)
        ).group_by(ev.c.device, ev.c.deployment)
        for r in c.execute(sa.select(ev.c.device, ev.c.deployment, ev.c.kind,
                                     ev.c.reason).where(ev.c.seq.in_(newest))):
            if r.deployment in waiting.get(r.device, ()):
                out.append(m.Report(r.device, r.deployment, r.kind, r.reason))
    return out


def shadow_runs(db: FleetDB, fleet: str, device_ids: Iterable[str]) -> dict[str, int]:
    """Device -> the deployment counter of the shadow run its last state says is under
    way (``devices.shadow`` with a ``status``), for each of ``device_ids`` that says one."""
    out: dict[str, int] = {}
    with db.read() as c:
        for part in chunks(sorted(device_ids), 500):
            for r in c.execute(sa.select(devices.c.id, devices.c.shadow).where(
                    (devices.c.fleet == fleet) & devices.c.id.in_(part))):
                block = json_value(r.shadow, None)
                if isinstance(block, dict) and block.get("status") is not None:
                    n = block.get("deployment")
                    if isinstance(n, int) and not isinstance(n, bool):
                        out[r.id] = n
    return out


def desired_records(db: FleetDB, fleet: str, *, devices: Iterable[str] = (),
                    unpublished: bool = False, rollouts: Sequence[int] | None = None,
                    ) -> list[Record]:
    """Records of ``desired`` topics (``device``, ``digest``, ``counter``, ``seq``,
    ``published``), read in one snapshot: with ``unpublished``, those the broker has not
    acknowledged, also those set by ``rollouts`` if given; then those of ``devices`` not
    read yet. Neither: every record of the fleet."""
    d = device_desired.c
    cols = (d.device, d.digest, d.counter, d.seq, d.published)
    where = d.fleet == fleet
    wanted = set(devices)
    rows: list[Record] = []
    with db.read() as c:
        if unpublished:
            todo: sa.ColumnElement[bool] = d.published.is_(None)
            if rollouts is not None:
                todo = sa.or_(todo, d.rollout.in_(list(rollouts)))
            rows += c.execute(sa.select(*cols).where(where & todo))
        elif not wanted:
            rows += c.execute(sa.select(*cols).where(where))
        seen = {r.device for r in rows}
        for part in chunks(sorted(wanted - seen), 500):
            rows += c.execute(sa.select(*cols).where(where & d.device.in_(part)))
    return rows


def desired_documents(db: FleetDB, fleet: str, device_ids: Sequence[str]) -> list[Record]:
    """``device``, ``document`` (None: a cleared topic) and ``seq`` of each record."""
    d = device_desired.c
    rows: list[Record] = []
    with db.read() as c:
        for part in chunks(device_ids, 500):
            rows += c.execute(sa.select(d.device, d.document, d.seq).where(
                (d.fleet == fleet) & d.device.in_(part)))
    return rows


def confirm_published(db: FleetDB, fleet: str, done: Sequence[tuple[str, int]]) -> None:
    """Mark records the broker acknowledged (``(device, seq)``) unless they changed since."""
    d = device_desired.c
    now = time.time()
    with db.begin() as c:
        for dev, seq in done:
            c.execute(device_desired.update().where(
                (d.fleet == fleet) & (d.device == dev) & (d.seq == seq)
                & d.published.is_(None)).values(published=now))
