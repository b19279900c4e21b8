"""Set rollouts end to end over a real Mosquitto: ``rollout run`` (waves followed from the
operator's machine) and ``rollout start`` (the controller in ``edge-sdk serve``, its
registry and database) deploy two models as one signed document and, on abort, send each
device back per model.

The devices are :class:`SetDevice`: until the agent installs sets (SPEC29 section 2) they
stand in for it at the protocol level — each verifies every document it reads with the
real trust code (signature, fleet, device, counter) and reports its models in its retained
state as an agent serving a set does. No install: these tests are about the fleet side.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from edge_sdk.trust import Deployment, ReplayError, load_public_key, verify_deployment
from tests import _fleet_host
from tests._e2e import FLEET, Fleet
from tests._fleet_host import Serve, wait_status
from tests._fleetdb import assign
from tests._process import wait_for

fleet = _fleet_host.fleet  # Mosquitto, a responder and releases of adder 1, 2, 3
db_url = _fleet_host.db_url  # SQLite and PostgreSQL


@pytest.fixture(scope="module")
def sets(fleet: Fleet) -> Fleet:
    """Model ``rec`` 1 and 2 beside adder's releases."""
    for v in ("1", "2"):
        fleet.release(v, name="rec")
    return fleet


class SetDevice:
    """One device at the protocol level: reads its retained ``desired`` topic, verifies
    each document, applies it to its models (``fail``: a model whose install fails, at
    that version) and says so in its retained ``state``."""

    def __init__(self, fleet: Fleet, device: str, models: dict[str, str], *,
                 fail: tuple[str, str] | None = None) -> None:
        self.device, self.models, self.fail = device, dict(models), fail
        self.key = load_public_key(fleet.repo.deployment_key_path)
        self.got: list[Deployment] = []
        self.counter = 0
        self._t = Topics(FLEET)
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self.conn = MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                                   name=f"set-{device}")
        self.conn.connect()
        self._say(None, None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.conn.subscribe(self._t.desired(device), lambda t, p: self._inbox.put(p))

    def _run(self) -> None:
        while (payload := self._inbox.get()) is not None:
            if not payload:
                continue
            try:
                dep = verify_deployment(payload, self.key, device_id=self.device,
                                        fleet=FLEET, last_counter=self.counter)
            except ReplayError:
                continue  # republished: handled already
            self.counter = dep.counter
            self.got.append(dep)
            if self.fail is not None and any((m.model, m.version) == self.fail
                                             for m in dep.models):
                self._say(dep.counter, "failed")
                continue
            for m in dep.models:
                self.models[m.model] = m.version
            for name in dep.remove:
                self.models.pop(name, None)
            self._say(dep.counter, "committed")

    def _say(self, counter: int | None, result: str | None) -> None:
        listed = [{"name": n, "version": v, "phase": "committed"}
                  for n, v in sorted(self.models.items())]
        state: dict[str, object] = {
            "online": True, "phase": "idle", "ts": time.time(), "models": listed,
            "model": listed[0] if listed else None, "deployment": self.counter}
        if counter is not None:
            state["last_update"] = {"deployment": counter, "result": result,
                                    "reason": None if result == "committed" else
                                    f"{self.device} could not install it"}
        self.conn.publish_wait(self._t.state(self.device), json.dumps(state).encode(),
                               retain=True)

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(10)
        self.conn.publish_wait(self._t.state(self.device), b"", retain=True)
        self.conn.publish_wait(self._t.desired(self.device), b"", retain=True)
        self.conn.close()


@pytest.fixture
def devices() -> Iterator[list[SetDevice]]:
    made: list[SetDevice] = []
    yield made
    for d in made:
        d.close()


def _back(d: SetDevice) -> Deployment:
    """The last document ``d`` took: the abort's send-back."""
    return wait_for(lambda: d.got[-1] if d.got and d.got[-1].rollback else None, 60,
                    lambda: f"{d.device} got {[x.describe() for x in d.got]}")


@pytest.mark.slow
def test_rollout_run_of_a_set_aborts_and_sends_each_device_back_per_model(
        sets: Fleet, devices: list[SetDevice], capsys: pytest.CaptureFixture[str]) -> None:
    devices += [SetDevice(sets, "run-a", {"adder": "1"}),
                SetDevice(sets, "run-b", {"adder": "1"}, fail=("rec", "2"))]
    code = main(["rollout", "run", "--repo", str(sets.repo.path), "--model", "adder=2",
                 "--model", "rec=2", "--device", "run-a", "--device", "run-b",
                 "--waves", "100%", "--wave-timeout", "60",
                 "--broker", sets.broker.url, "--fleet", FLEET])
    assert code == 3, capsys.readouterr()
    a, b = devices
    first = a.got[0]
    assert {m.model: m.version for m in first.models} == {"adder": "2", "rec": "2"}
    assert b.got == [first]  # one document for the wave, and none back for a failure
    back = _back(a)
    # adder back to the device's 1; rec, which it did not have, removed by a signature.
    assert {m.model: m.version for m in back.models} == {"adder": "1"}
    assert back.remove == ("rec",) and a.models == {"adder": "1"}


@pytest.mark.slow
def test_a_controller_set_rollout_aborts_and_sends_each_device_back_per_model(
        sets: Fleet, devices: list[SetDevice], db_url: str, tmp_path: Path) -> None:
    tag = db_url.split(":")[0].split("+")[0][:2]
    group = f"sets-{tag}"
    devices += [SetDevice(sets, f"ctl-a-{tag}", {"adder": "1"}),
                SetDevice(sets, f"ctl-b-{tag}", {"adder": "1"}),
                SetDevice(sets, f"ctl-c-{tag}", {"adder": "1"}, fail=("adder", "2"))]
    assign(db_url, FLEET, [d.device for d in devices], group)
    serve = Serve(sets, db_url, tmp_path / "serve").start()
    try:
        with FleetDB.open(db_url) as db:
            wait_for(lambda: len([d for d in db.devices(group=group)
                                  if d["version"] == "1"]) == 3, 30,
                     lambda: f"registry has {db.devices(group=group)}")
        assert main(["rollout", "start", "--db", db_url, "--operator", "tester",
                     "--fleet", FLEET, "--repo", str(sets.repo.path), "--model", "adder=2",
                     "--model", "rec=2", "--group", group, "--waves", "2,100%",
                     "--wave-timeout", "60"]) == 0
        with FleetDB.open(db_url) as db:
            rid = int(db.rollouts()[0]["id"])
        r = wait_status(db_url, rid, "aborted", 90)
    finally:
        serve.kill()
    assert r["models"] == [["adder", "2"], ["rec", "2"]]
    a, b, c = devices
    for d in (a, b):
        assert {m.model: m.version for m in d.got[0].models} == {"adder": "2", "rec": "2"}
        back = _back(d)
        assert {m.model: m.version for m in back.models} == {"adder": "1"}
        assert back.remove == ("rec",) and d.models == {"adder": "1"}
    assert [x.rollback for x in c.got] == [False]  # it failed: nothing to send back
    assert {d["device"]: d["rollback_status"] for d in r["devices"]} == {
        a.device: "committed", b.device: "committed", c.device: None}
