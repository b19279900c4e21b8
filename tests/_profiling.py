"""The host side of on-device profiling for end-to-end tests: a signed repository, a
listener on one device's reports, ``edge-sdk serve``, and what a ``convert --profile-on``
report must show (tests/test_profiling_e2e.py with an x86 agent, tests/test_arm64.py with
the agent in the arm64 rootfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests._broker import Mosquitto
from tests._e2e import FLEET
from tests._process import ROOT, ManagedProcess


class Host:
    """What AgentProc needs of a fleet (repository and broker), plus a listener on
    ``device``'s events, profiling results and state."""

    def __init__(self, tmp: Path, broker: Mosquitto, device: str) -> None:
        self.broker = broker
        self.device = device
        self.repo = Repository.init(tmp / "repo", tmp / "keys")
        self.conn = MqttConnection(MqttConfig(url=broker.url, fleet=FLEET))
        self.conn.connect()
        self.topics = Topics(FLEET)
        self.events: list[dict[str, Any]] = []
        self.results: list[bytes] = []
        self.states: dict[str, Any] = {}
        self.conn.subscribe(self.topics.events(device), self._on_event)
        self.conn.subscribe(self.topics.profile_result(device),
                            lambda t, p: self.results.append(p))
        self.conn.subscribe(self.topics.state(device),
                            lambda t, p: self.states.update({device: json.loads(p)}))

    def _on_event(self, topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("event") != "heartbeat":
            self.events.append(doc)

    def refusals(self) -> list[str]:
        return [str(e.get("reason")) for e in self.events if e["event"] == "profiling_refused"]

    def cli(self, *args: str) -> list[str]:
        """``edge-sdk ARGS`` against this broker and repository."""
        return [*args, "--broker", self.broker.url, "--repo", str(self.repo.path),
                "--fleet", FLEET]


class Serve(ManagedProcess):
    """``edge-sdk serve`` of the host's repository, logging to ``tmp/serve.log``."""

    def __init__(self, host: Host, tmp: Path) -> None:
        self.log = tmp / "serve.log"
        cmd = [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(host.repo.path),
               "--broker", host.broker.url, "--fleet", FLEET]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})


def measured(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates that were built and timed (not failed, skipped or a no-op)."""
    return [r for r in report["candidates"]
            if r["status"] not in ("failed", "skipped", "no-op")]


def expected_choice(report: dict[str, Any], tolerance: float = 0.05) -> str:
    """What ``auto --prefer latency`` must choose by the report's device figures (single
    medians, so the noise band is the tolerance alone): within the accuracy budget and
    not slower than fp32 on the device (at most 1 + tolerance its latency), the fastest;
    those at most 1 + tolerance its latency tie, and the smallest, then the first in the
    scheme order, wins."""
    from converters._candidates import SCHEMES

    rows = {r["name"]: r for r in report["candidates"]}
    budget = report["metric"]["max_drop"]
    fp32 = rows["fp32"]["device_latency_ms"]
    pool = [r for r in measured(report) if r["accuracy"]["drop"] <= budget
            and r["device_latency_ms"] / fp32 <= 1 + tolerance]
    fastest = min(r["device_latency_ms"] for r in pool)
    near = [r for r in pool if r["device_latency_ms"] / fastest <= 1 + tolerance]
    return str(min(near, key=lambda r: (r["size_bytes"], SCHEMES.index(r["scheme"]),
                                        r["name"]))["name"])
