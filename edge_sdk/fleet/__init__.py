"""The fleet controller's record: device registry, durable rollouts, audit log.

Needs the ``[fleet]`` extra (SQLAlchemy 2 Core, psycopg 3). One database holds everything;
``sqlite:///REPO/fleet.db`` (WAL mode) is the embedded default, ``postgresql://...`` the
choice for fleets that outgrow one host. Retained MQTT messages are a cache; this
database is the record.

- :class:`FleetDB`: ``FleetDB.open(url)`` (runs migrations; refuses a newer schema),
  and the read API the web page and the CLI use — ``devices(group=, tag=, model=,
  online=)``, ``device(id)``, ``device_history(id, limit)``, ``rollouts()``,
  ``rollout(id)`` (per-wave progress counts and failure reasons), ``models()``
  (devices per model version), ``audit(limit)``. Every value returned is a plain
  JSON-serialisable dict or list.
- :func:`default_url` — the database beside a release repository.
- :class:`FleetError` (one-line diagnoses), :class:`FleetUsageError` (bad requests).
"""

from ._db import SCHEMA_VERSION, FleetDB, FleetError, FleetUsageError, default_url

__all__ = ["SCHEMA_VERSION", "FleetDB", "FleetError", "FleetUsageError", "default_url"]
