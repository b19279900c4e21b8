"""Which devices a selector names, from the operator's records — and where what a device
reports about itself differs from them.

Group membership and tags that select devices are what the operator assigned (``edge-sdk
device set``, stored in ``device_assignments``), never what a device puts in its own
state: a device that claims ``groups: ["lobby"]`` is still in no group. Hardware facts
exist only as reported, so a selector uses them only when it says so (``hw.KEY[=VALUE]``),
and then only to narrow a selection the operator made by group, tag or device id: a
device cannot report its way into a rollout. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import UsageError
from ..transport import Topics

#: A tag of this prefix in a selector names a hardware fact the device reports.
HW_PREFIX = "hw."
#: Limits of an assignment (what the agent accepts for its own config's tags, too).
MAX_GROUPS = 32
MAX_TAGS = 32
TAG_KEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
TAG_VALUE = re.compile(r"[^\x00-\x1f\x7f]{0,128}")
#: Mismatch lines shown per device (the rest are counted), and characters per shown value.
MISMATCH_SHOWN = 8
_SHOWN_CHARS = 64


def split_tags(tags: Iterable[str]) -> tuple[list[str], list[str]]:
    """The operator tags of a selector, and its hardware filters (without ``hw.``)."""
    own, hw = [], []
    for t in tags:
        if t.startswith(HW_PREFIX):
            hw.append(t[len(HW_PREFIX):])
        else:
            own.append(t)
    return own, hw


#: What a rollout's selector may name.
SELECTOR_KEYS = ("groups", "tags", "devices")


def check_selector(fleet: str, selector: Mapping[str, Sequence[str]]) -> None:
    """Raise :class:`~edge_sdk.errors.UsageError` for a selector key other than
    :data:`SELECTOR_KEYS` or a value that is not a list of names, and
    :class:`~edge_sdk.errors.ConfigError` for a fleet, device or group id that cannot be
    one topic level (they become topics). Tags are matched as given."""
    unknown = sorted(set(selector) - set(SELECTOR_KEYS))
    if unknown:
        raise UsageError(f"unknown selector key(s) {', '.join(map(repr, unknown))} (a "
                         f"selector names {', '.join(SELECTOR_KEYS)})")
    for k, v in selector.items():
        if v and (isinstance(v, str | bytes) or not isinstance(v, Iterable)
                  or not all(isinstance(x, str) for x in v)):
            raise UsageError(f"selector {k}: a list of names, not {_shown(repr(v))}")
    topics = Topics(fleet)
    for d in selector.get("devices", ()):
        topics.device(d)
    for g in selector.get("groups", ()):
        topics.group_desired(g)


def _word(v: Any) -> str | None:
    """A scalar as a selector compares it (``true``, ``4``, ``aarch64``); None otherwise."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return json.dumps(v)
    return None


def tag_matches(tag: str, tags: Mapping[str, Any]) -> bool:
    """``KEY`` (present) or ``KEY=VALUE`` against a device's assigned tags."""
    k, sep, v = tag.partition("=")
    return k in tags and (not sep or _word(tags[k]) == v)


def hardware_matches(filters: Sequence[str], hardware: Mapping[str, Any]) -> bool:
    """Every key named holds one of the values given for it (``KEY`` alone: present); a
    list-valued fact (``cpu_features``) holds a value when it contains it."""
    wanted: dict[str, list[str | None]] = {}
    for f in filters:
        k, sep, v = f.partition("=")
        wanted.setdefault(k, []).append(v if sep else None)
    for k, values in wanted.items():
        if k not in hardware:
            return False
        if None in values:
            continue
        have = hardware[k]
        words = {_word(x) for x in have} if isinstance(have, list) else {_word(have)}
        if not words & set(values):
            return False
    return True


def operator_part(selector: Mapping[str, Sequence[str]]) -> bool:
    """Whether the selector names anything the operator assigns (a device id, a group, a
    tag that is not a hardware filter)."""
    own, _ = split_tags(selector.get("tags", ()))
    return bool(selector.get("devices") or selector.get("groups") or own)


def selects(selector: Mapping[str, Sequence[str]], dev: Mapping[str, Any]) -> bool:
    """Whether ``selector`` names ``dev``: its id is listed, or it is assigned one of the
    groups or tags — and, when the selector has ``hw.`` filters, its reported hardware
    passes them. ``dev``: ``id``, ``groups`` and ``tags`` (the operator's assignment),
    ``hardware`` (as reported)."""
    own, hw = split_tags(selector.get("tags", ()))
    chosen = (dev["id"] in selector.get("devices", ())
              or bool(set(selector.get("groups", ())) & set(dev["groups"]))
              or any(tag_matches(t, dev["tags"]) for t in own))
    return chosen and hardware_matches(hw, dev["hardware"])


def _shown(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def mismatch(assigned_groups: Sequence[str], assigned_tags: Mapping[str, str],
             reported_groups: Sequence[Any], reported_tags: Mapping[str, Any]) -> list[str]:
    """Where a device's report differs from its assignment, one short line each (at most
    :data:`MISMATCH_SHOWN`, then how many more). Reported values are the device's: any
    JSON, shown cut and as text."""
    out: list[str] = []
    assigned = set(assigned_groups)
    reported = {g for g in reported_groups if isinstance(g, str)}
    out += [f"reports group {_shown(g)} (not assigned)" for g in sorted(reported - assigned)]
    out += [f"assigned group {g} but does not follow it" for g in sorted(assigned - reported)]
    for k in sorted(set(reported_tags) | set(assigned_tags)):
        if k not in assigned_tags:
            out.append(f"reports tag {_shown(k)}={_shown(reported_tags[k])} (not assigned)")
        elif k not in reported_tags:
            out.append(f"assigned tag {k}={assigned_tags[k]} but does not report it")
        elif _word(reported_tags[k]) != assigned_tags[k]:
            out.append(f"reports tag {k}={_shown(reported_tags[k])}, assigned "
                       f"{k}={assigned_tags[k]}")
    if len(out) > MISMATCH_SHOWN:
        out = [*out[:MISMATCH_SHOWN], f"and {len(out) - MISMATCH_SHOWN} more"]
    return out
