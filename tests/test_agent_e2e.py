"""End to end: real agents as subprocesses, a real Mosquitto, a real signed release
repository served by the real responder, deployments signed and published as an
operator would."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from device_agent._crash import CRASH_ENV, CRASH_POINTS
from edge_sdk.release import (
    Repository,
    create_deployment,
    deployment_state,
    publish_deployment,
)
from edge_sdk.transport import MqttConfig, MqttConnection, RepoResponder, Topics
from tests import _models
from tests._broker import Mosquitto

FLEET = "lab"
ROOT = Path(__file__).resolve().parents[1]
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def offset_of(version: str) -> float:
    return float(version)


class Fleet:
    """Host side: repository, broker, responder, and a listener on every device's reports."""

    def __init__(self, tmp: Path, broker: Mosquitto) -> None:
        self.tmp = tmp
        self.broker = broker
        self.repo = Repository.init(tmp / "repo", tmp / "keys")
        self.arts = tmp / "arts"
        # A persistent session: device reports sent while this listener reconnects
        # (after a broker restart, say) are queued for it rather than lost.
        cfg = MqttConfig(url=broker.url, fleet=FLEET, persistent_session=True,
                         client_id=f"fleet-host-{random.getrandbits(32):08x}")
        self.host = MqttConnection(cfg)
        self.host.connect()
        self.responder = RepoResponder(self.host, self.repo.path)
        self.responder.start()
        self.topics = Topics(FLEET)
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.host.subscribe(self.topics.every_device("events"), self._on_event)
        self.host.subscribe(self.topics.every_device("state"), self._on_state)
        self.released: set[str] = set()

    def _on_event(self, topic: str, payload: bytes) -> None:
        doc = _report(payload)
        if isinstance(doc, dict) and doc.get("event") != "heartbeat":
            with self._lock:
                self.events[topic.split("/")[3]].append(doc)

    def _on_state(self, topic: str, payload: bytes) -> None:
        doc = _report(payload)
        if isinstance(doc, dict):
            self.states[topic.split("/")[3]] = doc

    def kinds(self, device: str) -> list[str]:
        with self._lock:
            return [e["event"] for e in self.events[device]]

    def last(self, device: str, kind: str) -> dict[str, Any]:
        with self._lock:
            return [e for e in self.events[device] if e["event"] == kind][-1]

    def wait_event(self, device: str, kind: str, version: str, timeout: float = 60) -> None:
        def found() -> bool:
            with self._lock:
                return any(e["event"] == kind and (e.get("model") or {}).get("version") == version
                           for e in self.events[device])

        wait_for(found, timeout, lambda: f"no {kind} of {version}: {self.kinds(device)}")

    def release(self, version: str, *, offset: float | None = None, name: str = "adder",
                builder: Callable[[Path], Path] | None = None) -> edge_sdk.Artifact:
        self.arts.mkdir(exist_ok=True)
        src = self.arts / f"{name}-{version}.onnx"
        if builder is not None:
            builder(src)
        else:
            _models.offset_model(src, offset_of(version) if offset is None else offset)
        art = edge_sdk.build_artifact(src, self.arts / f"{name}-{version}", name=name,
                                      version=version, sample={"x": X})
        self.repo.add_artifact(art.path)
        self.released.add(version)
        return art

    def deploy(self, device: str, version: str, **kw: Any) -> int:
        sd = create_deployment(self.repo, model="adder", fleet=FLEET, version=version,
                               devices=[device], **kw)
        publish_deployment(self.host, sd)
        return sd.deployment.counter

    def publish_raw(self, device: str, payload: bytes) -> None:
        self.host.publish_wait(self.topics.desired(device), payload, qos=1, retain=True)

    def close(self) -> None:
        self.responder.stop()
        self.host.close()


class ManagedProcess:
    """A subprocess a test starts, kills (SIGKILL) or stops (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class AgentProc(ManagedProcess):
    """One agent subprocess with its own state dir and config; ``wrap`` turns its command
    line into the one to run (``ThinLink.wrap``: inside a network namespace)."""

    def __init__(self, fleet: Fleet, tmp: Path, device: str, *, window_s: float = 0.3,
                 broker_url: str | None = None, groups: tuple[str, ...] = (),
                 port: int = 0, limits: dict[str, Any] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None,
                 tags: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        """``port``: a fixed HTTP port, for agents that cannot write ``agent.json`` (a full
        or read-only state dir); ``limits``: more ``[limits]`` keys; ``wrap``: the command
        that starts the agent (e.g. inside a network namespace); ``tags``: the config's
        ``tags`` table; ``auth``: the broker user name and password."""
        self.groups = groups
        self.tags = tags or {}
        self.auth = auth
        self.fixed_port = port
        self.limits = limits or {}
        self.wrap = wrap or list
        self.fleet = fleet
        self.device = device
        self.dir = tmp / device
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state"
        trust = self.dir / "trust"
        trust.mkdir(exist_ok=True)
        shutil.copyfile(fleet.repo.meta / "1.root.json", trust / "root.json")
        shutil.copyfile(fleet.repo.deployment_key_path, trust / "deployment.pub.json")
        self.config = self.dir / "agent.toml"
        self.broker_url = broker_url or fleet.broker.url
        self.write_config(window_s)
        self.proc = None
        self.port = port
        self.log = self.dir / "agent.log"

    def write_config(self, window_s: float) -> None:
        device = self.device
        self.config.write_text(
            f'device_id = "{device}"\nfleet = "{FLEET}"\nstate_dir = "state"\nthreads = 1\n'
            f"groups = {json.dumps(list(self.groups))}\n"
            "tags = {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.tags.items())
            + "}\n"
            f'[broker]\nurl = "{self.broker_url}"\n'
            + ("" if self.auth is None else
               f"username = {json.dumps(self.auth[0])}\npassword = {json.dumps(self.auth[1])}\n")
            +
            '[trust]\nroot = "trust/root.json"\ndeployment_key = "trust/deployment.pub.json"\n'
            f"[http]\nport = {self.fixed_port}\n"
            f"[health]\nwindow_s = {window_s}\nprobe_interval_s = 0.05\n"
            "[limits]\nretry_s = 0.5\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.limits.items()) +
            "[telemetry]\nheartbeat_s = 1.0\nprogress_s = 1.0\n"
        )

    def start(self, crash_at: str | None = None, *, cli: bool = False,
              wait: bool = True) -> AgentProc:
        """Start the agent; with ``wait``, return once it listens (a crash point reached at
        boot kills it before that: pass ``wait=False``)."""
        env = dict(os.environ)
        env.pop(CRASH_ENV, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        cmd = ([str(ROOT / ".venv/bin/edge-sdk"), "agent"] if cli
               else [sys.executable, "-m", "device_agent"])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.wrap([*cmd, "--config", str(self.config)]),
                                         cwd=ROOT, env=env, stdout=log, stderr=log)
        if wait:
            self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        assert self.proc is not None
        runtime = self.state / "agent.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()[-3000:]}")
            try:
                if self.fixed_port:
                    if self.get("/v2/health/live")[0] == 200:
                        return
                else:
                    info = json.loads(runtime.read_text())
                    if info["pid"] == self.proc.pid:
                        self.port = int(info["url"].rsplit(":", 1)[1])
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError("agent did not start listening")

    def get(self, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw) if raw else None

    def version(self) -> str | None:
        status, meta = self.get("/v2/models/adder")
        return meta["versions"][0] if status == 200 else None

    def wait_version(self, version: str, timeout: float = 60) -> None:
        wait_for(lambda: self.version() == version, timeout,
                 lambda: f"agent never served {version}; log: {self.log.read_text()[-3000:]}")

    def infer(self, conn: http.client.HTTPConnection | None = None) -> tuple[str, float]:
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": X.reshape(-1).tolist()}]})
        try:
            c.request("POST", "/v2/models/adder/infer", body=body)
            resp = c.getresponse()
            data = json.loads(resp.read())
        finally:
            if own:
                c.close()
        if resp.status != 200:
            raise AssertionError(f"infer failed with {resp.status}: {data}")
        return data["model_version"], float(data["outputs"][0]["data"][0])


def _report(payload: bytes) -> Any:
    """A device report as the agents send it; None for the hostile ones some tests
    publish on the same topics."""
    try:
        return json.loads(payload) if payload else None
    except (ValueError, RecursionError):
        return None


def wait_for(cond: Callable[[], Any], timeout: float = 60,
             why: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(why() if why else "condition not reached within the deadline")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("agent-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3", "4", "5", "6"):
            f.release(v)
        yield f
        f.close()


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    procs: list[AgentProc] = []
    yield procs
    for p in procs:
        p.kill()


def new_agent(fleet: Fleet, tmp: Path, agents: list[AgentProc], device: str,
              **kw: Any) -> AgentProc:
    a = AgentProc(fleet, tmp, device, **kw)
    agents.append(a)
    return a


def test_v1_installs_then_repeated_swaps_under_load_drop_no_request(fleet, tmp_path,
                                                                    agents) -> None:
    agent = new_agent(fleet, tmp_path, agents, "swap").start(cli=True)
    fleet.deploy("swap", "1")
    agent.wait_version("1")
    assert agent.infer() == ("1", 2.0)

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}")
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    np.testing.assert_array_equal(client.infer("adder", [inp]).as_numpy("y"), X + 1.0)
    client.close()

    stop = threading.Event()
    failures: list[str] = []
    seen: list[tuple[str, float]] = []

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        while not stop.is_set():
            try:
                version, y = agent.infer(conn)
                seen.append((version, y))
                if y != X[0, 0] + offset_of(version):
                    failures.append(f"version {version} answered {y}")
            except Exception as err:
                failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in ("2", "3", "4", "5", "6"):
            fleet.deploy("swap", v)
            fleet.wait_event("swap", "committed", v)
            assert agent.version() == v
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {v for v, _ in seen} >= {"1", "6"} and len(seen) > 100
    kinds = fleet.kinds("swap")
    assert kinds.count("swapped") == 6 and kinds.count("committed") == 6
    state = wait_for(lambda: (s := fleet.states.get("swap")) and s["model"]["version"] == "6"
                     and s)
    assert state["online"] is True and state["previous"]["version"] == "5"
    assert state["last_update"]["result"] == "committed"
    agent.stop()
    wait_for(lambda: fleet.states["swap"].get("online") is False)


def test_model_failing_its_smoke_test_is_refused_reported_and_old_model_serves(
    fleet, tmp_path, agents
) -> None:
    fleet.release("7", offset=float("nan"))
    agent = new_agent(fleet, tmp_path, agents, "smoke").start()
    fleet.deploy("smoke", "1")
    agent.wait_version("1")
    fleet.deploy("smoke", "7")
    wait_for(lambda: "failed" in fleet.kinds("smoke"))
    failed = fleet.last("smoke", "failed")
    assert failed["stage"] == "smoke_test" and "non-finite" in failed["reason"]
    assert agent.infer() == ("1", 2.0)
    state = wait_for(lambda: (s := fleet.states.get("smoke")) and s["last_update"]
                     and s["last_update"]["result"] == "failed" and s)
    assert state["model"]["version"] == "1"


def test_health_window_failure_rolls_back_and_reports(fleet, tmp_path, agents) -> None:
    fleet.release("8", builder=_models.batch1_only_model)
    agent = new_agent(fleet, tmp_path, agents, "health").start()
    fleet.deploy("health", "1")
    fleet.wait_event("health", "committed", "1")
    agent.stop()
    agent.write_config(window_s=60.0)
    agent.start()
    fleet.deploy("health", "8")
    agent.wait_version("8")
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                   "data": [0.0] * 8}]})
    conn.request("POST", "/v2/models/adder/infer", body=body)
    resp = conn.getresponse()
    assert resp.status == 500 and "Reshape" in json.loads(resp.read())["error"]
    conn.close()
    wait_for(lambda: "rolled_back" in fleet.kinds("health"))
    assert "inferences failed" in fleet.last("health", "rolled_back")["reason"]
    assert agent.infer() == ("1", 2.0)


def test_heartbeats_keep_coming_while_a_long_install_holds_the_worker(fleet, tmp_path,
                                                                     agents) -> None:
    beats: list[float] = []  # device clock, like the events' ts

    def on_event(topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("event") == "heartbeat":
            beats.append(doc["ts"])

    sub = fleet.host.subscribe(fleet.topics.events("busy"), on_event)
    try:
        # heartbeat_s is 1; the install holds the worker for its whole 5 s health window.
        new_agent(fleet, tmp_path, agents, "busy", window_s=5.0).start()
        fleet.deploy("busy", "1")
        fleet.wait_event("busy", "committed", "1")
        started = fleet.last("busy", "install_started")["ts"]
        committed = fleet.last("busy", "committed")["ts"]
        assert committed - started >= 5.0
        during = [t for t in beats if started < t < committed]
        took = committed - started
        assert len(during) >= 3, f"{len(during)} heartbeats during a {took:.1f} s install"
    finally:
        sub.cancel()


def test_heartbeats_name_the_newest_event_the_broker_acknowledged(fleet, tmp_path,
                                                                  agents) -> None:
    """The registry counts events it never received from the gaps in their numbers; a
    heartbeat naming the newest one sent shows the loss of the last ones too."""
    beats: list[int] = []

    def on_event(topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("event") == "heartbeat" and "last_seq" in doc:
            beats.append(doc["last_seq"])

    sub = fleet.host.subscribe(fleet.topics.events("numbered"), on_event)
    try:
        new_agent(fleet, tmp_path, agents, "numbered").start()
        fleet.deploy("numbered", "1")
        fleet.wait_event("numbered", "committed", "1")
        newest = max(e["seq"] for e in fleet.events["numbered"])
        wait_for(lambda: newest in beats, 30, lambda: f"newest {newest}, beats {beats[-5:]}")
    finally:
        sub.cancel()


def test_tampered_unauthorised_and_corrupt_updates_are_refused_while_v1_serves(
    fleet, tmp_path, agents
) -> None:
    agent = new_agent(fleet, tmp_path, agents, "tamper").start()
    fleet.deploy("tamper", "1")
    agent.wait_version("1")

    # A deployment changed in transit (same signature, different target).
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="2",
                           devices=["tamper"])
    doc = json.loads(sd.document)
    doc["signed"]["version"] = "3"
    fleet.publish_raw("tamper", json.dumps(doc).encode())
    wait_for(lambda: fleet.kinds("tamper").count("refused") >= 1)
    assert "not signed by the trusted deployment key" in fleet.last("tamper", "refused")["reason"]

    # A deployment signed by someone else's key.
    other = Repository.init(tmp_path / "other-repo", tmp_path / "other-keys")
    art = edge_sdk.Artifact.from_dir(fleet.arts / "adder-2")
    other.add_artifact(art.path)
    rogue = create_deployment(other, model="adder", fleet=FLEET, version="2",
                              devices=["tamper"])
    fleet.publish_raw("tamper", rogue.document)
    wait_for(lambda: fleet.kinds("tamper").count("refused") >= 2)
    assert "deployment failed verification" in fleet.last("tamper", "refused")["reason"]

    # A correctly signed deployment whose artifact bytes were altered on the server.
    art9 = fleet.release("9")
    target = next((fleet.repo.path / "targets").rglob(f"{art9.manifest.sha256}.*"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    fleet.deploy("tamper", "9")
    wait_for(lambda: "failed" in fleet.kinds("tamper"))
    failed = fleet.last("tamper", "failed")
    assert failed["stage"] == "fetch" and "sha256" in failed["reason"]
    for _ in range(20):
        assert agent.infer() == ("1", 2.0)
    assert fleet.kinds("tamper").count("swapped") == 1


def test_broker_down_at_start_serves_and_reports_arrive_when_it_returns(
    tmp_path, agents
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistent=True)
    broker.start()
    f = Fleet(tmp_path / "fleet", broker)
    try:
        f.release("1")
        f.release("2")
        agent = new_agent(f, tmp_path, agents, "offline").start()
        f.deploy("offline", "1")
        agent.wait_version("1")
        f.deploy("offline", "2")
        agent.wait_version("2")
        wait_for(lambda: f.kinds("offline").count("committed") == 2)
        agent.stop()
        # Damage the current model on disk, then start with no broker reachable.
        state = json.loads((agent.state / "installed.json").read_text())
        model = agent.state / "models" / state["current"]["id"] / "model.onnx"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        broker.stop()
        agent.start()
        assert agent.infer() == ("1", 2.0)  # serves the verified previous model, offline
        queued = list((agent.state / "outbox").glob("*.json"))
        assert queued, "the rollback report should wait on disk"
        broker.start()  # same port
        wait_for(lambda: "rolled_back" in f.kinds("offline"), 30)
        assert "failed verification at boot" in f.last("offline", "rolled_back")["reason"]
        wait_for(lambda: (s := f.states.get("offline")) and s["online"] and
                 s["model"]["version"] == "1", 30)
        wait_for(lambda: not list((agent.state / "outbox").glob("*.json")), 30)
    finally:
        f.close()
        broker.stop()


def _cli(fleet: Fleet, *args: str) -> list[str]:
    return [*args, "--repo", str(fleet.repo.path), "--broker", fleet.broker.url,
            "--fleet", FLEET]


def test_deploy_wait_follows_devices_to_commit_and_status_shows_them(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main
    from tests._fleetdb import assign

    solo = new_agent(fleet, tmp_path, agents, "w-solo").start()
    member = new_agent(fleet, tmp_path, agents, "w-member", groups=("w-lobby",)).start()
    assign(fleet.repo.path, FLEET, ["w-member"], "w-lobby")
    wait_for(lambda: {"w-solo", "w-member"} <= fleet.states.keys())
    assert main(_cli(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                     "w-solo", "--group", "w-lobby", "--wait", "--timeout", "60")) == 0
    out, err = capsys.readouterr()
    assert "committed on all 2 device(s)" in out
    assert "w-solo: install_started adder 1" in err and "w-member: committed adder 1" in err
    assert solo.infer() == ("1", 2.0) and member.infer() == ("1", 2.0)

    # Deploying what a device already serves is a success without an install.
    assert main(_cli(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                     "w-solo", "--wait", "--timeout", "60")) == 0
    assert "committed on all 1 device(s)" in capsys.readouterr().out

    argv = ["status", "--broker", fleet.broker.url, "--fleet", FLEET]
    assert main([*argv, "--device", "w-solo", "--device", "w-member"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["w-solo"].split()[1:4] == ["yes", "adder", "1"]
    assert "committed" in rows["w-member"] and "adder 1" in rows["w-member"]
    hw = fleet.states["w-solo"]["hardware"]
    assert isinstance(hw["cpu_features"], list) and hw["threads"] == 1
    assert f"{hw['arch']}/{hw['cores']}c" in rows["w-solo"]
    assert main([*argv, "--json", "--device", "w-member"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["w-member"]["groups"] == ["w-lobby"] and doc["w-member"]["model"]["version"] == "1"
    assert doc["w-member"]["hardware"]["cpu_features"] == hw["cpu_features"]
    assert main([*argv, "--device", "w-nobody"]) == 2
    assert "no state reported by device(s) w-nobody" in capsys.readouterr().err


def test_group_deployment_supersedes_the_devices_own_older_one_without_refusals(
    fleet, tmp_path, agents
) -> None:
    agent = new_agent(fleet, tmp_path, agents, "g-dev", groups=("g-lab",),
                      wrap=lambda cmd: [*cmd, "--log-level", "debug"]).start()
    fleet.deploy("g-dev", "1")
    agent.wait_version("1")
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="2",
                           groups=["g-lab"])
    publish_deployment(fleet.host, sd)
    agent.wait_version("2")
    fleet.wait_event("g-dev", "committed", "2")
    # After a restart both retained documents arrive again: the newer one stays, the
    # older one is passed over, and nothing is reported as refused.
    agent.stop()
    seen = len(agent.log.read_text())
    agent.start()
    wait_for(lambda: agent.version() == "2")

    def handled() -> bool:  # the agent's word that it has dealt with both documents
        log = agent.log.read_text()[seen:]
        return "already handled" in log and \
            f"{fleet.topics.desired('g-dev')} superseded by #{sd.deployment.counter}" in log

    wait_for(handled, 30, lambda: agent.log.read_text()[seen:][-3000:])
    assert agent.version() == "2"
    assert "event refused" not in agent.log.read_text()[seen:]
    assert "refused" not in fleet.kinds("g-dev")
    assert fleet.kinds("g-dev").count("committed") == 2


def test_deploy_wait_sees_through_a_retried_install(fleet, tmp_path, agents, capsys) -> None:
    from edge_sdk.cli import main

    agent = new_agent(fleet, tmp_path, agents, "w-retry").start()
    fleet.responder.stop()  # the repository is away: the agent's fetch fails and retries

    def come_back() -> None:
        # Nothing answers: the fetch gives up after FetchConfig.stall_timeout (60 s).
        wait_for(lambda: any(e.get("retry") for e in fleet.events["w-retry"]), 150)
        fleet.responder = RepoResponder(fleet.host, fleet.repo.path)
        fleet.responder.start()

    t = threading.Thread(target=come_back)
    t.start()
    try:
        code = main(_cli(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                         "w-retry", "--wait", "--timeout", "240"))
    finally:
        t.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "w-retry: failed adder 1" in err and "committed on all 1 device(s)" in out
    assert agent.infer() == ("1", 2.0)


def test_deploy_wait_fails_in_one_line_on_a_rollback_and_on_a_silent_device(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    if "7" not in fleet.released:
        fleet.release("7", offset=float("nan"))
    agent = new_agent(fleet, tmp_path, agents, "w-bad").start()
    fleet.deploy("w-bad", "1")
    agent.wait_version("1")
    code = main(_cli(fleet, "deploy", "--model", "adder", "--version", "7", "--device",
                     "w-bad", "--wait", "--timeout", "60"))
    out, err = capsys.readouterr()
    assert code == 3
    assert any(line.split()[:2] == ["w-bad", "failed"] for line in out.splitlines())
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-sdk: error: deployment ") and "did not succeed on 1 of 1" in last
    assert "w-bad failed" in last and "non-finite" in last
    assert agent.infer() == ("1", 2.0)

    code = main(_cli(fleet, "deploy", "--model", "adder", "--version", "2", "--device",
                     "w-ghost", "--wait", "--timeout", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "w-ghost no answer (the device has never reported)" in err
    code = main(_cli(fleet, "deploy", "--model", "adder", "--group", "w-empty", "--wait",
                     "--timeout", "5"))
    assert code == 3 and "no device is assigned to group(s) w-empty" in \
        capsys.readouterr().err


def test_waves_are_cumulative_and_put_every_device_in_exactly_one() -> None:
    from edge_sdk.errors import UsageError
    from edge_sdk.release import plan_waves

    devs = [f"d{i:02}" for i in range(20)]
    plan = plan_waves(devs, ["1", "10%", "50%", "100%"])
    assert [len(w) for w in plan] == [1, 1, 8, 10] and [d for w in plan for d in w] == devs
    # Waves that add nobody are dropped; a last wave always covers the rest.
    assert [len(w) for w in plan_waves(devs[:3], ["1", "10%", "50%"])] == [1, 1, 1]
    assert plan_waves(devs[:2], ["5"]) == [devs[:2]]
    for bad in ("0", "0%", "150%", "ten"):
        with pytest.raises(UsageError, match="must be a device count"):
            plan_waves(devs, [bad])


def group_on_v1(fleet: Fleet, tmp: Path, agents: list[AgentProc], group: str,
                n: int, db_url: str | None = None) -> list[AgentProc]:
    """``n`` agents in ``group`` (following it, and assigned to it by the operator in
    ``db_url``, else the repository's fleet.db), each serving release 1 and seen in the
    fleet's states."""
    from tests._fleetdb import assign

    procs = [new_agent(fleet, tmp, agents, f"{group}-{i}", groups=(group,)).start()
             for i in range(n)]
    assign(db_url or fleet.repo.path, FLEET, [p.device for p in procs], group)
    for p in procs:
        fleet.deploy(p.device, "1")
    for p in procs:
        p.wait_version("1")
    wait_for(lambda: all((fleet.states.get(p.device) or {}).get("groups") == [group]
                         for p in procs))
    return procs


def test_rollout_goes_wave_by_wave_and_commits_everywhere(fleet, tmp_path, agents,
                                                          capsys) -> None:
    from edge_sdk.cli import main

    procs = group_on_v1(fleet, tmp_path, agents, "ro-ok", 3)
    assert main(_cli(fleet, "rollout", "run", "--model", "adder", "--version", "2", "--group",
                     "ro-ok", "--waves", "1,100%", "--wave-timeout", "60")) == 0
    out, err = capsys.readouterr()
    assert "wave 1: deployment #" in err and "to 1 device(s): ro-ok-0" in err
    assert "to 2 device(s): ro-ok-1, ro-ok-2" in err
    assert "committed on every device" in out
    for p in procs:
        assert p.infer() == ("2", 3.0)


def test_rollout_aborts_on_a_silent_device_and_sends_the_others_back(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    procs = group_on_v1(fleet, tmp_path, agents, "ro-bad", 3)
    offline = procs[1]
    offline.stop()
    wait_for(lambda: fleet.states[offline.device]["online"] is False)
    code = main(_cli(fleet, "rollout", "run", "--model", "adder", "--version", "2", "--group",
                     "ro-bad", "--waves", "1,100%", "--wave-timeout", "8"))
    out, err = capsys.readouterr()
    assert "rollback ro-bad-1" in out and "sent" in out
    last = err.strip().splitlines()[-1]
    assert code == 3, err
    assert "aborted in wave 2 of 2" in last and "ro-bad-1 no answer (the device is offline)" \
        in last and "2 device(s) sent back" in last
    # Online devices went first: the canary and the other online device had committed 2.
    assert "to 1 device(s): ro-bad-0" in err and "to 2 device(s): ro-bad-2, ro-bad-1" in err
    for p in (procs[0], procs[2]):
        assert p.infer() == ("1", 2.0)
        # The state (which the rollout follows) goes out before the event it summarises.
        wait_for(lambda d=p.device: fleet.last(d, "committed")["model"]["version"] == "1", 10)
    # The device that was away finds the rollback, not version 2, when it returns.
    rollback_counter = deployment_state(fleet.repo)["counter"]
    offline.start()
    wait_for(lambda: (s := fleet.states.get(offline.device)) and s["online"] and
             s["deployment"] == rollback_counter and s["phase"] == "committed")
    assert offline.infer() == ("1", 2.0)
    assert not [e for e in fleet.events[offline.device]
                if (e.get("deployment") or e.get("model") or {}).get("version") == "2"
                or (e.get("deployment") or {}).get("artifact_version") == "2"]


def test_agent_cli_reports_config_errors_in_one_line(tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\nthreds = 2\n')
    assert main(["agent", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) threds" in err and "Traceback" not in err
    cfg.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n')
    assert main(["agent", "--config", str(cfg), "--check"]) == 0
    assert "config ok" in capsys.readouterr().out
    res = subprocess.run([str(ROOT / ".venv/bin/edge-sdk"), "agent", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert res.returncode == 2 and "no such config file" in res.stderr


#: The crashes that bring an agent to a boot-time crash point: one inside the trial
#: (the next boot resumes it), or health.max_restarts (1) + 1 of them (the next boot
#: rolls the trial back).
LEAD_IN = {"boot_trial_saved": ("health_probe",),
           "rollback_saved": ("health_probe", "health_probe")}


@pytest.mark.slow
def test_kill_9_at_any_point_of_an_install_restarts_into_a_verified_model(
    fleet, tmp_path, agents
) -> None:
    versions = [str(v) for v in range(10, 34)]
    for v in versions:
        fleet.release(v)
    agent = new_agent(fleet, tmp_path, agents, "crash", window_s=0.3).start()
    fleet.deploy("crash", "1")
    agent.wait_version("1")
    rng = random.Random(7)
    points = [*CRASH_POINTS, *(f"random:{rng.uniform(0.0, 1.2):.3f}" for _ in range(12))]
    assert set(CRASH_POINTS) <= set(points[:len(versions)])
    served = "1"

    def settled(counter: int) -> bool:
        st = json.loads((agent.state / "installed.json").read_text())
        return bool(st["phase"] == "committed" and st["deployment_counter"] >= counter)

    for point, version in zip(points, versions, strict=False):
        agent.stop()
        before = served
        if point.startswith("random:"):
            agent.start()
            counter = fleet.deploy("crash", version)
            time.sleep(float(point.split(":")[1]))
            agent.kill()
        else:
            first, *then = [*LEAD_IN.get(point, ()), point]
            agent.start(crash_at=first)
            counter = fleet.deploy("crash", version)
            assert agent.proc is not None
            assert agent.proc.wait(60) == -signal.SIGKILL, (point, first)
            for step in then:
                agent.start(crash_at=step, wait=False)
                assert agent.proc.wait(60) == -signal.SIGKILL, (point, step)
        agent.start()
        wait_for(lambda: agent.get("/v2/health/ready")[0] == 200, 30)
        got, y = agent.infer()
        assert got in (before, version), (point, got)
        assert y == X[0, 0] + offset_of(got), point
        # The retained deployment is then finished (or settled) by the restarted agent.
        wait_for(lambda c=counter: settled(c), 60)
        served = agent.version() or before
        assert served in (before, version), (point, served)
    assert len(points) >= 20
    agent.stop()
