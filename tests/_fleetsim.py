"""A fleet simulator that runs the real device code: N agents spread over a few processes.

Each simulated device is a :class:`device_agent.Agent` of its own (its own MQTT client,
state directory, signed-release client with its own TUF metadata, chunked fetches of its
own bytes, install state machine, health window and reports). What a process shares is
only what a real device would not need twice: one onnxruntime session per model hash
(every device still verifies its own copy of the file before the shared session is
handed out) and no HTTP endpoint.

Why several processes: paho runs one ``select()`` loop per client, and ``select`` cannot
watch a descriptor numbered 1024 or more. Each client holds three (its socket and a
socket pair), so a Python process stalls near 340 connections (measured: 320 in one
process all connect, of 360 only 340 do); ``per_process`` (default 125) stays well below
that and spreads the CPU over the cores.

Why an install gate: a real device has a CPU of its own; here 1000 devices share two
cores. With every device of a process fetching at once, 125 busy threads queue for one
GIL, each network thread waits a second or more for it, the fetchers' timeouts fire and
throughput collapses (measured: 92 of 1000 committed after 4 minutes). So at most
``installs_per_process`` devices of a process run the fetch-verify part of an install at
the same time (default 4); the others wait their turn *before* their first request. It
models the host's CPU, not a shortcut: every device still fetches, verifies and installs
its own bytes, and reports every step.

Used by ``bench/fleet.py`` and the slow scale tests::

    with FleetSim(tmp, n=100, broker_urls=[broker.url], root=..., deployment_key=...,
                  groups=("scale",)) as sim:
        sim.start()
        ...
    # ``python -m tests._fleetsim SPEC.json`` is one simulator process (internal).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Devices per simulator process (see the module docstring for the ceiling).
PER_PROCESS = 125


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


class FleetSim:
    """``n`` simulated devices ``{prefix}-0000``… in processes of ``per_process``.

    ``broker_urls``: the devices are spread over these round-robin (one URL each; a
    clustered broker gives one per node). ``root`` and ``deployment_key`` are the trust
    anchors every device is provisioned with. ``window_s`` is each device's health window,
    ``heartbeat_s`` its heartbeat period (long by default: heartbeats are not what a
    rollout is about, and 1000 of them a second would be)."""

    def __init__(self, workdir: Path, *, n: int, broker_urls: Sequence[str], root: Path,
                 deployment_key: Path, fleet: str = "default", groups: Sequence[str] = (),
                 prefix: str = "sim", per_process: int = PER_PROCESS, window_s: float = 0.2,
                 heartbeat_s: float = 60.0, retry_s: float = 1.0,
                 installs_per_process: int = 4, state_root: Path | None = None,
                 agent_config: dict[str, Any] | None = None,
                 wait_connected: bool = True) -> None:
        """``state_root``: where the devices' state directories go (default: a directory
        on /dev/shm when it is a tmpfs, else under ``workdir``); removed by :meth:`stop`.
        ``agent_config``: agent.toml keys (as a dict of sections) laid over every device's
        config, e.g. ``{"broker": {"keepalive_s": 10}}``; ``{DEVICE}`` in a string value
        is the device id, ``{URL}`` its broker URL. ``wait_connected``: :meth:`start`
        returns once every device's link is up (False: once every agent started; devices
        that enrol connect as themselves only after acceptance)."""
        if not broker_urls:
            raise ValueError("FleetSim needs at least one broker URL")
        self.workdir = workdir
        self.devices = [f"{prefix}-{i:04d}" for i in range(n)]
        self.broker_urls = list(broker_urls)
        self.root, self.deployment_key = root, deployment_key
        self.fleet, self.groups = fleet, tuple(groups)
        self.per_process = max(1, per_process)
        self.window_s, self.heartbeat_s, self.retry_s = window_s, heartbeat_s, retry_s
        self.installs_per_process = installs_per_process
        self.agent_config = agent_config or {}
        self.wait_connected = wait_connected
        self._own_state = state_root is None
        if state_root is None:
            shm = Path("/dev/shm")
            state_root = (Path(tempfile.mkdtemp(prefix="edge-fleetsim-", dir=shm))
                          if shm.is_dir() and os.access(shm, os.W_OK)
                          else workdir / "devices")
        self.state_root = state_root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spec(self, index: int, first: int, devices: Sequence[str]) -> dict[str, Any]:
        urls = self.broker_urls
        return {"devices": list(devices), "fleet": self.fleet, "groups": list(self.groups),
                "urls": [urls[(first + i) % len(urls)] for i in range(len(devices))],
                "root": str(self.root), "deployment_key": str(self.deployment_key),
                "state": str(self.state_root), "window_s": self.window_s,
                "installs": self.installs_per_process, "extra": self.agent_config,
                "heartbeat_s": self.heartbeat_s, "retry_s": self.retry_s,
                "wait": self.wait_connected, "log": str(self.workdir / f"sim-{index}.log")}

    def start(self, timeout: float = 120.0) -> None:
        """Start every process; return once each device's broker link is up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGE_SDK_AGENT_CRASH_AT", None)
        groups = [self.devices[i:i + self.per_process]
                  for i in range(0, len(self.devices), self.per_process)]
        for i, devs in enumerate(groups):
            path = self.workdir / f"sim-{i}.json"
            spec = self.spec(i, i * self.per_process, devs)
            path.write_text(json.dumps(spec))
            self.logs.append(Path(spec["log"]))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests._fleetsim", str(path)], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=open(self.workdir / f"sim-{i}.err", "ab")))  # noqa: SIM115
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.procs):
            assert p.stdout is not None
            line = _readline(p, deadline)
            if not line.startswith(b"ready"):
                err = (self.workdir / f"sim-{i}.err").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"simulator process {i} did not get ready "
                                   f"({line!r}): {err}")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        """User + system CPU of the simulator processes so far (from /proc)."""
        return sum(proc_cpu(pid) for pid in self.pids())

    def stop(self) -> None:
        """SIGTERM every process (each stops its agents: offline reports sent), then wait."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        self.procs = []
        if self._own_state:
            shutil.rmtree(self.state_root, ignore_errors=True)

    def __enter__(self) -> FleetSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _readline(p: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert p.stdout is not None
    out: list[bytes] = []

    def read() -> None:
        assert p.stdout is not None
        out.append(p.stdout.readline())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    return out[0] if out else b"timeout"


# -- one simulator process ----------------------------------------------------------------

class SharedSessions:
    """One Predictor per model hash for every agent of the process. The installer opens a
    model only after it re-verified the file's hash against its record, so the hash in the
    manifest is that of bytes this device checked itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_hash: dict[str, Any] = {}
        self.opened = 0

    def __call__(self, path: Path, *, threads: int | None = None,
                 manifest: Any = None) -> Any:
        from edge_sdk._internal import load_model_file

        key = manifest.sha256 if manifest is not None else None
        with self._lock:
            hit = self._by_hash.get(key) if key else None
            if hit is not None:
                return hit
            pred = load_model_file(path, threads=threads, manifest=manifest)
            self.opened += 1
            if key:
                self._by_hash[key] = pred
            return pred


class GatedSource:
    """The agent's own release source, with fetches taken in turns (see the module
    docstring): verification and every byte of the fetch are the real ones."""

    def __init__(self, inner: Any, gate: threading.Semaphore) -> None:
        self.inner, self.gate = inner, gate

    def verify_deployment(self, payload: bytes, **kw: Any) -> Any:
        return self.inner.verify_deployment(payload, **kw)

    def fetch(self, deployment: Any, dest_dir: Path, **kw: Any) -> Any:
        with self.gate:
            return self.inner.fetch(deployment, dest_dir, **kw)


def _agent_config(spec: dict[str, Any], device: str, url: str) -> Any:
    from device_agent import AgentConfig

    def fill(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("{DEVICE}", device).replace("{URL}", url)
        if isinstance(v, list):
            return [fill(x) for x in v]
        return {k: fill(x) for k, x in v.items()} if isinstance(v, dict) else v

    base: dict[str, Any] = {
        "device_id": device, "fleet": spec["fleet"], "groups": spec["groups"],
        "state_dir": str(Path(spec["state"]) / device), "threads": 1,
        "broker": {"url": url},
        "trust": {"root": spec["root"], "deployment_key": spec["deployment_key"]},
        "health": {"window_s": spec["window_s"], "probe_interval_s": 0.05},
        "limits": {"retry_s": spec["retry_s"], "warmup_runs": 1},
        "telemetry": {"heartbeat_s": spec["heartbeat_s"], "progress_s": 30.0},
    }
    for key, value in fill(spec.get("extra") or {}).items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and \
            isinstance(base.get(key), dict) else value
    return AgentConfig.from_dict(base)


def _paho_logs() -> None:
    import paho.mqtt.client as paho

    init = paho.Client.__init__

    def logged(self: Any, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        self.enable_logger(logging.getLogger(f"paho.{kw.get('client_id', '')}"))

    paho.Client.__init__ = logged  # type: ignore[method-assign]


def run_process(spec_path: Path) -> int:
    from device_agent import Agent

    spec = json.loads(spec_path.read_text())
    # EDGE_SIM_LOG=DEBUG (or INFO) to see what the agents do (DEBUG: paho's own log too,
    # one logger per client id).
    level = os.environ.get("EDGE_SIM_LOG", "WARNING")
    if level == "DEBUG":
        _paho_logs()
    logging.basicConfig(filename=spec["log"], level=getattr(logging, level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise_nofile()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: done.set())
    signal.signal(signal.SIGINT, lambda s, f: done.set())
    from device_agent._source import ReleaseSource

    sessions = SharedSessions()
    gate = threading.Semaphore(max(1, int(spec["installs"])))

    def source(config: Any, conn: Any) -> GatedSource:
        return GatedSource(ReleaseSource(config, conn), gate)

    agents = [Agent(_agent_config(spec, d, u), http=False, load_model=sessions, source=source)
              for d, u in zip(spec["devices"], spec["urls"], strict=True)]
    for a in agents:
        a.start()
    deadline = time.monotonic() + (90 if spec.get("wait", True) else 0)
    while not done.is_set() and time.monotonic() < deadline:
        if all(a.connection is not None and a.connection.connected for a in agents):
            break
        done.wait(0.1)
    up = sum(1 for a in agents if a.connection is not None and a.connection.connected)
    sys.stdout.write(f"ready {up} of {len(agents)}\n"
                     if up == len(agents) or not spec.get("wait", True)
                     else f"not ready: {up} of {len(agents)} connected\n")
    sys.stdout.flush()
    while not done.wait(0.5):
        dead = [a.config.device_id for a in agents if a.dead_threads()]
        if dead:
            logging.critical("agents with dead threads: %s", dead)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda a: a.stop(), agents))
    logging.warning("stopped %d agents (%d runtime session(s) opened)", len(agents),
                    sessions.opened)
    return 0


if __name__ == "__main__":
    sys.exit(run_process(Path(sys.argv[1])))
