"""A private 3-node NATS server cluster with MQTT enabled, on free loopback ports.

Each node gets its own config written here (``server_name``, ``jetstream { store_dir }``,
``cluster { name, listen, routes }``, ``mqtt { listen }``, a monitoring port); the
cluster counts as ready once the JetStream meta group has a leader and a retained QoS 1
message published on one node is read back on every node. Tests can ``kill -9`` a node
and start it again. Never a mocked broker: without ``nats-server`` the test fails (CI)
or is skipped (elsewhere).
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from edge_sdk.errors import EdgeError
from edge_sdk.transport import MqttConfig, MqttConnection
from tests._broker import free_port

CLUSTER = "edge-test"


def nats_binary() -> str | None:
    for cand in (shutil.which("nats-server"), "/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if cand and Path(cand).exists():
            return cand
    return None


class NatsNode:
    """One ``nats-server`` of the cluster."""

    def __init__(self, workdir: Path, name: str, route_ports: list[int], index: int) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mqtt_port = free_port()
        self.monitor_port = free_port()
        self.client_port = free_port()
        self.cluster_port = route_ports[index]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self.conf.write_text(
            f"server_name: {name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            f"cluster {{ name: {CLUSTER}, listen: 127.0.0.1:{self.cluster_port}, "
            f"routes: [{routes}] }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (.ci/setup.sh installs Debian's "
                               "nats-server package)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """``kill -9``: no goodbye to the cluster, no flush of the store."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def jsz(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/jsz",
                                    timeout=2) as resp:
            doc = json.loads(resp.read())
        assert isinstance(doc, dict)
        return doc

    def meta_leader(self) -> str | None:
        try:
            meta = self.jsz().get("meta_cluster")
        except (OSError, ValueError):
            return None
        leader = meta.get("leader") if isinstance(meta, dict) else None
        return leader if isinstance(leader, str) and leader else None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class PortTaken(RuntimeError):
    """A node could not bind a port: another process took it after ``free_port`` chose it."""


class NatsCluster:
    """Three (``size``) NATS nodes routed to each other, MQTT on each."""

    #: Clusters built with fresh ports when a node finds one of its ports taken.
    ATTEMPTS = 3

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.nodes = self._nodes(workdir)

    def _nodes(self, workdir: Path) -> list[NatsNode]:
        route_ports = [free_port() for _ in range(self.size)]
        return [NatsNode(workdir, f"n{i + 1}", route_ports, i) for i in range(self.size)]

    def urls(self, *order: int) -> str:
        """The MQTT URLs, comma-separated, of the nodes in ``order`` (default: all)."""
        idx = order or tuple(range(len(self.nodes)))
        return ",".join(self.nodes[i].url for i in idx)

    def start(self, timeout: float = 60) -> None:
        # A port free_port chose can be taken by another process (the rest of the suite)
        # before nats-server binds it: then the whole cluster starts again on new ports.
        for attempt in range(1, self.ATTEMPTS + 1):
            for n in self.nodes:
                n.start()
            try:
                self.wait_ready(timeout)
                return
            except PortTaken:
                self.stop()
                if attempt == self.ATTEMPTS:
                    raise
                self.nodes = self._nodes(self.workdir / f"retry-{attempt}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def leader_index(self) -> int | None:
        """The node that leads the JetStream meta group, as every live node sees it."""
        seen = {n.meta_leader() for n in self.nodes if n.alive}
        if len(seen) != 1:
            return None
        name = seen.pop()
        return next((i for i, n in enumerate(self.nodes) if n.name == name), None)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until a meta leader is elected and a retained message goes round on every node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    tail = n.log_tail()
                    kind = PortTaken if "address already in use" in tail else RuntimeError
                    raise kind(f"nats-server {n.name} exited: {tail}")
            if self.leader_index() is not None:
                live = [n for n in self.nodes if n.alive]
                if self.retained_round_trip(live[0], live, timeout=2.0):
                    return
            time.sleep(0.2)
        raise RuntimeError("NATS cluster not ready within "
                           f"{timeout:.0f} s: {self.nodes[0].log_tail()}")

    @staticmethod
    def retained_round_trip(writer: NatsNode, readers: list[NatsNode],
                            timeout: float = 2.0) -> bool:
        """Publish a retained QoS 1 message on ``writer``, read it on each of ``readers``
        with a fresh connection. False if any step fails within ``timeout`` each."""
        token = secrets.token_hex(6)
        topic = f"edge/nats-probe/{token}"
        try:
            with MqttConnection(MqttConfig(url=writer.url, connect_timeout=timeout),
                                name="probe-w") as w:
                w.publish_wait(topic, token, retain=True, timeout=timeout)
                for r in readers:
                    got = threading.Event()
                    with MqttConnection(MqttConfig(url=r.url, connect_timeout=timeout),
                                        name="probe-r") as c:
                        c.subscribe(topic, lambda t, p, got=got: got.set()
                                    if p == token.encode() else None, timeout=timeout)
                        if not got.wait(timeout):
                            return False
                w.publish_wait(topic, b"", retain=True, timeout=timeout)  # clear it
        except EdgeError:
            return False
        return True

    def unavailable_for(self, node: NatsNode, start: float, limit: float = 90) -> float:
        """Seconds from ``start`` (a monotonic time) until a retained round trip on
        ``node`` succeeds again."""
        deadline = start + limit
        while time.monotonic() < deadline:
            if self.retained_round_trip(node, [node], timeout=1.0):
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"{node.name} served no retained message within {limit:.0f} s "
                             f"of the kill: {node.log_tail()}")


