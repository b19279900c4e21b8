"""A device is in one active rollout at a time, and the older rollout keeps it: each device
has one retained ``desired`` topic, so a second rollout's document would replace the
first's, which would then time out, count the device as silent and abort. ``rollout
start`` refuses a selection another active rollout holds; the controller never adds to a
rollout a device an older active one holds (a device registered after both started)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import Controller, FleetDB, FleetUsageError, RolloutSpec, start_rollout
from edge_sdk.fleet._machine import DeviceProgress, RolloutState, holders, holds
from edge_sdk.fleet._registry import write_state
from edge_sdk.fleet._store import load_state, save_state
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _fleetdb
from tests._broker import Mosquitto

db_url = _fleetdb.db_url  # the fixture: one empty database per engine
FLEET = "lab"
SPEC = RolloutSpec(waves=("100%",), wave_timeout=60)


def _registered(db: FleetDB, *devices: str) -> None:
    for d in devices:
        with db.begin() as c:
            write_state(c, FLEET, d, json.dumps({
                "online": True, "model": {"name": "det", "version": "1"}}).encode())


def _progress(db: FleetDB, rid: int, status: str, **devices: str) -> None:
    """Put rollout ``rid`` in ``status`` with each device at its given status, as the
    controller would have (nothing here is signed or sent)."""
    with db.begin() as c:
        st = load_state(c, rid)
        old = load_state(c, rid)
        st.status, st.wave, st.waves = status, 1, 1
        for d, s in devices.items():
            st.devices[d] = DeviceProgress(1, status=s, counter=None, sent_at=time.time(),
                                           before_model="det", before_version="1",
                                           before_models={st.model: None})
        save_state(c, st, old)


def test_a_rollout_of_devices_another_active_rollout_holds_is_refused_in_one_line(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1", "d2", "d3", "d4", "d5")
        _fleetdb.assign(db_url, FLEET, ["d1", "d2", "d3", "d4", "d5"], "cams")
        first = start_rollout(db, fleet=FLEET, model="det", version="2",
                              selector={"groups": ["cams"]}, spec=SPEC, actor="alice")
        # Not planned yet: it holds every device it selects.
        with pytest.raises(FleetUsageError) as err:
            start_rollout(db, fleet=FLEET, model="rec", version="5",
                          selector={"groups": ["cams"]}, spec=SPEC, actor="bob")
        assert str(err.value) == (
            f"5 selected device(s) (d1, d2, d3 and 2 more) are in active rollout(s) "
            f"#{first}, and a device is in one active rollout at a time: update several "
            "models together with one set rollout (--model A=1 --model B=2), or wait for "
            f"#{first} to finish or abort it ('edge-sdk rollout abort {first}')")
        # Planned, some sent: the one selected device it holds is enough.
        _progress(db, first, "running", d1="sent", d2="pending", d3="pending",
                  d4="pending", d5="pending")
        capsys.readouterr()
        assert main(["rollout", "start", "--db", db_url, "--operator", "bob", "--fleet",
                     FLEET, "--device", "d1", "--model", "rec=5"]) == 2
        got = capsys.readouterr().err.strip().splitlines()
        assert len(got) == 1 and f"active rollout(s) #{first}" in got[0], got
        assert len(db.rollouts()) == 1


def test_a_device_whose_part_in_an_active_rollout_is_over_may_be_selected_again(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1", "d2")
        first = start_rollout(db, fleet=FLEET, model="det", version="2",
                              selector={"devices": ["d1", "d2"]}, spec=SPEC, actor="alice")
        # d1 failed (it rolled back itself: an abort sends it nothing), d2 is still sent.
        _progress(db, first, "running", d1="failed", d2="sent")
        start_rollout(db, fleet=FLEET, model="rec", version="5",
                      selector={"devices": ["d1"]}, spec=SPEC, actor="bob")
        with pytest.raises(FleetUsageError, match=r"1 selected device\(s\) \(d2\)"):
            start_rollout(db, fleet=FLEET, model="rec", version="5",
                          selector={"devices": ["d2"]}, spec=SPEC, actor="bob")
        # Once it ended, the rollout holds no one.
        _progress(db, first, "completed", d2="committed")
        start_rollout(db, fleet=FLEET, model="rec", version="5",
                      selector={"devices": ["d2"]}, spec=SPEC, actor="bob")


@pytest.mark.parametrize(("status", "device", "rollback", "held"), [
    ("running", "pending", None, True),
    ("running", "sent", None, True),
    ("running", "committed", None, True),  # an abort would send it back
    ("running", "silent", None, True),
    ("paused", "committed", None, True),
    ("running", "failed", None, False),  # it went back itself: nothing more is sent
    ("running", "refused", None, False),
    ("aborting", "committed", "sent", True),
    ("aborting", "committed", "committed", False),
    ("aborting", "cancelled", None, False),
    ("completed", "committed", None, False),
    ("aborted", "committed", "sent", False),
])
def test_a_rollout_holds_a_device_while_it_may_still_send_it_a_document(
        status: str, device: str, rollback: str | None, held: bool) -> None:
    st = RolloutState(1, "det", "2", SPEC, status=status, wave=1, waves=1, devices={
        "d1": DeviceProgress(1, status=device, rollback_status=rollback,
                             before_models={"det": "1"})})
    assert holds(st, "d1") is held
    newer = RolloutState(2, "rec", "5", SPEC, status="running", wave=1, waves=1,
                         devices={"d1": DeviceProgress(1, before_models={"rec": None})})
    assert holders([newer, st]) == {"d1": 1 if held else 2}


def test_a_rollout_without_rollback_lets_go_of_a_device_once_it_answered() -> None:
    spec = RolloutSpec(waves=("100%",), wave_timeout=60, rollback=False)
    st = RolloutState(1, "det", "2", spec, status="running", wave=1, waves=1, devices={
        "d1": DeviceProgress(1, status="committed", before_models={"det": "1"})})
    assert not holds(st, "d1")


@pytest.fixture()
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", tmp_path / "keys")


@pytest.fixture()
def conn(shared_broker: Mosquitto) -> Iterator[MqttConnection]:
    c = MqttConnection(MqttConfig(url=shared_broker.url, fleet=FLEET), name="ctl-overlap")
    c.connect()
    yield c
    c.close()


def _door_and_gate_rollouts(db: FleetDB, db_url: str) -> tuple[int, int]:
    """d1 in group door and d2 in gate, and two rollouts started in that order: det for
    door (the older) and rec for gate (the newer)."""
    _registered(db, "d1", "d2")
    _fleetdb.assign(db_url, FLEET, ["d1"], "door")
    _fleetdb.assign(db_url, FLEET, ["d2"], "gate")
    older = start_rollout(db, fleet=FLEET, model="det", version="2",
                          selector={"groups": ["door"]}, spec=SPEC, actor="alice")
    newer = start_rollout(db, fleet=FLEET, model="rec", version="5",
                          selector={"groups": ["gate"]}, spec=SPEC, actor="bob")
    return older, newer


def test_a_device_registered_after_two_rollouts_started_goes_to_the_older_only(
        db_url: str, repo: Repository, conn: MqttConnection,
        caplog: pytest.LogCaptureFixture) -> None:
    with FleetDB.open(db_url) as db:
        older, newer = _door_and_gate_rollouts(db, db_url)
        # Both paused (nothing is signed), which still takes in devices that join.
        _progress(db, older, "paused", d1="sent")
        _progress(db, newer, "paused", d2="sent")
        _registered(db, "d3")
        _fleetdb.assign(db_url, FLEET, ["d3"], "door", "gate")
        ctl = Controller(db, repo, conn, topics=Topics(FLEET))
        ctl.poll()
        ctl.poll()

        def devices(rid: int) -> set[str]:
            return {d["device"] for d in db.rollout(rid)["devices"]}

        assert (devices(older), devices(newer)) == ({"d1", "d3"}, {"d2"})
        said = [r.getMessage() for r in caplog.records if "leaves device" in r.getMessage()]
        assert said == [f"rollout {newer} leaves device 'd3' out while rollout {older} "
                        "holds it (a device is in one active rollout at a time)"]
        # The older one ends: a later poll gives d3 to the newer one.
        _progress(db, older, "completed", d1="committed", d3="committed")
        ctl.poll()
        assert devices(newer) == {"d2", "d3"}


def test_a_fresh_controller_leaves_a_device_with_the_newer_rollout_that_holds_it(
        db_url: str, repo: Repository, conn: MqttConnection) -> None:
    """A device that registered between the older rollout's poll and the newer one's went
    to the newer; a controller started afterwards, which has loaded neither, does not
    give it to the older one as well."""
    with FleetDB.open(db_url) as db:
        older, newer = _door_and_gate_rollouts(db, db_url)
        _registered(db, "d3")
        _fleetdb.assign(db_url, FLEET, ["d3"], "door", "gate")
        _progress(db, older, "paused", d1="sent")
        _progress(db, newer, "paused", d2="sent", d3="sent")
        Controller(db, repo, conn, topics=Topics(FLEET)).poll()
        assert {d["device"] for d in db.rollout(older)["devices"]} == {"d1"}
