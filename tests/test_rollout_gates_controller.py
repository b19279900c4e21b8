"""Gated rollouts carried out by the controller: a real broker, a real repository whose
deployment key signs every document, the registry taking in the devices' state reports.
The devices are played by the test, which publishes their retained state reports as an
agent does (the interface the host sees) and reads what the controller put on their
``desired`` topics with the device's own verification."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.fleet import Controller, FleetDB, RolloutSpec, start_rollout
from edge_sdk.fleet._ingest import RegistryConfig
from edge_sdk.fleet._registry import Registry, ingest_state
from edge_sdk.quality import Gate, ShadowFigures
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from edge_sdk.trust._deployment import Deployment, verify_deployment
from edge_sdk.trust._keys import load_public_key
from tests import _models
from tests._broker import Mosquitto
from tests._fleetrig import wait_for

GATE = "agreement>=0.99 over 50 requests within 10m sampling 0.5"


@pytest.fixture()
def repo(tmp_path: Path) -> Repository:
    r = Repository.init(tmp_path / "repo", tmp_path / "keys")
    for v in ("1", "2"):
        src = _models.offset_model(tmp_path / f"adder-{v}.onnx", float(v))
        art = edge_sdk.build_artifact(src, tmp_path / f"adder-{v}", name="adder",
                                      version=v, sample={"x": np.ones((1, 4), np.float32)})
        r.add_artifact(art.path)
    return r


class Rig:
    """The host (registry and controller on one database) and the devices' side of the
    broker: each device's retained desired topic as it reads it, its state as it says it."""

    def __init__(self, db: FleetDB, repo: Repository, conn: MqttConnection,
                 fleet: str) -> None:
        self.db, self.repo, self.conn, self.fleet = db, repo, conn, fleet
        self.topics = Topics(fleet)
        self.key = load_public_key(repo.deployment_key_path)
        self.registry = Registry(conn, db, topics=self.topics,
                                 config=RegistryConfig(flush_s=0.05)).start()
        self.ctl = self.controller()
        self._lock = threading.Lock()
        self.inbox: dict[str, list[bytes]] = {}
        self._sub = conn.subscribe(self.topics.every_device("desired"), self._got)

    def controller(self) -> Controller:
        ctl = Controller(self.db, self.repo, self.conn, topics=self.topics)
        ctl.acquire()
        return ctl

    def _got(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.inbox.setdefault(topic.split("/")[3], []).append(payload)

    def close(self) -> None:
        self._sub.cancel()
        self.ctl.stop()
        self.registry.stop()

    def say(self, device: str, version: str, *, results: Sequence[dict[str, Any]] = (),
            shadow: dict[str, Any] | None = None) -> None:
        """Publish ``device``'s retained state as its agent does, and wait until the
        registry has written it."""
        doc = {"device": device, "fleet": self.fleet, "online": True, "ts": time.time(),
               "model": {"name": "adder", "version": version},
               "models": [{"name": "adder", "version": version, "phase": "committed"}],
               "phase": "committed", "results": list(results),
               "last_update": results[-1] if results else None, "shadow": shadow}
        self.conn.publish_wait(self.topics.state(device), json.dumps(doc).encode(), qos=1,
                               retain=True)
        said = [(r["deployment"], r["result"]) for r in results]

        def written() -> bool:
            d = self.db.device(device, fleet=self.fleet)
            return d is not None and d["state"].get("ts") == doc["ts"] and said == [
                (r["deployment"], r["result"]) for r in d["results"]]

        wait_for(written, 20, f"the registry took in {device}'s state")

    def received(self, device: str, n: int) -> Deployment:
        """The ``n``-th document (1-based) on ``device``'s desired topic, verified as the
        device verifies it."""
        got = wait_for(lambda: len(self.inbox.get(device, [])) >= n and self.inbox[device],
                       20, f"document {n} for {device}")
        return verify_deployment(got[n - 1], self.key, device_id=device, fleet=self.fleet)

    def poll(self, times: int = 1) -> None:
        for _ in range(times):
            self.ctl.poll()


@pytest.fixture()
def rig(tmp_path: Path, repo: Repository, shared_broker: Mosquitto) -> Iterator[Rig]:
    fleet = f"gates{secrets.token_hex(3)}"
    conn = MqttConnection(MqttConfig(url=shared_broker.url, fleet=fleet), name="ctl-gates")
    conn.connect()
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        r = Rig(db, repo, conn, fleet)
        try:
            yield r
        finally:
            r.close()
            conn.close()


def _start(rig: Rig, *devices: str, **kw: Any) -> int:
    spec = RolloutSpec(waves=("100%",), wave_timeout=60, gate=Gate.parse(GATE), **kw)
    return start_rollout(rig.db, fleet=rig.fleet, model="adder", version="2",
                         selector={"devices": list(devices)}, spec=spec, actor="alice")


def _ended(counter: int, word: str, figures: ShadowFigures) -> dict[str, Any]:
    return {"deployment": counter, "result": word, "reason": f"the run ended: {word}",
            "models": ["adder"], "shadow": figures.to_json()}


def test_a_device_whose_shadow_passes_is_promoted_by_a_signed_deployment(
        rig: Rig) -> None:
    rig.say("cam-1", "1")
    rid = _start(rig, "cam-1")
    rig.poll(2)
    shadow = rig.received("cam-1", 1)
    # It keeps serving what it ran; the release runs beside it under the gate.
    assert [(m.model, m.version) for m in shadow.models] == [("adder", "1")]
    assert shadow.shadow is not None
    assert [(m.model, m.version) for m in shadow.shadow.models] == [("adder", "2")]
    assert shadow.shadow.gate == Gate.parse(GATE)
    assert (shadow.shadow.min_requests, shadow.shadow.time_limit_s,
            shadow.shadow.sample_rate) == (50, 600.0, 0.5)
    assert rig.db.rollout(rid)["devices"][0]["status"] == "shadowing"
    # Running: the registry keeps its shadow block; status shows the figures.
    running = ShadowFigures(compared=20, agreed=20, serving_ms_p50=1.0, shadow_ms_p50=1.5)
    rig.say("cam-1", "1", shadow={"deployment": shadow.counter, "model": "adder",
                                  "version": "2", "started": time.time(),
                                  "status": "running", "figures": running.to_json()})
    got = rig.db.device("cam-1", fleet=rig.fleet)
    assert got is not None and got["shadow"]["compared"] == 20
    assert got["shadow"]["latency_ratio"] == 1.5 and got["shadow"]["status"] == "running"
    rig.poll()
    assert rig.db.rollout(rid)["devices"][0]["status"] == "shadowing"
    passed = ShadowFigures(compared=50, agreed=50, worst=1.0)
    rig.say("cam-1", "1", results=[_ended(shadow.counter, "shadow_passed", passed)])
    rig.poll()
    promote = rig.received("cam-1", 2)
    assert promote.shadow is None and promote.counter > shadow.counter
    assert [(m.model, m.version) for m in promote.models] == [("adder", "2")]
    row = rig.db.rollout(rid)
    assert row["devices"][0]["shadow"]["verdict"] == "passed"
    assert row["progress"][0]["shadow"] == {"passed": 1}
    rig.say("cam-1", "2", results=[
        _ended(shadow.counter, "shadow_passed", passed),
        {"deployment": promote.counter, "result": "committed", "models": ["adder"]}])
    rig.poll()
    assert rig.db.rollout(rid)["status"] == "completed"


def test_a_device_whose_shadow_disagrees_fails_the_gate_with_its_figures(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.say("cam-1", "1")
    rig.say("cam-2", "1")
    rid = _start(rig, "cam-1", "cam-2", max_failure_rate=0.9, min_finished=2)
    rig.poll(2)
    shadow = rig.received("cam-1", 1)
    assert rig.received("cam-2", 1).counter == shadow.counter  # one document for both
    bad = ShadowFigures(compared=50, agreed=40, worst=0.1, worst_detail="class 3 -> 5")
    # The device calls it a pass: the controller judges the figures itself.
    rig.say("cam-1", "1", results=[_ended(shadow.counter, "shadow_passed", bad)])
    rig.say("cam-2", "1", results=[_ended(shadow.counter, "shadow_insufficient",
                                          ShadowFigures(compared=3, agreed=3))])
    rig.poll(2)
    row = rig.db.rollout(rid)
    by = {d["device"]: d for d in row["devices"]}
    assert by["cam-1"]["status"] == "gate_failed"
    assert by["cam-1"]["reason"] == ("agreement 0.8 over 50, worst 0.1 (class 3 -> 5) "
                                     "(gate agreement>=0.99)")
    assert by["cam-1"]["shadow"]["agreement"] == 0.8
    assert by["cam-2"]["status"] == "no_traffic"
    assert row["progress"][0]["shadow"] == {"failed": 1, "no_traffic": 1}
    assert row["status"] == "completed"  # within --max-failure-rate, no traffic skipped
    assert len(rig.inbox["cam-1"]) == 1  # never promoted
    capsys.readouterr()
    assert main(["rollout", "status", str(rid), "--db", rig.db.url]) == 0
    out = capsys.readouterr().out
    assert f"gate: {GATE} (no traffic: skip)" in out
    assert "wave 1: 2 device(s): 1 gate failed, 1 no traffic; shadow: 1 failed, " \
           "1 no traffic" in out
    assert "shadow #" in out and "failed: agreement 0.8 over 50" in out


def test_a_shadow_document_goes_out_again_until_the_device_says_its_run_is_under_way(
        rig: Rig) -> None:
    rig.say("cam-1", "1")
    _start(rig, "cam-1", republish_s=0.2)
    rig.poll(2)
    shadow = rig.received("cam-1", 1)

    def again() -> bool:
        rig.poll()
        return len(rig.inbox["cam-1"]) >= 2

    wait_for(again, 20, "the shadow document published again")
    rig.say("cam-1", "1", shadow={"deployment": shadow.counter, "model": "adder",
                                  "version": "2", "status": "running",
                                  "figures": ShadowFigures().to_json()})
    rig.poll()
    seen = len(rig.inbox["cam-1"])
    for _ in range(4):  # each poll is past republish_s since the one before
        time.sleep(0.25)
        rig.poll()
    assert len(rig.inbox["cam-1"]) == seen


def test_a_restarted_controller_publishes_the_same_shadow_document_again(
        rig: Rig) -> None:
    rig.say("cam-1", "1")
    _start(rig, "cam-1")
    rig.poll(2)
    first = rig.inbox["cam-1"][0]
    rig.ctl.stop()
    # The broker lost the retained copy; a new controller puts back the same bytes.
    rig.conn.publish_wait(rig.topics.desired("cam-1"), b"", qos=1, retain=True)
    rig.ctl = rig.controller()

    def republished() -> bool:
        rig.poll()  # it compares the topics with the record once its view has settled
        return rig.inbox["cam-1"][-1] == first

    wait_for(republished, 20, "the same document again")
    counter = (rig.repo.path / "deployments" / "counter").read_text().strip()
    assert counter == str(rig.received("cam-1", 1).counter)  # nothing signed since


def test_an_abort_while_a_device_shadows_ends_its_run_with_what_it_serves(
        rig: Rig) -> None:
    rig.say("cam-1", "1")
    rid = _start(rig, "cam-1")
    rig.poll(2)
    shadow = rig.received("cam-1", 1)
    assert main(["rollout", "abort", str(rid), "--db", rig.db.url]) == 0
    rig.poll()
    end = rig.received("cam-1", 2)
    assert end.shadow is None and end.counter > shadow.counter
    assert [(m.model, m.version) for m in end.models] == [("adder", "1")]
    assert end.remove == ()
    rig.say("cam-1", "1", results=[
        _ended(shadow.counter, "shadow_insufficient", ShadowFigures(compared=2, agreed=2)),
        {"deployment": end.counter, "result": "committed", "models": ["adder"]}])
    rig.poll()
    row = rig.db.rollout(rid)
    assert row["status"] == "aborted"
    assert row["devices"][0]["outcome"] == "skipped"
    assert "while it shadowed" in row["devices"][0]["note"]


@pytest.mark.parametrize(("gate", "said"), [
    ("agreement>=0.99", "not understood"),
    ("agreement>=0.99 over 0 requests", "1 <= N"),
    ("speed>=2 over 5 requests", "unknown metric"),
    ("agreement>=0.99 over 5 requests sampling 2", "'sampling' must be in (0, 1]"),
])
def test_a_bad_gate_is_refused_in_one_line_before_anything_is_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], gate: str, said: str) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    capsys.readouterr()
    assert main(["rollout", "start", "--db", url, "--fleet", "lab", "--device", "d1",
                 "--model", "adder=2", "--gate", gate]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and "Traceback" not in err[0], err


def test_an_unknown_no_traffic_policy_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    capsys.readouterr()
    assert main(["rollout", "start", "--db", url, "--fleet", "lab", "--device", "d1",
                 "--model", "adder=2", "--gate", GATE, "--gate-no-traffic", "maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edge-sdk: error: --gate-no-traffic must be one of fail, skip, promote"], err


def test_rollout_start_records_the_gate_and_the_no_traffic_rule(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with FleetDB.open(url) as db, db.begin() as c:
        assert ingest_state(c, "lab", "d1", json.dumps({
            "online": True, "model": {"name": "adder", "version": "1"}}).encode())
    capsys.readouterr()
    assert main(["rollout", "start", "--db", url, "--fleet", "lab", "--device", "d1",
                 "--model", "adder=2", "--gate", "agreement >= 0.995 over 200 requests",
                 "--gate-no-traffic", "promote"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("adder 2 gated by 'agreement>=0.995 over 200 requests within 1h' "
                        "(no traffic: promote) recorded; 'edge-sdk serve' carries it out")
    with FleetDB.open(url) as db:
        r = db.rollouts()[0]
    assert r["gate"]["text"] == "agreement>=0.995 over 200 requests within 1h"
    assert r["gate"]["no_traffic"] == "promote"
    assert Gate.from_json(r["config"]["gate"]) == Gate.parse("agreement>=0.995 over 200 "
                                                             "requests")
