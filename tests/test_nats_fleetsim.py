"""30 simulated devices (tests/_fleetsim.py: the real agent code, several per process) on
a 3-node NATS MQTT cluster, the node they are on killed with SIGKILL mid-rollout."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from tests import _fleetdb
from tests._e2e import FLEET
from tests._fleet_host import wait_status
from tests._fleetsim import FleetSim
from tests._nats import nats_binary
from tests._nats_fleet import ClusterFleet
from tests._process import wait_for

pytestmark = pytest.mark.skipif(nats_binary() is None,
                                reason="nats-server is not installed (.ci/setup.sh does it)")

N = 30
GROUP = "natsim"


@pytest.fixture()
def cf(tmp_path) -> Iterator[ClusterFleet]:
    f = ClusterFleet(tmp_path, n_agents=0)
    try:
        f.serve.start()
        yield f
    finally:
        f.close()


@pytest.mark.slow
def test_node_killed_mid_rollout_to_30_simulated_devices_loses_none(cf, tmp_path,
                                                                   capsys) -> None:
    repo = cf.fleet.repo
    with FleetSim(tmp_path / "sim", n=N, broker_urls=[cf.device_urls()],
                  root=repo.meta / "1.root.json", deployment_key=repo.deployment_key_path,
                  fleet=FLEET, groups=(GROUP,), prefix=GROUP, per_process=15) as sim:
        _fleetdb.assign(cf.db_url, FLEET, sim.devices, GROUP)  # provisioned in bulk
        sim.start()
        with FleetDB.open(cf.db_url) as db:
            wait_for(lambda: sum(1 for d in db.devices(group=GROUP) if d["online"]) == N, 90,
                     lambda: f"registry: {len(db.devices(group=GROUP))} devices")
            t0 = time.monotonic()
            assert main(["rollout", "start", "--db", cf.db_url, "--operator", "tester",
                         "--fleet", FLEET, "--model", "adder", "--version", "2", "--group",
                         GROUP, "--waves", "1,100%", "--wave-timeout", "120"]) == 0
            rid = int(db.rollouts()[0]["id"])
            wait_for(lambda: any(d["status"] == "sent" for d in db.rollout(rid)["devices"]
                                 if d["wave"] >= 2), 60, lambda: f"{db.rollout(rid)}")
            before = sum(d["status"] == "committed" for d in db.rollout(rid)["devices"])
            t_kill = time.monotonic()
            killed, down = cf.kill_device_node()
            r = wait_status(cf.db_url, rid, "completed", 150)
            done = time.monotonic()
            assert sorted(d["status"] for d in r["devices"]) == ["committed"] * N, r
            assert {d["device"] for d in r["devices"]} == set(sim.devices)
            wait_for(lambda: sorted((d["id"], d["version"], d["online"])
                                    for d in db.devices(group=GROUP))
                     == [(d, "2", True) for d in sim.devices], 30,
                     lambda: f"registry: {db.devices(group=GROUP)}")
    with capsys.disabled():
        print(f"\n{N} simulated devices, NATS node {killed} killed mid-rollout with "
              f"{before}/{N} committed: retained reads failed for {down:.1f} s; rollout "
              f"completed {done - t_kill:.1f} s after the kill ({done - t0:.1f} s in all)",
              file=sys.stderr)
