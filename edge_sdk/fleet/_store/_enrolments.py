"""Enrolment rows: devices asking to join with a claim, the claims, the allow-list, and
revoked devices (the rules that change them are ``edge_sdk.fleet._enrol``'s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from ._schema import (
    allowlist,
    chunks,
    claims,
    device_assignments,
    devices,
    enrolments,
    json_text,
    json_value,
)

_BATCH = 500


def _key(fleet: str, device: str) -> sa.ColumnElement[bool]:
    return (enrolments.c.fleet == fleet) & (enrolments.c.device_id == device)


def enrolment_row(c: Connection, fleet: str, device: str, *,
                  lock: bool = False) -> RowMapping | None:
    """A device's enrolment row; ``lock``: held until the transaction ends (PostgreSQL)."""
    q = sa.select(enrolments).where(_key(fleet, device))
    return c.execute(q.with_for_update() if lock else q).mappings().first()


def enrolment_rows(c: Connection, fleet: str, ids: Sequence[str]) -> dict[str, RowMapping]:
    """The enrolment rows of those of ``ids`` that have one, locked (PostgreSQL)."""
    out: dict[str, RowMapping] = {}
    for part in chunks(sorted(ids), _BATCH):
        q = sa.select(enrolments).where((enrolments.c.fleet == fleet)
                                        & enrolments.c.device_id.in_(part))
        out.update({r["device_id"]: r for r in c.execute(q.with_for_update()).mappings()})
    return out


def count_pending(c: Connection, fleet: str, batch: str | None = None) -> int:
    """Pending rows of ``fleet`` (of one claim ``batch`` if given)."""
    where = (enrolments.c.fleet == fleet) & (enrolments.c.state == "pending")
    if batch is not None:
        where = where & (enrolments.c.batch == batch)
    return int(c.execute(sa.select(sa.func.count()).select_from(enrolments).where(
        where)).scalar() or 0)


def insert_enrolment(c: Connection, row: Mapping[str, Any]) -> None:
    """A new row: ``facts``, ``groups``, ``tags`` given as JSON values."""
    c.execute(enrolments.insert().values(**_encoded(row)))


def update_enrolment(c: Connection, fleet: str, device: str, values: Mapping[str, Any], *,
                     want: str | None = None) -> int:
    """Change a row (``facts``, ``groups``, ``tags`` as JSON values; a column may be given
    as ``("+", n)`` to add ``n``); with ``want``, only while the row wants that. Returns
    the rows changed (0 or 1)."""
    vals: dict[str, Any] = {}
    for k, v in _encoded(values).items():
        vals[k] = enrolments.c[k] + v[1] if isinstance(v, tuple) else v
    q = enrolments.update().where(_key(fleet, device))
    if want is not None:
        q = q.where(enrolments.c.want == want)
    return int(c.execute(q.values(**vals)).rowcount)


def _encoded(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json_text(v) if k in ("facts", "groups", "tags") else v
            for k, v in row.items()}


def delete_pending_of_batch(c: Connection, fleet: str, batch: str) -> int:
    """Drop the batch's pending rows (those with nothing left to do at the broker)."""
    e = enrolments.c
    return int(c.execute(enrolments.delete().where(
        (e.fleet == fleet) & (e.batch == batch) & (e.state == "pending")
        & (e.want == ""))).rowcount)


def wanted_enrolments(c: Connection, fleet: str) -> list[RowMapping]:
    e = enrolments.c
    return list(c.execute(sa.select(enrolments).where((e.fleet == fleet) & (e.want != ""))
                          .order_by(e.updated_at, e.device_id)).mappings())


def _assigned_groups() -> sa.ColumnElement[str]:
    """The groups the operator assigned the enrolment row's device (its assignment
    row's text; ``[]`` when it has none)."""
    a = device_assignments.c
    return sa.func.coalesce(sa.select(a.groups).where(
        (a.fleet == enrolments.c.fleet) & (a.id == enrolments.c.device_id))
        .scalar_subquery(), "[]")


def group_drift(c: Connection, fleet: str, limit: int) -> list[RowMapping]:
    """Accepted devices with an active account whose assigned groups differ from the
    groups their account was granted (``groups``); each with ``assigned`` (the
    assignment's JSON text). Compared in the database: both sides are stored as the
    same canonical text, so one query finds the few that changed among thousands."""
    e = enrolments.c
    assigned = _assigned_groups().label("assigned")
    return list(c.execute(
        sa.select(e.device_id, e.batch, e.issued, e.groups, assigned)
        .where((e.fleet == fleet) & (e.state == "accepted") & (e.broker == "active")
               & (e.want == "") & (e.groups != _assigned_groups()))
        .order_by(e.device_id).limit(limit)).mappings())


def assigned_groups(c: Connection, fleet: str, device: str) -> str:
    """The JSON text of the groups assigned to ``device`` (``[]`` when none)."""
    a = device_assignments.c
    got = c.execute(sa.select(a.groups).where((a.fleet == fleet) & (a.id == device))
                    ).scalar()
    return str(got) if got is not None else "[]"


def set_granted_groups(c: Connection, fleet: str, device: str, groups_text: str) -> None:
    """Record ``groups_text`` (an assignment's text, stored as is so that it compares
    equal) as the groups the device's account was granted."""
    c.execute(enrolments.update().where(_key(fleet, device)).values(groups=groups_text))


def expired_due(c: Connection, fleet: str, now: float) -> list[str]:
    e = enrolments.c
    return [str(d) for d in c.execute(sa.select(e.device_id).where(
        (e.fleet == fleet) & (e.broker == "active") & e.expires_at.is_not(None)
        & (e.expires_at <= now)).order_by(e.device_id)).scalars()]


def prune_pending(c: Connection, fleet: str, before: float) -> int:
    e = enrolments.c
    return int(c.execute(enrolments.delete().where(
        (e.fleet == fleet) & (e.state == "pending") & (e.want == "")
        & (e.updated_at < before))).rowcount)


def list_enrolments(c: Connection, fleet: str | None, state: str | None,
                    limit: int | None = None) -> list[RowMapping]:
    e = enrolments.c
    q = sa.select(enrolments).order_by(e.fleet, e.device_id)
    if fleet is not None:
        q = q.where(e.fleet == fleet)
    if state is not None:
        q = q.where(e.state == state)
    if limit is not None:
        q = q.limit(limit)
    return list(c.execute(q).mappings())


def count_states(c: Connection, fleet: str | None) -> dict[str, int]:
    e = enrolments.c
    q = sa.select(e.state, sa.func.count()).group_by(e.state)
    if fleet is not None:
        q = q.where(e.fleet == fleet)
    return {str(s): int(n) for s, n in c.execute(q)}


# -- the allow-list ------------------------------------------------------------------------

def allowed(c: Connection, fleet: str, device: str) -> RowMapping | None:
    a = allowlist.c
    return c.execute(sa.select(allowlist).where((a.fleet == fleet) & (a.device_id == device))
                     ).mappings().first()


def delete_allowed(c: Connection, fleet: str, device: str) -> None:
    a = allowlist.c
    c.execute(allowlist.delete().where((a.fleet == fleet) & (a.device_id == device)))


def put_allowed(c: Connection, fleet: str, rows: Mapping[str, Mapping[str, Any]], *,
                actor: str, now: float) -> None:
    """Add or replace allow-list rows: device -> ``{"groups": [...], "tags": {...}}``."""
    a = allowlist.c
    for part in chunks(sorted(rows), _BATCH):
        c.execute(allowlist.delete().where((a.fleet == fleet) & a.device_id.in_(part)))
        c.execute(allowlist.insert(), [
            {"fleet": fleet, "device_id": d, "groups": json_text(rows[d]["groups"]),
             "tags": json_text(rows[d]["tags"]), "added_by": actor, "added_at": now}
            for d in part])


def list_allowed(c: Connection, fleet: str) -> list[dict[str, Any]]:
    a = allowlist.c
    return [{"device_id": r.device_id, "groups": json_value(r.groups, []),
             "tags": json_value(r.tags, {}), "added_by": r.added_by, "added_at": r.added_at}
            for r in c.execute(sa.select(allowlist).where(a.fleet == fleet)
                               .order_by(a.device_id))]


# -- revoked devices -----------------------------------------------------------------------

def set_device_revoked(c: Connection, fleet: str, ids: Sequence[str], *, at: float | None,
                       by: str | None, reason: str | None) -> None:
    """Mark registered devices revoked (``at`` None: no longer)."""
    for part in chunks(sorted(ids), _BATCH):
        c.execute(devices.update().where((devices.c.fleet == fleet) & devices.c.id.in_(part))
                  .values(revoked_at=at, revoked_by=by, revoked_reason=reason))


def revoked_ids(c: Connection, fleet: str) -> set[str]:
    """Devices rollouts leave out: revoked in the registry or in their enrolment."""
    e = enrolments.c
    out = {str(d) for d in c.execute(sa.select(devices.c.id).where(
        (devices.c.fleet == fleet) & devices.c.revoked_at.is_not(None))).scalars()}
    out.update(str(d) for d in c.execute(sa.select(e.device_id).where(
        (e.fleet == fleet) & (e.state == "revoked"))).scalars())
    return out


# -- claims --------------------------------------------------------------------------------

def _claim_key(fleet: str, batch: str) -> sa.ColumnElement[bool]:
    return (claims.c.fleet == fleet) & (claims.c.batch == batch)


def claim_row(c: Connection, fleet: str, batch: str, *,
              lock: bool = False) -> RowMapping | None:
    q = sa.select(claims).where(_claim_key(fleet, batch))
    return c.execute(q.with_for_update() if lock else q).mappings().first()


def insert_claim(c: Connection, row: Mapping[str, Any]) -> None:
    c.execute(claims.insert().values(**row))


def update_claim(c: Connection, fleet: str, batch: str, values: Mapping[str, Any], *,
                 want: str | None = None) -> int:
    q = claims.update().where(_claim_key(fleet, batch))
    if want is not None:
        q = q.where(claims.c.want == want)
    return int(c.execute(q.values(**values)).rowcount)


def add_claim_counts(c: Connection, fleet: str, batch: str, *, requests: int, dropped: int,
                     refused: int, at: float) -> int:
    k = claims.c
    return int(c.execute(claims.update().where(_claim_key(fleet, batch)).values(
        requests=k.requests + requests, dropped=k.dropped + dropped,
        refused=k.refused + refused, last_at=at)).rowcount)


def wanted_claims(c: Connection, fleet: str) -> list[RowMapping]:
    k = claims.c
    return list(c.execute(sa.select(claims).where((k.fleet == fleet) & (k.want != ""))
                          .order_by(k.batch)).mappings())


def list_claims(c: Connection, fleet: str | None) -> list[RowMapping]:
    k = claims.c
    q = sa.select(claims).order_by(k.fleet, k.batch)
    if fleet is not None:
        q = q.where(k.fleet == fleet)
    return list(c.execute(q).mappings())


# -- rows as the read API returns them -------------------------------------------------------

def enrolment_dict(r: RowMapping) -> dict[str, Any]:
    """An enrolment row as a JSON-serialisable dict (``facts``, ``groups``, ``tags``
    decoded)."""
    out = dict(r)
    out["facts"] = json_value(r["facts"], {})
    out["groups"] = json_value(r["groups"], [])
    out["tags"] = json_value(r["tags"], {})
    return out


def claim_dict(r: RowMapping) -> dict[str, Any]:
    """A claim row without its password: ``secret_pending`` says whether the controller
    has yet to create the account (and still holds the password)."""
    out = {k: v for k, v in dict(r).items() if k != "secret"}
    out["secret_pending"] = bool(r["secret"])
    return out
