"""The fleet controller under faults, end to end on SQLite and PostgreSQL: real agents as
subprocesses, a real Mosquitto, `edge-sdk serve` as a subprocess that is killed with
SIGKILL; hostile device reports while a rollout runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from edge_sdk.fleet import FleetDB
from tests import test_agent_e2e, test_fleet_e2e
from tests._broker import Mosquitto
from tests.test_agent_e2e import Fleet, wait_for
from tests.test_fleet_e2e import grp, start, start_fleet, wait_status
from tests.test_fleet_registry import HOSTILE_EVENTS, HOSTILE_STATES

agents = test_agent_e2e.agents
db_url = test_fleet_e2e.db_url
serve = test_fleet_e2e.serve


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-durable")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3", "4", "5"):
            f.release(v)
        yield f
        f.close()


@pytest.mark.slow
def test_hostile_reports_during_a_rollout_are_counted_and_ingestion_goes_on(
        fleet, tmp_path, agents, db_url, serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("junk", db_url), 3, db_url)
    hostile = [*HOSTILE_STATES.values(), *HOSTILE_EVENTS.values()]
    t = fleet.topics
    sent = [0]
    done = threading.Event()

    def flood() -> None:  # on the devices' own topics, and on made-up ones
        while not done.is_set():
            for p in procs:
                for i, (payload, _) in enumerate(hostile):
                    leaf = t.state if i < len(HOSTILE_STATES) else t.events
                    fleet.host.publish_wait(leaf(p.device if i % 2 else f"{g}-junk{i}"),
                                            payload, qos=1)
                    sent[0] += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        rid = start(db_url, "--version", "2", "--group", g, "--waves", "1,100%",
                    "--rate", "60")
        r = wait_status(db_url, rid, "completed", 60)
    finally:
        done.set()
        flooder.join(30)
    with FleetDB.open(db_url) as db:
        assert [p["by_status"] for p in r["progress"]] == [{"committed": 1},
                                                           {"committed": 2}]
        for p in procs:  # their later state still landed
            d = db.device(p.device)
            assert d is not None and d["version"] == "2" and d["last_result"] == "committed"
        stats = wait_for(lambda: (s := db.registry_stats(fleet=test_agent_e2e.FLEET))
                         and s[0]["malformed"] >= sent[0] and s[0], 20,
                         lambda: f"sent {sent[0]}: {db.registry_stats()}")
        assert stats["db_errors"] == 0 and stats["dropped"] == 0
        assert {d["id"] for d in db.devices(group=g)} == {p.device for p in procs}
