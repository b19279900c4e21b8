"""A hostile claim holder against a real ``edge-sdk serve --enrol`` and a real agent: it
floods the claim's topics with garbage and random ids, squats the id of a device not yet
enrolled, and the broker restarts under everyone. The real device must still enrol under
its own id once the operator rejects the squatter, and serve must still be running."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.identity import DeviceKey, EnrolRequest, claim_username
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests._dynsec import dynsec_broker
from tests._e2e import FLEET
from tests._identity_host import BATCH, Host
from tests._process import wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics(FLEET)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with dynsec_broker(tmp_path) as (broker, creds):
        h = Host(tmp_path, broker, creds)
        try:
            yield h
        finally:
            h.close()


def _claim(host: Host) -> MqttConnection:
    c = MqttConnection(MqttConfig(url=host.broker.url, fleet=FLEET,
                                  username=claim_username(BATCH),
                                  password=host.claim_file.read_text().strip()), name="thief")
    c.connect()
    return c


def test_a_squatter_flooding_with_a_leaked_claim_cannot_keep_a_device_from_its_id(
        host: Host) -> None:
    thief = DeviceKey.generate()
    with _claim(host) as claim:
        # The id of a device not switched on yet, asked for first, with the thief's key.
        claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-7"), EnrolRequest.create(
            thief, "cam-7", BATCH, {"serial": "SN-7"}).to_bytes(), qos=1)
        for i in range(300):  # and noise: garbage and random ids
            dev = f"r-{secrets.token_hex(4)}"
            payload = os.urandom(200) if i % 3 else EnrolRequest.create(
                thief, dev, BATCH, {}).to_bytes()
            claim.publish(TOPICS.enrol_request(BATCH, dev), payload, qos=0)
    squat = host.wait_state("cam-7", "pending")
    assert squat["fingerprint"] == thief.fingerprint
    agent = host.agent("cam-7")
    try:
        wait_for(lambda: (host.enrolment("cam-7") or {}).get("conflicts", 0) >= 1, 60,
                 lambda: "the real device's request never counted as a conflict")
        host.broker.restart(downtime=1.0)
        # The operator sees two keys for one id and rejects the one it does not know.
        assert host.op("device", "reject", "cam-7", "--reason", "not ours") == 0
        row = wait_for(lambda: (r := host.enrolment("cam-7")) and r["state"] == "pending"
                       and r["fingerprint"] != thief.fingerprint and r, 60,
                       lambda: f"the real key never got the id: {host.enrolment('cam-7')}")
        assert row["fingerprint"] != thief.fingerprint
        assert host.op("device", "accept", "cam-7") == 0
        wait_for(lambda: host.fleet.states.get("cam-7", {}).get("online") is True, 60,
                 lambda: f"cam-7 never online: {agent.log.read_text()[-3000:]}")
    finally:
        agent.stop()
    assert host.proc.poll() is None, host.log.read_text()[-3000:]
