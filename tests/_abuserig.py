"""One device with its own credentials attacking a running fleet, measured.

The fleet is what an operator runs with the example broker setup: a Mosquitto with the
example's password file, ACL and queue limits (examples/mosquitto), ``edge-sdk serve
--only responder`` as the example's ``edge-repo`` user, ``edge-sdk serve --only fleet``
(registry, controller, page) as ``edge-fleet``, and real agents as subprocesses, each
with its own device credentials. An honest reporter device publishes numbered events
(QoS 1, each acknowledged by the broker, like the agent's outbox) and the attacker is a
raw MQTT client with a device's credentials publishing on its own ``events`` topic as
fast as the broker takes it. Used by ``bench/fleet_abuse.py`` and
``tests/test_registry_flood.py``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import edge_sdk
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _models
from tests._acl import EXAMPLE, FLEET, example_module, example_settings
from tests._broker import Mosquitto
from tests._e2e import AgentProc, X
from tests._fleetrig import HostProc
from tests._process import wait_for

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
HONEST = ("h0", "h1", "h2")
REPORTER = "rep"
ATTACKER = "mal"
TOPICS = Topics(FLEET)

#: The attacker: a raw MQTT 3.1.1 client (no paho: it publishes pre-encoded packets as
#: fast as the socket takes them) that connects with a device's credentials and sends
#: events of SIZE bytes on its own events topic for SECONDS; prints the count sent.
ATTACKER_SCRIPT = r"""
import json, socket, struct, sys, threading, time
host, port, user, pw, topic, size, seconds, qos = sys.argv[1:9]
size, seconds, qos = int(size), float(seconds), int(qos)

def s(b):
    return struct.pack("!H", len(b)) + b

def packet(kind, body):
    n, out = len(body), bytearray([kind])
    while True:
        b, n = n % 128, n // 128
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out) + body

sock = socket.create_connection((host, int(port)))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
connect = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + s(user.encode()) \
    + s(user.encode()) + s(pw.encode())
sock.sendall(packet(0x10, connect))
ack = sock.recv(4)
if len(ack) < 4 or ack[3] != 0:
    sys.exit(f"refused: {ack!r}")
stop = threading.Event()

def drain():
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except OSError:
            return

threading.Thread(target=drain, daemon=True).start()
pad = max(0, size - 60)
doc = json.dumps({"event": "flood", "pad": "x" * pad}).encode()
sent, mid = 0, 0
end = time.monotonic() + seconds
batch = []
while time.monotonic() < end:
    for _ in range(16):
        if qos:
            mid = mid % 65535 + 1
            batch.append(packet(0x32, s(topic.encode()) + struct.pack("!H", mid) + doc))
        else:
            batch.append(packet(0x30, s(topic.encode()) + doc))
    try:
        sock.sendall(b"".join(batch))
    except OSError as err:
        print(json.dumps({"sent": sent, "error": str(err)}), flush=True)
        sys.exit(0)
    sent += len(batch)
    batch.clear()
stop.set()
sock.sendall(bytes([0xE0, 0]))
print(json.dumps({"sent": sent, "bytes": sent * len(doc)}), flush=True)
"""


@dataclass
class AbuseResult:
    """What one scenario did to the fleet."""

    scenario: str
    rollout: str = "-"
    rollout_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    db_before_mib: float = 0.0
    db_after_mib: float = 0.0
    honest_sent: int = 0
    honest_received: int = 0
    #: The reporter's reports the registry counted as dropped or lost (not written), and
    #: those of them dropped by the registry itself (its budget: must stay 0).
    honest_counted: int = 0
    honest_dropped: int = 0
    flood_sent: int = 0
    flood_mib: float = 0.0
    flood_s: float = 0.0
    #: The registry's totals: reports dropped (budgets, size, queue) and lost (before it).
    dropped: int = 0
    lost: int = 0
    attacker_dropped: int = 0
    attacker_rows: int = 0
    notes: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssPeak:
    """Samples a process's resident memory every 50 ms; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._t.join(2)
        return self.peak


def example_queue_settings() -> str:
    """The example config's broker queue limits (per client: messages in flight, queued),
    which decide when Mosquitto drops messages for a subscriber that falls behind."""
    keep = ("max_inflight_messages", "max_queued_messages")
    lines = (EXAMPLE / "mosquitto.conf").read_text().splitlines()
    return "".join(f"{ln}\n" for ln in lines if ln.split(" ")[0] in keep)


class AbuseRig:
    """The fleet under attack (see the module docstring). A context manager."""

    def __init__(self, tmp: Path, *, db_url: str | None = None, agents: int = 3,
                 serve_args: Sequence[str] = (), wave_timeout: float = 120.0) -> None:
        self.tmp = tmp
        self.db_url = db_url or f"sqlite:///{tmp / 'fleet.db'}"
        self.honest = HONEST[:agents]
        self.serve_args = list(serve_args)
        self.wave_timeout = wave_timeout
        self._stack = contextlib.ExitStack()
        self.agents: list[AgentProc] = []
        self.broker: Mosquitto
        self.creds: dict[str, str] = {}
        self.fleet_proc: HostProc
        self.responder: HostProc

    # -- set up ------------------------------------------------------------------------

    def __enter__(self) -> AbuseRig:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        tmp = self.tmp
        tmp.mkdir(parents=True, exist_ok=True)
        users = {d: [] for d in (*self.honest, REPORTER, ATTACKER)}
        self.creds = example_module().generate(tmp / "auth", FLEET, users)
        conf = (f"password_file {tmp / 'auth' / 'passwd'}\n"
                f"acl_file {tmp / 'auth' / 'acl'}\n" + example_settings()
                + example_queue_settings() + "log_type notice\n")
        self.broker = self._stack.enter_context(
            Mosquitto(tmp / "broker", allow_anonymous=False, extra_conf=conf))
        self.repo = Repository.init(tmp / "repo", tmp / "keys")
        arts = tmp / "arts"
        arts.mkdir()
        src = _models.offset_model(arts / "adder-1.onnx", 1.0)
        art = edge_sdk.build_artifact(src, arts / "adder-1", name="adder", version="1",
                                      sample={"x": X})
        self.repo.add_artifact(art.path)
        common = ["--repo", str(self.repo.path), "--broker", self.broker.url, "--fleet",
                  FLEET]
        self.responder = HostProc(
            ["serve", *common, "--only", "responder", "--username", "edge-repo",
             "--password", self.creds["edge-repo"]], tmp / "serve-responder.log")
        self._stack.callback(self.responder.stop)
        self.fleet_proc = HostProc(
            ["serve", *common, "--only", "fleet", "--db", self.db_url, "--poll", "0.2",
             "--username", "edge-fleet", "--password", self.creds["edge-fleet"],
             *self.serve_args], tmp / "serve-fleet.log")
        self._stack.callback(self.fleet_proc.stop)
        wait_for(lambda: "serving" in self.fleet_proc.log.read_text(errors="replace")
                 or self.fleet_proc.proc.poll() is not None, 60)
        assert self.fleet_proc.proc.poll() is None, self.fleet_log()
        host = SimpleNamespace(repo=self.repo, broker=self.broker)
        for dev in self.honest:
            a = AgentProc(host, tmp / "agents", dev,  # type: ignore[arg-type]
                          broker_url=self.device_url(dev))
            self.agents.append(a)
            self._stack.callback(a.kill)
            a.start()
        from edge_sdk.fleet import FleetDB

        with FleetDB.open(self.db_url) as db:
            wait_for(lambda: sum(1 for d in db.devices(fleet=FLEET)
                                 if d["id"] in self.honest and d["online"])
                     == len(self.honest), 60,
                     lambda: f"agents online in the registry: {db.devices(fleet=FLEET)}")

    def device_url(self, device: str) -> str:
        return (f"mqtt://{device}:{self.creds[device]}@{self.broker.host}:"
                f"{self.broker.port}")

    def connect(self, device: str) -> MqttConnection:
        c = MqttConnection(MqttConfig(url=self.broker.url, fleet=FLEET, username=device,
                                      password=self.creds[device]), name=device)
        c.connect()
        return c

    def fleet_log(self) -> str:
        return self.fleet_proc.log.read_text(errors="replace")[-4000:]

    # -- measuring ---------------------------------------------------------------------

    def db_mib(self) -> float:
        if self.db_url.startswith("sqlite:///"):
            p = Path(self.db_url[len("sqlite:///"):])
            return sum(q.stat().st_size for q in (p, p.with_name(p.name + "-wal"))
                       if q.exists()) / MiB
        import sqlalchemy as sa

        from edge_sdk.fleet import FleetDB

        with FleetDB.open(self.db_url) as db, db.read() as c:
            return int(c.execute(sa.text("SELECT pg_database_size(current_database())"))
                       .scalar_one()) / MiB

    # -- acting ------------------------------------------------------------------------

    def start_rollout(self, version: str = "1") -> int:
        from edge_sdk.cli import main
        from edge_sdk.fleet import FleetDB

        args = ["rollout", "start", "--db", self.db_url, "--operator", "bench", "--fleet",
                FLEET, "--model", "adder", "--version", version, "--waves", "100%",
                "--wave-timeout", f"{self.wave_timeout:g}"]
        for d in self.honest:
            args += ["--device", d]
        assert main(args) == 0
        with FleetDB.open(self.db_url) as db:
            return int(db.rollouts(fleet=FLEET)[0]["id"])

    def wait_rollout(self, rid: int, timeout: float) -> dict[str, Any]:
        from edge_sdk.fleet import FleetDB

        with FleetDB.open(self.db_url) as db:
            return wait_for(lambda: (r := db.rollout(rid))["status"] in ("completed",
                                                                          "aborted") and r,
                            timeout, lambda: f"rollout {rid}: {db.rollout(rid)}")

    def flood(self, seconds: float, size: int, qos: int = 0) -> subprocess.Popen[str]:
        """Start the attacker (a subprocess); ``finish_flood`` reads what it sent."""
        return subprocess.Popen(
            [sys.executable, "-c", ATTACKER_SCRIPT, self.broker.host, str(self.broker.port),
             ATTACKER, self.creds[ATTACKER], TOPICS.events(ATTACKER), str(size),
             str(seconds), str(qos)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    @staticmethod
    def finish_flood(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0 or not out.strip():
            raise AssertionError(f"the attacker failed ({p.returncode}): {err[-2000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    def report(self, conn: MqttConnection, seq: int) -> None:
        """One numbered report from the honest reporter, acknowledged by the broker."""
        doc = {"device": REPORTER, "fleet": FLEET, "event": "report", "ts": time.time(),
               "seq": seq}
        conn.publish_wait(TOPICS.events(REPORTER), json.dumps(doc), qos=1)

    def heartbeat(self, conn: MqttConnection, last_seq: int) -> None:
        """A heartbeat as the agent sends it: it names the newest event sent."""
        doc = {"device": REPORTER, "fleet": FLEET, "event": "heartbeat", "ts": time.time(),
               "last_seq": last_seq}
        conn.publish_wait(TOPICS.events(REPORTER), json.dumps(doc), qos=0)

    def received(self, device: str, kind: str) -> int:
        from edge_sdk.fleet import FleetDB

        with FleetDB.open(self.db_url) as db:
            return sum(1 for e in db.device_history(device, 100_000, fleet=FLEET)
                       if e["kind"] == kind)

    def counts(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The registry's totals and its per-device counts of reports not written."""
        from edge_sdk.fleet import FleetDB

        with FleetDB.open(self.db_url) as db:
            totals = next(iter(db.registry_stats(fleet=FLEET)), {})
            per = getattr(db, "ingest_stats", None)
            devices = {r["device"]: r for r in per(fleet=FLEET)} if per else {}
        return totals, devices


def run(tmp: Path, scenario: str, *, flood_s: float = 20.0, size: int = 120_000,
        qos: int = 0, reports: int = 200, db_url: str | None = None,
        serve_args: Sequence[str] = (), wave_timeout: float = 120.0,
        settle_s: float = 60.0) -> AbuseResult:
    """One scenario: ``honest`` (no attacker) or ``flood`` (the attacker sends ``size``-byte
    events for ``flood_s`` seconds). Either way a 3-device rollout starts with the flood
    and the reporter sends ``reports`` numbered events spread over it."""
    res = AbuseResult(scenario)
    with AbuseRig(tmp, db_url=db_url, serve_args=serve_args,
                  wave_timeout=wave_timeout) as rig:
        pid = rig.fleet_proc.proc.pid
        time.sleep(1.0)  # the registry writes what the agents said at start
        res.rss_before_mib, res.db_before_mib = rss_mib(pid), rig.db_mib()
        peak = RssPeak(pid)
        rep = rig.connect(REPORTER)
        attacker = rig.flood(flood_s, size, qos) if scenario != "honest" else None
        t0 = time.monotonic()
        rid = rig.start_rollout()
        done: dict[str, Any] = {}

        def wait() -> None:
            done.update(rig.wait_rollout(rid, wave_timeout + 60))
            done["_s"] = time.monotonic() - t0

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        try:
            every = flood_s / max(1, reports)
            for i in range(reports):
                rig.report(rep, i + 1)
                res.honest_sent += 1
                time.sleep(max(0.0, t0 + (i + 1) * every - time.monotonic()))
            if attacker is not None:
                got = rig.finish_flood(attacker, flood_s + 30)
                res.flood_sent = int(got.get("sent", 0))
                res.flood_mib = int(got.get("bytes", 0)) / MiB
                if "error" in got:
                    res.notes.append(f"attacker: {got['error']}")
            res.flood_s = time.monotonic() - t0
            # The registry catches up with what it took in, and counts the rest: the
            # reporter goes on with heartbeats, as an agent does, naming its last report.
            end = time.monotonic() + settle_s
            while time.monotonic() < end:
                rig.heartbeat(rep, res.honest_sent)
                res.honest_received = rig.received(REPORTER, "report")
                totals, per = rig.counts()
                mine = per.get(REPORTER, {})
                res.honest_dropped = int(mine.get("dropped", 0))
                res.honest_counted = res.honest_dropped + int(mine.get("lost", 0))
                if res.honest_received + res.honest_counted >= res.honest_sent:
                    break
                time.sleep(1.0)
        finally:
            rep.close()
            if attacker is not None and attacker.poll() is None:
                attacker.kill()
        waiter.join(wave_timeout + 60)
        if done:
            res.rollout = done["status"] if done["status"] == "completed" else \
                f"{done['status']}: {done['reason']}"
            res.rollout_s = float(done["_s"])
        else:
            res.rollout = "still running"
        res.rss_peak_mib = peak.stop()
        res.rss_after_mib = rss_mib(pid)
        res.db_after_mib = rig.db_mib()
        totals, per = rig.counts()
        res.dropped = int(totals.get("dropped", 0) or 0)
        res.lost = int(totals.get("lost", 0) or 0)
        res.attacker_dropped = int(per.get(ATTACKER, {}).get("dropped", 0))
        res.attacker_rows = rig.received(ATTACKER, "flood")
        if rig.fleet_proc.proc.poll() is not None:
            res.notes.append(f"serve --only fleet exited: {rig.fleet_log()}")
        broker_log = rig.broker.log.read_text(errors="replace") \
            if rig.broker.log.exists() else ""
        if "dropped" in broker_log:
            res.notes.append("mosquitto: " + "; ".join(sorted({ln.split(": ", 1)[-1] for ln in
                             broker_log.splitlines() if "dropped" in ln}))[:300])
    return res
