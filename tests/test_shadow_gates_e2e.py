"""Gated rollouts end to end: real agents as subprocesses running the shadow runs the
controller (a real `edge-sdk serve`) signs for them, under live requests that never fail.
A candidate that answers like the served model is promoted by the gate; one that
disagrees is not, and the rollout reports its agreement."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.fleet import FleetDB
from tests import _fleet_host, _fleetdb, _models
from tests._broker import Mosquitto
from tests._e2e import AgentProc, Fleet
from tests._fleet_host import Serve, grp, start, start_fleet, wait_status
from tests._process import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("shadow-gates")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        f.release("1")  # x + 1
        # Other bytes, the same answers as "1" (weights that change nothing).
        f.release("4", builder=lambda p: _models.weighted_offset_model(
            p, 1.0, np.ones((4, 8), np.float32)))
        f.release("2")  # x + 2: disagrees on every request
        yield f
        f.close()


@pytest.fixture()
def db_url(tmp_path: Path) -> Iterator[str]:
    yield from _fleetdb.make_db("sqlite", tmp_path)


serve = _fleet_host.serve


def requests_until(agents: list[AgentProc], done: object, most: int = 2000) -> int:
    """Requests to every agent in turn until ``done()``; each must be answered (200) by the
    served version. Returns how many were sent."""
    sent = 0
    while sent < most and not done():  # type: ignore[operator]
        for a in agents:
            version, y = a.infer()
            assert y == float(version) + 1.0 if version != "4" else y == 2.0
            sent += 1
    return sent


def test_a_candidate_that_agrees_is_promoted_by_the_gate_and_no_request_fails(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc], db_url: str,
        serve: Serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("agree", db_url), 2, db_url)
    rid = start(db_url, "--version", "4", "--group", g, "--waves", "100%",
                "--wave-timeout", "120", "--gate", "agreement>=0.99 over 20 requests within 5m")
    with FleetDB.open(db_url) as db:
        requests_until(procs, lambda: db.rollout(rid)["status"] == "completed"
                       or all(p.version() == "4" for p in procs))
    r = wait_status(db_url, rid, "completed")
    for p in procs:
        assert p.version() == "4", (r["devices"], p.log.read_text()[-3000:])
    shadows = [d["shadow"] for d in r["devices"]]
    assert all(s is not None and s["verdict"] in ("passed", "shadow_passed") for s in shadows), \
        shadows
    assert all(s["agreement"] == 1.0 and s["compared"] >= 20 for s in shadows), shadows


def test_a_candidate_that_disagrees_fails_the_gate_and_every_device_stays(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc], db_url: str,
        serve: Serve) -> None:
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("disagree", db_url), 2, db_url)
    # Neither device's failure may abort the rollout before the other's gate is judged.
    rid = start(db_url, "--version", "2", "--group", g, "--waves", "100%",
                "--wave-timeout", "120", "--gate", "agreement>=0.99 over 20 requests within 5m",
                "--max-failure-rate", "0.9", "--min-finished", "2")
    with FleetDB.open(db_url) as db:
        def decided() -> bool:
            devs = db.rollout(rid)["devices"]
            return len(devs) == 2 and all(d["status"] == "gate_failed" for d in devs)

        requests_until(procs, decided)
        wait_for(decided, 60, lambda: f"rollout {rid}: {db.rollout(rid)}")
        r = db.rollout(rid)
    for p in procs:
        assert p.version() == "1"  # never swapped
    for d in r["devices"]:
        s = d["shadow"]
        assert s is not None and s["compared"] >= 20 and s["agreement"] == 0.0, d
        assert "agreement" in (d["reason"] or ""), d
