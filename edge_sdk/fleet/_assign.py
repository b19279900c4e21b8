"""The operator's assignment of a device: the groups and tags that select it, as
``edge-sdk device set`` and an assignment file give them (:class:`AssignmentChange`,
:func:`parse_assignments`), and the checks on ids, groups and tags. Applying them is the
operator API's (:func:`._manage.assign_devices`, :func:`._manage.remove_devices`): many
devices in one transaction with one audit entry, the whole request refused when any part
of it is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeError
from ..transport._config import check_topic_word
from ._select import HW_PREFIX, TAG_KEY, TAG_VALUE
from ._store import FleetUsageError

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


def device_id(d: str) -> str:
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
            dev = device_id(dev)
            out[dev] = out[dev].merged(change) if dev in out else change
        except FleetUsageError as err:
            raise FleetUsageError(f"{source} line {n}: {err}") from None
    return out


__all__ = ["AssignmentChange", "device_id", "parse_assignments"]
