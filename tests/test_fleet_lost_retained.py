"""A retained message the broker acknowledged is not yet a message everyone reads: each
report and deployment a rollout needs is sent or read again until it is answered.

Measured on a 3-node NATS cluster (tests/test_nats_fleetsim.py, under load: 5 of 10 runs
red): a retained ``desired`` published during the JetStream leader election after a node
was killed was acknowledged while the node logged "unable to store retained message", so
the devices that were reconnecting then never read it and stayed silent; and a device's
first ``state``, published while the registry subscribed on another node, reached the
registry neither as a retained nor as a live message. Here each rule that recovers from
such a loss runs against real parts (Mosquitto, ``edge-sdk serve``, real agents, the real
registry and database); the test makes the loss itself (a cleared retained message, a
full registry queue), since Mosquitto loses nothing on its own.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from edge_sdk.fleet import FleetDB, Registry, RegistryConfig, RolloutSpec, start_rollout
from edge_sdk.fleet._reread import RereadLimits
from edge_sdk.release import create_deployment, publish_deployment
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _fleet_host
from tests._e2e import FLEET, AgentProc, Fleet, new_agent
from tests._fleet_host import Serve, wait_status
from tests._process import wait_for
from tests._rollout_sim import Sim, spec

fleet = _fleet_host.fleet  # Mosquitto, a responder and releases 1, 2, 3
db_url = _fleet_host.db_url  # SQLite and PostgreSQL


# -- the controller publishes an unanswered deployment again -------------------------------

def test_an_unanswered_deployment_is_published_again_until_answered_or_timed_out() -> None:
    sim = Sim(spec(waves=("100%",), republish_s=10.0), 3, results={"d00": "silent"})
    sim.tick(answer=False)  # signed and published to all three at t=1001
    sim.tick()  # d01 and d02 answer; d00 never does
    for _ in range(33):
        sim.tick()
    doc = sim.inbox["d01"][0]
    # The same signed bytes at 1011, 1021, 1031: no second counter, no new signature.
    assert sim.inbox["d00"] == [doc] * 4 and len(sim.signs) == 1
    assert sim.inbox["d01"] == sim.inbox["d02"] == [doc]
    sim.run()  # d00 falls silent after the 60 s wave timeout: nothing more goes to it
    assert sim.status()["d00"] == "silent" and sim.inbox["d00"].count(doc) == 7

    # Each device on its own clock: wave 2, sent a second after wave 1, a second later.
    late = Sim(spec(waves=("1", "100%"), republish_s=10.0), 2, results={"d01": "silent"})
    late.tick().tick()  # d00 sent at 1001, answers at 1002; then d01 is sent
    assert late.state.devices["d01"].sent_at == 1002.0
    while late.now < 1011.0:
        late.tick()
        assert len(late.inbox["d01"]) == 1
    late.tick()
    assert len(late.inbox["d01"]) == 2  # at 1012

    never = Sim(spec(waves=("100%",), republish_s=0.0), 1, results={"d00": "silent"})
    never.run()
    assert never.inbox["d00"].count(never.inbox["d00"][0]) == 1


def test_a_deployment_the_broker_acknowledged_but_did_not_keep_still_reaches_its_device(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc],
        db_url: str) -> None:
    serve = Serve(fleet, db_url, tmp_path / "serve").start()
    try:
        device = f"lost-desired-{db_url[:2]}"
        agent = new_agent(fleet, tmp_path, agents, device).start()
        fleet.deploy(device, "1")
        agent.wait_version("1")
        with FleetDB.open(db_url) as db:
            wait_for(lambda: any(d["id"] == device and d["version"] == "1"
                                 for d in db.devices()), 30)
            # The device's broker link dies (its NATS node was killed): the deployment
            # published now reaches it only as the retained copy it reads on reconnect.
            agent.kill()
            rid = start_rollout(db, fleet=FLEET, model="adder", version="2",
                                selector={"devices": [device]}, actor="tester",
                                spec=RolloutSpec(waves=("100%",), wave_timeout=120.0,
                                                 republish_s=1.0))
            wait_for(lambda: [d["status"] for d in db.rollout(rid)["devices"]] == ["sent"],
                     30, lambda: f"{db.rollout(rid)}")
        # Acknowledged, but not kept: what a NATS node does during a leader election.
        fleet.publish_raw(device, b"")
        agent.start()
        r = wait_status(db_url, rid, "completed", 60)
        assert [d["status"] for d in r["devices"]] == ["committed"]
        assert agent.infer() == ("2", 3.0)
    finally:
        serve.kill()


# -- the agent says its state again when a handled deployment comes again -------------------

def test_a_device_whose_answer_was_lost_says_it_again_when_the_deployment_comes_again(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    device = "lost-answer"
    agent = new_agent(fleet, tmp_path, agents, device).start()
    signed = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="1",
                               devices=[device])
    publish_deployment(fleet.host, signed)
    agent.wait_version("1")
    topics = Topics(FLEET)
    states: list[dict[str, object]] = []
    got = threading.Event()

    def on_state(topic: str, payload: bytes) -> None:
        if payload:
            states.append(json.loads(payload))
            got.set()

    with MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                        name="answer-watch") as watch:
        wait_for(lambda: (fleet.states.get(device) or {}).get("last_update"), 30)
        # The committed state is lost on its way (the registry dropped it, or the broker
        # kept no retained copy): nobody holds the answer any more.
        watch.publish_wait(topics.state(device), b"", retain=True)
        beats: list[bytes] = []
        watch.subscribe(topics.events(device), lambda t, p: beats.append(p)
                        if b'"heartbeat"' in p else None)
        watch.subscribe(topics.state(device), on_state)
        # A barrier, not a pause: the agent's sender sends a heartbeat, then any state
        # due, each time round; two heartbeats later, a state due before would be here.
        wait_for(lambda: len(beats) >= 2, 30)
        assert states == []  # an idle agent has nothing new to say by itself
        # The controller, still without an answer, publishes the same document again.
        watch.publish_wait(topics.desired(device), signed.document, retain=True)
        assert got.wait(20), "the agent did not say its state again"
    last = states[-1]["last_update"]
    assert isinstance(last, dict)
    assert (last["deployment"], last["result"]) == (signed.deployment.counter, "committed")
    assert agent.version() == "1"  # handled once: not installed a second time
    assert fleet.kinds(device).count("committed") == 1


# -- the registry reads the state of a device it hears from but has no state of -----------

def _state(version: str) -> bytes:
    return json.dumps({"online": True, "model": {"name": "adder", "version": version},
                       "phase": "committed", "deployment": 1,
                       "last_update": {"deployment": 1, "result": "committed"}}).encode()


def test_a_state_the_registry_dropped_is_read_again_on_the_devices_next_heartbeat(
        fleet: Fleet, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    topics = Topics(FLEET)
    # quiet's byte budget: a 1 KiB burst refilled at 200 B/s; the fleet-wide resync after a
    # drop is off, so only the per-device re-read can bring its state in.
    cfg = RegistryConfig(max_report_bytes=1024, burst_bytes=1024, bytes_per_s=200,
                         resync_s=0)
    with FleetDB.open(url) as db, \
            MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                           name="registry") as conn, \
            MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                           name="devices") as dev, \
            Registry(conn, db, config=cfg) as reg:
        reg.reread.limits = RereadLimits(every_s=1.0)
        # An event spends the budget (and asks for a retained state: there is none yet).
        dev.publish_wait(topics.events("quiet"), json.dumps(
            {"device": "quiet", "event": "boot", "pad": "x" * 900}).encode())
        wait_for(lambda: reg.reread.started == 1, 10)
        dev.publish_wait(topics.state("quiet"), _state("2"), retain=True)  # over budget
        wait_for(lambda: any(d["device"] == "quiet" and d["dropped"]
                             for d in db.ingest_stats(fleet=FLEET)), 10,
                 lambda: f"{db.ingest_stats(fleet=FLEET)}")
        assert "quiet" not in {d["id"] for d in db.devices()}
        time.sleep(3)  # the budget refills (600 B: a heartbeat and the state)
        # Nothing of "quiet" changes, so no new state comes; it is alive all the same.
        dev.publish_wait(topics.events("quiet"), json.dumps(
            {"device": "quiet", "event": "heartbeat", "ts": time.time()}), qos=0)
        found = wait_for(lambda: [d for d in db.devices() if d["id"] == "quiet"], 15,
                         lambda: f"registry: {[d['id'] for d in db.devices()]}")
        assert (found[0]["version"], found[0]["online"]) == ("2", True)
        assert reg.reread.started == 2
        dev.publish_wait(topics.state("quiet"), b"", retain=True)


def test_a_state_the_registry_missed_is_read_again_after_a_quiet_while(
        fleet: Fleet, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    topics = Topics(FLEET)
    # As above, but the device sends nothing more after its lost state (no event, no
    # heartbeat: an old agent, a broker that drops them), and neither the resync after a
    # drop nor the per-device re-read can help: only the re-read after a quiet while can.
    cfg = RegistryConfig(max_report_bytes=1024, burst_bytes=1024, bytes_per_s=200,
                         resync_s=0, reread_quiet_s=1.0, flush_s=0.2)
    with FleetDB.open(url) as db, \
            MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                           name="registry") as conn, \
            MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                           name="devices") as dev, \
            Registry(conn, db, config=cfg) as reg:
        reg.reread.limits = RereadLimits(every_s=3600.0)
        dev.publish_wait(topics.events("hushed"), json.dumps(
            {"device": "hushed", "event": "boot", "pad": "x" * 900}).encode())
        wait_for(lambda: reg.reread.started == 1, 10)  # the one re-read it gets, too early
        dev.publish_wait(topics.state("hushed"), _state("3"), retain=True)  # over budget
        wait_for(lambda: any(d["device"] == "hushed" and d["dropped"]
                             for d in db.ingest_stats(fleet=FLEET)), 10,
                 lambda: f"{db.ingest_stats(fleet=FLEET)}")
        try:
            found = wait_for(lambda: [d for d in db.devices() if d["id"] == "hushed"], 30,
                             lambda: f"registry: {[d['id'] for d in db.devices()]}")
            assert (found[0]["version"], found[0]["online"]) == ("3", True)
            assert reg.reread.started == 1
        finally:
            dev.publish_wait(topics.state("hushed"), b"", retain=True)


def test_an_agent_says_its_state_again_after_every_reconnect(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    topics = Topics(FLEET)
    device = "rejoin"
    agent = new_agent(fleet, tmp_path, agents, device)
    agent.config.write_text(agent.config.read_text() + "reconnect_jitter_s = 0.5\n")
    agent.start()
    wait_for(lambda: (fleet.states.get(device) or {}).get("online") is True, 30)
    with MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                        name="eraser") as eraser:
        # The broker loses the device's state (a node that kept no retained copy).
        eraser.publish_wait(topics.state(device), b"", retain=True)
    cfg = RegistryConfig(resync_s=0, flush_s=0.2)
    with FleetDB.open(url) as db, \
            MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET),
                           name="registry") as conn, \
            Registry(conn, db, config=cfg) as reg:
        reg.reread.limits = RereadLimits(every_s=3600.0)  # its heartbeats ask once, in vain
        wait_for(lambda: reg.reread.started == 1, 30)
        # The link drops (another client takes the agent's session for a moment): the
        # broker publishes its will, and the agent reconnects, with nothing new to say.
        with MqttConnection(MqttConfig(url=fleet.broker.url, fleet=FLEET,
                                       client_id=f"agent-{device}"), name="intruder"):
            pass
        found = wait_for(lambda: (d := db.device(device, fleet=FLEET)) and d["online"]
                         and d, 30, lambda: f"registry: {db.device(device, fleet=FLEET)}")
        assert found["state"]["link"][1] == 2 and found["hardware"]["arch"]
        assert reg.reread.started == 1
