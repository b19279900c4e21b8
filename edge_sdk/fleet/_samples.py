"""Who may be asked for field samples: the operator's allow list (``edge-sdk samples
allow|deny|list``), per device or per group, in the fleet database (schema 11's
``sample_policy``) with an audit entry for every change. ``edge-sdk samples request``
asks :func:`check_samples_allowed` first: a device neither allowed itself nor in an
allowed group is refused before anything is signed. The agent's ``[samples] enabled =
false`` is the device's own veto, whatever this list says."""

from __future__ import annotations

from typing import Any

from ..transport._config import check_topic_word
from . import _store as store
from ._store import FleetDB, FleetUsageError

SCOPES = ("device", "group")


def _scope(scope: str, name: str) -> None:
    if scope not in SCOPES:
        raise FleetUsageError(f"scope {scope!r} must be one of {', '.join(SCOPES)}")
    check_topic_word(name, f"{scope} id")


def allow_samples(db: FleetDB, fleet: str, scope: str, name: str, actor: str) -> bool:
    """Let the host ask ``scope`` ``name`` for field samples; False when it already
    could. Audited as ``samples.allow``."""
    _scope(scope, name)
    with db.begin() as c:
        new = store.allow_samples(c, fleet, scope, name, actor)
        db.record_audit(actor, "samples.allow", {"fleet": fleet, scope: name, "new": new},
                        conn=c)
    return new


def deny_samples(db: FleetDB, fleet: str, scope: str, name: str, actor: str) -> bool:
    """Take the permission back; False when there was none. Audited as ``samples.deny``."""
    _scope(scope, name)
    with db.begin() as c:
        gone = store.deny_samples(c, fleet, scope, name)
        db.record_audit(actor, "samples.deny", {"fleet": fleet, scope: name,
                                                "removed": gone}, conn=c)
    return gone


def sample_policy(db: FleetDB, fleet: str) -> list[dict[str, Any]]:
    """Every permission of ``fleet``: ``scope``, ``name``, ``allowed_by``, ``allowed_at``."""
    with db.read() as c:
        return store.sample_permissions(c, fleet)


def check_samples_allowed(db: FleetDB, fleet: str, device: str) -> str:
    """Why ``device`` may be asked for samples (``"device cam-1"``, ``"group line-3"``);
    raises :class:`FleetUsageError` saying how to allow it when nothing lets it. Its
    groups are those the registry knows (assigned or reported)."""
    check_topic_word(device, "device id")
    rec = db.device(device, fleet=fleet)
    groups = [str(g) for g in (rec or {}).get("groups") or []]
    with db.read() as c:
        row = store.sample_permission(c, fleet, device, groups)
    if row is None:
        where = f" (groups: {', '.join(groups)})" if groups else ""
        raise FleetUsageError(
            f"device {device}{where} does not allow field samples in fleet {fleet}: an "
            f"operator allows it with 'edge-sdk samples allow --device {device}' (or "
            "--group GROUP)")
    return f"{row['scope']} {row['name']}"
