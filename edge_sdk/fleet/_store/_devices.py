"""Device rows: what the registry writes from device reports, the operator's assignments
(``edge-sdk device set``) and removal (``edge-sdk device remove``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._schema import (
    ACTIVE_STATUSES,
    MAX_ID,
    Record,
    chunks,
    device_assignments,
    device_events,
    devices,
    json_text,
    json_value,
    rollout_devices,
    rollouts,
)

#: Ids per ``IN (...)`` of a bulk change (SQLite allows 32 766 parameters).
_BATCH = 500


def _limits(table: sa.Table) -> dict[str, tuple[str, int | None]]:
    """Per column: ``str`` with its length, ``text``, ``int`` with its largest value."""
    out: dict[str, tuple[str, int | None]] = {}
    for col in table.columns:
        t = col.type
        if isinstance(t, sa.String) and not isinstance(t, sa.Text) and t.length:
            out[col.name] = ("str", t.length)
        elif isinstance(t, sa.String):
            out[col.name] = ("text", None)
        elif isinstance(t, sa.Integer):
            out[col.name] = ("int", 2**63 - 1 if isinstance(t, sa.BigInteger) else MAX_ID)
    return out


#: What each column of the tables the registry writes can hold on every engine: ``kind``
#: (``str`` with its length, ``text``, ``int`` with its largest value) by column name.
DEVICE_COLUMNS, EVENT_COLUMNS = _limits(devices), _limits(device_events)


# -- the registry's writes -----------------------------------------------------------------

def reported_device(c: Connection, fleet: str, device: str) -> Record | None:
    """What the registry holds of a device, to merge its next state report into:
    ``online``, ``phase``, ``model``, ``version``, ``models``, ``last_deployment``,
    ``last_result``, ``state``, ``last_seen``; None for a device not registered."""
    key = (devices.c.fleet == fleet) & (devices.c.id == device)
    return c.execute(sa.select(devices.c.online, devices.c.phase, devices.c.model,
                               devices.c.version, devices.c.models,
                               devices.c.last_deployment, devices.c.last_result,
                               devices.c.state, devices.c.last_seen).where(key)).first()


def insert_device(c: Connection, fleet: str, device: str, first_seen: float,
                  values: Mapping[str, Any]) -> None:
    c.execute(devices.insert().values(fleet=fleet, id=device, first_seen=first_seen,
                                      **values))


def update_device(c: Connection, fleet: str, device: str, values: Mapping[str, Any]) -> None:
    c.execute(devices.update().where((devices.c.fleet == fleet) & (devices.c.id == device))
              .values(**values))


def insert_event(c: Connection, row: Mapping[str, Any]) -> None:
    c.execute(device_events.insert().values(**row))


# Built once: constructing a statement per report (``.values(...)``, its cache key) cost
# more than executing it, at the thousands of reports a minute a large rollout brings.
_TOUCH = devices.update().where(
    (devices.c.fleet == sa.bindparam("k_fleet")) & (devices.c.id == sa.bindparam("k_id"))
).values(last_seen=sa.bindparam("k_ts"))
_EVENT = device_events.insert()


def write_events(c: Connection, events: Sequence[Mapping[str, Any]],
                 touches: Sequence[Mapping[str, Any]]) -> None:
    """One multi-row insert of ``device_events`` rows, and one executemany of ``last_seen``
    updates (``k_fleet``, ``k_id``, ``k_ts``)."""
    if events:
        c.execute(_EVENT, list(events))
    if touches:
        c.execute(_TOUCH, list(touches))


def device_drift(c: Connection, fleet: str, device: str) -> str | None:
    """The device's stored input drift document (JSON text), or None."""
    return c.execute(sa.select(devices.c.drift).where(
        (devices.c.fleet == fleet) & (devices.c.id == device))).scalar()


def write_drift(c: Connection, fleet: str, device: str, drift: str, drifting: bool) -> None:
    """Store a registered device's input drift document and flag."""
    c.execute(devices.update().where((devices.c.fleet == fleet) & (devices.c.id == device))
              .values(drift=drift, drifting=drifting))


# -- the operator's assignments ------------------------------------------------------------

def assignments(c: Connection, fleet: str, ids: Iterable[str]
                ) -> tuple[dict[str, tuple[list[str], dict[str, str]]], set[str]]:
    """The current assignment (groups, tags) of each of ``ids`` that has one, and which of
    them are registered."""
    a = device_assignments
    current: dict[str, tuple[list[str], dict[str, str]]] = {}
    registered: set[str] = set()
    for part in chunks(sorted(ids), _BATCH):
        for r in c.execute(sa.select(a.c.id, a.c.groups, a.c.tags).where(
                (a.c.fleet == fleet) & a.c.id.in_(part))):
            current[r.id] = (json_value(r.groups, []), json_value(r.tags, {}))
        registered.update(c.execute(sa.select(devices.c.id).where(
            (devices.c.fleet == fleet) & devices.c.id.in_(part))).scalars())
    return current, registered


def write_assignments(c: Connection, fleet: str, inserts: Sequence[Mapping[str, Any]],
                      updates: Sequence[Mapping[str, Any]]) -> None:
    """Insert new assignment rows (``fleet``, ``id``, ``groups``, ``tags``, ``updated``,
    ``updated_by``); update others (``k_id`` names the device). ``groups`` is a list,
    ``tags`` a dict."""
    a = device_assignments

    def encoded(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "groups": json_text(r["groups"]), "tags": json_text(r["tags"])}
                for r in rows]

    inserts, updates = encoded(inserts), encoded(updates)
    if inserts:
        c.execute(a.insert(), inserts)
    if updates:
        c.execute(a.update().where((a.c.fleet == fleet) & (a.c.id == sa.bindparam("k_id")))
                  .values({k: sa.bindparam(k) for k in ("groups", "tags", "updated",
                                                        "updated_by")}), updates)


# -- removal -------------------------------------------------------------------------------

def known_devices(c: Connection, fleet: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are registered or assigned in ``fleet``."""
    a = device_assignments
    known: set[str] = set()
    for part in chunks(ids, _BATCH):
        known.update(c.execute(sa.select(devices.c.id).where(
            (devices.c.fleet == fleet) & devices.c.id.in_(part))).scalars())
        known.update(c.execute(sa.select(a.c.id).where(
            (a.c.fleet == fleet) & a.c.id.in_(part))).scalars())
    return known


def delete_devices(c: Connection, fleet: str, ids: Sequence[str]
                   ) -> tuple[int, dict[str, list[int]]]:
    """Delete the devices' registry rows, assignments and events. Returns the events
    deleted and, per device, the active rollouts it is in (their records stay)."""
    a = device_assignments
    events = 0
    active: dict[str, list[int]] = {}
    for part in chunks(ids, _BATCH):
        for r in c.execute(sa.select(rollout_devices.c.device, rollouts.c.id).where(
                (rollout_devices.c.rollout == rollouts.c.id) & (rollouts.c.fleet == fleet)
                & rollouts.c.status.in_(ACTIVE_STATUSES)
                & rollout_devices.c.device.in_(part))):
            active.setdefault(r.device, []).append(int(r.id))
        events += c.execute(device_events.delete().where(
            (device_events.c.fleet == fleet) & device_events.c.device.in_(part))).rowcount
        c.execute(devices.delete().where((devices.c.fleet == fleet)
                                         & devices.c.id.in_(part)))
        c.execute(a.delete().where((a.c.fleet == fleet) & a.c.id.in_(part)))
    return events, active

