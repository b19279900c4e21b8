"""The protocol unchanged on a 3-node NATS MQTT cluster: real agents as subprocesses,
the real controller and responder (`edge-sdk serve`), devices and operators on
different nodes, and a node killed with SIGKILL in the middle of a rollout."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.release import create_deployment
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests._e2e import FLEET, AgentProc
from tests._fleet_host import wait_status
from tests._nats import nats_binary
from tests._nats_fleet import GROUP, N_AGENTS, ClusterFleet
from tests._process import wait_for

pytestmark = pytest.mark.skipif(nats_binary() is None,
                                reason="nats-server is not installed (.ci/setup.sh does it)")


@pytest.fixture(scope="module")
def cf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFleet]:
    f = ClusterFleet(tmp_path_factory.mktemp("nats-e2e"))
    try:
        f.serve.start()
        for a in f.agents:
            a.start()
        with FleetDB.open(f.db_url) as db:
            # Deploy to devices the registry hears, as an operator does: a device says it
            # is online once the broker granted its subscriptions. NATS 2.9 loses a
            # retained QoS 1 document published while the subscription is being set up:
            # the node's retained copy is not there yet and the subscription's JetStream
            # consumer, created after it was stored, starts after it.
            wait_for(lambda: len([d for d in db.devices(group=GROUP) if d["online"]])
                     == N_AGENTS, 60, lambda: f"registry has {db.devices(group=GROUP)}")
            docs = {a.device: create_deployment(f.fleet.repo, model="adder", fleet=FLEET,
                                                version="1", devices=[a.device]).document
                    for a in f.agents}
            for a in f.agents:
                f.fleet.publish_raw(a.device, docs[a.device])
            for a in f.agents:
                serve_resent(a, functools.partial(f.fleet.publish_raw, a.device, docs[a.device]))
            wait_for(lambda: len([d for d in db.devices(group=GROUP)
                                  if d["version"] == "1" and d["online"]]) == N_AGENTS, 60,
                     lambda: f"registry has {db.devices(group=GROUP)}; serve log: "
                             f"{f.serve.log.read_text()[-2000:]}")
        yield f
    finally:
        f.close()


def serve_resent(agent: AgentProc, resend: Callable[[], None], version: str = "1",
                 times: int = 5) -> None:
    """Wait until ``agent`` serves ``version``, sending its document again each time a
    wait runs out, as the controller re-sends a rollout's (``republish_s``): a QoS 1
    subscription granted long before the publish can still miss it on NATS 2.9 (its
    JetStream consumer skipped a stored message of its subject; traced with -DV). The
    agent takes a document it already has as a redelivery."""
    for _ in range(times):
        try:
            agent.wait_version(version, timeout=15)
            return
        except AssertionError:
            resend()
    agent.wait_version(version)


def start_rollout(cf: ClusterFleet, version: str) -> int:
    assert main(["rollout", "start", "--db", cf.db_url, "--operator", "tester", "--fleet",
                 FLEET, "--model", "adder", "--version", version, "--group", GROUP,
                 "--waves", "1,100%", "--wave-timeout", "90"]) == 0
    with FleetDB.open(cf.db_url) as db:
        return int(db.rollouts()[0]["id"])


def assert_everyone_on(cf: ClusterFleet, rollout: dict[str, Any], version: str) -> None:
    assert sorted(d["status"] for d in rollout["devices"]) == ["committed"] * N_AGENTS, rollout
    for a in cf.agents:
        assert a.infer() == (version, float(version) + 1.0)
    with FleetDB.open(cf.db_url) as db:
        wait_for(lambda: sorted((d["id"], d["version"], d["online"])
                                for d in db.devices(group=GROUP))
                 == [(a.device, version, True) for a in cf.agents], 30,
                 lambda: f"registry: {db.devices(group=GROUP)}")


def test_shared_subscriptions_are_detected_as_missing_on_nats(cf) -> None:
    node = cf.cluster.nodes[cf.b]
    with MqttConnection(MqttConfig(url=node.url, fleet=FLEET), name="probe") as conn:
        assert conn.shared_subscriptions_work(Topics(FLEET).share_probe("t1"), "edge-repo") \
            is False
    assert "does not honour $share subscriptions" in cf.serve.log.read_text()


@pytest.mark.slow
def test_rollout_commits_everywhere_with_devices_and_operator_on_different_nodes(
        cf, capsys) -> None:
    t0 = time.monotonic()
    rid = start_rollout(cf, "2")
    r = wait_status(cf.db_url, rid, "completed", 120)
    elapsed = time.monotonic() - t0
    assert_everyone_on(cf, r, "2")
    with capsys.disabled():
        print(f"\nrollout to {N_AGENTS} agents on a 3-node NATS cluster: {elapsed:.1f} s",
              file=sys.stderr)


@pytest.mark.slow
def test_node_killed_mid_rollout_devices_fail_over_and_every_device_commits(
        cf, capsys) -> None:
    t0 = time.monotonic()
    rid = start_rollout(cf, "3")
    with FleetDB.open(cf.db_url) as db:
        # Wave 1 is done and wave 2's deployments are out: the kill lands mid-rollout.
        wait_for(lambda: any(d["status"] == "sent" for d in db.rollout(rid)["devices"]
                             if d["wave"] >= 2), 60, lambda: f"{db.rollout(rid)}")
    t_kill = time.monotonic()
    killed, down = cf.kill_device_node()
    r = wait_status(cf.db_url, rid, "completed", 120)
    done = time.monotonic()
    assert_everyone_on(cf, r, "3")
    # Each agent's report went out through another node: it moved on from the dead one.
    for a in cf.agents:
        assert cf.fleet.states[a.device]["online"] is True
        assert (cf.fleet.states[a.device].get("model") or {}).get("version") == "3"
    with capsys.disabled():
        print(f"\nNATS node {killed} (JetStream meta leader, the devices' node) "
              f"killed mid-rollout: retained reads on another node failed for {down:.1f} s; "
              f"rollout completed {done - t_kill:.1f} s after the kill "
              f"({done - t0:.1f} s in all)", file=sys.stderr)
