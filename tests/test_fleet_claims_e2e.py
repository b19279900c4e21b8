"""A device that claims a group or a tag in its own state, against a running fleet: real
Mosquitto with the example ACL (examples/mosquitto), real ``edge-sdk serve`` subprocesses
(the fleet part as the example's fleet user, the responder as ``edge-repo``), real
agents provisioned for ``lobby`` and assigned to it by the operator, and an intruder with
its own credentials, on its own topics only. It reports ``groups: ["lobby"]`` and
``site=berlin``, the hardware of the honest devices, and "failed" for every deployment
counter it can guess; its id sorts first, so a rollout that selected it would make it the
canary. It must get no deployment, and the rollouts must complete for the honest ones."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._store._schema import rollout_devices
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConnection, Topics
from tests import _fleetdb, _models
from tests._acl import FLEET, connect_as, example_broker
from tests._broker import Mosquitto
from tests._e2e import AgentProc, X
from tests._process import ROOT, wait_for

pytestmark = pytest.mark.slow

HONEST = ("lobby-1", "lobby-2")
INTRUDER = "aa-intruder"  # sorts before the honest ones: it would be the canary
TOPICS = Topics(FLEET)
ARCH = platform.machine()  # what the agents report as hardware.arch


class Host:
    """The operator's side: repository, broker and credentials (what AgentProc reads)."""

    def __init__(self, tmp: Path, broker: Mosquitto, creds: dict[str, str]) -> None:
        self.tmp, self.broker, self.creds = tmp, broker, creds
        self.repo = Repository.init(tmp / "repo", tmp / "keys")
        self.db_url = f"sqlite:///{tmp / 'fleet.db'}"
        for v in ("1", "2", "3"):
            src = tmp / "arts" / f"adder-{v}.onnx"
            src.parent.mkdir(exist_ok=True)
            _models.offset_model(src, float(v))
            art = edge_sdk.build_artifact(src, tmp / "arts" / f"adder-{v}", name="adder",
                                          version=v, sample={"x": X})
            self.repo.add_artifact(art.path)

    def cli(self, *args: str, user: str = "edge-operator-1") -> list[str]:
        return [*args, "--repo", str(self.repo.path), "--broker", self.broker.url,
                "--fleet", FLEET, "--username", user, "--password", self.creds[user]]


class Intruder:
    """A device with its own credentials that lies about itself on its own topics, and
    answers every deployment it could name with "failed"."""

    def __init__(self, host: Host) -> None:
        self.conn: MqttConnection = connect_as(host.broker, host.creds, INTRUDER)
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # Its own desired topic, the group's it claims, and everything it may read.
        for topic in (TOPICS.desired(INTRUDER), TOPICS.group_desired("lobby"),
                      f"{TOPICS.base}/grp/+/desired", f"{TOPICS.base}/#"):
            self.conn.subscribe(topic, self._on)
        self.thread = threading.Thread(target=self._lie, daemon=True)

    def _on(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/desired") and payload:
            with self.lock:
                self.got.append((topic, payload))

    def claim(self) -> None:
        self.conn.publish_wait(TOPICS.state(INTRUDER), json.dumps({
            "online": True, "phase": "idle", "model": None, "deployment": 0,
            "groups": ["lobby"], "tags": {"site": "berlin"},
            "hardware": {"arch": ARCH, "cores": 2, "threads": 1},
        }).encode(), qos=1, retain=True)

    def _lie(self) -> None:
        while not self.stop.wait(0.3):
            for counter in range(1, 12):
                self.conn.publish(TOPICS.events(INTRUDER), json.dumps({
                    "event": "failed", "reason": "intruder says so",
                    "deployment": {"counter": counter, "name": "adder"}}).encode())

    def deployments(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.got)


class ServeProc:
    """``edge-sdk serve --only fleet|responder`` under the example ACL's users."""

    def __init__(self, host: Host, only: str, user: str) -> None:
        extra = ["--db", host.db_url, "--poll", "0.2"] if only == "fleet" else []
        self.log = host.tmp / f"serve-{only}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(host.repo.path),
                 "--broker", host.broker.url, "--fleet", FLEET, "--username", user,
                 "--password", host.creds[user], "--only", only, *extra],
                cwd=ROOT, stdout=out, stderr=out)
        wait_for(lambda: "serving" in self.log.read_text(), 30,
                 lambda: f"serve --only {only}: {self.log.read_text()[-2000:]}")

    def alive(self) -> str:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        return self.log.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("claims")
    provisioned = {d: ["lobby"] for d in HONEST} | {INTRUDER: []}
    with example_broker(tmp, provisioned) as (broker, creds):
        host = Host(tmp, broker, creds)
        # The operator assigns the honest devices; the intruder is in no group.
        _fleetdb.assign(host.db_url, FLEET, HONEST, "lobby", tags=["site=berlin"])
        agents = [AgentProc(host, tmp / "agents", d, groups=("lobby",),  # type: ignore[arg-type]
                            tags={"site": "berlin"}, auth=(d, creds[d])) for d in HONEST]
        intruder = Intruder(host)
        served: list[ServeProc] = []
        try:
            for a in agents:
                a.start()
            intruder.claim()
            intruder.thread.start()
            served.append(ServeProc(host, "responder", "edge-repo"))
            # A group deployment first (before the fleet controller takes the operator's
            # session): the broker's ACL keeps it from the intruder, and --wait follows
            # the assigned members only, so the intruder's "failed" changes nothing.
            assert main(host.cli("deploy", "--model", "adder", "--version", "1", "--group",
                                 "lobby", "--wait", "--timeout", "60", "--db",
                                 host.db_url)) == 0
            for a in agents:
                a.wait_version("1")
            served.append(ServeProc(host, "fleet", "edge-fleet"))
            with FleetDB.open(host.db_url) as db:
                wait_for(lambda: {d["id"] for d in db.devices(fleet=FLEET)
                                  if d["registered"] and d["online"]} == {*HONEST, INTRUDER},
                         30, lambda: f"registry: {db.devices(fleet=FLEET)}")
            yield {"host": host, "agents": agents, "intruder": intruder, "served": served}
        finally:
            intruder.stop.set()
            for s in served:
                s.stop()
            for a in agents:
                a.kill()
            intruder.conn.close()


def _roll_out(fleet: dict[str, Any], version: str, *selector: str) -> dict[str, Any]:
    host: Host = fleet["host"]
    assert main(["rollout", "start", "--db", host.db_url, "--operator", "tester", "--fleet",
                 FLEET, "--model", "adder", "--version", version, *selector, "--waves",
                 "1,100%", "--wave-timeout", "60"]) == 0
    with FleetDB.open(host.db_url) as db:
        rid = int(db.rollouts()[0]["id"])
        r = wait_for(lambda: (x := db.rollout(rid))["status"] in ("completed", "aborted")
                     and x, 120, lambda: f"rollout {rid}: {db.rollout(rid)}")
        with db.read() as c:
            docs = c.execute(sa.select(rollout_devices.c.document).where(
                rollout_devices.c.rollout == rid)).scalars().all()
        intruder = db.device(INTRUDER)
    for s in fleet["served"]:
        s.alive()
    # What the controller signed names the honest devices only.
    for doc in docs:
        assert json.loads(doc)["signed"]["devices"] != [] and \
            INTRUDER not in json.loads(doc)["signed"]["devices"]
    # Its claim is shown as reported, flagged, and assigned nothing.
    assert intruder is not None and intruder["groups"] == [] and intruder["mismatch"]
    return r


def _assert_no_deployment_and_completed(fleet: dict[str, Any], r: dict[str, Any],
                                        version: str) -> None:
    assert r["status"] == "completed", r
    assert {d["device"] for d in r["devices"]} == set(HONEST)
    assert [p["by_status"] for p in r["progress"]] == [{"committed": 1}, {"committed": 1}]
    assert r["devices"][0]["wave"] == 1 and r["devices"][0]["device"] == HONEST[0]
    for a in fleet["agents"]:
        assert a.infer() == (version, float(version) + 1.0)
    # A barrier, not a pause: the broker hands the intruder a marker published now after
    # anything published to it before (a deployment of this rollout, retained or late).
    host: Host = fleet["host"]
    marker = (TOPICS.desired(INTRUDER), json.dumps({"barrier": version}).encode())
    with connect_as(host.broker, host.creds, "edge-operator-2") as op:
        op.publish_wait(*marker)
    wait_for(lambda: marker in fleet["intruder"].deployments(), 30)
    assert {m for m in fleet["intruder"].deployments() if b'"barrier"' not in m[1]} == set()


def test_device_claiming_a_group_gets_no_deployment(fleet: dict[str, Any]) -> None:
    r = _roll_out(fleet, "2", "--group", "lobby")
    _assert_no_deployment_and_completed(fleet, r, "2")


def test_device_claiming_a_tag_gets_no_deployment(fleet: dict[str, Any]) -> None:
    # The honest ones report the same hardware facts; hw.arch only narrows the tag's pick.
    r = _roll_out(fleet, "3", "--tag", "site=berlin", "--tag", f"hw.arch={ARCH}")
    _assert_no_deployment_and_completed(fleet, r, "3")
