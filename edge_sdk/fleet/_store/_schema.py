"""The fleet database's tables, their migrations, and how values are stored in them.

One schema for SQLite and PostgreSQL. JSON values are stored as text (:func:`json_text`,
:func:`json_value`) so that both engines hold the same bytes.

Schema versions live in ``schema_version``; :func:`migrate` brings an older database up
to :data:`SCHEMA_VERSION` (``FleetDB.open`` runs it in one transaction holding the
database's migration lock, so processes opening a fresh database at once migrate it
exactly once), and a database written by newer code is refused before anything is
changed.

``device_desired`` is the record of what every device's retained ``desired`` topic must
hold (a signed document, or nothing), written in the transaction that saves the rollout
state causing it; the retained messages on the broker are made equal to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from ..._redact import redact_url
from .._errors import FleetError

#: A result row of any columns, read by attribute (``row.device``).
Record: TypeAlias = Row[*tuple[Any, ...]]

#: The schema this code writes. Bump it and add a step to ``_MIGRATIONS`` together.
SCHEMA_VERSION = 11


meta = sa.MetaData()

schema_version = sa.Table(
    "schema_version", meta,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied", sa.Float, nullable=False),
)

#: Every device that has reported, as it last reported itself. ``groups`` and ``tags`` are
#: what the device claims (shown as reported, never used to select it): the operator's
#: assignment is in ``device_assignments``. ``models`` (schema 8): every model it serves,
#: a JSON list of ``{"name", "version", "sha256", "phase"}`` sorted by name; ``model`` and
#: ``version`` are the one it swapped in last (what agents before schema 8 reported).
#: ``results`` (schema 8): its newest update results, ``{"deployment", "result",
#: "reason", "models"}`` newest last; ``last_*`` are the last one (older agents' only).
devices = sa.Table(
    "devices", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("groups", sa.Text, nullable=False, default="[]"),
    sa.Column("tags", sa.Text, nullable=False, default="{}"),
    sa.Column("hardware", sa.Text, nullable=False, default="{}"),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("model", sa.String(256)),
    sa.Column("version", sa.String(128)),
    sa.Column("previous_model", sa.String(256)),
    sa.Column("previous_version", sa.String(128)),
    sa.Column("phase", sa.String(64)),
    sa.Column("deployment", sa.Integer, nullable=False, default=0),
    sa.Column("last_result", sa.String(64)),
    sa.Column("last_reason", sa.Text),
    sa.Column("last_deployment", sa.Integer),
    sa.Column("state", sa.Text, nullable=False, default="{}"),
    sa.Column("models", sa.Text, nullable=False, default="[]", server_default="[]"),
    sa.Column("results", sa.Text, nullable=False, default="[]", server_default="[]"),
    # Schema 10: revoked by an operator (``edge-sdk device revoke``): rollouts leave it
    # out; accepting its enrolment again clears them.
    sa.Column("revoked_at", sa.Float),
    sa.Column("revoked_by", sa.String(128)),
    sa.Column("revoked_reason", sa.Text),
    # Schema 11: quality. The device's last reported shadow run (JSON: its block, or the
    # figures of its last shadow result), its inputs' drift (JSON: per model and input,
    # as judged by the host) and whether any input is flagged as drifting.
    sa.Column("shadow", sa.Text),
    sa.Column("drift", sa.Text),
    sa.Column("drifting", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
)

device_events = sa.Table(
    "device_events", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fleet", sa.String(128), nullable=False),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("deployment", sa.Integer),
    sa.Column("model", sa.String(256)),
    sa.Column("version", sa.String(128)),
    sa.Column("reason", sa.Text),
    sa.Column("detail", sa.Text, nullable=False, default="{}"),
    sa.Index("ix_device_events_device", "fleet", "device", "seq"),
    sa.Index("ix_device_events_deployment", "fleet", "deployment"),
)
#: Rows older than the registry's ``events_max_age_s`` are found by it (schema 6).
_EVENTS_TS = sa.Index("ix_device_events_ts", device_events.c.ts)

rollouts = sa.Table(
    "rollouts", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fleet", sa.String(128), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("selector", sa.Text, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("wave", sa.Integer, nullable=False, default=0),
    sa.Column("waves", sa.Integer, nullable=False, default=0),
    sa.Column("reason", sa.Text),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    #: The rest of the rollout state machine's state (JSON), see ``_machine``.
    sa.Column("machine", sa.Text, nullable=False, default="{}"),
)

rollout_devices = sa.Table(
    "rollout_devices", meta,
    sa.Column("rollout", sa.Integer, sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("counter", sa.Integer),
    #: The signed deployment document sent (republished unchanged after a restart).
    sa.Column("document", sa.Text),
    sa.Column("sent_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("before_version", sa.String(128)),
    sa.Column("before_model", sa.String(256)),
    sa.Column("rollback_counter", sa.Integer),
    sa.Column("rollback_document", sa.Text),
    sa.Column("rollback_status", sa.String(32)),
    sa.Column("rollback_sent_at", sa.Float),
    #: JSON: the device's version of each model of the rollout before it (schema 8).
    sa.Column("before_models", sa.Text),
    # Schema 11: a gated rollout's shadow document for the device, the figures of its
    # shadow result (JSON) and the gate's verdict on them (see ``_machine``).
    sa.Column("shadow_counter", sa.Integer),
    sa.Column("shadow_document", sa.Text),
    sa.Column("shadow_sent_at", sa.Float),
    sa.Column("shadow_figures", sa.Text),
    sa.Column("shadow_verdict", sa.String(32)),
)

rollout_commands = sa.Table(
    "rollout_commands", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout", sa.Integer, sa.ForeignKey("rollouts.id"), nullable=False),
    sa.Column("command", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("done", sa.Float),
)

audit_log = sa.Table(
    "audit_log", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("params", sa.Text, nullable=False, default="{}"),
)

#: The registry's running totals per fleet (schema 2): reports written, and those it
#: would not write (malformed), could not queue (dropped) or could not store (db_errors).
registry_stats = sa.Table(
    "registry_stats", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("states", sa.BigInteger, nullable=False, default=0),
    sa.Column("events", sa.BigInteger, nullable=False, default=0),
    sa.Column("malformed", sa.BigInteger, nullable=False, default=0),
    sa.Column("dropped", sa.BigInteger, nullable=False, default=0),
    sa.Column("db_errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_malformed", sa.Text),
    sa.Column("last_malformed_at", sa.Float),
    sa.Column("updated", sa.Float, nullable=False),
    # Schema 4: reports lost before the registry (gaps in devices' event numbers), and
    # how far the registry has got: every report received before ``caught_up`` is
    # written; what is still queued; since when it listens; when a device is silent.
    sa.Column("lost", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("caught_up", sa.Float),
    sa.Column("backlog_reports", sa.BigInteger, nullable=False, default=0,
              server_default="0"),
    sa.Column("backlog_bytes", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("listening_since", sa.Float),
    sa.Column("silent_after_s", sa.Float),
)


#: Per device, the reports the registry did not write (schema 6): ``dropped`` (over the
#: device's budget or size cap, or pushed out of a full queue; ``reason`` names the
#: config key of the newest) and ``lost`` (gaps in the numbers of its events).
device_ingest = sa.Table(
    "device_ingest", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("dropped", sa.BigInteger, nullable=False, default=0),
    sa.Column("dropped_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("lost", sa.BigInteger, nullable=False, default=0),
    sa.Column("reason", sa.String(64)),
    sa.Column("at", sa.Float),
)

#: Which controller runs each fleet (schema 3), until ``expires`` unless renewed.
controller_lease = sa.Table(
    "controller_lease", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("holder", sa.String(256), nullable=False),
    sa.Column("acquired", sa.Float, nullable=False),
    sa.Column("renewed", sa.Float, nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
)

#: The groups and tags the operator gave each device (schema 4; ``edge-sdk device set``):
#: what rollout selectors and the group and tag filters use. A row may exist before its
#: device first reports (fleets are provisioned in bulk); no device report writes here.
device_assignments = sa.Table(
    "device_assignments", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("groups", sa.Text, nullable=False, default="[]"),
    sa.Column("tags", sa.Text, nullable=False, default="{}"),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("updated_by", sa.String(128), nullable=False),
)

#: What each device's retained ``desired`` topic must hold (schema 5): ``document`` (a
#: signed deployment; NULL: nothing, the topic cleared) with its sha256 ``digest`` and
#: ``counter`` (for a cleared topic: the withdrawn deployment's), set by ``rollout``.
#: ``seq`` grows with every change; ``published`` is NULL until the broker acknowledged
#: this content (the controller publishes it again until then).
device_desired = sa.Table(
    "device_desired", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("document", sa.Text),
    sa.Column("digest", sa.String(64)),
    sa.Column("counter", sa.Integer),
    sa.Column("model", sa.String(256)),
    sa.Column("version", sa.String(128)),
    sa.Column("rollout", sa.Integer),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("changed", sa.Float, nullable=False),
    sa.Column("published", sa.Float),
    sa.Index("ix_device_desired_published", "fleet", "published"),
)

#: The fleet page's operator accounts (schema 7; ``edge-sdk operator add``): ``hash`` is
#: ``scrypt$N$r$p$SALT$KEY`` (see ``_operators``); a ``disabled`` one cannot sign in.
operators = sa.Table(
    "operators", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("hash", sa.String(256), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
)

#: Signed-in page sessions (schema 7): ``id`` is the sha256 of the cookie's token (the
#: token itself is stored nowhere), valid until ``expires`` and while used within the
#: idle timeout. Removing an operator or changing its password deletes its rows.
operator_sessions = sa.Table(
    "operator_sessions", meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("operator", sa.String(64), nullable=False, index=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("last_used", sa.Float, nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
    sa.Column("address", sa.String(64), nullable=False, default=""),
)

#: Each device that asked to enrol with a claim (schema 10; see ``_enrol``): the key it
#: holds (``fingerprint``, ``public_key``), what it said about itself (``facts``) and
#: the operator's decision (``state`` pending, accepted, rejected, revoked). ``want`` is
#: what the controller still has to do at the broker ('' nothing, ``issue`` credentials,
#: ``revoke`` the account, ``reject`` answer), ``applied_at`` when it last did it,
#: ``broker`` what the account is there ('' none, ``active``, ``expired``, ``deleted``).
enrolments = sa.Table(
    "enrolments", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("batch", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("facts", sa.Text, nullable=False, default="{}"),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("conflicts", sa.Integer, nullable=False, default=0),
    sa.Column("decided_by", sa.String(128)),
    sa.Column("decided_at", sa.Float),
    sa.Column("reason", sa.Text),
    sa.Column("groups", sa.Text, nullable=False, default="[]"),
    sa.Column("tags", sa.Text, nullable=False, default="{}"),
    sa.Column("issued", sa.Integer, nullable=False, default=0),
    sa.Column("expires_at", sa.Float),
    sa.Column("want", sa.String(16), nullable=False, default=""),
    sa.Column("applied_at", sa.Float),
    sa.Column("broker", sa.String(16), nullable=False, default=""),
    sa.Index("ix_enrolments_state", "fleet", "state"),
    sa.Index("ix_enrolments_want", "fleet", "want"),
)

#: The claim accounts devices enrol with (schema 10; ``edge-sdk claim``), one per batch:
#: ``secret`` is the password until the controller created the account at the broker
#: (then ''); ``want`` what it still has to do there ('' nothing, ``create``,
#: ``delete``); the counts are the controller's: requests received, ``dropped`` over the
#: batch's rate, ``refused`` (malformed), the newest at ``last_at``. ``sessions``: how many
#: broker accounts the claim is (``_claim-<batch>``, ``_claim1-<batch>``...; all with its
#: password: each device of the batch uses one, so that they do not close each other's
#: enrolment exchanges).
claims = sa.Table(
    "claims", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("batch", sa.String(64), primary_key=True),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("secret", sa.Text, nullable=False, default=""),
    sa.Column("want", sa.String(16), nullable=False, default=""),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
    sa.Column("dropped", sa.BigInteger, nullable=False, default=0),
    sa.Column("refused", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_at", sa.Float),
    sa.Column("sessions", sa.Integer, nullable=False, default=1),
)

#: Devices accepted before they ask (schema 10; ``edge-sdk device allow``): the first
#: enrolment request of such an id is accepted with these groups and tags.
allowlist = sa.Table(
    "allowlist", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("groups", sa.Text, nullable=False, default="[]"),
    sa.Column("tags", sa.Text, nullable=False, default="{}"),
    sa.Column("added_by", sa.String(128), nullable=False),
    sa.Column("added_at", sa.Float, nullable=False),
)

#: Schema 11: devices and groups whose operator allowed field samples to be asked of them
#: (``edge-sdk samples allow``); nothing is asked of the others.
sample_policy = sa.Table(
    "sample_policy", meta,
    sa.Column("fleet", sa.String(128), primary_key=True),
    sa.Column("scope", sa.String(16), primary_key=True),  # "device" | "group"
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("allowed_by", sa.String(128), nullable=False),
    sa.Column("allowed_at", sa.Float, nullable=False),
)

#: Rollout states in which the controller still has work to do.
ACTIVE_STATUSES = ("pending", "running", "paused", "aborting")
FINISHED_STATUSES = ("completed", "aborted")


# -- migrations ----------------------------------------------------------------------------

def _v1(c: Connection) -> None:
    meta.create_all(c, tables=[devices, device_events, rollouts, rollout_devices,
                               rollout_commands, audit_log])


def _v2(c: Connection) -> None:
    registry_stats.create(c)


def _v3(c: Connection) -> None:
    controller_lease.create(c)


def _v4(c: Connection) -> None:
    # Groups and tags stop coming from the devices' reports: nothing is copied from the
    # reported ones (that would make every claim so far an assignment). The operator
    # assigns them (edge-sdk device set); until then group and tag selectors match no one.
    device_assignments.create(c)


def _v5(c: Connection) -> None:
    device_desired.create(c)


def _v6(c: Connection) -> None:
    """Per-device counts of reports not written, the registry's progress, and the index
    that age-based pruning of ``device_events`` uses."""
    insp = sa.inspect(c)
    device_ingest.create(c, checkfirst=True)
    have = {col["name"] for col in insp.get_columns("registry_stats")}
    for col in registry_stats.columns:
        if col.name not in have:  # a database made before schema 6
            spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
            c.execute(sa.text(f"ALTER TABLE registry_stats ADD COLUMN {spec}"))
    if _EVENTS_TS.name not in {i["name"] for i in insp.get_indexes("device_events")}:
        _EVENTS_TS.create(c)


def _v7(c: Connection) -> None:
    """Operator accounts and sessions of the fleet page's sign-in."""
    meta.create_all(c, tables=[operators, operator_sessions])


def _v8(c: Connection) -> None:
    """A rollout device's version of each model of a set rollout before it (rows saved
    earlier load with their one ``before_model``/``before_version``)."""
    have = {col["name"] for col in sa.inspect(c).get_columns("rollout_devices")}
    if "before_models" not in have:
        col = rollout_devices.c.before_models
        spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
        c.execute(sa.text(f"ALTER TABLE rollout_devices ADD COLUMN {spec}"))


def _v9(c: Connection) -> None:
    """Each device's models and update results: a device registered before keeps the one
    model it reported (its phase as the device's) until its next report says them all."""
    have = {col["name"] for col in sa.inspect(c).get_columns("devices")}
    for col in (devices.c.models, devices.c.results):
        if col.name not in have:
            spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
            c.execute(sa.text(f"ALTER TABLE devices ADD COLUMN {spec}"))
    d = devices.c
    rows = c.execute(sa.select(d.fleet, d.id, d.model, d.version, d.phase).where(
        d.model.is_not(None) & d.version.is_not(None))).all()
    update = devices.update().where((d.fleet == sa.bindparam("k_fleet"))
                                    & (d.id == sa.bindparam("k_id"))) \
        .values(models=sa.bindparam("k_models"))
    for part in chunks(rows, 1000):
        c.execute(update, [{"k_fleet": r.fleet, "k_id": r.id, "k_models": json_text([{
            "name": r.model, "version": r.version, "sha256": None,
            "phase": r.phase if r.phase in ("trial", "committed") else None}])}
            for r in part])


def _v10(c: Connection) -> None:
    """Device identity: enrolments, claims, the allow-list, and revoked devices."""
    meta.create_all(c, tables=[enrolments, claims, allowlist])
    have = {col["name"] for col in sa.inspect(c).get_columns("devices")}
    for col in (devices.c.revoked_at, devices.c.revoked_by, devices.c.revoked_reason):
        if col.name not in have:
            spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
            c.execute(sa.text(f"ALTER TABLE devices ADD COLUMN {spec}"))


def _v11(c: Connection) -> None:
    """Quality: shadow figures and input drift per device, the field-sample policy."""
    meta.create_all(c, tables=[sample_policy])
    have = {col["name"] for col in sa.inspect(c).get_columns("devices")}
    for col in (devices.c.shadow, devices.c.drift, devices.c.drifting):
        if col.name not in have:
            spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
            c.execute(sa.text(f"ALTER TABLE devices ADD COLUMN {spec}"))
    have = {col["name"] for col in sa.inspect(c).get_columns("rollout_devices")}
    rd = rollout_devices.c
    for col in (rd.shadow_counter, rd.shadow_document, rd.shadow_sent_at, rd.shadow_figures,
                rd.shadow_verdict):
        if col.name not in have:
            spec = sa.schema.CreateColumn(col).compile(dialect=c.dialect)
            c.execute(sa.text(f"ALTER TABLE rollout_devices ADD COLUMN {spec}"))


_MIGRATIONS = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6, 7: _v7, 8: _v8, 9: _v9,
               10: _v10, 11: _v11}


def migrate(c: Connection, url: str, *, write: bool) -> None:
    insp = sa.inspect(c)
    current = 0
    if insp.has_table("schema_version"):
        current = c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise FleetError(f"database {redact_url(url)} has schema version {current}, newer than "
                         f"this edge-sdk understands ({SCHEMA_VERSION}); upgrade edge-sdk")
    if current == SCHEMA_VERSION or not write:
        return
    schema_version.create(c, checkfirst=True)
    for v in range(current + 1, SCHEMA_VERSION + 1):
        _MIGRATIONS[v](c)
        c.execute(schema_version.insert().values(version=v, applied=time.time()))


#: The largest id an ``Integer`` column holds (PostgreSQL's ``integer``; SQLite has more).
MAX_ID = 2**31 - 1


def valid_id(n: int) -> bool:
    """Whether ``n`` can be a row id: an id past the column's range is no row, not a
    database error (PostgreSQL refuses to compare it with the column)."""
    return 1 <= n <= MAX_ID


def json_text(v: Any) -> str:
    """How a JSON value is stored: compact text with sorted keys."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def json_value(s: str | None, default: Any) -> Any:
    """A stored JSON value; ``default`` for none or unreadable text."""
    if not s:
        return default
    try:
        return json.loads(s)
    except ValueError:
        return default


def model_list(s: str | None) -> list[dict[str, Any]]:
    """A device's stored ``models``: ``{"name", "version", "sha256", "phase"}`` each, sorted
    by name (the registry wrote them checked; anything else reads as no model)."""
    v = json_value(s, [])
    return [m for m in v if isinstance(m, dict) and isinstance(m.get("name"), str)
            and isinstance(m.get("version"), str)] if isinstance(v, list) else []


def model_versions(s: str | None) -> dict[str, str]:
    """A device's stored ``models`` as name -> version."""
    return {m["name"]: m["version"] for m in model_list(s)}


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for it in items:
        buf.append(it)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
