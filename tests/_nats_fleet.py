"""A fleet on a 3-node NATS MQTT cluster (tests/_nats.py): the fleet host, ``edge-sdk
serve`` and agents, each connected to different nodes, so a test can kill the devices'
node in the middle of a rollout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests import _fleetdb
from tests._e2e import FLEET, AgentProc, Fleet
from tests._fleet_host import Serve
from tests._nats import NatsCluster

GROUP = "nats"
N_AGENTS = 4


class _Urls:
    """What Fleet reads of a broker: its URL (here a list of cluster nodes)."""

    def __init__(self, url: str) -> None:
        self.url = url


class ClusterFleet:
    """The cluster, the fleet host (on node B), `serve` (on node C) and the agents (on
    node A first). A is the JetStream meta leader at start: killing it is the worst case."""

    def __init__(self, tmp: Path, n_agents: int = N_AGENTS) -> None:
        self.cluster = NatsCluster(tmp / "nats")
        self.cluster.start()
        lead = self.cluster.leader_index()
        self.a = 0 if lead is None else lead
        self.b, self.c = [i for i in range(3) if i != self.a]
        self.fleet = Fleet(tmp, _Urls(self.cluster.urls(self.b, self.c, self.a)))  # type: ignore[arg-type]
        for v in ("1", "2", "3"):
            self.fleet.release(v)
        self.db_url = f"sqlite:///{tmp / 'fleet.db'}"
        self.serve = Serve(self.fleet, self.db_url, tmp / "serve")
        self.serve.cmd[self.serve.cmd.index("--broker") + 1] = self.cluster.urls(
            self.c, self.a, self.b)
        self.agents: list[AgentProc] = []
        device_urls = self.device_urls()
        for i in range(n_agents):
            agent = AgentProc(self.fleet, tmp / "agents", f"{GROUP}-{i}", groups=(GROUP,),
                              broker_url=device_urls)
            if i % 2:  # half of them name the nodes as a TOML list
                text = agent.config.read_text().replace(
                    f'url = "{device_urls}"', f"urls = {json.dumps(device_urls.split(','))}")
                assert "urls = [" in text
                agent.config.write_text(text)
            self.agents.append(agent)
        if self.agents:
            _fleetdb.assign(self.db_url, FLEET, [a.device for a in self.agents], GROUP)

    def device_urls(self) -> str:
        """The nodes as the devices list them: the one that will be killed first."""
        return self.cluster.urls(self.a, self.b, self.c)

    def kill_device_node(self) -> tuple[str, float]:
        """``kill -9`` node A; return its name and how long (s) retained reads on node B
        failed after it."""
        killed = self.cluster.nodes[self.a]
        t_kill = time.monotonic()
        killed.kill()
        return killed.name, self.cluster.unavailable_for(self.cluster.nodes[self.b], t_kill)

    def close(self) -> None:
        for a in self.agents:
            a.kill()
        self.serve.kill()
        self.fleet.close()
        self.cluster.stop()
