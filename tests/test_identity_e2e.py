"""Device identity end to end: a real Mosquitto with the dynamic security plugin set up as
``edge-sdk broker init`` writes it, a real ``edge-sdk serve --enrol`` subprocess (the
fleet part, as ``edge-serve``, the broker's admin), real agent subprocesses that hold
nothing but the claim credential of their batch, and the operator's commands.

A fresh device enrols, is accepted and gets a deployment (its own and its group's); a
rejected one gets nothing; a revoked one is disconnected within 10 s, cannot reconnect
with what it holds, is skipped by rollouts and can come back only through acceptance;
credentials rotate before they expire while a client keeps predicting."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_sdk.errors import TransportError
from edge_sdk.transport import MqttConfig, MqttConnection
from tests._dynsec import dynsec_broker
from tests._e2e import FLEET, AgentProc
from tests._identity_host import BATCH, LIFETIME_S, Host
from tests._process import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("identity")
    with dynsec_broker(tmp) as (broker, creds):
        h = Host(tmp, broker, creds)
        try:
            yield h
        finally:
            h.close()


def stored_credentials(agent: AgentProc) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (agent.state / "identity" / "credentials.json").read_text())
    return doc


def linked(agent: AgentProc) -> bool:
    """What the agent's own metrics say of its broker link."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return "edge_agent_broker_connected 1.0" in text


def connects(host: Host, user: str, password: str) -> bool:
    conn = MqttConnection(MqttConfig(url=host.broker.url, fleet=FLEET, username=user,
                                     password=password, connect_timeout=5), name=user)
    try:
        conn.connect()
    except TransportError:
        return False
    conn.close()
    return True


def test_fresh_device_enrols_is_accepted_and_gets_its_deployments(host: Host) -> None:
    agent = host.agent("cam-1")
    try:
        row = host.wait_state("cam-1", "pending")
        assert row["batch"] == BATCH and row["fingerprint"]
        # Nothing reaches a device before acceptance: it has no account of its own.
        assert "cam-1" not in host.fleet.states
        assert host.op("device", "accept", "cam-1", "--group", "lobby") == 0
        wait_for(lambda: host.fleet.states.get("cam-1", {}).get("online") is True, 60,
                 lambda: f"cam-1 never online as itself: {agent.log.read_text()[-3000:]}")
        # The key never left the device: the record holds the public half only.
        key = (agent.state / "identity" / "device.key").read_bytes()
        assert b"PRIVATE KEY" in key
        assert "PRIVATE" not in json.dumps(host.enrolment("cam-1"))
        host.fleet.release("1")
        host.fleet.deploy("cam-1", "1")
        agent.wait_version("1")
        # ... and the group the operator gave it at acceptance reaches it too.
        host.fleet.release("2")
        from edge_sdk.release import create_deployment, publish_deployment

        sd = create_deployment(host.fleet.repo, model="adder", fleet=FLEET, version="2",
                               groups=["lobby"])
        publish_deployment(host.fleet.host, sd)
        agent.wait_version("2")
    finally:
        agent.stop()


def test_rejected_device_gets_no_account_and_nothing_else(host: Host) -> None:
    agent = host.agent("cam-2")
    try:
        host.wait_state("cam-2", "pending")
        assert host.op("device", "reject", "cam-2", "--reason", "not ours") == 0
        wait_for(lambda: "enrolment_rejected" in agent.log.read_text()
                 or "rejected" in agent.log.read_text(), 30,
                 lambda: agent.log.read_text()[-2000:])
        time.sleep(2)
        assert not (agent.state / "identity" / "credentials.json").exists()
        assert "cam-2" not in host.fleet.states
        row = host.enrolment("cam-2")
        assert row is not None and row["state"] == "rejected"
        assert row["reason"] == "not ours"
    finally:
        agent.stop()


def test_revoked_device_is_cut_off_within_10s_and_comes_back_only_by_acceptance(
        host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    agent = host.agent("cam-3")
    try:
        host.wait_state("cam-3", "pending")
        assert host.op("device", "accept", "cam-3") == 0
        wait_for(lambda: host.fleet.states.get("cam-3", {}).get("online") is True, 60,
                 lambda: agent.log.read_text()[-3000:])
        creds = stored_credentials(agent)
        t0 = time.monotonic()
        assert host.op("device", "revoke", "cam-3", "--reason", "stolen") == 0
        # The agent itself sees its link closed (dynsec kicks without the last will).
        wait_for(lambda: not linked(agent), 10,
                 lambda: f"cam-3 still linked {time.monotonic() - t0:.1f} s after revoke")
        took = time.monotonic() - t0
        assert took < 10
        # Whatever it holds no longer opens a connection.
        passwords = {c["credentials"]["password"] for c in creds.values() if c}
        assert passwords
        for pw in passwords:
            assert not connects(host, "cam-3", pw)
        row = host.enrolment("cam-3")
        assert row is not None
        audit = host.db.audit(50)
        entry = [a for a in audit if a["action"] == "device.revoke"][-1]
        assert entry["actor"] == "tester" and "stolen" in json.dumps(entry)
        # Rollouts skip it: registered, but no selector matches it any more.
        capsys.readouterr()
        assert host.op("rollout", "start", "--model", "adder", "--version", "1",
                       "--device", "cam-3") != 0
        assert "matches no device" in capsys.readouterr().err
        # It asks again with its key and waits for an operator: pending, not accepted.
        host.wait_state("cam-3", "pending", 60)
        time.sleep(1)
        assert not linked(agent)
        assert host.op("device", "accept", "cam-3") == 0
        wait_for(lambda: linked(agent), 60, lambda: agent.log.read_text()[-3000:])
    finally:
        agent.stop()


def test_credentials_rotate_before_expiry_while_the_agent_serves(host: Host) -> None:
    agent = host.agent("cam-4")
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                agent.infer()
                answered[0] += 1
            except Exception as err:  # a failed request is what this test counts
                failures.append(repr(err))
            time.sleep(0.02)

    try:
        host.wait_state("cam-4", "pending")
        assert host.op("device", "accept", "cam-4") == 0
        wait_for(lambda: host.fleet.states.get("cam-4", {}).get("online") is True, 60,
                 lambda: agent.log.read_text()[-3000:])
        host.fleet.deploy("cam-4", "1")
        agent.wait_version("1")
        first = host.wait_state("cam-4", "accepted")["issued"]
        t = threading.Thread(target=client)
        t.start()
        # Two renewals: each well before the credentials in force expire.
        wait_for(lambda: (host.enrolment("cam-4") or {}).get("issued", 0) >= first + 2,
                 4 * LIFETIME_S, lambda: f"no renewal: {host.enrolment('cam-4')}; "
                                         f"{agent.log.read_text()[-3000:]}")
        # Still itself, still updating: a deployment after the renewals arrives.
        host.fleet.deploy("cam-4", "2")
        agent.wait_version("2")
        stop.set()
        t.join(10)
        assert not failures, failures[:3]
        assert answered[0] > 0
        kinds = host.fleet.kinds("cam-4")
        renewals = [e for e in host.fleet.history("cam-4")
                    if e["event"] == "credentials_issued" and e.get("how") == "renewal"]
        assert len(renewals) >= 2, kinds
        assert "credential_renewal_failed" not in kinds, kinds
        assert "expired" not in str((host.enrolment("cam-4") or {}).get("broker"))
    finally:
        stop.set()
        agent.stop()
