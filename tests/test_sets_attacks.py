"""Odd and hostile inputs to a device serving several models: budgets a device is already
over, deployments delivered again after newer ones, models whose stored ids would collide.
Pure-machine where the rule lives in the lifecycle, in-process agents (real onnxruntime,
real state directory) where it lives on disk."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent import Agent
from device_agent._config import MAX_SERVED_MODELS
from device_agent._events import Accepted, Boot, Report, Swap
from device_agent._lifecycle import Mode
from device_agent._state import InstalledState, ModelRecord
from edge_sdk import Artifact, build_artifact
from edge_sdk.errors import ConfigError, UsageError
from edge_sdk.release import DeviceStatus, create_deployment
from edge_sdk.release._watch import MAX_MODELS
from tests import _agent_local, _models, _process
from tests._agent_local import SAMPLE, config, deployment_set, events
from tests._lifecycle_driver import A1, A2, B1, B2, Run, install_set, set_dep
from tests._trust_env import FLEET, SimEnv

make_agent = _agent_local.make_agent
wait_for = functools.partial(_process.wait_for, timeout=30.0)


def submit(agent: Agent, payload: bytes, final: str = "committed") -> None:
    n = [e["event"] for e in events(agent)].count(final)
    agent.submit(payload)
    wait_for(lambda: [e["event"] for e in events(agent)].count(final) > n)


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


# -- stored ids ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Artifact, Artifact]:
    """One model file released as two models whose "name-version" is the same text."""
    d = tmp_path_factory.mktemp("twins")
    m = _models.offset_model(d / "m.onnx", 1.0)
    return (build_artifact(m, d / "a", name="det-1", version="x", sample=SAMPLE),
            build_artifact(m, d / "b", name="det", version="1-x", sample=SAMPLE))


def test_two_models_of_one_file_whose_ids_would_collide_are_stored_apart(
        make_agent, twins, tmp_path) -> None:
    a, b = twins
    agent = make_agent()
    submit(agent, deployment_set([a, b], 1))
    served = agent.slots.all()
    assert served["det-1"] is not served["det"]
    assert {n: (s.record.name, s.predictor.manifest.version) for n, s in served.items()} == \
        {"det-1": ("det-1", "x"), "det": ("det", "1-x")}
    st = agent.store.load()
    assert st.models["det-1"].id != st.models["det"].id
    submit(agent, deployment_set([], 2, remove=["det-1"]))
    agent.stop()
    again = make_agent(config(tmp_path / "state"))
    det = again.slots.get("det")
    assert det is not None and det.predictor.manifest.name == "det"
    assert [d.name for d in again.store.models.iterdir()] == [st.models["det"].id]


# -- how many models --------------------------------------------------------------------------

C1 = ModelRecord("kw-1-eeeeeeeeeeee", "kw", "1", "5" * 64, "s3")


def limited(most: int) -> Run:
    state = InstalledState(models={"det": A1, "rec": B1}, counters={"det": 1, "rec": 2},
                           scopes={"device": 2}, deployment_counter=2, deployment_digest="s2")
    return Run().feed(Boot(state, 1, max_models=most))


def test_a_deployment_that_would_serve_more_than_max_models_is_refused_before_download(
        ) -> None:
    run = limited(2)
    run.feed(Accepted(set_dep(3, C1)))
    assert run.life.mode is Mode.IDLE and run.reports()[-1] == "refused"
    assert "3 models, over the limit of 2 (limits.max_models)" in \
        run.life.installed.failed["s3"]
    # Swapping one model for another keeps the count: taken.
    install_set(run, set_dep(4, C1, remove=("rec",)), C1)
    assert run.life.serving == {"det": A1, "kw": C1}


def test_a_device_over_a_lowered_max_models_still_updates_and_sheds_models() -> None:
    run = limited(1)
    install_set(run, set_dep(3, A2), A2)
    assert run.life.serving == {"det": A2, "rec": B1}
    run.feed(Accepted(set_dep(4, remove=("rec",))))
    assert run.life.serving == {"det": A2}


def test_every_model_an_agent_may_serve_is_read_by_the_fleet() -> None:
    st = DeviceStatus.parse("d", json.dumps({"models": [
        {"name": f"m{i:02d}", "version": "1"} for i in range(MAX_SERVED_MODELS)]}).encode())
    assert st is not None and len(st.models) == MAX_SERVED_MODELS == MAX_MODELS
    with pytest.raises(ConfigError, match=r"limits\.max_models.*1-64"):
        config(Path("/tmp/unused"), limits={"max_models": MAX_SERVED_MODELS + 1})


# -- signing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "x" * 129, "a\nb"])
def test_a_removal_no_device_would_read_is_refused_before_signing(tmp_path, name) -> None:
    e = SimEnv(tmp_path)
    counter = e.repo.path / "deployments" / "counter"
    before = counter.read_bytes() if counter.exists() else None
    with pytest.raises(UsageError, match="'model' must be 1 to 128 printable characters"):
        create_deployment(e.repo, remove=[name], fleet=FLEET, devices=["d1"])
    assert (counter.read_bytes() if counter.exists() else None) == before
    assert not (e.repo.path / "deployments" / "dev-d1.json").exists()


# -- the state file ----------------------------------------------------------------------------

def test_a_state_file_with_odd_results_and_300_counters_still_takes_deployments() -> None:
    from dataclasses import asdict

    data = {"schema": 2, "models": {"det": asdict(A1), "rec": asdict(B1)},
            "counters": {**{f"gone{i:03d}": i for i in range(300)}, "det": 400, "rec": 401},
            "scopes": {"device": 401}, "floor": 0,
            "results": [7, "committed", None, ["x"],
                        {"deployment": 401, "result": "committed", "models": ["rec"]}]}
    st = InstalledState.from_json(data, "installed.json")
    assert [r["deployment"] for r in st.results] == [401]
    run = Run().feed(Boot(st, 1))
    install_set(run, set_dep(402, A2), A2)
    got = run.life.installed
    assert run.life.serving == {"det": A2, "rec": B1}
    assert [r["deployment"] for r in got.results] == [401, 402]
    assert len(got.counters) == 256 and got.counter_of("gone000") == got.floor == 45
    assert got.counters["det"] == 402 and got.counters["rec"] == 401


def test_removing_a_model_the_device_does_not_have_commits_saying_so() -> None:
    run = serving()
    run.feed(Accepted(set_dep(3, remove=("kw",))))
    assert not any(isinstance(e, Swap) for e in run.effects[-2:])
    last = run.life.installed.results[-1]
    assert (last["result"], last["reason"]) == ("committed", "not serving kw")
    assert run.life.installed.counter_of("kw") == 3  # an older deployment of kw is stale
    run.feed(Accepted(set_dep(4, B1, remove=("kw",))))
    assert run.life.installed.results[-1]["reason"] == "already serving rec; not serving kw"


# -- rollout run's send-back ------------------------------------------------------------------

def test_an_abort_never_removes_a_model_from_a_device_whose_models_were_unknown(
        tmp_path) -> None:
    """``rollout run --device d1`` while d1's retained state is missing (a broker restarted
    without persistence): its models before are unknown, not absent. An abort must not
    sign d1 a removal of the model it may well have served all along."""
    from edge_sdk.release._rollout import (
        RolloutConfig,
        RolloutResult,
        _models_before,
        _roll_back,
    )

    before = _models_before({}, ["d1"], {"det": "2"})
    result = RolloutResult("det", "2", [["d1"]])
    _roll_back(SimEnv(tmp_path).repo, None, None, {"det": "2"},  # type: ignore[arg-type]
               ["d1"], [], before, RolloutConfig(), None, None, result)
    assert result.rolled_back == []
    assert "unknown" in result.not_rolled_back["d1"]
