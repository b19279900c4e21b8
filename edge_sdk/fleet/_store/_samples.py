"""The operator's record of which devices and groups allow field samples (schema 11's
``sample_policy``); ``edge_sdk.fleet._samples`` decides what it means."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._schema import sample_policy


def allow_samples(c: Connection, fleet: str, scope: str, name: str, actor: str) -> bool:
    """Record the permission; False when it was already there (kept as it was)."""
    p = sample_policy
    have = c.execute(sa.select(p.c.name).where(
        (p.c.fleet == fleet) & (p.c.scope == scope) & (p.c.name == name))).first()
    if have is not None:
        return False
    c.execute(p.insert().values(fleet=fleet, scope=scope, name=name, allowed_by=actor,
                                allowed_at=time.time()))
    return True


def deny_samples(c: Connection, fleet: str, scope: str, name: str) -> bool:
    """Remove the permission; False when there was none."""
    p = sample_policy
    return bool(c.execute(p.delete().where(
        (p.c.fleet == fleet) & (p.c.scope == scope) & (p.c.name == name))).rowcount)


def sample_permissions(c: Connection, fleet: str) -> list[dict[str, Any]]:
    p = sample_policy
    rows = c.execute(sa.select(p).where(p.c.fleet == fleet)
                     .order_by(p.c.scope, p.c.name)).mappings()
    return [dict(r) for r in rows]


def sample_permission(c: Connection, fleet: str, device: str,
                      groups: Iterable[str]) -> dict[str, Any] | None:
    """The row that lets ``device`` (in ``groups``) be sampled: its own first, else one
    of its groups'; None when nothing does."""
    p = sample_policy
    scoped = (p.c.scope == "device") & (p.c.name == device)
    gs = sorted(set(groups))
    if gs:
        scoped = scoped | ((p.c.scope == "group") & p.c.name.in_(gs))
    rows = c.execute(sa.select(p).where((p.c.fleet == fleet) & scoped)
                     .order_by(p.c.scope.desc(), p.c.name)).mappings().all()
    return dict(rows[0]) if rows else None
