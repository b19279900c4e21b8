"""Which registered devices a rollout's selector names (read on every controller poll,
and when a rollout is started)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import EdgeError
from ..transport._config import check_topic_word
from . import _machine as m
from ._select import operator_part, selects, split_tags
from ._store import FleetDB, selectable_devices

log = logging.getLogger("edge_sdk.fleet.controller")


def matches(selector: Mapping[str, Any], dev: Mapping[str, Any]) -> bool:
    """A device matches when it is named, or the operator assigned it one of the groups or
    tags (``KEY`` or ``KEY=VALUE``); ``hw.KEY[=VALUE]`` tags then narrow that to the
    devices whose reported hardware facts match (see :mod:`._select`). What a device
    reports about its own groups and tags never selects it."""
    return selects(selector, dev)


_UNDEPLOYABLE_WARNED: set[str] = set()


def _deployable(device: str) -> bool:
    """False (with one warning per id) for a registered id no deployment can name: a '.'
    or another character an older agent accepted, which would fail the signing of the
    whole wave it landed in."""
    try:
        check_topic_word(device, "device id")
    except EdgeError as err:
        if device not in _UNDEPLOYABLE_WARNED and len(_UNDEPLOYABLE_WARNED) < 1000:
            _UNDEPLOYABLE_WARNED.add(device)
            log.warning("rollouts leave device %r out: %s", device, err)
        return False
    return True


def members(db: FleetDB, fleet: str, selector: Mapping[str, Any], *,
            model: str | None = None) -> dict[str, m.Member]:
    """The registered devices of ``fleet`` that ``selector`` names (:func:`matches`).

    Each with the model a rollout of ``model`` changes: that model and the device's
    version of it (None, None when it serves no such model); without ``model``, the
    model the device swapped in last."""
    if not operator_part(selector):
        return {}  # hardware facts alone select no one: a device could claim any
    hw = bool(split_tags(selector.get("tags", ()))[1])
    out: dict[str, m.Member] = {}
    for dev in selectable_devices(db, fleet, hardware=hw):
        if _deployable(dev["id"]) and matches(selector, dev):
            got = dev.get("models")  # each model the registry keeps: name -> version
            versions = dict(got) if isinstance(got, Mapping) else None
            if model is None:
                out[dev["id"]] = m.Member(dev["online"], dev["model"], dev["version"],
                                          versions)
                continue
            version = (versions or {}).get(model)
            out[dev["id"]] = m.Member(dev["online"], None if version is None else model,
                                      version, versions)
    return out


def leave_out_held(found: Mapping[str, m.Member], state: m.RolloutState,
                   held: Mapping[str, int], warned: set[tuple[str, int]],
                   ) -> dict[str, m.Member]:
    """``found`` (rollout ``state``'s members) without the devices it has not taken yet
    that another active rollout holds (``held``: device -> that rollout, see
    :func:`~._machine.holders`): a device has one ``desired`` topic, so it is in one
    active rollout at a time. One warning per device and rollout: ``warned`` keeps which
    (at most 1000)."""
    out: dict[str, m.Member] = {}
    for d, mem in found.items():
        other = held.get(d)
        if other is None or other == state.id or d in state.devices:
            out[d] = mem
            continue
        key = (d, state.id)
        if key not in warned and len(warned) < 1000:
            warned.add(key)
            log.warning("rollout %d leaves device %r out while rollout %d holds it (a "
                        "device is in one active rollout at a time)", state.id, d, other)
    return out
