"""Several models on one device: in-process agents with real onnxruntime models and a real
state directory, driven through a local source (sets, removals, budgets, scopes) and
through the real signed-release source over the repository simulator (hostile sets)."""

from __future__ import annotations

import functools
import gc
import json
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent
from device_agent._source import ReleaseSource
from edge_sdk import Artifact
from edge_sdk.release import create_deployment
from edge_sdk.trust import Deployment, ModelTarget, sign_deployment
from tests import _agent_local, _process
from tests._agent_local import LocalSource, X, config, deployment, deployment_set, events
from tests._trust_env import FLEET, SimEnv

arts = _agent_local.arts  # adder v1..v3 and nan; rec r1, r2, rnan, rbatch1
make_agent = _agent_local.make_agent

wait_for = functools.partial(_process.wait_for, timeout=30.0)


def kinds(agent: Agent) -> list[str]:
    return [e["event"] for e in events(agent)]


def versions(agent: Agent) -> dict[str, str]:
    return {n: s.version for n, s in agent.slots.all().items()}


def predict(agent: Agent, name: str) -> float:
    served = agent.slots.get(name)
    assert served is not None
    return float(served.predict({"x": X})["y"][0, 0])


def submit(agent: Agent, payload: bytes, final: str = "committed") -> None:
    n = kinds(agent).count(final)
    agent.submit(payload)
    wait_for(lambda: kinds(agent).count(final) > n)


def two_models(make_agent: Any, arts: dict[str, Artifact], **kw: Any) -> tuple[Agent, Any]:
    source = kw.pop("source", None) or LocalSource()
    agent = make_agent(kw.pop("cfg", None), source=source)
    submit(agent, deployment(arts["v1"], 1))
    submit(agent, deployment(arts["r1"], 2))
    return agent, source


def test_deploying_a_then_b_serves_both(make_agent, arts) -> None:
    agent, _ = two_models(make_agent, arts)
    assert versions(agent) == {"adder": "v1", "rec": "r1"}
    assert (predict(agent, "adder"), predict(agent, "rec")) == (2.0, 11.0)
    snap = agent.snapshot()
    assert snap["models"] == [
        {"name": "adder", "version": "v1", "sha256": arts["v1"].manifest.sha256,
         "phase": "committed"},
        {"name": "rec", "version": "r1", "sha256": arts["r1"].manifest.sha256,
         "phase": "committed"}]
    assert snap["model"]["name"] == "rec"  # the one swapped in last
    assert [(r["deployment"], r["result"], r["models"]) for r in snap["results"]] == \
        [(1, "committed", ["adder"]), (2, "committed", ["rec"])]


def test_updating_one_model_never_refetches_reloads_or_watches_another(make_agent,
                                                                        arts) -> None:
    agent, source = two_models(make_agent, arts)
    rec = agent.slots.get("rec")
    assert rec is not None
    probed = rec.health.ok
    submit(agent, deployment(arts["v2"], 3))
    assert versions(agent) == {"adder": "v2", "rec": "r1"}
    assert agent.slots.get("rec") is rec  # the very object: not reloaded, not swapped
    assert rec.health.ok == probed  # not probed by the health window
    assert source.fetched == ["adder", "rec", "adder"]
    swapped = [e for e in events(agent) if e["event"] == "swapped"][-1]
    assert swapped["model"]["name"] == "adder"


def test_a_set_whose_member_fails_its_smoke_test_keeps_both_old_versions(make_agent,
                                                                         arts) -> None:
    agent, _ = two_models(make_agent, arts)
    submit(agent, deployment_set([arts["v2"], arts["rnan"]], 3), final="failed")
    assert versions(agent) == {"adder": "v1", "rec": "r1"}
    about = [e for e in events(agent) if (e.get("deployment") or {}).get("counter") == 3]
    assert [e["event"] for e in about].count("failed") == 1
    assert "swapped" not in [e["event"] for e in about]
    failed = about[-1]
    assert failed["stage"] == "smoke_test" and "non-finite" in failed["reason"]
    assert failed["deployment"]["models"] == [
        {"name": "adder", "artifact_version": "v2"}, {"name": "rec", "artifact_version": "rnan"}]
    st = agent.store.load()
    assert {n: r.version for n, r in st.models.items()} == {"adder": "v1", "rec": "r1"}
    assert len(list(agent.store.models.iterdir())) == 2  # nothing of the set stays on disk


def test_a_set_failing_its_health_window_rolls_back_as_one(make_agent, arts,
                                                           tmp_path) -> None:
    first, _ = two_models(make_agent, arts)
    first.stop()
    agent = make_agent(config(tmp_path / "state",
                              health={"window_s": 60.0, "probe_interval_s": 0.05}))
    agent.submit(deployment_set([arts["v2"], arts["rbatch1"]], 3))
    wait_for(lambda: versions(agent) == {"adder": "v2", "rec": "rb1"})
    assert [m["phase"] for m in agent.snapshot()["models"]] == ["trial", "trial"]
    with pytest.raises(Exception, match=r"Reshape|reshape"):
        agent.slots.get("rec").predict({"x": np.ones((2, 4), np.float32)})
    wait_for(lambda: "rolled_back" in kinds(agent))
    assert kinds(agent).count("rolled_back") == 1
    assert versions(agent) == {"adder": "v1", "rec": "r1"}
    st = agent.store.load()
    assert st.phase == "committed" and st.results[-1]["result"] == "rolled_back"
    assert {n: r.version for n, r in st.models.items()} == {"adder": "v1", "rec": "r1"}


def test_a_removed_model_is_gone_and_its_memory_let_go(make_agent, arts) -> None:
    agent, _ = two_models(make_agent, arts)
    rec = agent.slots.get("rec")
    adder = weakref.ref(agent.slots.all()["adder"])
    submit(agent, deployment_set([], 3, remove=["adder"]))
    assert versions(agent) == {"rec": "r1"} and agent.slots.get("rec") is rec
    st = agent.store.load()
    assert set(st.models) == {"rec"} and "adder" not in st.previous
    # Nothing holds adder's runtime session any more: its memory goes back.
    wait_for(lambda: gc.collect() >= 0 and adder() is None)
    assert [d.name for d in agent.store.models.iterdir()] == [st.models["rec"].id]
    assert predict(agent, "rec") == 11.0


def test_a_set_over_the_memory_budget_is_refused_before_any_download(make_agent, arts,
                                                                     tmp_path) -> None:
    size = arts["v1"].manifest.size_bytes
    cfg = config(tmp_path / "state", limits={"max_models_bytes": 3 * size})
    agent, source = two_models(make_agent, arts, cfg=cfg)
    submit(agent, deployment_set([arts["v2"], arts["r2"]], 3), final="refused")
    refused = [e for e in events(agent) if e["event"] == "refused"][-1]
    assert "limits.max_models_bytes" in refused["reason"]
    assert f"{4 * size} bytes" in refused["reason"] and str(3 * size) in refused["reason"]
    assert source.fetches == 2 and versions(agent) == {"adder": "v1", "rec": "r1"}
    submit(agent, deployment(arts["v2"], 4))  # one replaced model fits: 3 sizes
    assert versions(agent) == {"adder": "v2", "rec": "r1"}


def test_a_set_with_a_member_over_the_artifact_limit_is_refused_before_download(
        make_agent, arts) -> None:
    agent, source = two_models(make_agent, arts)
    hostile = deployment_set([arts["v2"], arts["r2"]], 3)
    body = json.loads(hostile)["body"]
    body["models"][1]["length"] = agent.config.limits.max_artifact_bytes + 1
    submit(agent, _agent_local_sign(body), final="refused")
    reason = [e for e in events(agent) if e["event"] == "refused"][-1]["reason"]
    assert "rec r2" in reason and "limits.max_artifact_bytes" in reason
    assert source.fetches == 2 and versions(agent) == {"adder": "v1", "rec": "r1"}


def _agent_local_sign(body: dict[str, Any]) -> bytes:
    import hashlib
    import hmac

    sig = hmac.new(_agent_local.KEY, json.dumps(body, sort_keys=True).encode(),
                   hashlib.sha256).hexdigest()
    return json.dumps({"body": body, "sig": sig}).encode()


@pytest.mark.parametrize("device_first", [True, False])
def test_device_and_group_documents_combine_per_model_newest_counter_wins(
        make_agent, arts, tmp_path, device_first) -> None:
    cfg = config(tmp_path / "state", groups=["line"])
    agent, _ = two_models(make_agent, arts, cfg=cfg)
    mine = deployment_set([arts["v2"]], 7, devices=["dev-1"])
    group = deployment_set([arts["v3"], arts["r2"]], 5, groups=["line"])
    for payload in ([mine, group] if device_first else [group, mine]):
        submit(agent, payload)
    assert versions(agent) == {"adder": "v2", "rec": "r2"}
    st = agent.store.load()
    assert st.counters == {"adder": 7, "rec": 5}
    assert st.scopes == {"device": 7, "group:line": 5}
    if device_first:
        started = [e for e in events(agent) if e["event"] == "install_started"][-1]
        assert started["skipped"] == [{"name": "adder", "reason": "superseded by #7"}]
    # A replay within a scope is still refused (the worker passes it over quietly: with
    # several desired topics, older documents stay retained on the others).
    agent.installer.apply(deployment_set([arts["r1"]], 6, groups=["line"]))
    replay = deployment_set([arts["r1"]], 6, groups=["line"], again=1)
    assert agent.installer.apply(replay) is False
    assert "not newer than the installed 6" in agent.store.load().failed[_digest(replay)]
    assert versions(agent) == {"adder": "v2", "rec": "r1"}


def _digest(payload: bytes) -> str:
    import hashlib

    return hashlib.sha256(payload).hexdigest()[:32]


def test_a_restart_serves_the_whole_set_again(make_agent, arts, tmp_path) -> None:
    agent, _ = two_models(make_agent, arts)
    agent.stop()
    again = make_agent(config(tmp_path / "state"))
    assert versions(again) == {"adder": "v1", "rec": "r1"}


# -- hostile sets through the real trust layer -------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def env(tmp_path: Path) -> SimEnv:
    e = SimEnv(tmp_path / "env")
    e.release("a", "1.0")
    e.release("b", "1.0", seed=1)
    e.release("a", "2.0", seed=2)
    return e


def release_agent(env: SimEnv, tmp_path: Path, make_agent: Any) -> Agent:
    cfg = config(tmp_path / "state", device_id="d1", fleet=FLEET,
                 trust={"root": str(env.repo.meta / "1.root.json"),
                        "deployment_key": str(env.repo.deployment_key_path)})
    agent = make_agent(cfg, ReleaseSource(cfg, None, fetcher=env.sim))
    sd = create_deployment(env.repo, models=[("a", "1.0"), ("b", "1.0")], fleet=FLEET,
                           devices=["d1"])
    submit(agent, sd.document)
    assert versions(agent) == {"a": "1.0", "b": "1.0"}
    return agent


def signed(env: SimEnv, dep: Deployment, edit: dict[str, Any] | None = None) -> bytes:
    doc = json.loads(sign_deployment(dep, env.repo.keys.signers("deployment")))
    if edit:
        from edge_sdk.trust._envelope import canonical

        doc["signed"] = {**doc["signed"], **edit}
        sig = env.repo.keys.signers("deployment")[0].sign(canonical(doc["signed"]))
        doc["signatures"] = [{"keyid": sig.keyid, "sig": sig.signature}]
    return json.dumps(doc).encode()


def target(env: SimEnv, name: str, version: str) -> ModelTarget:
    """The signed target of a released model (as a deployment of it names it)."""
    sd = create_deployment(env.repo, model=name, version=version, fleet=FLEET, devices=["x"])
    return ModelTarget.from_signed(json.loads(sd.document)["signed"])


def a_set(env: SimEnv, *members: ModelTarget, counter: int = 50) -> Deployment:
    return Deployment(fleet=FLEET, counter=counter, issued=NOW,
                      expires=NOW + timedelta(days=1), models=members, devices=("d1",))


def test_a_set_naming_a_model_twice_is_refused_with_the_old_set_serving(
        env, tmp_path, make_agent) -> None:
    agent = release_agent(env, tmp_path, make_agent)
    a2 = target(env, "a", "2.0")
    twice = signed(env, a_set(env, a2, target(env, "b", "1.0")),
                   {"models": [a2.to_signed(), a2.to_signed()]})
    submit(agent, twice, final="refused")
    assert "'a' more than once" in [e for e in events(agent)
                                    if e["event"] == "refused"][-1]["reason"]
    assert versions(agent) == {"a": "1.0", "b": "1.0"}


def test_a_set_mixing_a_signed_and_an_unlisted_target_installs_nothing(
        env, tmp_path, make_agent) -> None:
    agent = release_agent(env, tmp_path, make_agent)
    b = target(env, "b", "1.0")
    unlisted = ModelTarget("b", "9.0", "b/9.0/model.onnx", "1" * 64, b.length)
    submit(agent, signed(env, a_set(env, target(env, "a", "2.0"), unlisted)), final="failed")
    failed = [e for e in events(agent) if e["event"] == "failed"][-1]
    assert failed["stage"] == "fetch" and "b/9.0/model.onnx" in failed["reason"]
    assert versions(agent) == {"a": "1.0", "b": "1.0"}
    st = agent.store.load()
    assert {n: r.version for n, r in st.models.items()} == {"a": "1.0", "b": "1.0"}
    assert len(list(agent.store.models.iterdir())) == 2  # a 2.0 was fetched, then dropped


def test_an_older_group_set_installs_its_other_models_without_downgrading_a_newer_one(
        env, tmp_path, make_agent) -> None:
    env.release("b", "2.0", seed=3)
    cfg = config(tmp_path / "state", device_id="d1", fleet=FLEET, groups=["line"],
                 trust={"root": str(env.repo.meta / "1.root.json"),
                        "deployment_key": str(env.repo.deployment_key_path)})
    agent = make_agent(cfg, ReleaseSource(cfg, None, fetcher=env.sim))
    submit(agent, create_deployment(env.repo, models=[("a", "1.0"), ("b", "1.0")],
                                    fleet=FLEET, devices=["d1"]).document)
    group = create_deployment(env.repo, models=[("a", "1.0"), ("b", "2.0")], fleet=FLEET,
                              groups=["line"])
    mine = create_deployment(env.repo, model="a", version="2.0", fleet=FLEET, devices=["d1"])
    submit(agent, mine.document)
    # a 1.0 in the group's set would be a downgrade, but #mine decided a: it is skipped.
    submit(agent, group.document)
    assert versions(agent) == {"a": "2.0", "b": "2.0"}
    started = [e for e in events(agent) if e["event"] == "install_started"][-1]
    assert started["skipped"] == [
        {"name": "a", "reason": f"superseded by #{mine.deployment.counter}"}]


def test_after_a_restart_the_model_installed_last_is_the_one_old_readers_are_told(
        make_agent, arts, tmp_path) -> None:
    agent = make_agent()
    submit(agent, deployment(arts["r1"], 1))
    submit(agent, deployment(arts["v1"], 2))  # adder: installed last, sorted first
    agent.stop()
    again = make_agent(config(tmp_path / "state"))
    assert again.snapshot()["model"]["name"] == "adder"


def test_a_signed_set_with_a_member_over_the_artifact_limit_downloads_nothing(
        env, tmp_path, make_agent) -> None:
    big = env.release("c", "1.0", n=4096, seed=4)
    small = target(env, "a", "2.0").length
    assert big.manifest.size_bytes > 4 * small
    cfg = config(tmp_path / "state", device_id="d1", fleet=FLEET,
                 limits={"max_artifact_bytes": 2 * small},
                 trust={"root": str(env.repo.meta / "1.root.json"),
                        "deployment_key": str(env.repo.deployment_key_path)})
    agent = make_agent(cfg, ReleaseSource(cfg, None, fetcher=env.sim))
    submit(agent, create_deployment(env.repo, model="a", version="1.0", fleet=FLEET,
                                    devices=["d1"]).document)
    sd = create_deployment(env.repo, models=[("a", "2.0"), ("c", "1.0")], fleet=FLEET,
                           devices=["d1"])
    submit(agent, sd.document, final="refused")
    told = [e for e in events(agent)
            if (e.get("deployment") or {}).get("counter") == sd.deployment.counter]
    assert [e["event"] for e in told] == ["refused"]
    assert "c 1.0" in told[0]["reason"] and "limits.max_artifact_bytes" in told[0]["reason"]
    assert versions(agent) == {"a": "1.0"}
