"""An accepted device's groups changed later (``edge-sdk device set ID --group H
--remove-group G``, run here through the CLI): the real Enroller over a dynsec Mosquitto
changes the account's roles and leaves a retained renewal hint; the real agent renews at
once and follows exactly the groups its new credentials name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent, AgentConfig, InstallRequest
from edge_sdk import Artifact
from edge_sdk.cli import main
from edge_sdk.errors import EdgeError
from edge_sdk.fleet import Enroller, FleetDB, IdentityConfig
from edge_sdk.fleet import _enrol as rec
from edge_sdk.fleet._dynsec import SERVE, DynsecAdmin
from edge_sdk.transport import MqttConnection, Topics
from tests import _agent_local
from tests._agent_local import LocalSource, deployment
from tests._dynsec import FLEET, MONITOR, connect_as, dynsec_broker
from tests._process import wait_until

arts = _agent_local.arts

DEV = "cam-1"
BATCH = "line-1"
TOPICS = Topics(FLEET)


class Recording(LocalSource):
    """The local source, remembering every deployment that reached the agent (version,
    counter), whatever became of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reached: list[tuple[str, int]] = []

    def verify_deployment(self, payload: bytes, **kw: Any) -> InstallRequest:
        req = super().verify_deployment(payload, **kw)
        self.reached.append((str(req.raw["artifact_version"]), req.counter))
        return req


@dataclass
class Controller:
    url: str
    db: FleetDB
    db_url: str
    claim_password: str
    enroller: Enroller
    monitor: MqttConnection


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    """A dynsec broker, a sqlite record, a running Enroller whose credentials live an hour
    (no renewal is due on its own during a test) and a monitor account that publishes
    deployments."""
    with dynsec_broker(tmp_path) as (broker, creds):
        db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
        db = FleetDB.open(db_url)
        conn = connect_as(broker, creds, SERVE)
        monitor = connect_as(broker, creds, MONITOR)
        admin = DynsecAdmin(conn, fleet=FLEET)
        enroller = Enroller(db, conn, admin, fleet=FLEET, config=IdentityConfig(
            lifetime_s=3600.0, poll_s=0.1, sweep_s=0.2)).start()
        try:
            password = rec.create_claim(db, FLEET, BATCH, actor="op")
            wait_until(lambda: all(c["want"] == "" for c in rec.claims(db, FLEET)), "the claim")
            yield Controller(broker.url, db, db_url, password, enroller, monitor)
        finally:
            enroller.stop()
            monitor.close()
            conn.close()
            db.close()



def _config(tmp_path: Path, ctl: Controller) -> AgentConfig:
    return AgentConfig.from_dict({
        "device_id": DEV, "fleet": FLEET, "state_dir": str(tmp_path / "state"),
        "http": {"port": 0}, "broker": {"url": ctl.url},
        "health": {"window_s": 0.5, "probe_interval_s": 0.05},
        "identity": {"batch": BATCH, "claim_password": ctl.claim_password, "poll_s": 0.3,
                     "answer_wait_s": 2.0}})


def _issued(agent: Agent) -> int:
    path = agent.config.identity_dir / "credentials.json"
    cur = json.loads(path.read_text())["current"] if path.exists() else None
    return int(cur["credentials"]["issued"]) if cur else 0


def _version(agent: Agent) -> str | None:
    cur = agent.slots.current
    return cur.version if cur is not None else None


def _move(db_url: str, to: str, away: str) -> None:
    """``edge-sdk device set DEV --group TO --remove-group AWAY``."""
    assert main(["device", "set", DEV, "--group", to, "--remove-group", away,
                 "--db", db_url, "--fleet", FLEET, "--operator", "olga"]) == 0


def _enrolled(tmp_path: Path, ctl: Controller, source: LocalSource) -> Agent:
    agent = Agent(_config(tmp_path, ctl), source=source)
    agent.start()
    wait_until(lambda: rec.enrolment(ctl.db, FLEET, DEV) is not None, "the request")
    rec.accept_devices(ctl.db, FLEET, [DEV], groups=["lobby"], actor="op")
    conn = agent.connection
    assert conn is not None
    wait_until(lambda: conn.connected, "the device's own connection")
    return agent


def test_a_device_moved_to_another_group_gets_its_deployments_and_not_the_old_ones(
        tmp_path: Path, controller: Controller, arts: dict[str, Artifact]) -> None:
    ctl = controller
    ctl.monitor.publish_wait(TOPICS.group_desired("lobby"), deployment(arts["v1"], 1),
                             retain=True)
    source = Recording()
    agent = _enrolled(tmp_path, ctl, source)
    try:
        wait_until(lambda: _version(agent) == "v1", "the lobby deployment", 60)
        assert agent.config.groups == ("lobby",)

        _move(ctl.db_url, "door", "lobby")
        # The account's roles change (dynsec kicks the device), the retained hint makes
        # it renew now: its new credentials name door only.
        wait_until(lambda: agent.config.groups == ("door",), "the agent following door")
        conn = agent.connection
        assert conn is not None
        wait_until(lambda: conn.connected and _issued(agent) == 2, "the renewed credentials")
        assert agent.snapshot()["groups"] == ["door"]

        # Published in this order: had the device still read lobby, the newer lobby
        # deployment would reach it before the door one.
        ctl.monitor.publish_wait(TOPICS.group_desired("lobby"), deployment(arts["v3"], 10),
                                 retain=True)
        ctl.monitor.publish_wait(TOPICS.group_desired("door"), deployment(arts["v2"], 2),
                                 retain=True)
        wait_until(lambda: _version(agent) == "v2", "the door deployment", 60)
        assert ("v3", 10) not in source.reached
        row = rec.enrolment(ctl.db, FLEET, DEV)
        assert row is not None and row["groups"] == ["door"]
        assert ctl.enroller.stats.regrouped == 1

        # The agent itself no longer follows lobby: with the broker granting lobby again
        # behind the record's back (which kicks the device), its reconnect does not
        # subscribe lobby and the retained v3 still does not reach it.
        ctl.enroller.admin.set_groups(DEV, ["door", "lobby"])
        ctl.monitor.publish_wait(TOPICS.group_desired("door"), deployment(arts["v1"], 3),
                                 retain=True)
        wait_until(lambda: ("v1", 3) in source.reached, "the next door deployment", 60)
        assert ("v3", 10) not in source.reached
    finally:
        agent.stop()


def test_a_hint_sent_while_the_device_was_away_is_found_when_it_comes_back(
        tmp_path: Path, controller: Controller, arts: dict[str, Artifact]) -> None:
    ctl = controller
    agent = _enrolled(tmp_path, ctl, LocalSource())
    agent.stop()
    _move(ctl.db_url, "door", "lobby")
    wait_until(lambda: ctl.enroller.stats.regrouped == 1, "the broker roles changed")
    ctl.monitor.publish_wait(TOPICS.group_desired("door"), deployment(arts["v2"], 1),
                             retain=True)
    # Back with the credentials it stored (they name lobby): the retained hint is there.
    again = Agent(_config(tmp_path, ctl), source=LocalSource())
    again.start()
    try:
        wait_until(lambda: _version(again) == "v2", "the door deployment", 60)
        assert again.config.groups == ("door",)
        conn = again.connection
        assert conn is not None
        wait_until(lambda: conn.connected and _issued(again) == 2,
              "the link up on the renewed password")
        wait_until(lambda: ctl.enroller.stats.renewed == 1, "the renewal done")
        # The renewal cleared the hint: the next connection does not renew again.
        seen: list[bytes] = []
        sub = ctl.monitor.subscribe(TOPICS.cred_answer(DEV), lambda t, p: seen.append(p))
        # A second SUBACK comes after the retained message the first one brought.
        ctl.monitor.subscribe(TOPICS.cred_answer(DEV), lambda t, p: None).cancel()
        sub.cancel()
        assert not [p for p in seen if p]
    finally:
        again.stop()



def test_credentials_name_the_groups_assigned_when_they_are_issued(tmp_path: Path) -> None:
    import time

    from edge_sdk.identity import DeviceKey, EnrolAnswer, EnrolRequest

    with dynsec_broker(tmp_path) as (broker, creds):
        db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
        db = FleetDB.open(db_url)
        conn = connect_as(broker, creds, SERVE)
        monitor = connect_as(broker, creds, MONITOR)
        admin = DynsecAdmin(conn, fleet=FLEET)
        enroller = Enroller(db, conn, admin, fleet=FLEET)  # not started: polled here
        try:
            key = DeviceKey.generate()
            rec.record_request(db, FLEET, EnrolRequest.create(key, DEV, BATCH, {}),
                               now=time.time(), max_pending=10)
            rec.accept_devices(db, FLEET, [DEV], groups=["lobby"], actor="op")
            _move(db_url, "door", "lobby")  # before the controller got to the acceptance
            got: list[bytes] = []
            monitor.subscribe(TOPICS.enrol_answer(BATCH, DEV),
                              lambda t, p: got.append(p) if p else None)
            enroller.poll()
            wait_until(lambda: got, "the accepted answer")
            answer = EnrolAnswer.from_bytes(got[-1], device_id=DEV)
            assert answer.state == "accepted" and answer.sealed is not None
            assert key.open(answer.sealed, device_id=DEV).groups == ("door",)
            account = admin.client(DEV)
            assert account is not None
            assert sorted(r["rolename"] for r in account["roles"]) == [
                f"dev:{DEV}", "grp:door"]
            assert rec.group_changes(db, FLEET) == []
        finally:
            monitor.close()
            conn.close()
            db.close()


def test_a_renewal_answered_before_a_group_change_is_not_put_in_force(
        tmp_path: Path, controller: Controller) -> None:
    import queue
    import time

    from edge_sdk.identity import DeviceKey, EnrolAnswer, EnrolRequest, RenewHint, RenewRequest

    ctl = controller
    key = DeviceKey.generate()
    rec.record_request(ctl.db, FLEET, EnrolRequest.create(key, DEV, BATCH, {}),
                       now=time.time(), max_pending=10)
    got: queue.Queue[bytes] = queue.Queue()
    ctl.monitor.subscribe(TOPICS.enrol_answer(BATCH, DEV),
                          lambda t, p: got.put(p) if p else None)
    rec.accept_devices(ctl.db, FLEET, [DEV], groups=["lobby"], actor="op")
    first = EnrolAnswer.from_bytes(got.get(timeout=30), device_id=DEV)
    assert first.sealed is not None
    creds = key.open(first.sealed, device_id=DEV)
    device = connect_as_device(ctl, creds.password)
    answers: queue.Queue[bytes] = queue.Queue()
    try:
        device.subscribe(TOPICS.cred_answer(DEV), lambda t, p: answers.put(p) if p else None)

        def renew(ack: int = 0) -> None:
            device.publish_wait(TOPICS.cred_request(DEV),
                                RenewRequest.signed(key, DEV, ack=ack))

        def next_credentials() -> tuple[int, tuple[str, ...]]:
            while True:
                payload = answers.get(timeout=30)
                try:
                    RenewHint.from_bytes(payload, device_id=DEV)
                except EdgeError:
                    answer = EnrolAnswer.from_bytes(payload, device_id=DEV)
                    assert answer.sealed is not None
                    c = key.open(answer.sealed, device_id=DEV)
                    return c.issued, c.groups

        renew()
        assert next_credentials() == (2, ("lobby",))
        _move(ctl.db_url, "door", "lobby")
        wait_until(lambda: ctl.enroller.stats.regrouped == 1, "the broker roles changed")
        # Kicked by the role change: it reconnects (same password) and asks again.
        renew(ack=2)  # the answer made before the change: not put in force
        renew()
        assert next_credentials() == (2, ("door",))
        row = rec.enrolment(ctl.db, FLEET, DEV)
        assert row is not None and row["issued"] == 1 and ctl.enroller.stats.renewed == 0
    finally:
        device.close()


def connect_as_device(ctl: Controller, password: str) -> MqttConnection:
    """The device's own connection (reconnecting quickly after a kick)."""
    from edge_sdk.transport import MqttConfig

    conn = MqttConnection(MqttConfig(url=ctl.url, username=DEV, password=password,
                                     fleet=FLEET, client_id=DEV, reconnect_max_delay=0.5))
    conn.connect(timeout=10)
    return conn


def test_a_group_deployment_is_checked_against_the_groups_the_credentials_name(
        tmp_path: Path) -> None:
    """The signed-release source refuses a group deployment naming none of the device's
    groups: after new credentials that set is theirs (the removed group's deployment is
    refused, even if it reached the device)."""
    import time

    from device_agent._source import ReleaseSource
    from edge_sdk.identity import Credentials
    from edge_sdk.release import create_deployment
    from tests._agent_local import config, events
    from tests._trust_env import FLEET as SIM_FLEET
    from tests._trust_env import SimEnv

    env = SimEnv(tmp_path / "env")
    env.release("a", "1.0")
    env.release("a", "2.0", seed=2)
    cfg = config(tmp_path / "state", device_id="d1", fleet=SIM_FLEET,
                 trust={"root": str(env.repo.meta / "1.root.json"),
                        "deployment_key": str(env.repo.deployment_key_path)})
    agent = Agent(cfg, source=ReleaseSource(cfg, None, fetcher=env.sim), connect=False)
    agent.start()
    try:
        def given(*groups: str) -> None:
            """What the identity service calls before the link uses new credentials."""
            follow = agent._follow  # noqa: SLF001
            follow(Credentials(username="d1", password="p" * 16, issued=1,
                               expires_at=time.time() + 3600, groups=groups, ca_pem=None))

        def kinds() -> list[str]:
            return [e["event"] for e in events(agent)]

        given("lobby")
        agent.submit(create_deployment(env.repo, model="a", version="1.0", fleet=SIM_FLEET,
                                       groups=["lobby"]).document)
        wait_until(lambda: "committed" in kinds(), "the lobby deployment installed")
        given("door")
        assert agent.config.groups == ("door",)
        agent.submit(create_deployment(env.repo, model="a", version="2.0", fleet=SIM_FLEET,
                                       groups=["lobby"]).document)
        wait_until(lambda: "refused" in kinds(), "the lobby deployment refused")
        cur = agent.slots.current
        assert cur is not None and cur.version == "1.0"
    finally:
        agent.stop()
