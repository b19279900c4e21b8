"""Opening the fleet database from the CLI, and appending operator actions to its audit
log (shared by the release and the fleet commands)."""

from __future__ import annotations

from typing import Any

from ..errors import EdgeError, UsageError


def resolve_db(db_url: str | None, repo_dir: str | None) -> str:
    if db_url:
        return db_url
    if repo_dir:
        return str(fleet_module().default_url(repo_dir))
    raise UsageError("name the fleet database with --db URL (or EDGE_DB), or --repo REPO "
                     "for the repository's fleet.db")


def fleet_installed() -> bool:
    """Whether the ``[fleet]`` extra (SQLAlchemy) can be imported."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return False
    return True


def fleet_module() -> Any:
    """The ``edge_sdk.fleet`` package, or one line naming the extra it needs."""
    try:
        from .. import fleet
    except ImportError as err:
        raise EdgeError(f"the fleet database needs {err.name}: pip install "
                        "'edge-sdk[fleet]'") from err
    return fleet


def open_db(db_url: str | None, repo_dir: str | None) -> Any:
    return fleet_module().FleetDB.open(resolve_db(db_url, repo_dir))


def record(db_url: str | None, repo_dir: str | None, operator: str | None, action: str,
           params: dict[str, Any]) -> None:
    """Append an operator action to the audit log (the repo's fleet.db without --db).
    Without the ``[fleet]`` extra and without --db, it says once that nothing is recorded
    rather than refuse the action: an agent-only install can still release and deploy."""
    if db_url is None and not fleet_installed():
        import click

        click.echo("edge-sdk: warning: not recorded in the audit log: it needs the fleet "
                   "extra (pip install 'edge-sdk[fleet]')", err=True)
        return
    with open_db(db_url, repo_dir) as db:
        db.record_audit(fleet_module().actor_name(operator), action, params)
