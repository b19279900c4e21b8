"""FleetServer: what ``edge-sdk serve`` runs for a fleet (registry, controller, page),
started from Python against a real broker and both database engines."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

from edge_sdk.fleet import FleetDB, FleetServer, WebConfig
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _fleetdb
from tests._broker import Mosquitto
from tests._fleetrig import wait_for

db_url = _fleetdb.db_url
FLEET = "fleet-server"


def test_a_fleet_server_registers_serves_its_page_and_hands_its_lease_on_when_stopped(
        shared_broker: Mosquitto, db_url: str, tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    cfg = MqttConfig(url=shared_broker.url, fleet=FLEET)
    topic = Topics(FLEET).state("cam-1")
    state = {"online": True, "model": {"name": "adder", "version": "1"}, "phase": "idle"}
    with FleetDB.open(db_url) as db, MqttConnection(cfg) as conn, \
            MqttConnection(cfg) as other:
        first = FleetServer(db, repo, conn, web=WebConfig(port=0), poll_s=0.2, lease_ttl=3.0)
        assert first.wait_for_lease(threading.Event())
        second = FleetServer(db, repo, other, poll_s=0.2, lease_ttl=3.0)
        try:
            with first:
                assert first.running and first.web is not None
                conn.publish_wait(topic, json.dumps(state).encode(), qos=1, retain=True)
                wait_for(lambda: db.device("cam-1", fleet=FLEET), 15, "the device registered")
                with urllib.request.urlopen(first.web.url + "api/devices", timeout=10) as r:
                    assert [d["id"] for d in json.load(r)] == ["cam-1"]
                lease = db.lease(FLEET)
                assert lease is not None and lease["holder"] == first.controller.holder

                # A second one on the same database and fleet waits, and says so once.
                said: list[str] = []
                stop = threading.Event()
                threading.Timer(1.0, stop.set).start()
                assert not second.wait_for_lease(stop, say=said.append)
                assert len(said) == 1 and said[0].startswith(
                    f"waiting: fleet {FLEET!r}"), said
            # Stopped: the page is closed and the lease given up, so the next one takes it
            # at once instead of after the lease's expiry.
            assert not first.running and db.lease(FLEET) is None
            assert second.wait_for_lease(threading.Event())
        finally:
            second.controller.stop()
            conn.publish_wait(topic, b"", qos=1, retain=True)
