"""End to end, several models on one device: a real Mosquitto, a real signed release
repository served by the real responder (which notes every chunk it is asked for), real
agents as subprocesses, deployments signed as an operator would (or by hand with the
deployment key, for the documents the tools refuse to make).

The models: ``det`` (4 MiB of weights a retrain keeps: each version a small delta from
the one before), ``rec`` and ``kw`` (tiny). Each answers y = x + its offset, so every
answer tells which model and version computed it.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_sdk.errors import UsageError
from edge_sdk.release import create_deployment, publish_deployment
from edge_sdk.trust import ModelTarget, sign_deployment
from tests import _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, Fleet, X, cli_args, new_agent
from tests._process import wait_for
from tests._trust_env import RecordingResponder

#: Each model's offset: what it adds to x, version by version (``rec 2`` answers NaN: it
#: fails the agent's smoke test; ``rec 4`` fails any batch but 1, in its health window).
OFFSET = {"det": 0.0, "rec": 10.0, "kw": 20.0}
_RNG = np.random.default_rng(29)
DET_WEIGHTS = _RNG.standard_normal((4, 262144)).astype(np.float32)  # 4 MiB every det keeps
_DET_HEADS = {v: _RNG.standard_normal(16384).astype(np.float32) for v in ("1", "2", "3")}
#: Outcomes after which a deployment's install is over.
FINAL = ("committed", "failed", "rolled_back", "refused")


def expected(name: str, version: str) -> float:
    """y[0] of ``name`` ``version`` for the input X."""
    return float(X[0, 0]) + OFFSET[name] + float(version)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("models-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        f.responder.stop()
        f.responder = RecordingResponder(f.host, f.repo.path)
        f.responder.start()
        for v in ("1", "2", "3"):
            def det(src: Path, v: str = v) -> Path:
                return _models.weighted_offset_model(src, float(v), DET_WEIGHTS, _DET_HEADS[v])

            f.release(v, name="det", builder=det)
        for v in ("1", "2", "3"):
            offset = float("nan") if v == "2" else OFFSET["rec"] + float(v)
            f.release(v, name="rec", offset=offset)
        f.release("4", name="rec", builder=_models.batch1_only_model)  # fails batch > 1
        for v in ("1", "2"):
            f.release(v, name="kw", offset=OFFSET["kw"] + float(v))
        yield f
        f.close()


# -- the operator's side ------------------------------------------------------------------

def deploy(fleet: Fleet, device: str | None, *models: tuple[str, str],
           remove: Sequence[str] = (), group: str | None = None) -> int:
    """Sign and publish one deployment installing ``models`` (name, version) together and
    removing ``remove`` on ``device`` (or on ``group``); its counter."""
    sd = create_deployment(fleet.repo, fleet=FLEET, models=list(models), remove=remove,
                           devices=[device] if device else [],
                           groups=[group] if group else [])
    publish_deployment(fleet.host, sd)
    return sd.deployment.counter


def publish_by_hand(fleet: Fleet, device: str, members: Sequence[ModelTarget]) -> int:
    """Sign, with the fleet's real deployment key, a document installing ``members`` as
    they are (the tools would refuse to make it), under a fresh counter; its counter."""
    fresh = create_deployment(fleet.repo, fleet=FLEET, model="kw", version="1",
                              devices=[device], rollback=True)  # for its counter; unsent
    doc = sign_deployment(replace(fresh.deployment, models=tuple(members)),
                          fleet.repo.keys.signers("deployment"))
    fleet.publish_raw(device, doc)
    return fresh.deployment.counter


def member(fleet: Fleet, name: str, version: str) -> ModelTarget:
    """The signed target of release ``name`` ``version``, as a deployment names it."""
    rel = fleet.repo.find(name, version)
    return ModelTarget(rel.name, rel.version, rel.path, rel.sha256, rel.length)


# -- what the device says -------------------------------------------------------------------

def counter_of(ev: dict[str, Any]) -> int | None:
    """The deployment an event is about (a refused document: the counter it claims)."""
    dep, payload = ev.get("deployment"), ev.get("payload")
    if isinstance(dep, dict):
        return dep.get("counter")
    if isinstance(dep, int):
        return dep
    return payload.get("claimed_counter") if isinstance(payload, dict) else None


def names_in(doc: Any) -> set[str]:
    """Every model an event names, wherever it does (its deployment, a set's members and
    removals, the model it swapped in, what it replaced or restored)."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("name", "model") and isinstance(v, str):
                out.add(v)
            elif k == "remove" and isinstance(v, list):
                out |= {r for r in v if isinstance(r, str)}
            else:
                out |= names_in(v)
    elif isinstance(doc, list):
        for v in doc:
            out |= names_in(v)
    return out


def events_of(fleet: Fleet, device: str, counter: int) -> list[dict[str, Any]]:
    return [e for e in fleet.history(device) if counter_of(e) == counter]


def outcome(fleet: Fleet, agent: AgentProc, counter: int, timeout: float = 60) -> dict[str, Any]:
    """The event that ends deployment ``counter`` on the agent (committed, failed, ...)."""
    def done() -> dict[str, Any] | None:
        return next((e for e in events_of(fleet, agent.device, counter)
                     if e["event"] in FINAL), None)

    got: dict[str, Any] = wait_for(done, timeout, lambda: (
        f"deployment #{counter} did not finish: {fleet.kinds(agent.device)}; log: "
        f"{agent.log.read_text()[-3000:]}"))
    return got


def request(agent: AgentProc, method: str, path: str, body: Any = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    c = conn or http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body))
        resp = c.getresponse()
        raw = resp.read()
    finally:
        if conn is None:
            c.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def infer(agent: AgentProc, name: str,
          conn: http.client.HTTPConnection | None = None) -> tuple[str, float]:
    """(version, y[0]) of one request to model ``name``; AssertionError unless it is 200."""
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": X.reshape(-1).tolist()}]}
    status, data = request(agent, "POST", f"/v2/models/{name}/infer", body, conn)
    assert status == 200, f"{name}: {status} {data}"
    return data["model_version"], float(data["outputs"][0]["data"][0])


def serves(agent: AgentProc, name: str, version: str) -> bool:
    got = infer(agent, name)
    return got == (version, expected(name, version))


def served(agent: AgentProc) -> dict[str, str]:
    """Model name -> version of every model the agent's repository index lists READY."""
    status, index = request(agent, "POST", "/v2/repository/index")
    assert status == 200, index
    return {m["name"]: m["version"] for m in index if m.get("state") == "READY"}


def metric(agent: AgentProc, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on the agent's /metrics matching ``labels``."""
    c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def chunks_asked(fleet: Fleet, since: int, name: str) -> list[str]:
    """The target chunks of model ``name`` the responder was asked for after mark ``since``."""
    assert isinstance(fleet.responder, RecordingResponder)
    return [p for p in fleet.responder.paths[since:] if p.startswith(f"targets/{name}/")]


def mark(fleet: Fleet) -> int:
    assert isinstance(fleet.responder, RecordingResponder)
    return len(fleet.responder.paths)


def stored(agent: AgentProc) -> dict[str, Any]:
    """Model name -> its record in the agent's state file (the set it serves)."""
    models: dict[str, Any] = json.loads((agent.state / "installed.json").read_text())["models"]
    return models


def rss_bytes(agent: AgentProc) -> int:
    assert agent.proc is not None
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    kb = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert kb, status
    return int(kb[1]) * 1024


def det_then_rec(fleet: Fleet, tmp: Path, agents: list[AgentProc], device: str,
                 **kw: Any) -> AgentProc:
    """An agent to which det 1 and then rec 1 were deployed, one deployment each."""
    agent = new_agent(fleet, tmp, agents, device, **kw).start()
    assert outcome(fleet, agent, deploy(fleet, device, ("det", "1")))["event"] == "committed"
    assert outcome(fleet, agent, deploy(fleet, device, ("rec", "1")))["event"] == "committed"
    return agent


# -- the tests ------------------------------------------------------------------------------

def test_a_second_model_serves_beside_the_first_and_one_updates_alone(
    fleet, tmp_path, agents
) -> None:
    agent = det_then_rec(fleet, tmp_path, agents, "pair")
    # Deploying rec did not replace det: both answer, each with its own version.
    assert serves(agent, "det", "1") and serves(agent, "rec", "1")
    assert served(agent) == {"det": "1", "rec": "1"}
    state = wait_for(lambda: (s := fleet.states.get("pair")) and len(s.get("models", [])) == 2
                     and s, 30, lambda: f"state: {fleet.states.get('pair')}")
    assert [(m["name"], m["version"], m["phase"]) for m in state["models"]] == \
        [("det", "1", "committed"), ("rec", "1", "committed")]

    # det 2 alone while a client keeps asking rec.
    stop, answers, failures = threading.Event(), [], []

    def ask_rec() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        while not stop.is_set():
            try:
                answers.append(infer(agent, "rec", conn))
            except Exception as err:
                failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        conn.close()

    since, loaded = mark(fleet), metric(agent, "edge_agent_download_bytes_total")
    seen = len(fleet.history("pair"))
    rec_before = stored(agent)["rec"]
    client = threading.Thread(target=ask_rec)
    client.start()
    try:
        wait_for(lambda: len(answers) >= 20 or failures)
        counter = deploy(fleet, "pair", ("det", "2"))
        assert outcome(fleet, agent, counter)["event"] == "committed"
        before = len(answers)
        wait_for(lambda: len(answers) >= before + 20 or failures)
    finally:
        stop.set()
        client.join()
    assert failures == []
    assert set(answers) == {("1", expected("rec", "1"))}
    assert serves(agent, "det", "2") and served(agent) == {"det": "2", "rec": "1"}

    # rec was not fetched, verified, stored, loaded or swapped: no chunk of it was asked
    # for, its record on disk still names the deployment that installed it, no event
    # names it, and the device downloaded exactly what det's update reported.
    assert stored(agent)["rec"] == rec_before
    assert chunks_asked(fleet, since, "rec") == []
    assert chunks_asked(fleet, since, "det"), "det 2 itself came through the responder"
    update = events_of(fleet, "pair", counter)
    assert {e["event"] for e in update} >= {"install_started", "swapped", "committed"}
    assert all(names_in(e) <= {"det"} for e in update), update
    assert not [e for e in fleet.history("pair")[seen:] if "rec" in names_in(e)]
    got = next(e["download"] for e in update if e["event"] == "downloaded")
    assert got["kind"] == "delta"  # from det 1, the base this device holds for det
    assert metric(agent, "edge_agent_download_bytes_total") - loaded == got["bytes"]
    assert metric(agent, "edge_agent_requests_total", model="rec", outcome="ok") >= len(answers)


def test_a_set_whose_member_fails_its_smoke_test_keeps_both_at_their_old_versions(
    fleet, tmp_path, agents
) -> None:
    agent = det_then_rec(fleet, tmp_path, agents, "both")
    counter = deploy(fleet, "both", ("det", "2"), ("rec", "2"))  # rec 2 answers NaN
    end = outcome(fleet, agent, counter)
    assert end["event"] == "failed" and end["stage"] == "smoke_test", end
    # The reason says which member failed (the operator must know which model to fix).
    assert "non-finite" in end["reason"], end
    named = end.get("model")
    assert "rec" in end["reason"] or named == "rec" or (
        isinstance(named, dict) and named.get("name") == "rec"), end
    assert {m["name"] for m in end["deployment"]["models"]} == {"det", "rec"}
    # det 2 loaded fine, but the set is one: neither was swapped in.
    assert serves(agent, "det", "1") and serves(agent, "rec", "1")
    assert served(agent) == {"det": "1", "rec": "1"}
    kinds = [e["event"] for e in events_of(fleet, "both", counter)]
    assert kinds.count("failed") == 1 and "swapped" not in kinds and "rolled_back" not in kinds
    state = wait_for(lambda: (s := fleet.states.get("both")) and any(
        r["deployment"] == counter for r in s.get("results", [])) and s, 30)
    assert [(m["name"], m["version"]) for m in state["models"]] == [("det", "1"), ("rec", "1")]
    result = next(r for r in state["results"] if r["deployment"] == counter)
    assert result["result"] == "failed"


def test_a_set_failing_its_health_window_goes_back_as_one(fleet, tmp_path, agents) -> None:
    agent = det_then_rec(fleet, tmp_path, agents, "watched")
    agent.stop()
    agent.write_config(window_s=60.0)  # the first counted failure ends it
    agent.start()
    counter = deploy(fleet, "watched", ("det", "2"), ("rec", "4"))
    wait_for(lambda: "swapped" in [e["event"] for e in events_of(fleet, "watched", counter)])
    assert served(agent) == {"det": "2", "rec": "4"}
    # A batch of two: rec 4 fails on it where rec 1 ran it, which counts against rec 4.
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}]}
    assert request(agent, "POST", "/v2/models/rec/infer", body)[0] == 500
    end = outcome(fleet, agent, counter)
    assert end["event"] == "rolled_back" and "inferences failed" in end["reason"], end
    # The whole set went back, det (which did nothing wrong) with it.
    assert serves(agent, "det", "1") and serves(agent, "rec", "1")
    assert served(agent) == {"det": "1", "rec": "1"}
    kinds = [e["event"] for e in events_of(fleet, "watched", counter)]
    assert kinds.count("swapped") == 1 and kinds.count("rolled_back") == 1
    assert "committed" not in kinds
    assert {n: r["version"] for n, r in stored(agent).items()} == {"det": "1", "rec": "1"}


def test_removing_a_model_frees_its_memory_and_the_other_keeps_serving(
    fleet, tmp_path, agents
) -> None:
    agent = det_then_rec(fleet, tmp_path, agents, "slim")
    for _ in range(20):  # both warmed up: what they hold is allocated
        assert serves(agent, "det", "1") and serves(agent, "rec", "1")
    before = rss_bytes(agent)
    counter = deploy(fleet, "slim", remove=["det"])
    assert outcome(fleet, agent, counter)["event"] == "committed"
    status, body = request(agent, "GET", "/v2/models/det")
    assert status == 404, body
    status, body = request(agent, "POST", "/v2/models/det/infer", {"inputs": []})
    assert status == 404, body
    for _ in range(20):
        assert serves(agent, "rec", "1")
    assert served(agent) == {"rec": "1"}
    state = wait_for(lambda: (s := fleet.states.get("slim")) and [
        m["name"] for m in s.get("models", [])] == ["rec"] and s, 30)
    assert state["online"]
    # det's weights (4 MiB in its file) are given back, not kept by the allocator.
    after = rss_bytes(agent)
    assert after <= before - DET_WEIGHTS.nbytes // 2, f"RSS {before} before, {after} after"
    assert "rec" not in names_in(events_of(fleet, "slim", counter))


def test_a_deployment_over_the_memory_budget_is_refused_before_any_download(
    fleet, tmp_path, agents
) -> None:
    budget = 1_000_000  # rec fits; det's 4 MiB do not
    agent = new_agent(fleet, tmp_path, agents, "tight",
                      limits={"max_models_bytes": budget}).start()
    assert outcome(fleet, agent, deploy(fleet, "tight", ("rec", "1")))["event"] == "committed"
    since, loaded = mark(fleet), metric(agent, "edge_agent_download_bytes_total")
    counter = deploy(fleet, "tight", ("det", "1"))
    end = outcome(fleet, agent, counter)
    assert end["event"] in ("refused", "failed"), end
    assert "limits.max_models_bytes" in end["reason"] and str(budget) in end["reason"], end
    assert chunks_asked(fleet, since, "det") == []
    assert metric(agent, "edge_agent_download_bytes_total") == loaded
    assert serves(agent, "rec", "1") and served(agent) == {"rec": "1"}
    assert request(agent, "GET", "/v2/models/det")[0] == 404


def test_hostile_sets_are_refused_while_the_old_set_serves(fleet, tmp_path, agents) -> None:
    agent = new_agent(fleet, tmp_path, agents, "hostile",
                      limits={"max_artifact_bytes": 1_000_000}).start()
    first = deploy(fleet, "hostile", ("kw", "1"), ("rec", "1"))
    assert outcome(fleet, agent, first)["event"] == "committed"
    assert served(agent) == {"kw": "1", "rec": "1"}

    def still_the_old_set(counter: int) -> None:
        assert serves(agent, "kw", "1") and serves(agent, "rec", "1")
        assert served(agent) == {"kw": "1", "rec": "1"}
        assert "swapped" not in [e["event"] for e in events_of(fleet, "hostile", counter)]

    # One model named twice: the tools refuse to make it, so it is signed by hand.
    with pytest.raises(UsageError, match="more than once"):
        create_deployment(fleet.repo, fleet=FLEET, models=[("kw", "2"), ("kw", "2")],
                          devices=["hostile"])
    twice = publish_by_hand(fleet, "hostile", [member(fleet, "kw", "2"),
                                               member(fleet, "rec", "3"),
                                               member(fleet, "kw", "2")])
    end = outcome(fleet, agent, twice)
    assert end["event"] == "refused" and "more than once" in end["reason"], end
    still_the_old_set(twice)

    # A member over limits.max_artifact_bytes: nothing of the set is installed.
    since = mark(fleet)
    big = deploy(fleet, "hostile", ("kw", "2"), ("det", "1"))
    end = outcome(fleet, agent, big)
    assert end["event"] in ("refused", "failed"), end
    assert "limits.max_artifact_bytes" in end["reason"] and "1000000" in end["reason"], end
    assert chunks_asked(fleet, since, "det") == []
    still_the_old_set(big)

    # A signed member beside one the release repository does not list.
    fake = ModelTarget("rec", "9", "rec/9/model.onnx", "ab" * 32, 1234)
    mixed = publish_by_hand(fleet, "hostile", [member(fleet, "kw", "2"), fake])
    end = outcome(fleet, agent, mixed)
    assert end["event"] in ("refused", "failed"), end
    assert "rec/9/model.onnx" in end["reason"] or "rec 9" in end["reason"], end
    still_the_old_set(mixed)

    # The device is none the worse: the next good set installs.
    good = deploy(fleet, "hostile", ("kw", "2"), ("rec", "3"))
    assert outcome(fleet, agent, good)["event"] == "committed"
    assert serves(agent, "kw", "2") and serves(agent, "rec", "3")
    kinds = [e["event"] for e in events_of(fleet, "hostile", good)]
    assert kinds.count("swapped") == 1 and kinds.count("committed") == 1


def test_group_and_device_deployments_combine_per_model_the_newest_counter_wins(
    fleet, tmp_path, agents
) -> None:
    """The group carries det and rec; one device has its own, newer rec. The group's
    older document reaching the device after its own (a device joining the group) installs
    det and passes over rec; the group's next det leaves that rec alone; a restart, which
    brings both retained documents again, changes nothing."""
    older = create_deployment(fleet.repo, fleet=FLEET, models=[("det", "1"), ("rec", "1")],
                              groups=["g-combo"])
    agent = new_agent(fleet, tmp_path, agents, "combo", groups=("g-combo",)).start()
    own = deploy(fleet, "combo", ("rec", "3"))
    assert outcome(fleet, agent, own)["event"] == "committed"
    publish_deployment(fleet.host, older)
    end = outcome(fleet, agent, older.deployment.counter)
    assert end["event"] == "committed", end
    assert serves(agent, "det", "1") and serves(agent, "rec", "3")
    state = wait_for(lambda: (s := fleet.states.get("combo")) and len(s.get("models", [])) == 2
                     and s, 30)
    assert [(m["name"], m["version"]) for m in state["models"]] == [("det", "1"), ("rec", "3")]

    later = deploy(fleet, None, ("det", "2"), group="g-combo")
    assert outcome(fleet, agent, later)["event"] == "committed"
    assert serves(agent, "det", "2") and serves(agent, "rec", "3")
    assert names_in(events_of(fleet, "combo", later)) <= {"det"}

    agent.stop()
    seen = len(fleet.history("combo"))
    agent.start()
    wait_for(lambda: (fleet.states.get("combo") or {}).get("online") is True)
    assert serves(agent, "det", "2") and serves(agent, "rec", "3")
    assert served(agent) == {"det": "2", "rec": "3"}
    kinds = [e["event"] for e in fleet.history("combo")]
    assert "refused" not in kinds and "failed" not in kinds and "rolled_back" not in kinds
    assert not [e for e in fleet.history("combo")[seen:] if e["event"] == "install_started"]


def test_deploy_cli_sends_a_set_with_a_removal_then_one_model_back(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    agent = new_agent(fleet, tmp_path, agents, "cli").start()
    assert outcome(fleet, agent, deploy(fleet, "cli", ("kw", "1"), ("rec", "1")))["event"] \
        == "committed"
    assert main(cli_args(fleet, "deploy", "--device", "cli", "--model", "det=1", "--model",
                         "rec=3", "--remove", "kw", "--wait", "--timeout", "60")) == 0
    out = capsys.readouterr().out
    assert "committed on all 1 device(s)" in out, out
    assert served(agent) == {"det": "1", "rec": "3"}
    assert request(agent, "GET", "/v2/models/kw")[0] == 404

    # rec alone back to the version deployed before: det stays as it is.
    assert main(cli_args(fleet, "deploy", "--device", "cli", "--model", "rec", "--rollback",
                         "--wait", "--timeout", "60")) == 0
    assert "committed on all 1 device(s)" in capsys.readouterr().out
    assert serves(agent, "rec", "1") and serves(agent, "det", "1")
    assert served(agent) == {"det": "1", "rec": "1"}
