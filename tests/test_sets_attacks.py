"""Odd and hostile inputs to a device serving several models: budgets a device is already
over, deployments delivered again after newer ones, models whose stored ids would collide.
Pure-machine where the rule lives in the lifecycle, in-process agents (real onnxruntime,
real state directory) where it lives on disk."""

from __future__ import annotations

from dataclasses import replace

from device_agent._events import Accepted, Boot, Report, Swap
from device_agent._lifecycle import Mode
from device_agent._state import InstalledState
from tests.test_lifecycle import A1, A2, B1, B2, Run, install_set, set_dep


def serving(budget: int = 0) -> Run:
    """A device serving det 1 and rec 1 (2000 bytes), under ``budget`` (0: none)."""
    state = InstalledState(models={"det": A1, "rec": B1}, counters={"det": 1, "rec": 2},
                           scopes={"device": 2}, deployment_counter=2, deployment_digest="s2")
    return Run().feed(Boot(state, 1, max_models_bytes=budget))


def test_a_removal_is_taken_by_a_device_already_over_its_memory_budget() -> None:
    run = serving(1500)
    run.feed(Accepted(set_dep(3, remove=("det",)), served_bytes=2000))
    assert run.reports()[-1] == "committed"
    assert run.life.serving == {"rec": B1} and run.life.installed.models == {"rec": B1}
    assert Swap({"det": None}) in run.effects


def test_a_deployment_of_what_serves_commits_on_a_device_over_its_budget() -> None:
    run = serving(1500)
    run.feed(Accepted(set_dep(3, B1), served_bytes=2000))
    assert "refused" not in run.reports()
    assert run.life.installed.results[-1]["result"] == "committed"


def test_a_deployment_installed_then_delivered_again_after_a_newer_one_keeps_its_result(
        ) -> None:
    """Two rollouts of different models to one device: #3 (det) then #4 (rec) commit; the
    controller, not having heard #3's answer, publishes #3 again. The device must not
    turn #3's committed result into a refusal (the rollout would count it as failed)."""
    run = serving()
    install_set(run, set_dep(3, A2), A2)
    install_set(run, set_dep(4, B2), B2)
    assert [r["result"] for r in run.life.installed.results[-2:]] == ["committed"] * 2
    start = len(run.effects)
    run.feed(Accepted(replace(set_dep(3, A2)), served_bytes=2000))
    assert "refused" not in run.reports(start)
    results = {r["deployment"]: r["result"] for r in run.life.installed.results}
    assert results[3] == "committed" and results[4] == "committed"
    assert run.life.mode is Mode.IDLE and run.life.serving == {"det": A2, "rec": B2}
    assert not any(isinstance(e, Report) for e in run.effects[start:])
