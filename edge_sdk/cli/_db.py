"""Opening the fleet database from the CLI, and appending operator actions to its audit
log (shared by the release and the fleet commands)."""

from __future__ import annotations

from typing import Any

from ..errors import EdgeError, UsageError


def resolve_db(db_url: str | None, repo_dir: str | None) -> str:
    if db_url:
        return db_url
    if repo_dir:
        from ..fleet import default_url

        return default_url(repo_dir)
    raise UsageError("name the fleet database with --db URL (or EDGE_DB), or --repo REPO "
                     "for the repository's fleet.db")


def open_db(db_url: str | None, repo_dir: str | None) -> Any:
    try:
        from ..fleet import FleetDB
    except ImportError as err:
        raise EdgeError(f"the fleet database needs {err.name}: pip install "
                        "'edge-sdk[fleet]'") from err
    return FleetDB.open(resolve_db(db_url, repo_dir))


def record(db_url: str | None, repo_dir: str | None, operator: str | None, action: str,
           params: dict[str, Any]) -> None:
    """Append an operator action to the audit log (the repo's fleet.db without --db)."""
    from ..fleet import actor_name

    with open_db(db_url, repo_dir) as db:
        db.record_audit(actor_name(operator), action, params)
