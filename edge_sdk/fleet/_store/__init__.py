"""The fleet's store: every SQL statement the fleet runs, and the only module that talks
to the database (the import-linter contract "the fleet's SQL only in its store" and
``tests/test_fleet_store_only.py`` hold the rest of ``edge_sdk.fleet`` to that).

- :mod:`._schema`: the tables, their migrations, how values are stored;
- :mod:`._db`: :class:`FleetDB` (connections, the read API, leases, the audit log, the
  registry's counters);
- :mod:`._rollouts`: rollout records, their command queue and the ``desired`` record;
- :mod:`._devices`: what the registry writes from device reports, the operator's
  assignments, removal;
- :mod:`._accounts`: the fleet page's operator accounts and sessions;
- :mod:`._samples`: which devices and groups allow field samples;
- :mod:`._enrolments` (as ``enrolment_rows``): enrolments, claims, the allow-list,
  revoked devices.
"""

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError as DatabaseError

from .._errors import FleetError, FleetUsageError, LeaseHeld, LeaseLost
from . import _enrolments as enrolment_rows
from ._accounts import (
    delete_operator,
    delete_session,
    end_sessions,
    has_operators,
    insert_operator,
    insert_session,
    list_operators,
    operator_exists,
    operator_hash,
    session,
    touch_session,
    update_operator,
)
from ._db import FleetDB, default_url, engine_url
from ._devices import (
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    assignments,
    delete_devices,
    device_drift,
    insert_device,
    insert_event,
    known_devices,
    reported_device,
    update_device,
    write_assignments,
    write_drift,
    write_events,
)
from ._rollouts import (
    active_rollouts,
    command_done,
    confirm_published,
    desired_documents,
    desired_records,
    desired_versions,
    heard_until,
    insert_rollout,
    load_state,
    lock_rollout,
    pending_commands,
    queue_command,
    reports,
    revoked_devices,
    rollout_selector,
    save_desired,
    save_state,
    selectable_devices,
    shadow_runs,
)
from ._samples import allow_samples, deny_samples, sample_permission, sample_permissions
from ._schema import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    MAX_ID,
    SCHEMA_VERSION,
    Record,
    chunks,
    json_text,
    json_value,
    model_list,
    model_versions,
    valid_id,
)

__all__ = [
    "ACTIVE_STATUSES",
    "DEVICE_COLUMNS",
    "EVENT_COLUMNS",
    "FINISHED_STATUSES",
    "MAX_ID",
    "SCHEMA_VERSION",
    "Connection",
    "DatabaseError",
    "FleetDB",
    "FleetError",
    "FleetUsageError",
    "LeaseHeld",
    "LeaseLost",
    "Record",
    "active_rollouts",
    "allow_samples",
    "assignments",
    "chunks",
    "command_done",
    "confirm_published",
    "default_url",
    "delete_devices",
    "delete_operator",
    "delete_session",
    "deny_samples",
    "desired_documents",
    "desired_records",
    "desired_versions",
    "device_drift",
    "end_sessions",
    "engine_url",
    "enrolment_rows",
    "has_operators",
    "heard_until",
    "insert_device",
    "insert_event",
    "insert_operator",
    "insert_rollout",
    "insert_session",
    "json_text",
    "json_value",
    "known_devices",
    "list_operators",
    "load_state",
    "lock_rollout",
    "model_list",
    "model_versions",
    "operator_exists",
    "operator_hash",
    "pending_commands",
    "queue_command",
    "reported_device",
    "reports",
    "revoked_devices",
    "rollout_selector",
    "sample_permission",
    "sample_permissions",
    "save_desired",
    "save_state",
    "selectable_devices",
    "session",
    "shadow_runs",
    "touch_session",
    "update_device",
    "update_operator",
    "valid_id",
    "write_assignments",
    "write_drift",
    "write_events",
]
