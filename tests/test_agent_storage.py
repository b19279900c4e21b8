"""Storage faults end to end: a real agent subprocess whose state directory is a small
tmpfs the test mounts (we run as root), a real Mosquitto, the real responder and signed
repository (the helpers of tests/_e2e.py). A full or read-only disk must never stop
a verified model from serving."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.transport import DeviceLimits, RepoResponder, ResponderConfig
from tests._broker import Mosquitto, free_port
from tests._e2e import AgentProc, Fleet
from tests._models import weighted_offset_model
from tests._process import wait_for

MiB = 1 << 20
DISK = "8m"
#: 16 MiB: never fits on the 8 MiB disk.
HUGE = np.zeros((4, 4 * MiB // 4), np.float32)
#: 2.5 MiB: fits, and takes about two seconds at the responder's rate below.
BIG = np.random.default_rng(5).standard_normal((4, 160 * 1024)).astype(np.float32)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("storage-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        # A slow link: a download lasts long enough for the disk to fill up under it.
        f.responder.stop()
        f.responder = RepoResponder(f.host, f.repo.path, config=ResponderConfig(
            limits=DeviceLimits(bytes_per_s=MiB, burst_bytes=256 * 1024,
                                max_inflight_bytes=512 * 1024)))
        f.responder.start()
        f.release("1")
        f.release("2", builder=lambda p: weighted_offset_model(p, 2.0, HUGE))
        f.release("3", builder=lambda p: weighted_offset_model(p, 3.0, BIG))
        yield f
        f.close()


def _mount(args: list[str]) -> str | None:
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


class Disks:
    """Agents whose state directory is a tmpfs of :data:`DISK` this fixture mounts, and
    unmounts after killing them, even when a test fails."""

    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.fleet, self.tmp = fleet, tmp
        self.agents: list[AgentProc] = []
        self.mounts: list[Path] = []

    def agent(self, device: str, **limits: Any) -> AgentProc:
        a = AgentProc(self.fleet, self.tmp, device, port=free_port(),
                      limits={"storage_retry_s": 0.3, **limits})
        a.state.mkdir(parents=True, exist_ok=True)
        why = _mount(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(a.state)])
        if why is not None:
            msg = f"cannot mount a {DISK} tmpfs at {a.state} (needs root): {why}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        self.mounts.append(a.state)
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            a.kill()
        for m in self.mounts:
            _mount(["umount", "-l", str(m)])


@pytest.fixture()
def disks(fleet: Fleet, tmp_path: Path) -> Iterator[Disks]:
    d = Disks(fleet, tmp_path)
    try:
        yield d
    finally:
        d.close()


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; the bytes written."""
    block = b"\0" * (64 * 1024)
    n = 0
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        try:  # the last partial block
            while True:
                n += f.write(b"\0" * 512)
        except OSError:
            pass
    return n


def metric(agent: AgentProc, name: str) -> float:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m[1])


def failed_for(fleet: Fleet, device: str, counter: int) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        got = [e for e in list(fleet.events[device]) if e["event"] == "failed"
               and (e.get("deployment") or {}).get("counter") == counter]
        return got[-1] if got else None

    return wait_for(find, 60, lambda: f"no failed event for #{counter}: {fleet.kinds(device)}")


def storage_state(fleet: Fleet, device: str, ok: bool) -> dict[str, Any]:
    return wait_for(lambda: (s := fleet.states.get(device)) and s.get("online")
                    and (s.get("storage") or {}).get("ok") is ok and s, 30,
                    lambda: f"state never said storage ok={ok}: {fleet.states.get(device)}")


def leftovers(agent: AgentProc) -> list[str]:
    return sorted(str(p.relative_to(agent.state)) for d in ("partial", "staging")
                  if (agent.state / d).is_dir() for p in (agent.state / d).iterdir())


def test_deployment_too_big_for_the_disk_is_refused_before_downloading(
        fleet: Fleet, disks: Disks) -> None:
    agent = disks.agent("huge", reserve_bytes=MiB).start()
    fleet.deploy("huge", "1")
    agent.wait_version("1")
    sent = fleet.responder.stats.bytes_sent
    counter = fleet.deploy("huge", "2")
    failed = failed_for(fleet, "huge", counter)
    assert failed["stage"] == "space"
    assert failed["deployment"]["artifact_version"] == "2"
    assert failed["needed_bytes"] >= HUGE.nbytes > failed["free_bytes"]
    assert failed["reserve_bytes"] == MiB
    assert "not enough space" in failed["reason"] and "limits.reserve_bytes" in failed["reason"]
    # Refused on the signed length: metadata travelled, not the 16 MiB model.
    assert fleet.responder.stats.bytes_sent - sent < MiB
    assert leftovers(agent) == []
    assert agent.infer() == ("1", 2.0)
    st = wait_for(lambda: (s := fleet.states.get("huge")) and (s.get("last_update") or {})
                  .get("deployment") == counter and s)
    assert st["last_update"]["result"] == "failed" and st["model"]["version"] == "1"
    assert st["storage"]["ok"] is True
    # Recorded, so that a redelivery (a reconnect, a restart) does not try it again.
    saved = json.loads((agent.state / "installed.json").read_text())
    assert any(r.startswith("space: not enough space") for r in saved["failed"].values())


def test_disk_filling_up_during_the_download_fails_cleanly_and_v1_serves(
        fleet: Fleet, disks: Disks) -> None:
    agent = disks.agent("fills", reserve_bytes=0).start()
    fleet.deploy("fills", "1")
    agent.wait_version("1")
    filler = agent.state / "filler"
    filled: list[int] = []

    def fill_when_the_download_starts() -> None:
        partial = agent.state / "partial"
        wait_for(lambda: partial.is_dir() and any(partial.iterdir()), 60)
        filled.append(fill(filler))

    t = threading.Thread(target=fill_when_the_download_starts)
    t.start()
    counter = fleet.deploy("fills", "3")
    t.join(70)
    assert filled, "the download never started"
    failed = failed_for(fleet, "fills", counter)
    assert failed["stage"] == "fetch" and "No space left on device" in failed["reason"]
    assert failed["deployment"]["artifact_version"] == "3"
    assert leftovers(agent) == []  # the partial download is gone, not kept to resume
    assert agent.infer() == ("1", 2.0)

    # Space freed (the failure is saved then, if the filler took the space it freed): the
    # operator deploys the same version again, under a new counter.
    filler.unlink()

    def saved() -> dict[str, Any] | None:
        st = json.loads((agent.state / "installed.json").read_text())
        return st if (st["last_result"] or {}).get("deployment") == counter else None

    st = wait_for(saved, 30)
    assert st["models"]["adder"]["version"] == "1" and st["last_result"]["result"] == "failed"
    again = fleet.deploy("fills", "3")
    assert again > counter
    agent.wait_version("3")
    fleet.wait_event("fills", "committed", "3")
    assert agent.infer() == ("3", 4.0)


def test_restart_on_a_full_disk_serves_v1_and_installs_once_space_is_freed(
        fleet: Fleet, disks: Disks) -> None:
    agent = disks.agent("full", reserve_bytes=0).start()
    fleet.deploy("full", "1")
    fleet.wait_event("full", "committed", "1")
    agent.stop()
    filler = agent.state / "filler"
    fill(filler)
    agent.start()
    assert agent.infer() == ("1", 2.0)
    assert metric(agent, "edge_agent_storage_ok") == 0
    st = storage_state(fleet, "full", ok=False)
    assert "No space left on device" in st["storage"]["reason"]
    assert "ENOSPC" in agent.log.read_text()
    counter = fleet.deploy("full", "3")
    failed = failed_for(fleet, "full", counter)
    assert failed["stage"] == "storage" and failed["retry"] is True
    assert agent.infer() == ("1", 2.0)

    filler.unlink()
    storage_state(fleet, "full", ok=True)
    assert metric(agent, "edge_agent_storage_ok") == 1
    agent.wait_version("3")  # the deployment that waited for the disk
    fleet.wait_event("full", "committed", "3")


def test_read_only_state_dir_still_serves_and_reports_it(fleet: Fleet, disks: Disks) -> None:
    agent = disks.agent("ro").start()
    fleet.deploy("ro", "1")
    fleet.wait_event("ro", "committed", "1")
    agent.stop()
    assert _mount(["mount", "-o", "remount,ro", str(agent.state)]) is None
    agent.start()
    assert agent.infer() == ("1", 2.0)
    assert metric(agent, "edge_agent_storage_ok") == 0
    st = storage_state(fleet, "ro", ok=False)
    assert "Read-only file system" in st["storage"]["reason"]
    wait_for(lambda: "storage" in fleet.kinds("ro"))
    assert "Read-only file system" in fleet.last("ro", "storage")["reason"]
    counter = fleet.deploy("ro", "3")
    failed = failed_for(fleet, "ro", counter)
    assert failed["stage"] == "storage" and "Read-only" in failed["reason"]
    assert agent.infer() == ("1", 2.0)

    assert _mount(["mount", "-o", "remount,rw", str(agent.state)]) is None
    storage_state(fleet, "ro", ok=True)
    agent.wait_version("3")
    fleet.wait_event("ro", "committed", "3")
