"""The end-to-end harness: the host side of a fleet (repository, Mosquitto, responder and
a listener on every device's reports) and real agents as subprocesses.

A test module builds its own module-scoped ``fleet`` fixture from :class:`Fleet`; the
``agents`` fixture (conftest.py) kills the agents a test started with :func:`new_agent`.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from device_agent._crash import CRASH_ENV
from edge_sdk.release import Repository, create_deployment, publish_deployment
from edge_sdk.transport import MqttConfig, MqttConnection, RepoResponder, Topics
from tests import _models
from tests._broker import Mosquitto
from tests._process import ROOT, ManagedProcess, edge_sdk_cli, wait_for

FLEET = "lab"
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def offset_of(version: str) -> float:
    return float(version)


class Fleet:
    """Host side: repository, broker, responder, and a listener on every device's reports."""

    def __init__(self, tmp: Path, broker: Mosquitto, *,
                 auth: tuple[str, str] | None = None) -> None:
        """``auth``: the broker user name and password of the host side (one account that
        may answer chunk requests, publish deployments and read reports)."""
        self.tmp = tmp
        self.broker = broker
        self.repo = Repository.init(tmp / "repo", tmp / "keys")
        self.arts = tmp / "arts"
        # A persistent session: device reports sent while this listener reconnects
        # (after a broker restart, say) are queued for it rather than lost.
        cfg = MqttConfig(url=broker.url, fleet=FLEET, persistent_session=True,
                         client_id=f"fleet-host-{random.getrandbits(32):08x}",
                         username=auth[0] if auth else None,
                         password=auth[1] if auth else None)
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

    def history(self, device: str) -> list[dict[str, Any]]:
        """A copy of the events ``device`` reported so far (heartbeats left out), oldest first."""
        with self._lock:
            return list(self.events[device])

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

    def deploy_set(self, device: str, models: list[tuple[str, str]], **kw: Any) -> int:
        """Deploy several models at once (installed, swapped and rolled back as one)."""
        sd = create_deployment(self.repo, models=models, fleet=FLEET, devices=[device], **kw)
        publish_deployment(self.host, sd)
        return sd.deployment.counter

    def publish_raw(self, device: str, payload: bytes) -> None:
        self.host.publish_wait(self.topics.desired(device), payload, qos=1, retain=True)

    def close(self) -> None:
        self.responder.stop()
        self.host.close()


class AgentProc(ManagedProcess):
    """One agent subprocess with its own state dir and config; ``wrap`` turns its command
    line into the one to run (``ThinLink.wrap``: inside a network namespace)."""

    def __init__(self, fleet: Fleet, tmp: Path, device: str, *, window_s: float = 0.3,
                 broker_url: str | None = None, groups: tuple[str, ...] = (),
                 port: int = 0, limits: dict[str, Any] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None,
                 tags: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None,
                 identity: dict[str, Any] | None = None,
                 tls_ca: Path | None = None,
                 sections: dict[str, dict[str, Any]] | None = None) -> None:
        """``port``: a fixed HTTP port, for agents that cannot write ``agent.json`` (a full
        or read-only state dir); ``limits``: more ``[limits]`` keys; ``wrap``: the command
        that starts the agent (e.g. inside a network namespace); ``tags``: the config's
        ``tags`` table; ``auth``: the broker user name and password; ``identity``: the
        ``[identity]`` table (enrolment through a claim account instead of ``auth``);
        ``tls_ca``: the CA file for an ``mqtts://`` broker; ``sections``: more tables of
        the config (``{"shadow": {"queue": 1}}``)."""
        self.sections = sections or {}
        self.groups = groups
        self.tls_ca = tls_ca
        self.identity = identity
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
            + ("" if self.tls_ca is None else
               f"[broker.tls]\nca_file = {json.dumps(str(self.tls_ca))}\n")
            +
            '[trust]\nroot = "trust/root.json"\ndeployment_key = "trust/deployment.pub.json"\n'
            f"[http]\nport = {self.fixed_port}\n"
            f"[health]\nwindow_s = {window_s}\nprobe_interval_s = 0.05\n"
            "[limits]\nretry_s = 0.5\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.limits.items()) +
            "[telemetry]\nheartbeat_s = 1.0\nprogress_s = 1.0\n"
            + ("" if self.identity is None else "[identity]\n" + "".join(
                f"{k} = {json.dumps(v)}\n" for k, v in self.identity.items()))
            + "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                               for k, v in table.items())
                      for name, table in self.sections.items())
        )

    def start(self, crash_at: str | None = None, *, cli: bool = False,
              wait: bool = True) -> AgentProc:
        """Start the agent; with ``wait``, return once it listens (a crash point reached at
        boot kills it before that: pass ``wait=False``)."""
        env = dict(os.environ)
        env.pop(CRASH_ENV, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        cmd = ([*edge_sdk_cli(), "agent"] if cli
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

    def version(self, model: str = "adder") -> str | None:
        status, meta = self.get(f"/v2/models/{model}")
        return meta["versions"][0] if status == 200 else None

    def wait_version(self, version: str, timeout: float = 60) -> None:
        wait_for(lambda: self.version() == version, timeout,
                 lambda: f"agent never served {version}; log: {self.log.read_text()[-3000:]}")

    def infer(self, conn: http.client.HTTPConnection | None = None, *,
              model: str = "adder") -> tuple[str, float]:
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": X.reshape(-1).tolist()}]})
        try:
            c.request("POST", f"/v2/models/{model}/infer", body=body)
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


def new_agent(fleet: Fleet, tmp: Path, agents: list[AgentProc], device: str,
              **kw: Any) -> AgentProc:
    a = AgentProc(fleet, tmp, device, **kw)
    agents.append(a)
    return a


def cli_args(fleet: Fleet, *args: str) -> list[str]:
    """The options that point an ``edge-sdk`` command at ``fleet``."""
    return [*args, "--repo", str(fleet.repo.path), "--broker", fleet.broker.url,
            "--fleet", FLEET]


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


#: Versions 1 to 5 of a model whose retrains keep the same 4 MiB of weights (``RETAINED``)
#: and change a 64 KiB head: :func:`release_with_delta` releases them, each a small delta
#: from the one before.
_RNG = np.random.default_rng(3)
RETAINED = _RNG.standard_normal((4, 262144)).astype(np.float32)  # 4 MiB that a retrain keeps
_HEADS = {v: _RNG.standard_normal(16384).astype(np.float32) for v in ("1", "2", "3", "4", "5")}


def release_with_delta(fleet: Fleet, version: str) -> None:
    def build(src: Path) -> Path:
        return _models.weighted_offset_model(src, float(version), RETAINED, _HEADS[version])

    fleet.release(version, builder=build)
