"""The operator's record of each device: the groups and tags that select it, and removal.

``edge-sdk device set`` and ``edge-sdk device remove`` are thin wrappers over
:func:`assign_devices` and :func:`remove_devices`. Both change many devices in one
transaction with one audit entry (fleets are provisioned in bulk), and refuse the whole
request, writing nothing, when any part of it is wrong.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ..errors import EdgeError
from ..transport._config import check_topic_word
from ._db import (
    ACTIVE_STATUSES,
    FleetDB,
    FleetUsageError,
    chunks,
    device_assignments,
    device_events,
    devices,
    json_text,
    json_value,
    rollout_devices,
    rollouts,
)
from ._select import HW_PREFIX, MAX_GROUPS, MAX_TAGS, TAG_KEY, TAG_VALUE

#: Ids per ``IN (...)`` of a bulk change (SQLite allows 32 766 parameters).
_BATCH = 500
#: Lines an assignment file may hold (one per device).
MAX_FILE_LINES = 1_000_000


def _group(g: str) -> str:
    try:
        return check_topic_word(g, "group")
    except EdgeError as err:
        raise FleetUsageError(str(err)) from None


#: Any id the registry can hold (a topic level): older agents' ids with a '.' included, so
#: that they can be removed (rollouts leave them out: no deployment can name them).
_ID = re.compile(r"[^/+#\x00-\x1f\x7f]{1,128}")


def _device_id(d: str) -> str:
    if not _ID.fullmatch(d):
        raise FleetUsageError(f"device id {d[:80]!r} must be 1-128 characters without '/', "
                              "'+', '#' or control characters")
    return d


def _tag_key(k: str) -> str:
    if not TAG_KEY.fullmatch(k):
        raise FleetUsageError(f"tag name {k[:80]!r} must be 1-64 letters, digits, '.', '_' "
                              "or '-'")
    if k.startswith(HW_PREFIX):
        raise FleetUsageError(f"tag name {k!r}: '{HW_PREFIX}' is reserved for the hardware "
                              "facts devices report (a selector's hw.KEY=VALUE)")
    return k


def _tag(kv: str) -> tuple[str, str]:
    k, sep, v = kv.partition("=")
    if not sep:
        raise FleetUsageError(f"tag {kv[:80]!r} must look like KEY=VALUE")
    if not TAG_VALUE.fullmatch(v):
        raise FleetUsageError(f"tag {k[:80]!r}: the value must be at most 128 characters "
                              "without control characters")
    return _tag_key(k), v


@dataclass(frozen=True)
class AssignmentChange:
    """What to change in a device's assignment. ``replace``: start from no groups and no
    tags instead of the current ones (the change then says everything the device has)."""

    add_groups: tuple[str, ...] = ()
    remove_groups: tuple[str, ...] = ()
    set_tags: Mapping[str, str] = field(default_factory=dict)
    remove_tags: tuple[str, ...] = ()
    replace: bool = False

    @classmethod
    def parse(cls, *, groups: Iterable[str] = (), remove_groups: Iterable[str] = (),
              tags: Iterable[str] = (), remove_tags: Iterable[str] = (),
              replace: bool = False) -> AssignmentChange:
        """From the command line's words (``tags`` as ``KEY=VALUE``). Raises
        :class:`FleetUsageError` for a bad name or a contradiction."""
        return cls(tuple(_group(g) for g in groups), tuple(_group(g) for g in remove_groups),
                   dict(_tag(t) for t in tags), tuple(_tag_key(k) for k in remove_tags),
                   replace).checked()

    def checked(self) -> AssignmentChange:
        both = set(self.add_groups) & set(self.remove_groups)
        if both:
            raise FleetUsageError(f"group {sorted(both)[0]!r} is both added and removed")
        both = set(self.set_tags) & set(self.remove_tags)
        if both:
            raise FleetUsageError(f"tag {sorted(both)[0]!r} is both set and removed")
        return self

    def merged(self, other: AssignmentChange) -> AssignmentChange:
        """Both changes at once; a tag given two different values is refused."""
        for k in set(self.set_tags) & set(other.set_tags):
            if self.set_tags[k] != other.set_tags[k]:
                raise FleetUsageError(f"tag {k!r} is set to both {self.set_tags[k]!r} and "
                                      f"{other.set_tags[k]!r}")
        return AssignmentChange(
            _unique(self.add_groups + other.add_groups),
            _unique(self.remove_groups + other.remove_groups),
            {**self.set_tags, **other.set_tags},
            _unique(self.remove_tags + other.remove_tags),
            self.replace or other.replace).checked()

    @property
    def empty(self) -> bool:
        return not (self.add_groups or self.remove_groups or self.set_tags
                    or self.remove_tags or self.replace)

    def apply(self, groups: Sequence[str], tags: Mapping[str, str]
              ) -> tuple[list[str], dict[str, str]]:
        g = [] if self.replace else [x for x in groups if x not in self.remove_groups]
        g += [x for x in self.add_groups if x not in g]
        t = {} if self.replace else {k: v for k, v in tags.items()
                                     if k not in self.remove_tags}
        t.update(self.set_tags)
        return sorted(g), dict(sorted(t.items()))

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in (("add_groups", list(self.add_groups)),
                                  ("remove_groups", list(self.remove_groups)),
                                  ("set_tags", dict(self.set_tags)),
                                  ("remove_tags", list(self.remove_tags)),
                                  ("replace", self.replace)) if v}


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_assignments(text: str, source: str = "file") -> dict[str, AssignmentChange]:
    """An assignment file: one device per line, ``DEVICE[:GROUP,...] [KEY=VALUE ...]``
    (the ``ID:GROUP,...`` of ``examples/mosquitto/make_credentials.py --device``); blank
    lines and ``#`` comments are skipped. Each line adds its groups and sets its tags.
    Raises :class:`FleetUsageError` naming the line."""
    out: dict[str, AssignmentChange] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if n > MAX_FILE_LINES:
            raise FleetUsageError(f"{source}: more than {MAX_FILE_LINES} lines")
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        dev, _, groups = words[0].partition(":")
        try:
            change = AssignmentChange.parse(groups=[g for g in groups.split(",") if g],
                                            tags=words[1:])
            dev = _device_id(dev)
            out[dev] = out[dev].merged(change) if dev in out else change
        except FleetUsageError as err:
            raise FleetUsageError(f"{source} line {n}: {err}") from None
    return out


@dataclass(frozen=True)
class AssignResult:
    """What :func:`assign_devices` did: each named device's assignment afterwards,
    the ones it changed, and the ones that have not reported yet."""

    assignments: dict[str, dict[str, Any]]
    changed: tuple[str, ...]
    unregistered: tuple[str, ...]


def assign_devices(db: FleetDB, *, fleet: str, changes: Mapping[str, AssignmentChange],
                   actor: str, source: str | None = None) -> AssignResult:
    """Apply each device's change in one transaction and record one ``device.set`` audit
    entry (with every changed device's new groups and tags). A device that has not
    reported yet gets its assignment now and is selected once it registers. Raises
    :class:`FleetUsageError`, writing nothing, for a bad id or an assignment over the
    limits."""
    try:
        check_topic_word(fleet, "fleet")
    except EdgeError as err:
        raise FleetUsageError(str(err)) from None
    if not changes:
        raise FleetUsageError("name at least one device (or --file)")
    for d, ch in changes.items():
        _device_id(d)
        if ch.empty:
            raise FleetUsageError(f"nothing to change for {d}: give --group, --tag, "
                                  "--remove-group, --remove-tag or --replace")
    a = device_assignments
    now = time.time()
    after: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    with db.begin() as c:
        current: dict[str, tuple[list[str], dict[str, str]]] = {}
        registered: set[str] = set()
        for ids in chunks(sorted(changes), _BATCH):
            for r in c.execute(sa.select(a.c.id, a.c.groups, a.c.tags).where(
                    (a.c.fleet == fleet) & a.c.id.in_(ids))):
                current[r.id] = (json_value(r.groups, []), json_value(r.tags, {}))
            registered.update(c.execute(sa.select(devices.c.id).where(
                (devices.c.fleet == fleet) & devices.c.id.in_(ids))).scalars())
        inserts, updates = [], []
        for d in sorted(changes):
            old = current.get(d, ([], {}))
            groups, tags = changes[d].apply(*old)
            if len(groups) > MAX_GROUPS or len(tags) > MAX_TAGS:
                raise FleetUsageError(f"{d}: {len(groups)} groups and {len(tags)} tags; at "
                                      f"most {MAX_GROUPS} and {MAX_TAGS}")
            after[d] = {"groups": groups, "tags": tags}
            if d in current and (groups, tags) == (sorted(old[0]), old[1]):
                continue
            changed.append(d)
            row = {"groups": json_text(groups), "tags": json_text(tags), "updated": now,
                   "updated_by": actor}
            if d in current:
                updates.append({"k_id": d, **row})
            else:
                inserts.append({"fleet": fleet, "id": d, **row})
        if inserts:
            c.execute(a.insert(), inserts)
        if updates:
            c.execute(a.update().where((a.c.fleet == fleet) & (a.c.id == sa.bindparam("k_id")))
                      .values({k: sa.bindparam(k) for k in ("groups", "tags", "updated",
                                                            "updated_by")}), updates)
        if changed:
            common = _common(changes)
            db.record_audit(actor, "device.set", {
                "fleet": fleet, "count": len(changed),
                **({"change": common.describe()} if common is not None else {}),
                **({"file": source} if source else {}),
                "devices": {d: after[d] for d in changed}}, conn=c)
    return AssignResult(after, tuple(changed), tuple(sorted(set(changes) - registered)))


def _common(changes: Mapping[str, AssignmentChange]) -> AssignmentChange | None:
    """The one change every device got, if they all got the same."""
    first = next(iter(changes.values()))
    return first if all(ch == first for ch in changes.values()) else None


@dataclass(frozen=True)
class RemoveResult:
    """What :func:`remove_devices` deleted, and the active rollouts the devices are in
    (they stay in them: a rollout's record is not rewritten)."""

    devices: tuple[str, ...]
    events: int
    active_rollouts: dict[str, list[int]]


def remove_devices(db: FleetDB, *, fleet: str, device_ids: Sequence[str],
                   actor: str) -> RemoveResult:
    """Delete the devices' registry rows, assignments and history (their events) in one
    transaction, with one ``device.remove`` audit entry. Rollout records keep the device
    (what was signed for whom stays on record). A removed device that reports again
    registers again, unassigned. Raises :class:`FleetUsageError`, deleting nothing, when
    a device is neither registered nor assigned in ``fleet``."""
    ids = sorted({_device_id(d) for d in device_ids})
    if not ids:
        raise FleetUsageError("name at least one device")
    a = device_assignments
    events = 0
    active: dict[str, list[int]] = {}
    with db.begin() as c:
        known: set[str] = set()
        for part in chunks(ids, _BATCH):
            known.update(c.execute(sa.select(devices.c.id).where(
                (devices.c.fleet == fleet) & devices.c.id.in_(part))).scalars())
            known.update(c.execute(sa.select(a.c.id).where(
                (a.c.fleet == fleet) & a.c.id.in_(part))).scalars())
        unknown = [d for d in ids if d not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise FleetUsageError(f"no device {', '.join(unknown[:5])}{more} in fleet "
                                  f"{fleet!r}; nothing removed")
        for part in chunks(ids, _BATCH):
            for r in c.execute(sa.select(rollout_devices.c.device, rollouts.c.id).where(
                    (rollout_devices.c.rollout == rollouts.c.id) & (rollouts.c.fleet == fleet)
                    & rollouts.c.status.in_(ACTIVE_STATUSES)
                    & rollout_devices.c.device.in_(part))):
                active.setdefault(r.device, []).append(int(r.id))
            events += c.execute(device_events.delete().where(
                (device_events.c.fleet == fleet) & device_events.c.device.in_(part))).rowcount
            c.execute(devices.delete().where((devices.c.fleet == fleet)
                                             & devices.c.id.in_(part)))
            c.execute(a.delete().where((a.c.fleet == fleet) & a.c.id.in_(part)))
        db.record_audit(actor, "device.remove", {
            "fleet": fleet, "devices": ids, "events": events,
            **({"active_rollouts": active} if active else {})}, conn=c)
    return RemoveResult(tuple(ids), events, active)


__all__ = ["AssignResult", "AssignmentChange", "RemoveResult", "assign_devices",
           "parse_assignments", "remove_devices"]
