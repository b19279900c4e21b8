"""Shaped links: a real agent in its own network namespace, joined to the broker's by a veth
pair shaped with ``tc ... tbf`` both ways (1 Mbit/s, and 1 Gbit/s for a LAN), a real
Mosquitto and responder here.

These are the acceptance figures of the flow control (see ``edge_sdk.transport._pace``):
on a slow link the transfer takes about size / rate, sends each byte about once and
never gives up; cut for 20 s, it resumes; on a fast one every byte arrives once and
intact (how fast is ``bench/thin_link.py``'s business). They need root; in CI a missing
namespace is a failure, elsewhere a skip. Traffic stays on the veth pair and loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_sdk.transport import DeviceLimits, RepoResponder, ResponderConfig
from tests import _models
from tests._broker import Mosquitto, free_port
from tests._e2e import FLEET, AgentProc, Fleet, cli_args
from tests._netns import ThinLink, unavailable
from tests._process import wait_for

RATE = 1_000_000  # bit/s
FAST = 1_000_000_000  # bit/s: a factory LAN
MiB = 1024 * 1024
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class Thin:
    def __init__(self, link: ThinLink, fleet: Fleet, url: str, tmp: Path) -> None:
        self.link, self.fleet, self.url, self.tmp = link, fleet, url, tmp
        self.agents: list[AgentProc] = []

    def agent(self, device: str) -> AgentProc:
        a = AgentProc(self.fleet, self.tmp, device, broker_url=self.url, wrap=self.link.wrap)
        self.agents.append(a)
        a.start()
        wait_for(lambda: device in self.fleet.states, 60,
                 lambda: f"{device} never reported over the thin link: {a.log.read_text()}")
        return a

    def release(self, version: str, size: int) -> int:
        """Release a model of ``size`` bytes; return the bytes a device fetches (model and
        sample)."""
        art = self.fleet.release(version, builder=lambda p: _models.padded_offset_model(
            p, float(version), size))
        assert art.sample_path is not None
        return art.model_path.stat().st_size + art.sample_path.stat().st_size


@contextmanager
def shaped(tmp_path: Path, rate: int) -> Iterator[Thin]:
    why = unavailable()
    if why is not None:
        if _CI:
            pytest.fail(f"the thin-link tests must run in CI (as root, with iproute2): {why}")
        pytest.skip(f"thin-link tests: {why}")
    with ThinLink(rate) as link:
        port = free_port()
        with Mosquitto(tmp_path / "broker", extra_conf=f"listener {port} {link.host_ip}\n") as b:
            fleet = Fleet(tmp_path / "fleet", b)
            t = Thin(link, fleet, f"mqtt://{link.host_ip}:{port}", tmp_path)
            try:
                yield t
            finally:
                for a in t.agents:
                    a.kill()
                fleet.close()


@pytest.fixture()
def thin(tmp_path: Path) -> Iterator[Thin]:
    with shaped(tmp_path, RATE) as t:
        yield t


@pytest.fixture()
def fast(tmp_path: Path) -> Iterator[Thin]:
    with shaped(tmp_path, FAST) as t:
        yield t


def test_one_mib_over_1_mbit_commits_near_ideal_sending_each_byte_about_once(
        thin: Thin, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sdk.cli import main

    art = thin.release("1", MiB)
    thin.agent("slow")
    fleet = thin.fleet
    fleet.responder.stats.bytes_sent = 0
    t0 = time.time()
    assert main(cli_args(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                     "slow", "--wait", "--timeout", "120")) == 0
    out, err = capsys.readouterr()
    assert "committed on all 1 device(s)" in out
    # deploy --wait shows the download as it goes: bytes, rate, time left.
    assert "slow: downloading adder 1: " in err and " left" in err, err
    fleet.wait_event("slow", "committed", "1", timeout=30)  # the test's own listener
    took = fleet.last("slow", "committed")["ts"] - t0
    ideal = art * 8 / RATE
    sent = fleet.responder.stats.bytes_sent
    print(f"1 MiB over 1 Mbit/s: {took:.1f} s (ideal {ideal:.1f} s, {took / ideal:.2f}x), "
          f"{sent / art:.3f}x the artifact sent, {thin.link.drops()} tbf drops")
    assert took <= 2 * ideal
    assert sent <= 1.2 * art
    assert "failed" not in fleet.kinds("slow")
    # The operator saw it coming: progress with bytes, rate and time left.
    progress = [e for e in fleet.events["slow"] if e["event"] == "progress"]
    assert progress, fleet.kinds("slow")
    assert all(p["deployment"]["artifact_version"] == "1" for p in progress)
    assert any(0 < p["bytes"] < p["total"] and p["rate_bytes_s"] > 0 and p["eta_s"] is not None
               for p in progress), progress


def test_link_cut_for_20_s_mid_transfer_resumes_and_commits_without_giving_up(
        thin: Thin, capsys: pytest.CaptureFixture[str]) -> None:
    art = thin.release("2", MiB)
    thin.agent("cut")
    fleet = thin.fleet
    responder = fleet.responder
    responder.stats.bytes_sent = 0
    fleet.deploy("cut", "2")
    wait_for(lambda: responder.stats.bytes_sent > art // 3, 60, lambda: "no transfer started")
    thin.link.set_up(False)
    try:
        cut_at = time.monotonic()
        # Meanwhile `status` shows where the download was (the retained state says so).
        from edge_sdk.cli import main

        assert main(["status", "--broker", fleet.broker.url, "--fleet", FLEET,
                     "--device", "cut"]) == 0
        assert "downloading adder 2: " in capsys.readouterr().out
        time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))
    finally:
        thin.link.set_up(True)
    fleet.wait_event("cut", "committed", "2", timeout=180)
    kinds = fleet.kinds("cut")
    assert "failed" not in kinds, [e for e in fleet.events["cut"] if e["event"] == "failed"]
    # Resumed where it was, not from zero (a few chunks asked again across the cut).
    assert responder.stats.bytes_sent <= 1.5 * art


def test_64_mib_over_1_gbit_arrives_whole_and_intact_sending_each_byte_about_once(
        fast: Thin) -> None:
    # 64 MiB is half a second of a 1 Gbit/s link: hundreds of its sub-millisecond round
    # trips, far past any start-up of the pace, yet small enough for a CI machine.
    size = 64 * MiB
    art = fast.release("1", size)
    fleet = fast.fleet
    # The per-device byte budget above the link's rate: the link, not the policy, is
    # the limit here (a lone device's budget has tests of its own).
    fleet.responder.stop()
    lan = DeviceLimits(bytes_per_s=4 * FAST // 8, burst_bytes=4 * FAST // 8)
    fleet.responder = RepoResponder(fleet.host, fleet.repo.path,
                                    config=ResponderConfig(limits=lan))
    fleet.responder.start()
    agent = fast.agent("lan")
    fleet.deploy("lan", "1")
    fleet.wait_event("lan", "committed", "1", timeout=120)
    assert "failed" not in fleet.kinds("lan"), [
        e for e in fleet.events["lan"] if e["event"] == "failed"]
    # Every byte arrived, intact: the served model is the released one, byte for byte.
    installed = json.loads((agent.state / "installed.json").read_text())
    got = agent.state / "models" / installed["models"]["adder"]["id"] / "model.onnx"
    released = fleet.arts / "adder-1" / got.name
    assert got.stat().st_size == released.stat().st_size > size
    assert _sha256(got) == _sha256(released)
    # Each byte sent about once: the artifact, 5 % of it again at most, and the metadata
    # a refresh reads (at most every signed file of the repository).
    metadata = sum(p.stat().st_size for p in (fleet.repo.path / "metadata").iterdir())
    sent = fleet.responder.stats.bytes_sent
    assert sent <= 1.05 * art + metadata, (sent, art, metadata)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
