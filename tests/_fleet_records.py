"""A fleet database for the fleet page's tests, filled as the host side fills it: agent-
shaped state and event reports ingested by the registry, and the operator's group and tag
assignments. A module takes the ``db`` fixture by assignment (``db = _fleet_records.db``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.fleet import AssignmentChange, FleetDB, assign_devices
from edge_sdk.fleet._registry import ingest_event, ingest_state

FLEET = "plant1"
HW = {"arch": "aarch64", "cpu": "Cortex-A72", "runtimes": {"onnxruntime": "1.32.0"}}


def state(device: str, version: str | None, *, groups: list[str], online: bool = True,
          result: str | None = None, counter: int | None = None,
          reason: str | None = None) -> bytes:
    """A retained state report shaped like the agent's ``snapshot()``."""
    last = None if result is None else {"result": result, "deployment": counter,
                                        "reason": reason}
    return json.dumps({
        "device": device, "fleet": FLEET, "online": online, "ts": time.time(),
        "model": None if version is None else {"name": "adder", "version": version,
                                               "sha256": "ab" * 32},
        "previous": None, "phase": "idle", "deployment": counter or 0,
        "last_update": last, "groups": groups, "hardware": HW, "tags": {"site": "north"},
        "queued_reports": 0, "dropped_reports": 0, "storage": {"ok": True},
    }).encode()


def event(device: str, kind: str, counter: int, version: str, **extra: Any) -> bytes:
    return json.dumps({"device": device, "fleet": FLEET, "event": kind, "ts": time.time(),
                       "deployment": {"counter": counter, "name": "adder",
                                      "artifact_version": version}, **extra}).encode()


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[FleetDB]:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as d:
        with d.begin() as c:
            for i in range(3):
                assert ingest_state(c, FLEET, f"cam-{i}", state(f"cam-{i}", "1",
                                                                groups=["cams"]))
            assert ingest_state(c, FLEET, "gate 1 ü", state("gate 1 ü", None,
                                                            groups=["gates"], online=False))
            assert ingest_state(c, "other", "elsewhere", state("elsewhere", "7",
                                                                groups=["cams"]))
            assert ingest_event(c, FLEET, "cam-0", event("cam-0", "downloaded", 5, "2"))
            assert ingest_event(c, FLEET, "cam-0", event(
                "cam-0", "rolled_back", 5, "2", reason="health window: 3 errors"))
            assert not ingest_state(c, FLEET, "cam-9", b"{not json")  # ignored, counted
        # The operator's assignment: what the group and tag filters and selectors use.
        north = AssignmentChange.parse(tags=["site=north"])
        assign_devices(d, fleet=FLEET, actor="tester", changes={
            **{f"cam-{i}": north.merged(AssignmentChange(("cams",))) for i in range(3)},
            "gate 1 ü": north.merged(AssignmentChange(("gates",)))})
        assign_devices(d, fleet="other", actor="tester",
                       changes={"elsewhere": AssignmentChange(("cams",))})
        yield d
