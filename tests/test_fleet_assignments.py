"""Groups and tags come from the operator, not from a device's report: the selection rule
against what devices claim about themselves in their retained state, and ``edge-sdk device
set|remove`` (bulk, audit-logged) on both database engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import (
    AssignmentChange,
    FleetDB,
    FleetUsageError,
    RolloutSpec,
    assign_devices,
    start_rollout,
)
from edge_sdk.fleet._members import members
from edge_sdk.fleet._registry import ingest_event, ingest_state
from edge_sdk.fleet._web import FleetApi
from tests import _fleetdb

db_url = _fleetdb.db_url
FLEET = "lab"
HW = {"arch": "aarch64", "cores": 4, "cpu_features": ["asimd", "asimddp"]}


def state(*, groups: Any = (), tags: Any = None, hardware: Any = None,
          version: str = "1") -> bytes:
    return json.dumps({"online": True, "model": {"name": "adder", "version": version},
                       "phase": "idle", "groups": list(groups), "tags": tags or {},
                       "hardware": HW if hardware is None else hardware}).encode()


def register(db: FleetDB, device: str, payload: bytes) -> None:
    with db.begin() as c:
        assert ingest_state(c, FLEET, device, payload)


def change(*groups: str, tags: tuple[str, ...] = ()) -> AssignmentChange:
    return AssignmentChange.parse(groups=groups, tags=tags)


@pytest.fixture()
def fleet_db(db_url: str) -> Any:
    """Two honest devices the operator put in ``lobby`` at ``site=berlin``, one honest
    device elsewhere, and one that claims the group, the tag and the hardware itself."""
    with FleetDB.open(db_url) as db:
        for d in ("cam-1", "cam-2"):
            register(db, d, state(groups=["lobby"], tags={"site": "berlin"}))
        register(db, "cam-3", state(hardware={**HW, "arch": "x86_64"}))
        register(db, "aa-intruder", state(groups=["lobby"], tags={"site": "berlin"}))
        assign_devices(db, fleet=FLEET, actor="op", changes={
            "cam-1": change("lobby", tags=("site=berlin",)),
            "cam-2": change("lobby", tags=("site=berlin",)),
            "cam-3": change("door", tags=("site=paris",))})
        yield db


def test_device_claiming_a_group_or_a_tag_in_its_state_is_selected_by_neither(
        fleet_db: FleetDB) -> None:
    db = fleet_db
    assert set(members(db, FLEET, {"groups": ["lobby"]})) == {"cam-1", "cam-2"}
    assert set(members(db, FLEET, {"tags": ["site=berlin"]})) == {"cam-1", "cam-2"}
    assert set(members(db, FLEET, {"tags": ["site"]})) == {"cam-1", "cam-2", "cam-3"}
    # The group filters of the page and the CLI read the assignment too.
    assert [d["id"] for d in db.devices(fleet=FLEET, group="lobby")] == ["cam-1", "cam-2"]
    assert [d["id"] for d in db.devices(fleet=FLEET, tag="site=berlin")] == ["cam-1", "cam-2"]
    # Named by the operator, a device is in whatever it reports.
    assert set(members(db, FLEET, {"devices": ["aa-intruder"]})) == {"aa-intruder"}


def test_only_claims_select_no_one_and_say_so(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        register(db, "aa-intruder", state(groups=["kiosk"], tags={"site": "rome"}))
        for sel in ({"groups": ["kiosk"]}, {"tags": ["site=rome"]}):
            assert members(db, FLEET, sel) == {}
            with pytest.raises(FleetUsageError, match=r"matches no device registered in fleet "
                               r"'lab'; 1 device\(s\) report it about themselves "
                               r"\(aa-intruder\)"):
                start_rollout(db, fleet=FLEET, model="adder", version="2", selector=sel,
                              spec=RolloutSpec(), actor="op")
        assert db.rollouts() == [] and db.audit() == []


def test_hardware_facts_only_narrow_what_the_operator_selected(fleet_db: FleetDB) -> None:
    db = fleet_db
    both = {"groups": ["lobby", "door"]}
    assert set(members(db, FLEET, both)) == {"cam-1", "cam-2", "cam-3"}
    assert set(members(db, FLEET, {**both, "tags": ["hw.arch=aarch64"]})) == {"cam-1",
                                                                               "cam-2"}
    # Values of one key are alternatives; a list-valued fact holds what it contains.
    assert set(members(db, FLEET, {**both, "tags": ["hw.arch=aarch64", "hw.arch=x86_64"]})
               ) == {"cam-1", "cam-2", "cam-3"}
    assert set(members(db, FLEET, {**both, "tags": ["hw.cpu_features=asimddp",
                                                    "hw.cores=4", "hw.arch=x86_64"]})
               ) == {"cam-3"}
    assert members(db, FLEET, {**both, "tags": ["hw.arch=riscv64"]}) == {}
    # Reported hardware alone would let any device in: refused, and selects no one.
    assert members(db, FLEET, {"tags": ["hw.arch=aarch64"]}) == {}
    with pytest.raises(FleetUsageError, match="names only hardware facts"):
        start_rollout(db, fleet=FLEET, model="adder", version="2",
                      selector={"tags": ["hw.arch=aarch64"]}, spec=RolloutSpec(), actor="op")
    # A listing may filter by a reported fact (it selects nothing).
    assert [d["id"] for d in db.devices(fleet=FLEET, tag="hw.arch=x86_64")] == ["cam-3"]


def test_what_a_device_reports_is_shown_as_reported_and_a_mismatch_is_flagged(
        fleet_db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = fleet_db
    register(db, "cam-2", state(groups=["lobby", "vip"], tags={"site": {"x": {"toString": 1}}}))
    devs = {d["id"]: d for d in db.devices(fleet=FLEET)}
    assert devs["cam-1"]["mismatch"] == []
    assert (devs["cam-1"]["groups"], devs["cam-1"]["tags"]) == (["lobby"], {"site": "berlin"})
    intruder = devs["aa-intruder"]
    assert (intruder["groups"], intruder["tags"], intruder["assigned"]) == ([], {}, None)
    assert intruder["reported_groups"] == ["lobby"]
    assert intruder["reported_tags"] == {"site": "berlin"}
    assert intruder["mismatch"] == ["reports group lobby (not assigned)",
                                    "reports tag site=berlin (not assigned)"]
    assert devs["cam-2"]["mismatch"] == [
        "reports group vip (not assigned)",
        'reports tag site={"x": {"toString": 1}}, assigned site=berlin']
    assert devs["cam-3"]["mismatch"] == ["assigned group door but does not follow it",
                                         "assigned tag site=paris but does not report it"]
    api = FleetApi(db, fleet=FLEET)
    status, _, body = api.handle("GET", "/api/devices/aa-intruder")
    doc = json.loads(body)["device"]
    assert status == 200 and doc["reported_groups"] == ["lobby"] and doc["groups"] == []
    capsys.readouterr()
    assert main(["status", "--db", db_url, "--fleet", FLEET]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("aa-", "cam"))}
    assert rows["cam-1"][:3] == ["cam-1", "yes", "lobby"]
    assert rows["aa-intruder"][:3] == ["aa-intruder", "yes", "-!"]
    assert "3 device(s) report groups or tags other than the operator assigned" in out
    assert "  aa-intruder: reports group lobby (not assigned); reports tag site=berlin" in out


def test_device_set_assigns_many_devices_in_one_audit_entry(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", db_url, "--fleet", FLEET, "--operator", "olga"]
    f = tmp_path / "devices.txt"
    f.write_text("# from provisioning\n" + "".join(f"sim-{i:04d}:lobby,door line=3\n"
                                                   for i in range(1000)) + "\ncam-1\n")
    assert main(["device", "set", "--file", str(f), "cam-2", "--tag", "site=berlin", *db]) == 0
    out = capsys.readouterr().out
    assert "1002 of 1002 device(s) changed in fleet 'lab'; 1002 not registered yet" in out
    with FleetDB.open(db_url) as fdb:
        got = {d["id"]: (d["groups"], d["tags"]) for d in fdb.devices(fleet=FLEET)}
        assert len(got) == 1002 and not any(d["registered"] for d in fdb.devices())
        assert got["sim-0999"] == (["door", "lobby"], {"line": "3", "site": "berlin"})
        assert got["cam-1"] == got["cam-2"] == ([], {"site": "berlin"})
        [entry] = fdb.audit()
        assert (entry["actor"], entry["action"]) == ("olga", "device.set")
        assert entry["params"]["count"] == 1002 and entry["params"]["file"] == str(f)
        assert entry["params"]["devices"]["sim-0000"] == {"groups": ["door", "lobby"],
                                                          "tags": {"line": "3", "site": "berlin"}}
    # Remove a group and a tag, add another; then replace: exactly what is given.
    assert main(["device", "set", "sim-0000", "sim-0001", "--remove-group", "door",
                 "--remove-tag", "line", "--group", "kiosk", *db]) == 0
    assert main(["device", "set", "sim-0002", "--replace", "--group", "solo", *db]) == 0
    assert main(["device", "set", "sim-0002", "--group", "solo", *db]) == 0  # no change
    assert "0 of 1 device(s) changed" in capsys.readouterr().out
    with FleetDB.open(db_url) as fdb:
        assert fdb.device("sim-0001")["groups"] == ["kiosk", "lobby"]  # type: ignore[index]
        assert fdb.device("sim-0001")["tags"] == {"site": "berlin"}  # type: ignore[index]
        assert fdb.device("sim-0002")["groups"] == ["solo"]  # type: ignore[index]
        assert fdb.device("sim-0002")["tags"] == {}  # type: ignore[index]
        assert [a["action"] for a in fdb.audit()] == ["device.set"] * 3
        before = fdb.devices()
    # Every mistake is one line, exit 2, and nothing is written.
    bad = tmp_path / "bad.txt"
    bad.write_text("ok-1:lobby\nok-2:lob.by\n")
    for args, why in (
            (["--file", str(bad)], "bad.txt line 2: group 'lob.by'"),
            (["cam-1", "--tag", "hw.arch=aarch64"], "'hw.' is reserved"),
            (["cam-1", "--tag", "site"], "must look like KEY=VALUE"),
            (["cam-1", "--group", "a", "--remove-group", "a"], "both added and removed"),
            (["cam/1", "--group", "a"], "device id 'cam/1'"),
            (["cam-1"], "nothing to change for cam-1"),
            (["cam-1", *[a for i in range(33) for a in ("--group", f"g{i}")]], "at most 32"),
    ):
        assert main(["device", "set", *args, *db]) == 2, args
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, (args, err)
    with FleetDB.open(db_url) as fdb:
        assert fdb.devices() == before and len(fdb.audit()) == 3


def test_device_remove_deletes_row_assignment_and_history_and_a_returning_device_is_unassigned(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", db_url, "--fleet", FLEET, "--operator", "olga"]
    with FleetDB.open(db_url) as fdb:
        register(fdb, "cam-1", state(groups=["lobby"]))
        register(fdb, "cam-2", state(groups=["lobby"]))
        with fdb.begin() as c:
            assert ingest_event(c, FLEET, "cam-1", b'{"event": "failed", "reason": "x"}')
    assert main(["device", "set", "cam-1", "cam-2", "--group", "lobby", *db]) == 0
    capsys.readouterr()
    assert main(["device", "remove", "cam-1", "cam-9", *db]) == 2  # all or nothing
    assert "no device cam-9 in fleet 'lab'; nothing removed" in capsys.readouterr().err
    assert main(["device", "remove", "cam-1", *db]) == 0
    assert "removed 1 device(s) from fleet 'lab' (2 history rows)" in capsys.readouterr().out
    with FleetDB.open(db_url) as fdb:
        assert fdb.device("cam-1") is None and fdb.device_history("cam-1") == []
        assert [d["id"] for d in fdb.devices(group="lobby")] == ["cam-2"]
        entry = fdb.audit()[-1]
        assert (entry["actor"], entry["action"], entry["params"]) == (
            "olga", "device.remove", {"fleet": FLEET, "devices": ["cam-1"], "events": 2})
        # It reports again: back in the registry, in no group, its claim flagged.
        register(fdb, "cam-1", state(groups=["lobby"]))
        d = fdb.device("cam-1")
        assert d is not None and d["groups"] == [] and d["assigned"] is None
        assert d["mismatch"] == ["reports group lobby (not assigned)"]
        assert set(members(fdb, FLEET, {"groups": ["lobby"]})) == {"cam-2"}
