"""Device enrolment in the fleet's record: what the operator decides (``edge-sdk device
accept|reject|revoke|allow``, ``edge-sdk claim``) and what the controller records of the
requests it hears and of what it did at the broker.

A device enrols with the password of a claim account (one per batch) by sending a
request with its public key (:class:`~edge_sdk.identity.EnrolRequest`).
:func:`record_request` files it: an unknown id waits for an operator (``pending``)
unless the allow-list names it; the key it first came with is its identity (another key
for the same id is refused and counted as a conflict); an accepted device asking again
with its key gets new credentials (its password was lost or expired); a rejected key
stays rejected (another key for that id waits for an operator again); a revoked one
waits for an operator again.

Each row's ``want`` is the controller's to-do at the broker: ``issue`` (create or update
the account, send the sealed credentials), ``revoke`` (delete the account, which closes
its connection), ``reject`` (answer the device it was rejected); the controller reports
each done (:func:`issued`, :func:`revoked_applied`, :func:`rejected_applied`) and the
operator's ``device revoke`` waits for ``applied_at``. Claims likewise (``create``,
``delete``, :func:`claim_applied`).

Every write is one transaction; operator actions leave their audit entry in it.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeError
from ..identity import (
    DEFAULT_CLAIM_SESSIONS,
    EnrolRequest,
    IdentityError,
    check_claim_sessions,
    check_device_id,
    claim_username,
)
from ..identity import check_batch as _check_batch
from ..transport._config import check_topic_word
from . import _store as store
from ._assign import AssignmentChange, device_id
from ._manage import apply_assignments
from ._store import FleetDB, FleetUsageError
from ._store import enrolment_rows as rows

#: Enrolment states.
STATES = ("pending", "accepted", "rejected", "revoked")
#: The reasons of the answers :func:`record_request` gives.
PENDING_REASON = "waiting for an operator to accept it"
CONFLICT_REASON = "the id is enrolled with another key"
TOO_MANY_REASON = "too many pending requests"
REJECTED_REASON = "rejected by an operator"
#: A reason is sent to the device in its answer: one line, at most this long.
MAX_REASON_CHARS = 200
#: The actor of the audit entry of an allow-listed device's acceptance.
CONTROLLER_ACTOR = "controller"

_REASON = re.compile(r"[^\x00-\x1f\x7f]*")


@dataclass(frozen=True)
class RecordOutcome:
    """How a request was filed, and what to answer: ``state`` pending, accepted,
    rejected or refused with a one-line ``reason``; ``new``: the request opened a pending
    row (or an allow-listed acceptance); ``issue``: the controller must issue
    credentials (the row's ``want`` is ``issue``)."""

    state: str
    reason: str
    new: bool
    issue: bool


def record_request(db: FleetDB, fleet: str, req: EnrolRequest, *, now: float,
                   max_pending: int) -> RecordOutcome:
    """File an enrolment request (see the module's docstring for the rules). At most
    ``max_pending`` rows of each claim batch wait for an operator: a request that would
    open one more is refused and leaves no row. Per batch: whoever floods with one
    claim's password (it ships on every device image) fills only that batch, never
    blocks the devices of the others."""
    dev = req.device_id
    fresh = {"batch": req.batch, "fingerprint": req.fingerprint,
             "public_key": req.public_pem, "facts": dict(req.facts)}
    with db.begin() as c:
        row = rows.enrolment_row(c, fleet, dev, lock=True)
        if row is None:
            allow = rows.allowed(c, fleet, dev)
            if allow is not None:
                groups = store.json_value(allow["groups"], [])
                tags = store.json_value(allow["tags"], {})
                after = _assign(c, fleet, [dev], groups, tags, actor=allow["added_by"])
                rows.insert_enrolment(c, {
                    "fleet": fleet, "device_id": dev, **fresh, "state": "accepted",
                    "requested_at": now, "updated_at": now, "requests": 1, "conflicts": 0,
                    "decided_by": allow["added_by"], "decided_at": now,
                    "groups": after[dev]["groups"], "tags": after[dev]["tags"],
                    "issued": 0, "want": "issue", "broker": ""})
                rows.delete_allowed(c, fleet, dev)
                db.record_audit(CONTROLLER_ACTOR, "device.enrol.auto", {
                    "fleet": fleet, "device": dev, "batch": req.batch,
                    "fingerprint": req.fingerprint, "allowed_by": allow["added_by"],
                    **after[dev]}, conn=c)
                return RecordOutcome("accepted", "", True, True)
            if rows.count_pending(c, fleet, req.batch) >= max_pending:
                return RecordOutcome("refused", TOO_MANY_REASON, False, False)
            rows.insert_enrolment(c, {
                "fleet": fleet, "device_id": dev, **fresh, "state": "pending",
                "requested_at": now, "updated_at": now, "requests": 1, "conflicts": 0,
                "groups": [], "tags": {}, "issued": 0, "want": "", "broker": ""})
            return RecordOutcome("pending", PENDING_REASON, True, False)
        state, same = row["state"], row["fingerprint"] == req.fingerprint
        if state == "rejected" and not same and not row["want"] \
                and rows.count_pending(c, fleet, req.batch) < max_pending:
            # A rejection is of the key the operator saw. Another key for the id waits
            # for an operator again: else whoever asked first with an id (a squatter
            # holding a leaked claim) and was rejected would lock the real device out of
            # its id for good. (Not while the broker still has to carry the rejection out.)
            rows.update_enrolment(c, fleet, dev, {
                **fresh, "state": "pending", "requested_at": now, "updated_at": now,
                "requests": 1, "conflicts": ("+", 1), "decided_by": None,
                "decided_at": None, "reason": None, "expires_at": None})
            return RecordOutcome("pending", PENDING_REASON, True, False)
        if state == "rejected":
            rows.update_enrolment(c, fleet, dev, {"requests": ("+", 1), "updated_at": now}
                                  if same else {"conflicts": ("+", 1)})
            return RecordOutcome("rejected", row["reason"] or REJECTED_REASON, False, False)
        if state == "revoked":
            if rows.count_pending(c, fleet, req.batch) >= max_pending:
                return RecordOutcome("refused", TOO_MANY_REASON, False, False)
            # Its old key may be the stolen one: only an operator lets it back in. The
            # broker's account may still be waiting to be deleted (want stays).
            rows.update_enrolment(c, fleet, dev, {
                **fresh, "state": "pending", "requested_at": now, "updated_at": now,
                "requests": 1, "decided_by": None, "decided_at": None, "reason": None,
                "expires_at": None})
            return RecordOutcome("pending", PENDING_REASON, True, False)
        if not same:
            rows.update_enrolment(c, fleet, dev, {"conflicts": ("+", 1)})
            return RecordOutcome("refused", CONFLICT_REASON, False, False)
        if state == "pending":
            rows.update_enrolment(c, fleet, dev, {"requests": ("+", 1), "updated_at": now,
                                                  "batch": req.batch,
                                                  "facts": dict(req.facts)})
            return RecordOutcome("pending", PENDING_REASON, False, False)
        # Accepted, the same key: it lost its password or let it expire.
        rows.update_enrolment(c, fleet, dev, {"requests": ("+", 1), "updated_at": now,
                                              "batch": req.batch, "facts": dict(req.facts),
                                              "want": "issue"})
        return RecordOutcome("accepted", "", False, True)


# -- the operator's decisions --------------------------------------------------------------

def _fleet(fleet: str) -> str:
    try:
        return check_topic_word(fleet, "fleet")
    except EdgeError as err:
        raise FleetUsageError(str(err)) from None


def _ids(ids: Iterable[str]) -> list[str]:
    out = sorted({device_id(d) for d in ids})
    if not out:
        raise FleetUsageError("name at least one device")
    return out


def _change(groups: Sequence[str], tags: Mapping[str, str]) -> AssignmentChange:
    return AssignmentChange.parse(groups=groups, tags=[f"{k}={v}" for k, v in tags.items()])


def _reason(reason: str | None, default: str) -> str:
    text = (reason or "").strip() or default
    if len(text) > MAX_REASON_CHARS or not _REASON.fullmatch(text):
        raise FleetUsageError(f"the reason must be one line of at most {MAX_REASON_CHARS} "
                              "characters (the device is sent it)")
    return text


def _assign(c: store.Connection, fleet: str, ids: Sequence[str], groups: Sequence[str],
            tags: Mapping[str, str], *, actor: str) -> dict[str, dict[str, Any]]:
    """Add ``groups`` and set ``tags`` in the devices' assignments (``device set``'s
    code); their assignment afterwards."""
    change = _change(groups, tags)
    after, _, _ = apply_assignments(c, fleet, {d: change for d in ids}, actor=actor)
    return after


def _listed(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def _refuse(found: Mapping[str, Any], ids: Sequence[str], fleet: str,
            ok: Sequence[str], what: str) -> None:
    """Raise naming the ids without a row, and those in a state other than ``ok``."""
    unknown = [d for d in ids if d not in found]
    if unknown:
        raise FleetUsageError(
            f"no enrolment request from {_listed(unknown)} in fleet {fleet!r}; nothing "
            f"{what} (see 'edge-sdk device pending'; 'edge-sdk device allow' accepts a "
            "device before it asks)")
    for state in STATES:
        bad = [d for d in ids if found[d]["state"] == state and state not in ok]
        if bad:
            hint = {"accepted": "revoke it with 'edge-sdk device revoke ID --reason ...'",
                    "revoked": "it asks again with its key, then 'edge-sdk device accept'",
                    "pending": "accept or reject it",
                    "rejected": "accept it first"}[state]
            raise FleetUsageError(f"{_listed(bad)} {'is' if len(bad) == 1 else 'are'} "
                                  f"{state}; nothing {what} ({hint})")


def accept_devices(db: FleetDB, fleet: str, ids: Iterable[str], *,
                   groups: Sequence[str] = (), tags: Mapping[str, str] | None = None,
                   actor: str, via: str | None = None) -> list[str]:
    """Accept pending or rejected devices: the controller issues their credentials.
    ``groups`` are added and ``tags`` set in their assignment (what rollouts select by,
    and the group topics their broker account may read). A revoked mark on the device
    is cleared. Devices accepted already are left as they are. Returns the devices
    accepted now. ``via`` (``page``) goes into the audit entry. Raises
    :class:`FleetUsageError`, changing nothing, when an id has no request or is
    revoked."""
    fleet, ids = _fleet(fleet), _ids(ids)
    tags = dict(tags or {})
    _change(groups, tags)  # checked before the transaction
    now = time.time()
    with db.begin() as c:
        found = rows.enrolment_rows(c, fleet, ids)
        _refuse(found, ids, fleet, ("pending", "rejected", "accepted"), "accepted")
        todo = [d for d in ids if found[d]["state"] != "accepted"]
        if not todo:
            return []
        _mark_accepted(c, fleet, _assign(c, fleet, todo, groups, tags, actor=actor),
                       actor=actor, now=now)
        db.record_audit(actor, "device.accept", {
            "fleet": fleet, "devices": todo, "groups": list(groups), "tags": tags,
            "fingerprints": {d: found[d]["fingerprint"] for d in todo},
            **({"via": via} if via else {})}, conn=c)
    return todo


def _mark_accepted(c: store.Connection, fleet: str, after: Mapping[str, Mapping[str, Any]], *,
                   actor: str, now: float) -> None:
    """The devices of ``after`` (id -> their assignment now) are accepted: the controller
    issues their credentials with those groups; a revocation they had is over."""
    for d, assigned in after.items():
        rows.update_enrolment(c, fleet, d, {
            "state": "accepted", "want": "issue", "decided_by": actor,
            "decided_at": now, "reason": None, "updated_at": now,
            "groups": assigned["groups"], "tags": assigned["tags"]})
    rows.set_device_revoked(c, fleet, list(after), at=None, by=None, reason=None)


def reject_devices(db: FleetDB, fleet: str, ids: Iterable[str], *,
                   reason: str | None = None, actor: str,
                   via: str | None = None) -> list[str]:
    """Reject pending (or revoked) devices: they are answered ``rejected`` with
    ``reason`` and every later request of theirs too, until accepted. Rejected ones are
    left as they are. Returns the devices rejected now. Raises
    :class:`FleetUsageError`, changing nothing, for an id without a request or an
    accepted one (revoke it)."""
    fleet, ids = _fleet(fleet), _ids(ids)
    why = _reason(reason, REJECTED_REASON)
    now = time.time()
    with db.begin() as c:
        found = rows.enrolment_rows(c, fleet, ids)
        _refuse(found, ids, fleet, ("pending", "revoked", "rejected"), "rejected")
        todo = [d for d in ids if found[d]["state"] != "rejected"]
        for d in todo:
            # A revocation not applied at the broker yet goes first; the controller
            # answers "rejected" after it (revoked_applied).
            keep = found[d]["want"] == "revoke"
            rows.update_enrolment(c, fleet, d, {
                "state": "rejected", "decided_by": actor, "decided_at": now,
                "reason": why, "updated_at": now, **({} if keep else {"want": "reject"})})
        if todo:
            db.record_audit(actor, "device.reject", {
                "fleet": fleet, "devices": todo, "reason": why,
                **({"via": via} if via else {})}, conn=c)
    return todo


def revoke_device(db: FleetDB, fleet: str, device: str, *, reason: str,
                  actor: str) -> None:
    """Revoke an accepted device: the controller deletes its broker account (which
    closes its connection), rollouts leave it out, and it can come back only by asking
    again and being accepted. ``applied_at`` is cleared until the controller did it.
    Raises :class:`FleetUsageError` for a device that is not accepted or a reason that
    is empty or not one line."""
    fleet, (dev,) = _fleet(fleet), _ids([device])
    if not (reason or "").strip():
        raise FleetUsageError("say why with --reason (it goes to the audit log)")
    why = _reason(reason, "")
    now = time.time()
    with db.begin() as c:
        found = rows.enrolment_rows(c, fleet, [dev])
        _refuse(found, [dev], fleet, ("accepted",), "revoked")
        rows.update_enrolment(c, fleet, dev, {
            "state": "revoked", "want": "revoke", "applied_at": None, "decided_by": actor,
            "decided_at": now, "reason": why, "updated_at": now})
        rows.set_device_revoked(c, fleet, [dev], at=now, by=actor, reason=why)
        db.record_audit(actor, "device.revoke", {
            "fleet": fleet, "device": dev, "reason": why,
            "fingerprint": found[dev]["fingerprint"]}, conn=c)


@dataclass(frozen=True)
class AllowResult:
    """What :func:`allow_devices` did: devices put on the allow-list (accepted when they
    first ask) and pending or rejected ones accepted at once."""

    listed: tuple[str, ...]
    accepted: tuple[str, ...]


def allow_devices(db: FleetDB, fleet: str, ids: Iterable[str], *,
                  groups: Sequence[str] = (), tags: Mapping[str, str] | None = None,
                  actor: str) -> AllowResult:
    """Accept devices before they ask: the first request of each is accepted with
    ``groups`` and ``tags`` (an audit entry ``device.enrol.auto``). One that asked
    already is accepted now (pending or rejected) or left as it is (accepted)."""
    change = _change(groups, dict(tags or {}))
    return allow_changes(db, fleet, {d: change for d in _ids(ids)}, actor=actor)


def allow_changes(db: FleetDB, fleet: str, changes: Mapping[str, AssignmentChange], *,
                  actor: str, source: str | None = None) -> AllowResult:
    """:func:`allow_devices` with each device's groups and tags (an assignment file's
    lines, see :func:`~._assign.parse_assignments`). Raises :class:`FleetUsageError`,
    changing nothing, for a revoked device (it comes back only by acceptance)."""
    fleet, ids = _fleet(fleet), _ids(changes)
    for d in ids:  # stricter than an assignment's id: the id a request may carry
        try:
            check_device_id(d)
        except IdentityError as err:
            raise FleetUsageError(f"{err}; nothing allowed (no request can name it)") \
                from None
    for d, ch in changes.items():
        if ch.remove_groups or ch.remove_tags or ch.replace:
            raise FleetUsageError(f"{d}: the allow-list adds groups and sets tags only")
    now = time.time()
    with db.begin() as c:
        found = rows.enrolment_rows(c, fleet, ids)
        revoked = [d for d in ids if d in found and found[d]["state"] == "revoked"]
        if revoked:
            raise FleetUsageError(f"{_listed(revoked)} revoked; nothing allowed (a revoked "
                                  "device comes back by asking again and 'edge-sdk device "
                                  "accept')")
        listed = [d for d in ids if d not in found]
        accept = [d for d in ids if d in found and found[d]["state"] in ("pending",
                                                                          "rejected")]
        rows.put_allowed(c, fleet, {d: {"groups": list(changes[d].add_groups),
                                        "tags": dict(changes[d].set_tags)} for d in listed},
                         actor=actor, now=now)
        if accept:
            after, _, _ = apply_assignments(c, fleet, {d: changes[d] for d in accept},
                                            actor=actor)
            _mark_accepted(c, fleet, after, actor=actor, now=now)
        db.record_audit(actor, "device.allow", {
            "fleet": fleet, "devices": {d: changes[d].describe() for d in ids},
            "accepted": accept, **({"file": source} if source else {})}, conn=c)
    return AllowResult(tuple(listed), tuple(accept))


# -- claims --------------------------------------------------------------------------------

def check_batch(batch: str) -> str:
    """A claim batch (:func:`edge_sdk.identity.check_batch`); raises
    :class:`FleetUsageError`."""
    try:
        return _check_batch(batch)
    except IdentityError as err:
        raise FleetUsageError(str(err)) from None


def claim_user(batch: str) -> str:
    """The broker user name of a claim account: ``_claim-<batch>``."""
    return claim_username(check_batch(batch))


def create_claim(db: FleetDB, fleet: str, batch: str, *, actor: str,
                 sessions: int = DEFAULT_CLAIM_SESSIONS) -> str:
    """Create the claim of ``batch``: ``sessions`` broker accounts with one password (the
    controller creates them at the broker), and return the password, which is shown
    once: the record keeps it only until the controller has applied it. A revoked claim
    is created again with a new password. Raises :class:`FleetUsageError` for a claim
    that exists or a number of sessions out of 1..256."""
    fleet, batch = _fleet(fleet), check_batch(batch)
    try:
        sessions = check_claim_sessions(sessions, "--sessions")
    except IdentityError as err:
        raise FleetUsageError(str(err)) from None
    password = secrets.token_urlsafe(24)
    now = time.time()
    with db.begin() as c:
        row = rows.claim_row(c, fleet, batch, lock=True)
        if row is not None and row["revoked_at"] is None:
            raise FleetUsageError(f"claim {batch!r} of fleet {fleet!r} exists (created by "
                                  f"{row['created_by']}); 'edge-sdk claim revoke {batch}' "
                                  "first for a new password")
        values = {"created_by": actor, "created_at": now, "revoked_at": None,
                  "secret": password, "want": "create", "sessions": sessions}
        if row is None:
            rows.insert_claim(c, {"fleet": fleet, "batch": batch, **values, "requests": 0,
                                  "dropped": 0, "refused": 0})
        else:
            rows.update_claim(c, fleet, batch, values)
        db.record_audit(actor, "claim.create", {"fleet": fleet, "batch": batch,
                                                "sessions": sessions}, conn=c)
    return password


def revoke_claim(db: FleetDB, fleet: str, batch: str, *, actor: str) -> int:
    """Revoke a claim: the controller deletes its broker account; its pending requests
    are dropped (their devices ask again with another claim). Returns how many. Raises
    :class:`FleetUsageError` for a claim that does not exist or is revoked."""
    fleet, batch = _fleet(fleet), check_batch(batch)
    now = time.time()
    with db.begin() as c:
        row = rows.claim_row(c, fleet, batch, lock=True)
        if row is None or row["revoked_at"] is not None:
            raise FleetUsageError(f"no claim {batch!r} in fleet {fleet!r}"
                                  + ("" if row is None else " (it is revoked)")
                                  + " (see 'edge-sdk claim list')")
        rows.update_claim(c, fleet, batch, {"revoked_at": now, "secret": "",
                                            "want": "delete"})
        dropped = rows.delete_pending_of_batch(c, fleet, batch)
        db.record_audit(actor, "claim.revoke", {"fleet": fleet, "batch": batch,
                                                "pending_dropped": dropped}, conn=c)
    return dropped


# -- what the controller records -----------------------------------------------------------

def enrolment(db: FleetDB, fleet: str, device: str) -> dict[str, Any] | None:
    """A device's enrolment row (see :meth:`FleetDB.enrolments`), or None."""
    with db.read() as c:
        row = rows.enrolment_row(c, fleet, device)
    return None if row is None else rows.enrolment_dict(row)


def wanted(db: FleetDB, fleet: str) -> list[dict[str, Any]]:
    """What the controller still has to do at the broker, oldest first: enrolment rows
    (``kind`` ``device``: ``want`` issue, revoke or reject, with ``device_id``,
    ``batch``, ``public_key``, ``fingerprint``, ``groups``, ``issued``...), then claims
    (``kind`` ``claim``: ``want`` create with its ``secret``, or delete)."""
    with db.read() as c:
        devs = [{"kind": "device", **rows.enrolment_dict(r)}
                for r in rows.wanted_enrolments(c, fleet)]
        cls = [{"kind": "claim", **dict(r)} for r in rows.wanted_claims(c, fleet)]
    return devs + cls


def issued(db: FleetDB, fleet: str, device: str, *, issued: int, expires_at: float) -> None:
    """The controller gave the device's broker account password number ``issued``,
    valid until ``expires_at`` (a first issue, a re-issue or a renewal)."""
    now = time.time()
    with db.begin() as c:
        rows.update_enrolment(c, fleet, device, {"issued": issued, "expires_at": expires_at,
                                                 "applied_at": now, "broker": "active"})
        rows.update_enrolment(c, fleet, device, {"want": ""}, want="issue")


def group_changes(db: FleetDB, fleet: str, *, limit: int = 500) -> list[dict[str, Any]]:
    """Accepted devices with an active broker account whose assigned groups (``edge-sdk
    device set``, the page, an assignment file) differ from the groups the account was
    granted: ``device_id``, ``batch``, ``issued``, ``granted`` and ``assigned`` (lists),
    ``assigned_text`` (to pass to :func:`groups_granted`). At most ``limit``."""
    with db.read() as c:
        found = rows.group_drift(c, fleet, limit)
    return [{"device_id": r["device_id"], "batch": r["batch"], "issued": int(r["issued"]),
             "granted": _group_list(r["groups"]), "assigned": _group_list(r["assigned"]),
             "assigned_text": str(r["assigned"])} for r in found]


def assigned_groups(db: FleetDB, fleet: str, device: str) -> tuple[list[str], str]:
    """The groups assigned to ``device`` now, as a list and as stored (for
    :func:`groups_granted`)."""
    with db.read() as c:
        text = rows.assigned_groups(c, fleet, device)
    return _group_list(text), text


def groups_granted(db: FleetDB, fleet: str, device: str, assigned_text: str) -> None:
    """The controller made the device's broker roles those of ``assigned_text`` (the
    assignment's stored groups, from :func:`group_changes` or :func:`assigned_groups`)."""
    with db.begin() as c:
        rows.set_granted_groups(c, fleet, device, assigned_text)


def _group_list(text: object) -> list[str]:
    value = store.json_value(str(text) if text is not None else None, [])
    return [g for g in value if isinstance(g, str)] if isinstance(value, list) else []


def revoked_applied(db: FleetDB, fleet: str, device: str) -> None:
    """The controller deleted the device's broker account. A device rejected meanwhile
    is then answered so (``want`` reject)."""
    now = time.time()
    with db.begin() as c:
        row = rows.enrolment_row(c, fleet, device, lock=True)
        if row is None:
            return
        after = "reject" if row["state"] == "rejected" else ""
        rows.update_enrolment(c, fleet, device, {"want": after, "applied_at": now,
                                                 "broker": "deleted", "expires_at": None},
                              want="revoke")


def rejected_applied(db: FleetDB, fleet: str, device: str) -> None:
    """The controller published the device's ``rejected`` answer."""
    with db.begin() as c:
        rows.update_enrolment(c, fleet, device, {"want": "", "applied_at": time.time()},
                              want="reject")


def claim_applied(db: FleetDB, fleet: str, batch: str, *, want: str | None = None) -> None:
    """The controller created (or deleted) the claim's broker account: the record
    forgets the password. With ``want``, only if the claim still wants that (an operator
    may have changed it meanwhile)."""
    with db.begin() as c:
        rows.update_claim(c, fleet, batch, {"secret": "", "want": ""}, want=want)


def expired_due(db: FleetDB, fleet: str, now: float) -> list[str]:
    """Devices whose active broker password expired by ``now`` (to disable)."""
    with db.read() as c:
        return rows.expired_due(c, fleet, now)


def mark_expired(db: FleetDB, fleet: str, device: str) -> None:
    """The controller disabled the device's account: its password expired. Asking again
    with its key re-issues it."""
    with db.begin() as c:
        rows.update_enrolment(c, fleet, device, {"broker": "expired",
                                                 "applied_at": time.time()})


def count_claim(db: FleetDB, fleet: str, batch: str, *, requests: int = 0,
                dropped: int = 0, refused: int = 0) -> None:
    """Add to the claim's counts (a claim not in the record is not counted)."""
    with db.begin() as c:
        rows.add_claim_counts(c, fleet, batch, requests=requests, dropped=dropped,
                              refused=refused, at=time.time())


def prune(db: FleetDB, fleet: str, *, now: float, pending_ttl: float) -> int:
    """Delete pending requests not repeated for ``pending_ttl`` seconds. Returns how
    many."""
    with db.begin() as c:
        return rows.prune_pending(c, fleet, now - pending_ttl)


def enrolments(db: FleetDB, fleet: str | None = None,
               state: str | None = None) -> list[dict[str, Any]]:
    return db.enrolments(fleet, state)


def claims(db: FleetDB, fleet: str | None = None) -> list[dict[str, Any]]:
    return db.claims(fleet)


__all__ = ["AllowResult", "RecordOutcome", "accept_devices", "allow_changes",
           "allow_devices", "assigned_groups", "claim_applied", "claim_user", "claims",
           "count_claim", "create_claim", "enrolment", "enrolments", "expired_due",
           "group_changes", "groups_granted", "issued", "mark_expired", "prune",
           "record_request", "reject_devices", "rejected_applied", "revoke_claim",
           "revoke_device", "revoked_applied", "wanted"]
