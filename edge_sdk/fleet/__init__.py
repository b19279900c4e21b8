"""The fleet controller's record: device registry, durable rollouts, audit log.

Needs the ``[fleet]`` extra (SQLAlchemy 2 Core, psycopg 3). One database holds everything;
``sqlite:///REPO/fleet.db`` (WAL mode) is the embedded default, ``postgresql://...`` the
choice for fleets that outgrow one host. Retained MQTT messages are a cache; this
database is the record.

- :class:`FleetDB`: ``FleetDB.open(url)`` (runs migrations; refuses a newer schema),
  and the read API the web page and the CLI use — ``devices(group=, tag=, model=,
  online=)`` (``groups``/``tags``: the operator's assignment; ``reported_groups``,
  ``reported_tags``, ``hardware``: what the device says; ``mismatch``), ``device(id)``,
  ``device_history(id, limit)``, ``fleets()`` (devices per fleet), ``rollouts()``,
  ``rollout(id)`` (per-wave progress counts and failure reasons), ``models()`` (devices
  per model version), ``audit(limit)``, ``registry_stats()`` (reports written and
  ignored, and how far it has got), ``ingest_stats()`` (per device: reports dropped
  over its budget, lost before the registry), ``lease(fleet)`` (which controller runs
  it). Every value returned is a plain JSON-serialisable dict or list.
- :func:`default_url` — the database beside a release repository.
- :class:`Registry` — ingests every device's retained ``state`` and ``events`` into the DB,
  within :class:`RegistryConfig` (per-device budgets, queue bound, retention, silence).
- :func:`assign_devices` (:class:`AssignmentChange`, :func:`parse_assignments` for an
  assignment file) — the groups and tags the operator gives devices, the only ones
  rollout selectors use; :func:`remove_devices` — take devices out of the registry.
- :class:`Controller` — runs the rollouts recorded in the DB (its poll loop);
  :func:`start_rollout`, :func:`command_rollout` write the records it follows;
  :class:`RolloutSpec` — waves, rate, timeout, abort criteria, pause after each wave.
- :class:`FleetServer` — what ``edge-sdk serve`` runs for a fleet: the registry, the
  controller and (with a :class:`WebConfig`) the fleet page, started and stopped as one.
- :class:`Enroller` (:class:`IdentityConfig`) — enrolment by claim and the devices' broker
  credentials (``serve --enrol``), through the broker's dynamic security plugin.
- :func:`actor_name`, :func:`audit` — the audit log's actor and an appended action.
- Operator accounts and page sessions live in ``_operators`` (``edge-sdk operator``);
  the page that uses them in ``_web``.

Inside: ``_store`` holds every SQL statement (the schema, :class:`FleetDB`, and the rows
of rollouts, devices, enrolments and accounts); ``_manage`` is the operator API
(rollouts, device assignments and removal, the audit log's actor); ``_enrol`` the
enrolment record (devices' requests, ``device accept|reject|revoke|allow``, claims, and
what the controller still has to do at the broker); ``_controller`` only the loop, which
changes a rollout only through the state machine in ``_machine``.
- :class:`FleetError` (one-line diagnoses), :class:`FleetUsageError` (bad requests),
  :class:`LeaseHeld` / :class:`LeaseLost` (another controller runs the fleet).
"""

from ._assign import AssignmentChange, parse_assignments
from ._controller import Controller, check_key_permissions
from ._enroller import Enroller, EnrollerStats, IdentityConfig
from ._ingest import RegistryConfig
from ._machine import RolloutSpec
from ._manage import (
    AssignResult,
    RemoveResult,
    actor_name,
    assign_devices,
    audit,
    command_rollout,
    remove_devices,
    start_rollout,
)
from ._registry import Registry, RegistryStats
from ._server import FleetServer
from ._store import (
    SCHEMA_VERSION,
    FleetDB,
    FleetError,
    FleetUsageError,
    LeaseHeld,
    LeaseLost,
    default_url,
)
from ._web import WebConfig

__all__ = ["SCHEMA_VERSION", "AssignResult", "AssignmentChange", "Controller", "Enroller",
           "EnrollerStats", "FleetDB", "FleetError", "FleetServer", "FleetUsageError",
           "IdentityConfig", "LeaseHeld", "LeaseLost",
           "Registry", "RegistryConfig", "RegistryStats", "RemoveResult", "RolloutSpec",
           "WebConfig", "actor_name", "assign_devices", "audit", "check_key_permissions",
           "command_rollout", "default_url", "parse_assignments", "remove_devices",
           "start_rollout"]
