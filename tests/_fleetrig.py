"""A rollout to a simulated fleet through the real host side, measured.

The host side is what an operator runs: ``edge-sdk serve --only fleet --db URL`` (registry,
controller, fleet page) and one or more ``edge-sdk serve --only responder`` processes, all
subprocesses on a broker the caller started; the rollout is recorded with ``edge-sdk
rollout start`` and followed through the database. The devices are a :class:`FleetSim`.
Used by ``bench/fleet.py`` (10 / 100 / 1000 devices) and ``tests/test_fleet_scale.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests import _models
from tests._broker import free_port
from tests._fleetdb import assign
from tests._fleetsim import PER_PROCESS, ROOT, FleetSim, proc_cpu

FLEET = "scale"
GROUP = "scale"
MODEL = "scaled"
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


class HostProc:
    """One ``edge-sdk serve`` subprocess with its log."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_sdk", *args], cwd=ROOT,
                                         stdout=out, stderr=out, env=env)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> str:
        """SIGTERM, wait, and return the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text(errors="replace")


@dataclass
class ScaleResult:
    devices: int
    responders: int
    rollout_s: float = 0.0
    committed: int = 0
    lost: list[str] = field(default_factory=list)
    registry_new: int = 0
    chunks: int = 0
    bytes_served: int = 0
    model_bytes: int = 0
    responder_cpu: float = 0.0
    controller_cpu: float = 0.0
    devices_cpu: float = 0.0
    db_rows: dict[str, int] = field(default_factory=dict)
    status_s: float = 0.0
    status_lines: int = 0
    page_devices_s: float = 0.0
    page_devices: int = 0
    #: Seconds from the wave's first send to half / 90 % of the devices committed.
    half_s: float = 0.0
    p90_s: float = 0.0
    broker_cpu: float = 0.0
    notes: list[str] = field(default_factory=list)


def release(repo: Any, arts: Path, version: str, model_bytes: int) -> int:
    """Build and release a ``model_bytes`` model; return the size of its model file."""
    import edge_sdk

    arts.mkdir(parents=True, exist_ok=True)
    src = _models.padded_offset_model(arts / f"{MODEL}-{version}.onnx", float(version),
                                      model_bytes)
    art = edge_sdk.build_artifact(src, arts / f"{MODEL}-{version}", name=MODEL,
                                  version=version, sample={"x": X})
    repo.add_artifact(art.path)
    return int(art.manifest.size_bytes)


def wait_for(cond: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {what}")
        time.sleep(every)


def run_rollout(tmp: Path, n: int, *, broker_urls: Sequence[str], responders: int = 1,
                broker_pids: Sequence[int] = (),
                shared: bool = True, db_url: str | None = None, model_bytes: int = 1 << 20,
                per_process: int | None = None, installs: int = 16, timeout: float = 600.0,
                measure_reads: bool = False,
                agent_config: dict[str, Any] | None = None) -> ScaleResult:
    """Provision ``n`` devices on ``broker_urls``, roll a fresh ``model_bytes`` release out
    to all of them in one wave, and measure. ``shared`` False runs the responders on plain
    subscriptions, each answering its partition of the devices. ``installs``: how many
    devices install at once over all simulator processes (the host's CPU, not the
    devices', limits the rest; see :class:`FleetSim`). ``agent_config`` is laid over every
    device's config (:class:`FleetSim`)."""
    import sqlalchemy as sa

    from edge_sdk.cli import main
    from edge_sdk.fleet import FleetDB
    from edge_sdk.fleet._store._schema import meta
    from edge_sdk.release import Repository

    tmp.mkdir(parents=True, exist_ok=True)
    res = ScaleResult(n, responders)
    repo = Repository.init(tmp / "repo", tmp / "keys")
    res.model_bytes = release(repo, tmp / "arts", "1", model_bytes)
    db_url = db_url or f"sqlite:///{tmp / 'fleet.db'}"
    url0 = broker_urls[0]
    web_port = free_port()
    host_args = ["--repo", str(repo.path), "--broker", url0, "--fleet", FLEET]
    fleet = HostProc(["serve", *host_args, "--only", "fleet", "--db", db_url, "--poll", "0.5",
                      "--http", f"127.0.0.1:{web_port}"], tmp / "serve-fleet.log")
    resp: list[HostProc] = []
    for k in range(responders):
        extra = [] if shared else ["--no-shared", "--partition", f"{k}/{responders}"]
        resp.append(HostProc(["serve", *[a if a != url0 else broker_urls[k % len(broker_urls)]
                                         for a in host_args], "--only", "responder", *extra],
                             tmp / f"serve-responder-{k}.log"))
    per = per_process or PER_PROCESS
    procs = -(-n // per)
    sim = FleetSim(tmp / "sim", n=n, broker_urls=broker_urls, root=repo.meta / "1.root.json",
                   deployment_key=repo.deployment_key_path, fleet=FLEET, groups=(GROUP,),
                   per_process=per, installs_per_process=max(1, -(-installs // procs)),
                   agent_config=agent_config)
    logs: list[str] = []
    try:
        assign(db_url, FLEET, sim.devices, GROUP)  # provisioned in bulk, as an operator does
        sim.start()
        with FleetDB.open(db_url) as db:
            wait_for(lambda: sum(1 for d in db.devices(fleet=FLEET) if d["online"]) == n,
                     120, f"{n} devices online in the registry")
        cpu0 = ([p.cpu() for p in resp], fleet.cpu(), sim.cpu_seconds(),
                sum(proc_cpu(p) for p in broker_pids))
        t0 = time.monotonic()
        assert main(["rollout", "start", "--db", db_url, "--operator", "bench", "--fleet",
                     FLEET, "--model", MODEL, "--version", "1", "--group", GROUP,
                     "--waves", "100%", "--wave-timeout", str(timeout)]) == 0
        with FleetDB.open(db_url) as db:
            rid = int(db.rollouts(fleet=FLEET)[0]["id"])
            r = wait_for(lambda: (x := db.rollout(rid))["status"] in ("completed", "aborted")
                         and x, timeout + 60, f"rollout {rid} finishing", every=0.5)
            res.rollout_s = time.monotonic() - t0
            res.responder_cpu = sum(p.cpu() for p in resp) - sum(cpu0[0])
            res.controller_cpu = fleet.cpu() - cpu0[1]
            res.devices_cpu = sim.cpu_seconds() - cpu0[2]
            res.broker_cpu = sum(proc_cpu(p) for p in broker_pids) - cpu0[3]
            sent = [d["sent_at"] for d in r["devices"] if d["sent_at"]]
            done = sorted(d["finished_at"] - min(sent) for d in r["devices"]
                          if d["status"] == "committed" and d["finished_at"] and sent)
            if done:
                res.half_s, res.p90_s = done[len(done) // 2], done[int(len(done) * 0.9) - 1]
            if r["status"] != "completed":
                res.notes.append(f"rollout {r['status']}: {r['reason']}")
            by_dev = {d["device"]: d["status"] for d in r["devices"]}
            res.committed = sum(1 for s in by_dev.values() if s == "committed")
            res.lost = sorted(d for d in sim.devices if by_dev.get(d) != "committed")
            # The registry catches up with the last state reports.
            def registry_new() -> int:
                return sum(1 for d in db.devices(fleet=FLEET) if d["version"] == "1")
            try:
                wait_for(lambda: registry_new() == n, 30, "registry rows on the new version")
            except AssertionError as err:
                res.notes.append(str(err))
            res.registry_new = registry_new()
            with db.read() as c:
                res.db_rows = {t.name: int(c.execute(sa.select(sa.func.count()).select_from(t))
                                           .scalar_one()) for t in meta.sorted_tables}
        if measure_reads:
            # With the fleet still online, as an operator would look; best of three (the
            # machine is shared).
            times = []
            for _ in range(3):
                t = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "edge_sdk", "status", "--db",
                                      db_url, "--fleet", FLEET], cwd=ROOT, capture_output=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
                times.append(time.monotonic() - t)
            res.status_s = min(times)
            res.status_lines = len(out.stdout.splitlines())
            times = []
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
                t = time.monotonic()
                conn.request("GET", "/api/devices")
                body = conn.getresponse().read()
                times.append(time.monotonic() - t)
                conn.close()
            res.page_devices_s = min(times)
            res.page_devices = len(json.loads(body))
    finally:
        sim.stop()
        for p in resp:
            logs.append(p.stop())
        fleet.stop()
    for text in logs:
        m = re.search(r"stopped: (\d+) requests, (\d+) chunks, (\d+) bytes", text)
        if m:
            res.chunks += int(m.group(2))
            res.bytes_served += int(m.group(3))
        else:
            res.notes.append(f"a responder did not report its totals: {text[-500:]}")
    return res
