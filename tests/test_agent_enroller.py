"""The agent against the real controller: the Enroller of ``serve --enrol`` over a dynsec
Mosquitto and a real fleet record, decisions taken through the operator API (what
``edge-sdk device accept|revoke`` call). Enrol, accept, renew, revoke, enrol again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent, AgentConfig
from edge_sdk.fleet import Enroller, FleetDB, IdentityConfig
from edge_sdk.fleet import _enrol as rec
from edge_sdk.fleet._dynsec import SERVE, DynsecAdmin
from edge_sdk.identity import claim_username
from tests._agent_local import LocalSource
from tests._dynsec import FLEET, connect_as, dynsec_broker
from tests._process import wait_until

DEV = "cam-1"
BATCH = "line-1"


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[str, FleetDB, str]]:
    """A dynsec broker, a sqlite record and a running Enroller (credentials live 8 s);
    yields the broker URL, the record and the claim password."""
    with dynsec_broker(tmp_path) as (broker, creds):
        db = FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}")
        conn = connect_as(broker, creds, SERVE)
        admin = DynsecAdmin(conn, fleet=FLEET)
        enroller = Enroller(db, conn, admin, fleet=FLEET, config=IdentityConfig(
            lifetime_s=8.0, poll_s=0.1, sweep_s=0.2)).start()
        try:
            password = rec.create_claim(db, FLEET, BATCH, actor="op")
            wait_until(lambda: all(c["want"] == "" for c in rec.claims(db, FLEET)), "the claim")
            yield broker.url, db, password
        finally:
            enroller.stop()
            conn.close()
            db.close()



def _stored(agent: Agent) -> dict[str, Any]:
    path = agent.config.identity_dir / "credentials.json"
    return json.loads(path.read_text()) if path.exists() else {"current": None,
                                                               "pending": None}


def _issued(agent: Agent) -> int:
    cur = _stored(agent)["current"]
    return int(cur["credentials"]["issued"]) if cur else 0


def test_an_agent_enrols_renews_and_comes_back_after_revocation_through_serve(
        tmp_path: Path, controller: tuple[str, FleetDB, str]) -> None:
    url, db, claim_pw = controller
    cfg = AgentConfig.from_dict({
        "device_id": DEV, "fleet": FLEET, "state_dir": str(tmp_path / "state"),
        "http": {"port": 0}, "broker": {"url": url},
        "identity": {"batch": BATCH, "claim_password": claim_pw, "poll_s": 0.3,
                     "answer_wait_s": 2.0, "renew_fraction": 0.5,
                     "facts": {"hw": "test-rig"}}})
    agent = Agent(cfg, source=LocalSource())
    agent.start()
    try:
        conn = agent.connection
        assert conn is not None
        wait_until(lambda: [r for r in rec.enrolments(db, FLEET, "pending")
                       if r["device_id"] == DEV], "the pending request")
        row = rec.enrolment(db, FLEET, DEV)
        assert row is not None and row["batch"] == BATCH
        assert not conn.connected and agent.http is not None

        rec.accept_devices(db, FLEET, [DEV], groups=["lobby"], actor="op")
        wait_until(lambda: conn.connected, "the device's own connection")
        assert "lobby" in agent.config.groups

        # Credentials live 8 s and are renewed at half: the Enroller switches the broker
        # to each new password after the agent's ack, and the link follows.
        wait_until(lambda: _issued(agent) >= 2 and _stored(agent)["pending"] is None
              and conn.connected, "a renewed password in use")
        row = rec.enrolment(db, FLEET, DEV)
        assert row is not None and row["issued"] >= 2

        rec.revoke_device(db, FLEET, DEV, reason="stolen", actor="op")
        wait_until(lambda: not conn.connected, "the revoked device kicked")
        wait_until(lambda: (rec.enrolment(db, FLEET, DEV) or {}).get("state") == "pending",
              "a new request with the same key")
        assert not conn.connected
        rec.accept_devices(db, FLEET, [DEV], actor="op")
        wait_until(lambda: conn.connected, "the device back after a new acceptance")
        assert claim_username(BATCH) not in (conn.config.username or "")
    finally:
        agent.stop()
