"""The fleet page's operator accounts and signed-in sessions (``_operators`` decides
what they mean: hashing, sign-in, backoff)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._db import FleetDB
from ._schema import Record, operator_sessions, operators


def operator_exists(c: Connection, name: str) -> bool:
    return c.execute(sa.select(operators.c.name).where(operators.c.name == name)) \
        .first() is not None


def insert_operator(c: Connection, name: str, stored: str, actor: str) -> None:
    c.execute(operators.insert().values(name=name, hash=stored, created=time.time(),
                                        created_by=actor, disabled=False))


def update_operator(c: Connection, name: str, *, stored: str | None = None,
                    disabled: bool | None = None) -> bool:
    """Set the password hash or the disabled flag; False when there is no such operator."""
    values: dict[str, Any] = {}
    if stored is not None:
        values["hash"] = stored
    if disabled is not None:
        values["disabled"] = disabled
    return bool(c.execute(operators.update().where(operators.c.name == name)
                          .values(**values)).rowcount)


def delete_operator(c: Connection, name: str) -> bool:
    """False when there is no such operator."""
    return bool(c.execute(operators.delete().where(operators.c.name == name)).rowcount)


def end_sessions(c: Connection, name: str) -> None:
    c.execute(operator_sessions.delete().where(operator_sessions.c.operator == name))


def list_operators(db: FleetDB) -> list[dict[str, Any]]:
    """Every operator (never the hash) with its number of live sessions."""
    now = time.time()
    s = operator_sessions
    live = sa.select(s.c.operator, sa.func.count().label("n")).where(s.c.expires > now) \
        .group_by(s.c.operator).subquery()
    q = sa.select(operators.c.name, operators.c.created, operators.c.created_by,
                  operators.c.disabled, sa.func.coalesce(live.c.n, 0).label("sessions")) \
        .outerjoin(live, live.c.operator == operators.c.name).order_by(operators.c.name)
    with db.read() as c:
        return [dict(r) for r in c.execute(q).mappings()]


def has_operators(db: FleetDB) -> bool:
    """Whether any enabled operator exists."""
    with db.read() as c:
        return c.execute(sa.select(operators.c.name).where(~operators.c.disabled).limit(1)) \
            .first() is not None


def operator_hash(db: FleetDB, name: str) -> Record | None:
    """``hash`` and ``disabled`` of the operator ``name``, if there is one."""
    with db.read() as c:
        return c.execute(sa.select(operators.c.hash, operators.c.disabled)
                         .where(operators.c.name == name)).first()


def insert_session(db: FleetDB, sid: str, name: str, address: str, ttl_s: float) -> None:
    """A new session row (``sid``: the hash of its token); expired sessions go."""
    now = time.time()
    with db.begin() as c:
        c.execute(operator_sessions.delete().where(operator_sessions.c.expires <= now))
        c.execute(operator_sessions.insert().values(
            id=sid, operator=name, created=now, last_used=now, expires=now + ttl_s,
            address=address[:64]))


def session(db: FleetDB, sid: str) -> Record | None:
    """``operator``, ``last_used``, ``expires`` and the operator's ``disabled`` of a
    session, if there is one."""
    s = operator_sessions
    q = sa.select(s.c.operator, s.c.last_used, s.c.expires, operators.c.disabled) \
        .join(operators, operators.c.name == s.c.operator).where(s.c.id == sid)
    with db.read() as c:
        return c.execute(q).first()


def touch_session(db: FleetDB, sid: str, now: float) -> None:
    with db.begin() as c:
        c.execute(operator_sessions.update().where(operator_sessions.c.id == sid)
                  .values(last_used=now))


def delete_session(db: FleetDB, sid: str) -> None:
    with db.begin() as c:
        c.execute(operator_sessions.delete().where(operator_sessions.c.id == sid))
