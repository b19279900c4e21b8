"""Several models on one device, end to end: a real agent subprocess, a real Mosquitto, a
real signed release repository served by the real responder, deployments signed and
published as an operator would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.release import create_deployment, publish_deployment
from tests import _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, Fleet, X, new_agent
from tests._process import wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("sets-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3"):
            f.release(v)
        for v in ("1", "2"):
            f.release(v, name="rec", offset=100.0 + float(v))

        def nan(src: Path) -> Path:
            return _models.offset_model(src, float("nan"))

        f.release("9", name="rec", builder=nan)  # fails its smoke test
        yield f
        f.close()


def about(fleet: Fleet, device: str, counter: int) -> list[dict]:
    """The events ``device`` reported about deployment ``counter``."""
    return [e for e in list(fleet.events[device])
            if (e.get("deployment") or {}).get("counter") == counter]


def remove(fleet: Fleet, device: str, name: str) -> int:
    sd = create_deployment(fleet.repo, remove=[name], fleet=FLEET, devices=[device])
    publish_deployment(fleet.host, sd)
    return sd.deployment.counter


def settled(fleet: Fleet, device: str, counter: int, result: str) -> bool:
    state = fleet.states.get(device) or {}
    return any(r["deployment"] == counter and r["result"] == result
               for r in state.get("results") or ())


def test_two_models_update_alone_fail_as_a_set_and_remove_one(fleet, tmp_path,
                                                               agents) -> None:
    agent = new_agent(fleet, tmp_path, agents, "pair").start()
    fleet.deploy("pair", "1")
    agent.wait_version("1")
    c = fleet.deploy_set("pair", [("rec", "1")])
    wait_for(lambda: agent.version("rec") == "1", 60)
    assert agent.infer(model="adder") == ("1", 2.0)
    assert agent.infer(model="rec") == ("1", X[0, 0] + 101.0)
    wait_for(lambda: settled(fleet, "pair", c, "committed"), 30)

    # adder alone: nothing about rec is downloaded, swapped or watched.
    c = fleet.deploy("pair", "2")
    wait_for(lambda: settled(fleet, "pair", c, "committed"), 60)
    assert agent.infer(model="adder") == ("2", 3.0) and agent.version("rec") == "1"
    told = about(fleet, "pair", c)
    assert {e["deployment"]["name"] for e in told} == {"adder"}
    assert all((e.get("model") or {}).get("name", "adder") == "adder" for e in told)

    # A set whose rec fails its smoke test: both stay, one failed event for the set.
    c = fleet.deploy_set("pair", [("adder", "3"), ("rec", "9")])
    wait_for(lambda: settled(fleet, "pair", c, "failed"), 60)
    told = about(fleet, "pair", c)
    assert [e["event"] for e in told].count("failed") == 1
    assert "swapped" not in [e["event"] for e in told]
    assert (agent.version("adder"), agent.version("rec")) == ("2", "1")
    state = fleet.states["pair"]
    assert [(m["name"], m["version"], m["phase"]) for m in state["models"]] == \
        [("adder", "2", "committed"), ("rec", "1", "committed")]

    # Removing adder: it is gone, rec keeps serving.
    c = remove(fleet, "pair", "adder")
    wait_for(lambda: settled(fleet, "pair", c, "committed"), 60)
    assert agent.get("/v2/models/adder")[0] == 404
    assert agent.infer(model="rec") == ("1", X[0, 0] + 101.0)
    installed = json.loads((agent.state / "installed.json").read_text())
    assert set(installed["models"]) == {"rec"}


def test_a_set_over_the_memory_budget_is_refused_before_downloading(fleet, tmp_path,
                                                                    agents) -> None:
    size = (fleet.arts / "adder-1" / "model.onnx").stat().st_size
    agent = new_agent(fleet, tmp_path, agents, "budget",
                      limits={"max_models_bytes": 3 * size}).start()
    c = fleet.deploy_set("budget", [("adder", "1"), ("rec", "1")])
    wait_for(lambda: settled(fleet, "budget", c, "committed"), 60)
    c = fleet.deploy_set("budget", [("adder", "2"), ("rec", "2")])
    wait_for(lambda: settled(fleet, "budget", c, "refused"), 60)
    told = about(fleet, "budget", c)
    assert [e["event"] for e in told] == ["refused"]  # nothing downloaded
    assert "limits.max_models_bytes" in told[0]["reason"]
    assert (agent.version("adder"), agent.version("rec")) == ("1", "1")
