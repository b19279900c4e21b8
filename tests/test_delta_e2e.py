"""Delta updates end to end: a real Mosquitto, the real responder and signed repository,
real agent subprocesses (the helpers of tests/_e2e.py)."""

from __future__ import annotations

import http.client
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent._crash import DELTA_CRASH_POINTS
from tests._broker import Mosquitto
from tests._e2e import (
    FLEET,
    RETAINED,
    AgentProc,
    Fleet,
    cli_args,
    new_agent,
    release_with_delta,
)
from tests._process import wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("delta-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        yield f
        f.close()


def download_bytes(agent: AgentProc) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^edge_agent_download_bytes_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


def downloaded(fleet: Fleet, device: str, version: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        try:
            e = fleet.last(device, "downloaded")
        except IndexError:
            return None
        return dict(e["download"]) if e["deployment"]["artifact_version"] == version else None

    return wait_for(found, 60, lambda: f"no download event for {version}: "
                                       f"{fleet.kinds(device)}")


def state_download(agent: AgentProc) -> str:
    st = json.loads((agent.state / "installed.json").read_text())
    return str((st.get("last_result") or {}).get("download"))


def test_v2_installs_from_a_delta_and_a_corrupt_delta_falls_back_to_the_full_model(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc],
        capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sdk.cli import main

    release_with_delta(fleet, "1")
    agent = new_agent(fleet, tmp_path, agents, "delta").start()
    fleet.deploy("delta", "1")
    agent.wait_version("1")
    assert downloaded(fleet, "delta", "1")["kind"] == "full"
    full_1 = download_bytes(agent)["full"]
    assert full_1 >= RETAINED.nbytes

    release_with_delta(fleet, "2")
    v2 = fleet.repo.find("adder", "2")
    assert [d.base_version for d in v2.deltas] == ["1"]
    sent_before = fleet.responder.stats.bytes_sent
    fleet.deploy("delta", "2")
    agent.wait_version("2")
    got = downloaded(fleet, "delta", "2")
    assert got["kind"] == "delta" and got["from"] == "1"
    assert got["message"] == f"delta from 1 ({v2.deltas[0].length} bytes)"
    assert got["bytes"] == v2.deltas[0].length < v2.length * 0.05
    assert download_bytes(agent) == {"delta": v2.deltas[0].length, "full": full_1}
    # Metadata and the sample travel too, but nothing close to the model's 4 MiB.
    assert fleet.responder.stats.bytes_sent - sent_before < v2.length * 0.1
    wait_for(lambda: "delta from 1" in state_download(agent), 30)
    assert agent.infer() == ("2", 3.0)
    capsys.readouterr()
    assert main(["status", "--device", "delta", "--broker", fleet.broker.url,
                 "--fleet", FLEET]) == 0
    assert f"[delta from 1 ({v2.deltas[0].length} bytes)]" in capsys.readouterr().out

    # The repository host's copy of the next delta is damaged: the signed hash catches
    # it, and the agent takes the full model in the same install.
    release_with_delta(fleet, "3")
    v3 = fleet.repo.find("adder", "3")
    assert sorted(d.base_version for d in v3.deltas) == ["1", "2"]  # it holds both
    for ref in v3.deltas:
        dirname, _, base = ref.path.rpartition("/")
        (stored,) = (fleet.repo.path / "targets" / dirname).glob(f"*.{base}")
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    assert main(cli_args(fleet, "deploy", "--model", "adder", "--version", "3", "--device",
                     "delta", "--wait", "--timeout", "60")) == 0
    progress = capsys.readouterr().err
    assert f"delta: downloaded adder 3: full artifact ({v3.length} bytes); the delta" in progress
    agent.wait_version("3")
    got = downloaded(fleet, "delta", "3")
    assert got["kind"] == "full" and got["from"] in ("1", "2")
    assert "do not match the signed length and sha256" in got["fallback"]
    assert got["message"].startswith(f"full artifact ({v3.length} bytes); the delta from "
                                     f"{got['from']} failed")
    assert download_bytes(agent)["full"] == full_1 + v3.length
    assert agent.infer() == ("3", 4.0)


@pytest.mark.slow
@pytest.mark.parametrize("point", DELTA_CRASH_POINTS)
def test_kill_9_while_a_delta_is_applied_restarts_into_a_verified_model(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc], point: str) -> None:
    for v in ("1", "2", "3", "4", "5"):
        if v not in fleet.released:
            release_with_delta(fleet, v)
    device = f"crash-{point.replace('_', '-')}"
    agent = new_agent(fleet, tmp_path, agents, device).start()
    fleet.deploy(device, "4")
    agent.wait_version("4")
    agent.stop()
    agent.start(crash_at=point)
    fleet.deploy(device, "5")
    assert agent.proc is not None and agent.proc.wait(60) == -signal.SIGKILL
    agent.start()
    wait_for(lambda: agent.get("/v2/health/ready")[0] == 200, 30)
    assert agent.infer() in (("4", 5.0), ("5", 6.0))  # a verified model serves at once
    agent.wait_version("5")  # and the retained deployment is finished from the delta
    assert agent.infer() == ("5", 6.0)
    wait_for(lambda: "delta from 4" in state_download(agent), 30, lambda: state_download(agent))
