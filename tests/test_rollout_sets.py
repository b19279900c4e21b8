"""Rollouts of a set of models: the record of a set rollout and of each device's models
before it, saved and loaded (rows saved before sets existed load too), and the operator
API's checks of a set."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB, FleetUsageError, RolloutSpec, start_rollout
from edge_sdk.fleet._machine import DeviceProgress
from edge_sdk.fleet._registry import write_state
from edge_sdk.fleet._store import load_state, save_state
from tests import _fleetdb

db_url = _fleetdb.db_url  # the fixture: one empty database per engine
FLEET = "lab"
SPEC = RolloutSpec(waves=("100%",), wave_timeout=60)


def _registered(db: FleetDB, *devices: str, version: str = "1") -> None:
    for d in devices:
        with db.begin() as c:
            write_state(c, FLEET, d, json.dumps({
                "online": True, "model": {"name": "det", "version": version}}).encode())


def test_a_set_rollout_and_each_device_before_per_model_survive_a_reload(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1", "d2")
        rid = start_rollout(db, fleet=FLEET, models=[("det", "2"), ("rec", "5")],
                            selector={"devices": ["d1", "d2"]}, spec=SPEC, actor="alice")
        with db.begin() as c:
            st = load_state(c, rid)
            assert (st.model, st.version, st.models) == ("det", "2", (("det", "2"),
                                                                       ("rec", "5")))
            st.devices = {"d1": DeviceProgress(1, before_model="det", before_version="1",
                                               before_models={"det": "1", "rec": None})}
            save_state(c, st, None)
        with db.read() as c:
            again = load_state(c, rid)
        assert again.models == st.models and again.wanted() == {"det": "2", "rec": "5"}
        assert again.devices["d1"].before_models == {"det": "1", "rec": None}
        assert db.rollout(rid)["model"] == "det"  # old readers see its first model


def test_a_rollout_row_saved_before_sets_loads_as_its_one_model(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1")
        rid = start_rollout(db, fleet=FLEET, model="det", version="2",
                            selector={"devices": ["d1"]}, spec=SPEC, actor="alice")
        with db.begin() as c:
            st = load_state(c, rid)
            st.devices = {"d1": DeviceProgress(1, before_model="det", before_version="1")}
            save_state(c, st, None)
            # As an older edge-sdk left it: no machine models, no before_models.
            c.execute(sa.text("UPDATE rollouts SET machine = '{}'"))
            c.execute(sa.text("UPDATE rollout_devices SET before_models = NULL"))
        with db.read() as c:
            st = load_state(c, rid)
        assert st.models == () and st.wanted() == {"det": "2"}
        assert st.before("d1") == {"det": "1"}


@pytest.mark.parametrize(("models", "why"), [
    ([("det", "2"), ("det", "3")], "named twice"),
    ([(f"m{i}", "1") for i in range(17)], "at most 16"),
    ([("det", "")], "its version"),
])
def test_a_set_rollout_that_cannot_be_signed_is_refused_before_it_is_recorded(
        db_url: str, models: list[tuple[str, str]], why: str) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1")
        with pytest.raises(FleetUsageError, match=why):
            start_rollout(db, fleet=FLEET, models=models, selector={"devices": ["d1"]},
                          spec=SPEC, actor="alice")
        assert db.rollouts() == []


def test_a_set_rollout_that_downgrades_one_of_its_models_needs_rollback(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1", version="3")
        with pytest.raises(FleetUsageError, match="det 2 for 1 selected device"):
            start_rollout(db, fleet=FLEET, models=[("rec", "9"), ("det", "2")],
                          selector={"devices": ["d1"]}, spec=SPEC, actor="alice")


def test_rollout_start_records_a_set_and_says_each_model(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with FleetDB.open(db_url) as db:
        _registered(db, "d1")
    base = ["rollout", "start", "--db", db_url, "--operator", "alice", "--fleet", FLEET,
            "--device", "d1", "--model", "det=2"]
    capsys.readouterr()
    assert main([*base, "--model", "rec"]) == 2  # no --repo to find rec's newest
    assert capsys.readouterr().err.strip().splitlines() == [
        "edge-sdk: error: name the version of rec (--model rec=VERSION, or --repo to take "
        "the newest release)"]
    assert main([*base, "--model", "rec=5"]) == 0
    assert "det 2, rec 5 recorded" in capsys.readouterr().out
    with FleetDB.open(db_url) as db:
        rid = int(db.rollouts()[0]["id"])
    assert main(["rollout", "status", str(rid), "--db", db_url]) == 0
    assert capsys.readouterr().out.startswith(f"rollout {rid}: det 2, rec 5 pending")
