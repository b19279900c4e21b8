"""Opening the fleet database from the CLI, and appending operator actions to its audit
log (shared by the release and the fleet commands)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import EdgeError, UsageError

if TYPE_CHECKING:  # the [fleet] extra may be missing: imported where used, after the check
    from ..fleet import FleetDB


def resolve_db(db_url: str | None, repo_dir: str | None) -> str:
    if db_url:
        return db_url
    if repo_dir:
        require_fleet()
        from ..fleet import default_url

        return default_url(repo_dir)
    raise UsageError("name the fleet database with --db URL (or EDGE_DB), or --repo REPO "
                     "for the repository's fleet.db")


def fleet_installed() -> bool:
    """Whether the ``[fleet]`` extra (SQLAlchemy) can be imported."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return False
    return True


def require_fleet() -> None:
    """Raise one line naming the extra it needs unless ``edge_sdk.fleet`` can be imported.
    Call it first, then import what the command uses from ``edge_sdk.fleet`` (checked by
    mypy like any other import)."""
    try:
        from .. import fleet  # noqa: F401
    except ImportError as err:
        raise EdgeError(f"the fleet database needs {err.name}: pip install "
                        "'edge-sdk[fleet]'") from err


def open_db(db_url: str | None, repo_dir: str | None) -> FleetDB:
    require_fleet()
    from ..fleet import FleetDB

    return FleetDB.open(resolve_db(db_url, repo_dir))


@contextmanager
def fleet_db(db_url: str | None, repo_dir: str | None, fleet: str) -> Iterator[FleetDB]:
    """:func:`open_db` for a command about one fleet: a bad request raised inside (a device
    or group found nowhere) also names the fleets the database holds when ``fleet`` has
    no device at all — most often a missing --fleet or EDGE_FLEET."""
    require_fleet()
    from ..fleet import FleetUsageError

    with open_db(db_url, repo_dir) as db:
        try:
            yield db
        except (UsageError, FleetUsageError) as err:
            hint = other_fleets(db, fleet)
            if not hint:
                raise
            raise type(err)(f"{err}; {hint}") from err


#: Other fleets named by :func:`other_fleets` (the rest are counted).
_FLEETS_SHOWN = 5


def other_fleets(db: FleetDB, fleet: str) -> str:
    """When ``fleet`` has no device (reported or assigned) and the database holds other
    fleets, a clause naming them and how to choose one; else ``""``."""
    known = db.fleets()
    if known.get(fleet) or not known:
        return ""
    names = [f"{f!r} ({n} device{'s' if n != 1 else ''})"
             for f, n in list(known.items())[:_FLEETS_SHOWN]]
    more = len(known) - _FLEETS_SHOWN
    if more > 0:
        names.append(f"{more} more")
    pick = next(iter(known)) if len(known) == 1 else "NAME"
    return (f"the database holds fleet {', '.join(names)}: pass --fleet {pick} or set "
            f"EDGE_FLEET={pick}")


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
        from ..fleet import actor_name

        db.record_audit(actor_name(operator), action, params)
