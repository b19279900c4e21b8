"""Input drift on the host: heartbeats' histograms judged against the reference of the
version each device serves (the device's own PSI is never trusted), hostile drift blocks
bounded or refused, and what ``status``, its ``--drifting`` filter and the API show."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB, FleetServer
from edge_sdk.fleet._drift import MAX_INPUTS, MAX_MODELS, DriftJudge, drift_line
from edge_sdk.fleet._registry import ingest_event, write_state
from edge_sdk.fleet._web import FleetApi
from edge_sdk.quality import DriftConfig, Reference, reference_stats
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection
from tests._broker import Mosquitto
from tests._drift_rig import analysed, drift_agent, drift_artifact, evaluation_like, infer
from tests._hostile import state_report
from tests._process import wait_for

FLEET = "lab"
REF = Reference.from_json(json.loads(json.dumps(
    reference_stats(evaluation_like(400, seed=1))["x"])))
assert REF is not None


def _refs(name: str, version: str) -> Mapping[str, Reference] | None:
    return {"x": REF} if (name, version) == ("adder", "1") else {}  # type: ignore[dict-item]


JUDGE = DriftJudge(DriftConfig(), _refs)


def _block(shift: float, n: int = 300, seed: int = 5) -> dict[str, Any]:
    """What an agent reports for input x after ``n`` requests (device_agent._drift)."""
    assert REF is not None
    acc = REF.accumulator()
    for f in evaluation_like(n, seed=seed, shift=shift):
        acc.add(f["x"])
    return {"n": acc.samples, "channels": acc.channels()}


def _beat(drift: object, version: str = "1", **extra: object) -> bytes:
    return json.dumps({"event": "heartbeat", "models": [{"name": "adder", "version": version}],
                       "drift": drift, **extra}).encode()


def _ingest(db: FleetDB, device: str, payload: bytes, judge: DriftJudge = JUDGE) -> None:
    with db.begin() as c:
        if db.device(device, fleet=FLEET) is None:
            write_state(c, FLEET, device, state_report())
        assert ingest_event(c, FLEET, device, payload, drift=judge)


@pytest.fixture()
def db(tmp_path: Path) -> Any:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as d:
        yield d


def test_shifted_inputs_flag_the_device_and_like_ones_do_not(db: FleetDB) -> None:
    _ingest(db, "cam-moved", _beat({"adder": {"x": _block(shift=1.0)}}))
    _ingest(db, "cam-calm", _beat({"adder": {"x": _block(shift=0.0)}}))
    moved, calm = db.device("cam-moved", fleet=FLEET), db.device("cam-calm", fleet=FLEET)
    assert moved is not None and calm is not None
    assert moved["drifting"] is True and moved["drift"]["flagged"] == ["adder/x"]
    x = moved["drift"]["models"]["adder"]["inputs"]["x"]
    assert x["level"] == "alert" and x["psi_max"] > 0.25 and x["n"] == 300
    dev_mean, ref_mean = x["mean"]
    assert dev_mean > ref_mean  # the worst channel moved up
    assert calm["drifting"] is False and calm["drift"]["flagged"] == []
    assert calm["drift"]["models"]["adder"]["inputs"]["x"]["level"] == "ok"
    assert [d["id"] for d in db.devices(fleet=FLEET, drifting=True)] == ["cam-moved"]
    assert drift_line(moved["drift"]).startswith("DRIFT adder/x psi ")
    assert drift_line(calm["drift"]) == "ok"


def test_the_devices_own_psi_is_not_trusted(db: FleetDB) -> None:
    block = _block(shift=1.0)
    block["psi"] = [0.0] * 4
    block["psi_max"] = 0.0
    _ingest(db, "cam-1", _beat({"adder": {"x": block}}))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drifting"] is True


def test_few_requests_and_versions_without_a_reference_are_never_flagged(
        db: FleetDB) -> None:
    _ingest(db, "cam-few", _beat({"adder": {"x": _block(shift=3.0, n=50)}}))
    _ingest(db, "cam-v2", _beat({"adder": {"x": _block(shift=3.0)}}, version="2"))
    for dev_id, level, line in (("cam-few", "few", "few requests"),
                                ("cam-v2", "no_reference", "no reference")):
        dev = db.device(dev_id, fleet=FLEET)
        assert dev is not None and dev["drifting"] is False
        assert dev["drift"]["models"]["adder"]["inputs"]["x"]["level"] == level
        assert drift_line(dev["drift"]) == line


def test_inputs_sent_in_turns_are_kept_until_the_version_changes(db: FleetDB) -> None:
    _ingest(db, "cam-1", _beat({"adder": {"x": _block(shift=1.0)}}))
    _ingest(db, "cam-1", _beat({"adder": {"y": _block(shift=0.0)}}))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and set(dev["drift"]["models"]["adder"]["inputs"]) == {"x", "y"}
    assert dev["drifting"] is True  # x still drifts though this heartbeat left it out
    _ingest(db, "cam-1", _beat({}, version="2"))  # nothing new: the old figures go
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drift"]["models"] == {} and dev["drifting"] is False
    _ingest(db, "cam-1", _beat({"adder": {"y": _block(shift=0.0)}}, version="2"))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and set(dev["drift"]["models"]["adder"]["inputs"]) == {"y"}
    assert dev["drifting"] is False


def test_a_moderate_shift_warns_without_flagging(db: FleetDB) -> None:
    judge = DriftJudge(DriftConfig(psi_alert=100.0), _refs)
    _ingest(db, "cam-1", _beat({"adder": {"x": _block(shift=1.0)}}), judge)
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drifting"] is False
    assert dev["drift"]["warn"] == ["adder/x"] and dev["drift"]["flagged"] == []
    assert drift_line(dev["drift"]).startswith("warn adder/x psi ")


@pytest.mark.parametrize(("block", "refused"), [
    ({"other": {"x": "_"}}, 1),                                  # a model it does not serve
    ({"adder": {"x": {"n": 5, "channels": [{"hist": [1] * 13}]}}}, 1),  # hist too long
    ({"adder": {"x": {"n": 5, "channels": [{}] * 65}}}, 1),       # over 64 channels
    ({"adder": {"x": {"n": -3, "channels": [{}]}}}, 1),
    ({"adder": {"x": {"n": 5, "channels": [{"mean": 1e400}]}}}, None),  # not JSON at all
    ({"adder": {"\x00": {"n": 5, "channels": [{}]}}}, 1),
    ({"adder": {"x" * 300: {"n": 5, "channels": [{}]}}}, 1),
    ({"adder": ["x"]}, 1),
])
def test_hostile_drift_blocks_are_refused_and_counted(db: FleetDB, block: Any,
                                                     refused: int | None) -> None:
    if refused is None:  # the registry refuses the whole report before parsing it
        payload = _beat({}).replace(b'"drift": {}', b'"drift": {"adder": {"x": '
                                    b'{"n": 5, "channels": [{"mean": 1e400}]}}}')
        with db.begin() as c:
            write_state(c, FLEET, "cam-1", state_report())
            assert not ingest_event(c, FLEET, "cam-1", payload, drift=JUDGE)
        dev = db.device("cam-1", fleet=FLEET)
        assert dev is not None and dev["drift"] is None
        return
    _ingest(db, "cam-1", _beat(block))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drifting"] is False
    assert dev["drift"]["refused"] == refused and dev["drift"]["models"] in ({}, {
        "adder": {"version": "1", "inputs": {}}})


@pytest.mark.parametrize("drift", ["yes", 7, None, ["adder"]])
def test_a_drift_value_that_is_no_block_stores_nothing(db: FleetDB, drift: object) -> None:
    _ingest(db, "cam-1", _beat(drift))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drift"] is None and dev["drifting"] is False


def test_inputs_past_the_limit_are_refused(db: FleetDB) -> None:
    small = {"n": 1, "channels": [{"mean": 0.0}]}
    _ingest(db, "cam-1", _beat({"adder": {f"in{j}": small for j in range(MAX_INPUTS + 7)}}))
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drift"]["refused"] == 7
    assert len(dev["drift"]["models"]["adder"]["inputs"]) == MAX_INPUTS


def test_many_models_and_inputs_are_bounded(db: FleetDB) -> None:
    small = {"n": 1, "channels": [{"mean": 0.0}]}
    served = [{"name": f"m{i}", "version": "1"} for i in range(40)]
    block = {f"m{i}": {f"in{j}": small for j in range(50)} for i in range(40)}
    payload = json.dumps({"event": "heartbeat", "models": served, "drift": block}).encode()
    _ingest(db, "cam-1", payload)
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None
    models = dev["drift"]["models"]
    assert len(models) <= MAX_MODELS
    assert all(len(m["inputs"]) <= MAX_INPUTS for m in models.values())
    assert dev["drift"]["refused"] > 0


def test_status_shows_drift_and_filters_drifting_devices(
        db: FleetDB, capsys: pytest.CaptureFixture[str]) -> None:
    _ingest(db, "cam-moved", _beat({"adder": {"x": _block(shift=1.0)}}))
    _ingest(db, "cam-calm", _beat({"adder": {"x": _block(shift=0.0)}}))
    url = db.url
    capsys.readouterr()
    assert main(["status", "--db", url, "--fleet", FLEET]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "DRIFT" in lines[0]
    assert any(ln.startswith("cam-moved") and "DRIFT adder/x psi" in ln for ln in lines)
    assert any(ln.startswith("cam-calm") and " ok " in ln for ln in lines)
    assert "1 device(s) see inputs that drifted" in out
    assert main(["status", "--db", url, "--fleet", FLEET, "--drifting"]) == 0
    only = capsys.readouterr().out
    assert "cam-moved" in only and "cam-calm" not in only
    assert main(["status", "--db", url, "--fleet", FLEET, "--drifting", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cam-moved"]["drift"]["flagged"] == ["adder/x"]
    assert main(["status", "--drifting", "--broker", "mqtt://127.0.0.1:1"]) != 0
    err = capsys.readouterr().err
    assert "--drifting" in err and len(err.strip().splitlines()) == 1


def test_the_api_lists_and_filters_drifting_devices(db: FleetDB) -> None:
    _ingest(db, "cam-moved", _beat({"adder": {"x": _block(shift=1.0)}}))
    _ingest(db, "cam-calm", _beat({"adder": {"x": _block(shift=0.0)}}))
    api = FleetApi(db, fleet=FLEET)
    status, _, body = api.handle("GET", "/api/devices?drifting=true")
    assert status == 200
    assert [d["id"] for d in json.loads(body)] == ["cam-moved"]
    status, _, body = api.handle("GET", "/api/devices/cam-moved")
    assert status == 200 and json.loads(body)["device"]["drift"]["flagged"] == ["adder/x"]
    status, _, body = api.handle("GET", "/api/devices?drifting=maybe")
    assert status == 400 and b"drifting" in body


def test_serve_refuses_drift_options_without_a_registry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--repo", str(tmp_path), "--broker", "mqtt://127.0.0.1:1",
                 "--only", "responder", "--drift-psi", "0.3"]) != 0
    err = capsys.readouterr().err
    assert "--drift" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_real_agent_fed_shifted_inputs_is_flagged_and_an_untouched_one_is_not(
        broker: Mosquitto, tmp_path: Path) -> None:
    """Agents on a real broker; serve's fleet server judges their heartbeats against the
    released artifact's manifest in the release repository."""
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    (tmp_path / "arts").mkdir()
    art = drift_artifact(tmp_path / "arts")
    repo.add_artifact(art.path)
    cfg = MqttConfig(url=broker.url, fleet=FLEET)
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db, \
            MqttConnection(cfg) as conn:
        server = FleetServer(db, repo, conn, poll_s=0.2, lease_ttl=3.0,
                             drift=DriftConfig(min_samples=200))
        assert server.wait_for_lease(threading.Event())
        with server, contextlib.ExitStack() as stack:
            agents = {}
            for dev in ("cam-moved", "cam-calm"):
                agents[dev] = stack.enter_context(drift_agent(
                    tmp_path / dev, art, connect=True, device_id=dev, fleet=FLEET,
                    broker={"url": broker.url}, telemetry={"heartbeat_s": 0.3},
                    drift={"max_per_s": 10_000, "queue": 1024}))
            for dev, shift in (("cam-moved", 1.0), ("cam-calm", 0.0)):
                for feed in evaluation_like(250, seed=9, shift=shift):
                    infer(agents[dev], feed)
            for dev in agents:
                wait_for(lambda d=dev: analysed(agents[d]) >= 250,  # type: ignore[misc]
                         30, lambda d=dev: f"{d} to analyse its requests")  # type: ignore[misc]

            def judged(dev: str) -> dict[str, Any] | None:
                row = db.device(dev, fleet=FLEET)
                x = None if row is None or row["drift"] is None else \
                    row["drift"]["models"].get("adder", {}).get("inputs", {}).get("x")
                return row if x is not None and x["n"] >= 250 else None

            wait_for(lambda: judged("cam-moved") and judged("cam-calm"), 30,
                     lambda: f"both devices' drift in the registry: {db.devices()}")
            moved, calm = judged("cam-moved"), judged("cam-calm")
            assert moved is not None and calm is not None
            assert moved["drifting"] is True and moved["drift"]["flagged"] == ["adder/x"]
            assert calm["drifting"] is False
            assert calm["drift"]["models"]["adder"]["inputs"]["x"]["level"] == "ok"
            assert [d["id"] for d in db.devices(fleet=FLEET, drifting=True)] == ["cam-moved"]


@pytest.mark.slow
def test_the_stored_document_stays_bounded(db: FleetDB) -> None:
    rng = np.random.default_rng(0)
    wide = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(50)]
    ref = Reference.from_json(json.loads(json.dumps(reference_stats(wide)["x"])))
    assert ref is not None
    acc = ref.accumulator()
    for f in wide:
        acc.add(f["x"] + 3.0)
    block = {"n": 250, "channels": acc.channels()}
    judge = DriftJudge(DriftConfig(min_samples=1), lambda name, version: {
        f"in{j}": ref for j in range(MAX_INPUTS)})
    served = [{"name": f"m{i}", "version": "1"} for i in range(MAX_MODELS)]
    # as a device with many inputs sends them: in turns, each heartbeat under 128 KiB
    for i in range(MAX_MODELS):
        for part in range(0, MAX_INPUTS, 8):
            payload = json.dumps({"event": "heartbeat", "models": served, "drift": {
                f"m{i}": {f"in{j}": block for j in range(part, part + 8)}}})
            _ingest(db, "cam-1", payload.encode(), judge)
            with db.read() as c:
                text = c.execute(sa.text("SELECT drift FROM devices WHERE id = 'cam-1'")
                                 ).scalar()
            assert len(text) <= 64 * 1024
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["drifting"] is True and dev["drift"]["flagged"]
