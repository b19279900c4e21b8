"""Shadow runs end to end: real agents as subprocesses, a real Mosquitto, shadow documents
signed by a real release repository, candidates compared on live requests by
onnxruntime. A shadow run never changes an answer, never fails or waits for a request,
and ends with a result entry the controller can judge."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.quality import Gate
from edge_sdk.release import create_deployment, publish_deployment
from edge_sdk.trust import ShadowSpec
from tests import _models
from tests._broker import Mosquitto
from tests._e2e import _HEADS, FLEET, RETAINED, AgentProc, Fleet, new_agent
from tests._process import wait_for

pytestmark = pytest.mark.slow

#: The served classifier's last layer; "1.2" swaps its first two columns.
W = np.array([[3.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.5, 0.0],
              [1.0, 0.5, 1.0, 0.0], [0.5, 0.0, 0.0, 1.0]], dtype=np.float32)
W2 = W * 2.0
RNG = np.random.default_rng(31)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("agent-shadow")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        perturbed = W[:, [1, 0, 2, 3]]
        builders = {
            "1": lambda p: _models.linear_model(p, W),
            "1.1": lambda p: _models.linear_model(p, W.copy()),  # the same answers
            "1.2": lambda p: _models.linear_model(p, perturbed),
            "1.3": lambda p: _models.batch1_only_model(p),        # raises on batch 2
            "1.4": lambda p: _models.slow_model(p, W),            # same answers, slowly
            "2": lambda p: _models.linear_model(p, W2),
        }
        for version, build in builders.items():
            f.release(version, builder=build)
        f.release("1", name="other", builder=lambda p: _models.linear_model(p, W))
        for v in ("1", "2"):  # 4 MiB kept by a retrain: "2" comes as a delta from "1"
            f.release(v, name="big", builder=lambda p, v=v: _models.weighted_offset_model(
                p, float(v), RETAINED, _HEADS[v]))
        yield f
        f.close()


def shadow(fleet: Fleet, device: str, version: str, *, served: str | None = "1",
           name: str = "adder", gate: str | None = None, min_requests: int = 20,
           time_limit_s: float = 600.0) -> int:
    """Sign and publish a shadow document: compare ``version`` with what serves."""
    run = ShadowSpec(models=(), sample_rate=1.0, min_requests=min_requests,
                     time_limit_s=time_limit_s,
                     gate=None if gate is None else Gate.parse(gate))
    sd = create_deployment(fleet.repo, fleet=FLEET, devices=[device],
                           models=[] if served is None else [("adder", served)],
                           shadow=[(name, version)], shadow_run=run)
    publish_deployment(fleet.host, sd)
    return sd.deployment.counter


def serving_v1(fleet: Fleet, tmp: Path, agents: list[AgentProc], device: str,
               **kw: Any) -> AgentProc:
    agent = new_agent(fleet, tmp, agents, device, **kw).start()
    fleet.deploy(device, "1")
    agent.wait_version("1")
    return agent


def infer(agent: AgentProc, x: np.ndarray, conn: http.client.HTTPConnection | None = None,
          ) -> np.ndarray:
    """The served answer to ``x``; fails the test on anything but 200."""
    c = conn or http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})
    try:
        c.request("POST", "/v2/models/adder/infer", body=body)
        resp = c.getresponse()
        data = json.loads(resp.read())
    finally:
        if conn is None:
            c.close()
    assert resp.status == 200, data
    assert data["model_version"] == "1"
    out = data["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def traffic(agent: AgentProc, n: int, batch: int = 1) -> None:
    """``n`` requests of random rows, each answered by the served model exactly."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    try:
        for _ in range(n):
            x = RNG.uniform(0.0, 4.0, (batch, 4)).astype(np.float32)
            np.testing.assert_allclose(infer(agent, x, conn), x @ W, rtol=1e-5)
    finally:
        conn.close()


def traffic_until_ended(fleet: Fleet, agent: AgentProc, counter: int, batch: int = 1,
                        most: int = 400) -> None:
    """Requests until the run has its verdict (a busy host may drop a few from the
    comparison: the queue is small and the worker runs at a low priority)."""
    sent = 0
    while sent < most and agent.get("/v2/models/adder/shadow")[0] == 200 and \
            result(fleet, agent.device, counter) is None:
        traffic(agent, 5, batch)
        sent += 5


def result(fleet: Fleet, device: str, counter: int) -> dict[str, Any] | None:
    for r in (fleet.states.get(device) or {}).get("results") or ():
        if r.get("deployment") == counter:
            return dict(r)
    return None


def wait_result(fleet: Fleet, agent: AgentProc, counter: int, timeout: float = 60,
                ) -> dict[str, Any]:
    wait_for(lambda: result(fleet, agent.device, counter) is not None, timeout,
             lambda: f"no result for #{counter}: {fleet.kinds(agent.device)}; "
                     f"run: {agent.get('/v2/models/adder/shadow')}; "
                     f"log: {agent.log.read_text()[-2000:]}")
    got = result(fleet, agent.device, counter)
    assert got is not None
    return got


def wait_running(fleet: Fleet, agent: AgentProc, counter: int) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        status, body = agent.get("/v2/models/adder/shadow")
        return body if status == 200 and body["deployment"] == counter else None

    wait_for(lambda: running() is not None, 60,
             lambda: f"shadow run #{counter} never started: {fleet.kinds(agent.device)}; "
                     f"log: {agent.log.read_text()[-2000:]}")
    got = running()
    assert got is not None
    return got


def metric(agent: AgentProc, line_start: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
              if ln.startswith(line_start)]
    return sum(values)


def test_identical_shadow_passes_with_agreement_one_and_answers_unchanged(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "same")
    counter = shadow(fleet, "same", "1.1", min_requests=20)
    block = wait_running(fleet, agent, counter)
    assert (block["model"], block["version"], block["status"]) == ("adder", "1.1", "running")
    traffic_until_ended(fleet, agent, counter)
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_passed", got
    figures = got["shadow"]
    assert figures["compared"] == 20 and figures["agreement"] == 1.0
    assert figures["errors"] == 0 and figures["worst"] == 1.0
    assert metric(agent, 'edge_agent_shadow_agreed_total{model="adder"}') == 20
    # Over: nothing compares any more; the candidate's files stay for a promotion.
    assert agent.get("/v2/models/adder/shadow")[0] == 404
    assert any(d.name.startswith("adder-1.1-") for d in (agent.state / "models").iterdir())
    assert "shadow_started" in fleet.kinds("same") and "shadow_ended" in fleet.kinds("same")


def test_perturbed_last_layer_fails_its_gate_and_reports_the_figures(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "perturbed")
    counter = shadow(fleet, "perturbed", "1.2", min_requests=20,
                     gate="agreement>=0.99 over 20 requests")
    wait_running(fleet, agent, counter)
    traffic_until_ended(fleet, agent, counter)
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_failed", got
    figures = got["shadow"]
    assert figures["compared"] == 20 and figures["agreement"] < 0.99
    assert figures["worst"] < 1.0 and figures["worst_detail"]
    assert "agreement" in got["reason"]
    assert agent.version() == "1"  # never swapped


def test_raising_shadow_model_never_fails_a_request(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "raising")
    counter = shadow(fleet, "raising", "1.3", min_requests=10)
    wait_running(fleet, agent, counter)
    # The candidate fails on every batch of 2; clients never see it.
    traffic_until_ended(fleet, agent, counter, batch=2)
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_failed" and got["shadow"]["errors"] == 10, got
    assert "failed on 10 of 10" in got["reason"]
    assert metric(agent, 'edge_agent_requests_total{model="adder",outcome="ok"}') >= 10
    for outcome in ("error", "cannot_run"):
        assert metric(agent, f'edge_agent_requests_total{{model="adder",outcome="{outcome}"}}'
                      ) == 0


def test_full_queue_drops_sampled_requests_and_answers_them_all(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "full", sections={"shadow": {"queue": 1}})
    counter = shadow(fleet, "full", "1.4", min_requests=100_000)
    wait_running(fleet, agent, counter)
    sent = 0
    while sent < 400 and agent.get("/v2/models/adder/shadow")[1]["figures"]["dropped"] == 0:
        traffic(agent, 10)
        sent += 10
    figures = agent.get("/v2/models/adder/shadow")[1]["figures"]
    assert figures["dropped"] > 0, figures
    assert metric(agent, 'edge_agent_shadow_dropped_total{model="adder",why="full"}') > 0
    assert figures["compared"] + figures["dropped"] <= sent


@pytest.mark.parametrize(("limit", "why"), [({"max_rss_bytes": 1}, "memory"),
                                            ({"cpu_share": 1e-6}, "cpu")])
def test_run_pauses_at_its_limit_and_drops_while_paused(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc], limit: dict[str, Any],
        why: str) -> None:
    agent = serving_v1(fleet, tmp_path, agents, f"limit-{why}", sections={"shadow": limit})
    counter = shadow(fleet, agent.device, "1.1", min_requests=100_000)
    wait_running(fleet, agent, counter)
    sent = 0
    while sent < 400 and agent.get("/v2/models/adder/shadow")[1]["status"] == "running":
        traffic(agent, 5)
        sent += 5
    assert agent.get("/v2/models/adder/shadow")[1]["status"] == f"paused: {why}"
    traffic(agent, 5)
    assert metric(agent, f'edge_agent_shadow_dropped_total{{model="adder",why="{why}"}}') > 0
    # The heartbeat says so too.
    beats: list[dict[str, Any]] = []
    sub = fleet.host.subscribe(fleet.topics.events(agent.device),
                               lambda _t, payload: beats.append(json.loads(payload)))
    try:
        wait_for(lambda: any(b.get("event") == "heartbeat" and (b.get("shadow") or {})
                             .get("status") == f"paused: {why}" for b in list(beats)), 30)
    finally:
        sub.cancel()


def test_run_saved_before_a_crash_resumes_after_restart_with_its_deadline(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "restart")
    agent.kill()
    agent.start(crash_at="shadow_saved")
    counter = shadow(fleet, "restart", "1.1", min_requests=15)
    assert agent.proc is not None
    agent.proc.wait(60)  # killed -9 right after the run was saved, before it started
    agent.start()
    block = wait_running(fleet, agent, counter)
    traffic(agent, 5)
    agent.kill()
    agent.start()
    again = wait_running(fleet, agent, counter)
    assert again["started"] == block["started"]  # same run, same deadline
    assert again["figures"]["compared"] == 0  # figures start from zero after a restart
    traffic_until_ended(fleet, agent, counter)
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_passed" and got["shadow"]["compared"] == 15, got


def test_normal_deployment_during_a_run_ends_it_and_installs(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "replaced")
    counter = shadow(fleet, "replaced", "1.1", min_requests=100_000)
    wait_running(fleet, agent, counter)
    traffic(agent, 3)

    def seen() -> int:
        f = agent.get("/v2/models/adder/shadow")[1]["figures"]
        return int(f["compared"]) + int(f["dropped"])

    wait_for(lambda: seen() == 3, 30)
    newer = fleet.deploy("replaced", "2")
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_insufficient", got
    assert got["reason"] == f"replaced by deployment {newer}"
    assert got["shadow"]["compared"] + got["shadow"]["dropped"] == 3
    agent.wait_version("2")
    assert agent.get("/v2/models/adder/shadow")[0] == 404


def test_shadow_of_a_model_the_device_does_not_serve_fails_naming_it(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "nothing")
    before = len(fleet.kinds("nothing"))
    counter = shadow(fleet, "nothing", "1", served=None, name="other")
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "failed", got
    assert got["reason"] == "serves no model other to compare with"
    assert "install_started" not in fleet.kinds("nothing")[before:]  # nothing fetched


def test_shadow_document_failing_verification_is_refused_and_nothing_fetched(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "forged")
    before = len(fleet.kinds("forged"))
    sd = create_deployment(fleet.repo, fleet=FLEET, devices=["forged"],
                           models=[("adder", "1")], shadow=[("adder", "1.2")])
    doc = json.loads(sd.document)
    doc["signed"]["shadow"]["min_requests"] = 1  # altered after signing
    fleet.publish_raw("forged", json.dumps(doc).encode())
    wait_for(lambda: "refused" in fleet.kinds("forged"), 30)
    refused = fleet.last("forged", "refused")
    assert "verification" in refused["reason"]
    assert "install_started" not in fleet.kinds("forged")[before:]
    assert agent.get("/v2/models/adder/shadow")[0] == 404
    assert not any(d.name.startswith("adder-1.2-") for d in (agent.state / "models").iterdir())


def test_candidate_comes_as_a_delta_from_the_served_version(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = new_agent(fleet, tmp_path, agents, "delta").start()
    publish_deployment(fleet.host, create_deployment(fleet.repo, fleet=FLEET, devices=["delta"],
                                                     model="big", version="1"))
    wait_for(lambda: "committed" in fleet.kinds("delta"), 60)
    before = len(fleet.kinds("delta"))
    sd = create_deployment(fleet.repo, fleet=FLEET, devices=["delta"], models=[("big", "1")],
                           shadow=[("big", "2")])
    publish_deployment(fleet.host, sd)
    wait_for(lambda: "shadow_started" in fleet.kinds("delta")[before:], 60,
             lambda: f"{fleet.kinds('delta')}: {agent.log.read_text()[-2000:]}")
    got = [e for e in fleet.history("delta")[before:] if e["event"] == "downloaded"]
    assert [e["download"]["kind"] for e in got] == ["delta"], got
    assert agent.get("/v2/models/big/shadow")[1]["version"] == "2"


def test_kill_9_after_the_end_is_saved_restarts_with_the_result_and_no_run(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = serving_v1(fleet, tmp_path, agents, "ended")
    agent.kill()
    agent.start(crash_at="shadow_ended")
    counter = shadow(fleet, "ended", "1.1", min_requests=3)
    wait_running(fleet, agent, counter)
    assert agent.proc is not None
    for _ in range(80):  # until the verdict is saved and the agent killed right after it
        if agent.proc.poll() is not None:
            break
        try:
            traffic(agent, 1)
        except OSError:
            break  # killed while answering: the kill, not the run
    assert agent.proc.wait(60) != 0
    agent.start()
    got = wait_result(fleet, agent, counter)
    assert got["result"] == "shadow_passed", got
    assert agent.get("/v2/models/adder/shadow")[0] == 404
    traffic(agent, 3)  # serving as before, nothing compared
    assert agent.get("/v2/models/adder/shadow")[0] == 404
