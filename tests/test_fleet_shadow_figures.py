"""A device's shadow run as the host keeps and shows it: the registry stores the last
reported shadow block (or the figures of its last shadow result) in ``devices.shadow``,
bounded whatever the device sent; ``edge-sdk status``, the JSON API and the rollout
record show the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._registry import ingest_state
from edge_sdk.fleet._web import FleetApi
from edge_sdk.quality import ShadowFigures
from tests._shadow_records import GATE, RUNNING, gated_rollout, state

FLEET = "plant"


@pytest.fixture()
def db(tmp_path: Path) -> Any:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as d:
        yield d


def _get(api: FleetApi, target: str) -> Any:
    status, _, body = api.handle("GET", target)
    assert status == 200, body
    return json.loads(body)


def test_a_running_shadow_is_kept_and_shown_by_status_and_the_api(
        db: FleetDB, capsys: pytest.CaptureFixture[str]) -> None:
    with db.begin() as c:
        assert ingest_state(c, FLEET, "cam-1", state("cam-1", shadow=RUNNING))
        assert ingest_state(c, FLEET, "cam-2", state("cam-2", shadow=None))
    got = db.device("cam-1", fleet=FLEET)
    assert got is not None
    sh = got["shadow"]
    assert (sh["deployment"], sh["model"], sh["version"], sh["status"]) == (
        7, "det", "2", "running")
    assert (sh["compared"], sh["agreement"], sh["worst"], sh["latency_ratio"]) == (
        20, 0.95, 0.4, 1.5)
    assert db.device("cam-2", fleet=FLEET)["shadow"] is None  # type: ignore[index]
    api = FleetApi(db, fleet=FLEET)
    assert _get(api, "/api/devices/cam-1")["device"]["shadow"]["agreement"] == 0.95
    assert [d["shadow"] is not None for d in _get(api, "/api/devices")] == [True, False]
    capsys.readouterr()
    assert main(["status", "--db", db.url, "--fleet", FLEET]) == 0
    out = capsys.readouterr().out
    assert ("shadow: cam-1 det 2 running: agreement 0.95 over 20, worst 0.4 "
            "(class 3 -> 5), latency 1.50x (#7)") in out
    assert "shadow: cam-2" not in out


def test_after_the_run_the_last_shadow_results_figures_are_kept(db: FleetDB) -> None:
    figures = ShadowFigures(compared=500, agreed=500).to_json()
    with db.begin() as c:
        assert ingest_state(c, FLEET, "cam-1", state("cam-1", shadow=RUNNING))
        assert ingest_state(c, FLEET, "cam-1", state("cam-1", shadow=None, results=[
            {"deployment": 7, "result": "shadow_passed", "reason": "gate passed",
             "models": ["det"], "shadow": figures},
            {"deployment": 8, "result": "committed", "models": ["det"]}]))
    got = db.device("cam-1", fleet=FLEET)
    assert got is not None
    sh = got["shadow"]
    assert (sh["deployment"], sh["result"], sh["compared"], sh["agreement"]) == (
        7, "shadow_passed", 500, 1.0)
    # The controller reads the figures beside the result.
    assert got["results"][0]["shadow"] == figures and "shadow" not in got["results"][1]


@pytest.mark.parametrize("block", [
    {"deployment": -1, "model": "m" * 10_000, "version": ["x"], "started": "soon",
     "status": "\x1b[31mred", "figures": {"compared": 10**40, "agreed": -5,
                                          "worst": 7, "worst_detail": "d" * 10_000,
                                          "serving_ms_p50": "fast", "extra": [0] * 99}},
    {"figures": "not figures"},
    {"deployment": True, "figures": None},
])
def test_a_hostile_shadow_block_is_stored_bounded(
        db: FleetDB, capsys: pytest.CaptureFixture[str], block: dict[str, Any]) -> None:
    with db.begin() as c:
        assert ingest_state(c, FLEET, "cam-1", state("cam-1", shadow=block))
    got = db.device("cam-1", fleet=FLEET)
    assert got is not None
    sh = got["shadow"]
    assert len(json.dumps(sh)) < 2000
    assert sh["deployment"] is None and sh["version"] is None
    assert "extra" not in sh["figures"]
    if isinstance(block.get("figures"), dict):
        assert sh["figures"]["compared"] <= 2**53 and sh["figures"]["agreed"] == 0
        assert sh["worst"] == 1.0 and len(sh["worst_detail"]) == 200
        assert sh["status"] is None and len(sh["model"]) == 256
    capsys.readouterr()
    assert main(["status", "--db", db.url, "--fleet", FLEET]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("shadow:")]
    assert len(line) == 1 and line[0].isprintable() and len(line[0]) < 1000


def test_a_rollouts_record_shows_each_devices_shadow_figures_and_each_waves(
        db: FleetDB) -> None:
    rid = gated_rollout(db, FLEET)
    r = _get(FleetApi(db, fleet=FLEET), f"/api/rollouts/{rid}")
    assert r["gate"] == {"text": "agreement>=0.99 over 100 requests within 1h",
                         "gate": GATE.to_json(), "no_traffic": "skip"}
    assert r["progress"][0]["shadow"] == {"shadowing": 1, "passed": 1, "failed": 1}
    by = {d["device"]: d for d in r["devices"]}
    assert by["cam-1"]["outcome"] == "shadowing" and by["cam-1"]["shadow"]["compared"] is None
    assert by["cam-2"]["outcome"] == "gate_failed"
    assert by["cam-2"]["shadow"]["agreement"] == 0.5
    assert by["cam-2"]["shadow"]["verdict"] == "failed"
    assert by["cam-3"]["shadow"]["stage"] == "passed"
    assert by["cam-3"]["shadow"]["latency_ratio"] == 1.25
    assert [f["device"] for f in r["failures"]] == ["cam-2"]
