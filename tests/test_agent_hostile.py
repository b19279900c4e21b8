"""Attacks and faults against a running agent: real agent subprocesses, a real Mosquitto,
a real signed release repository and responder (the helpers of tests/_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.release import DeploymentWatch, create_deployment, publish_deployment
from tests import _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, Fleet, cli_args, new_agent
from tests._hostile import payloads
from tests._process import wait_for


class Heartbeats:
    """Counts each device's heartbeats (the e2e Fleet ignores them)."""

    def __init__(self, fleet: Fleet) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        fleet.host.subscribe(fleet.topics.every_device("events"), self._on_event)

    def _on_event(self, topic: str, payload: bytes) -> None:
        if json.loads(payload).get("event") == "heartbeat":
            with self._lock:
                self.count[topic.split("/")[3]] += 1

    def wait_more(self, device: str, n: int = 2, timeout: float = 30) -> None:
        start = self.count[device]
        wait_for(lambda: self.count[device] >= start + n, timeout,
                 lambda: f"{device} sent {self.count[device] - start} heartbeats, not {n}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("agent-hostile")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3"):
            f.release(v)
        f.heartbeats = Heartbeats(f)  # type: ignore[attr-defined]
        yield f
        f.close()


@pytest.fixture()
def agents() -> Iterator[list[AgentProc]]:
    procs: list[AgentProc] = []
    yield procs
    for p in procs:
        p.kill()


def test_hostile_retained_desired_payloads_neither_stop_updates_nor_heartbeats(
    fleet, tmp_path, agents
) -> None:
    beats = fleet.heartbeats
    agent = new_agent(fleet, tmp_path, agents, "hostile").start()
    fleet.deploy("hostile", "1")
    agent.wait_version("1")
    # Every class of hostile payload, live; the last one stays retained on the topic.
    sent = 0
    for _label, payload in payloads(per_family=2, seed=5):
        if payload:
            fleet.publish_raw("hostile", payload)
            sent += 1
    fleet.publish_raw("hostile", b"[" * 5000)
    beats.wait_more("hostile")
    assert agent.proc is not None and agent.proc.poll() is None
    # Retained, it arrives again at every start: the agent must live through that too.
    agent.stop()
    agent.start()
    beats.wait_more("hostile")
    assert agent.version() == "1"
    fleet.deploy("hostile", "2")
    agent.wait_version("2")
    fleet.wait_event("hostile", "committed", "2")
    beats.wait_more("hostile")
    assert agent.proc.poll() is None and agent.infer() == ("2", 3.0)
    log = agent.log.read_text()
    assert "RecursionError" not in log and "Traceback" not in log


def test_a_dead_worker_thread_takes_the_agent_process_down_for_a_restart(
    fleet, tmp_path, agents
) -> None:
    agent = new_agent(fleet, tmp_path, agents, "zombie")
    agent.start(crash_at="install_started:thread")
    fleet.deploy("zombie", "1")
    assert agent.proc is not None
    assert agent.proc.wait(30) == 1
    lines = [ln for ln in agent.log.read_text().splitlines() if "exiting so that" in ln]
    assert len(lines) == 1 and "install worker thread died (ThreadCrash" in lines[0]
    # What systemd does next: a restart, which finishes the retained deployment.
    agent.start()
    agent.wait_version("1")
    fleet.wait_event("zombie", "committed", "1")


def test_garbage_after_a_pending_signed_deployment_neither_displaces_nor_fails_it(
    fleet, tmp_path, agents
) -> None:
    dev = "displace"
    agent = new_agent(fleet, tmp_path, agents, dev, window_s=4.0).start()
    fleet.deploy(dev, "1")
    fleet.wait_event(dev, "committed", "1")
    fleet.deploy(dev, "2")
    fleet.wait_event(dev, "swapped", "2")  # the worker is now inside v2's health window
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="3", devices=[dev])
    garbage = b"\x00garbage\xff{[\x01" + b"]" * 4
    assert len(garbage) == 16
    with DeploymentWatch(fleet.host, sd.deployment.counter, devices=[dev],
                         document=sd.document) as watch:
        publish_deployment(fleet.host, sd)
        fleet.publish_raw(dev, garbage)  # same topic, newer, unsigned
        outcomes = watch.wait(60)
    assert [(o.result, o.model) for o in outcomes] == [("committed", "adder 3")]
    assert agent.version() == "3"
    refused = wait_for(lambda: [e for e in fleet.events[dev] if e["event"] == "refused"])
    assert len(refused) == 1 and "deployment" not in refused[0]
    assert refused[0]["payload"] == {"sha256": hashlib.sha256(garbage).hexdigest()[:32],
                                     "bytes": 16}


def test_a_refusal_of_the_watched_document_itself_fails_the_watch(fleet, tmp_path,
                                                                  agents) -> None:
    dev = "forged"
    new_agent(fleet, tmp_path, agents, dev).start()
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="1", devices=[dev])
    doc = json.loads(sd.document)
    doc["signed"]["version"] = "2"  # changed after signing: the device cannot verify it
    forged = json.dumps(doc).encode()
    with DeploymentWatch(fleet.host, sd.deployment.counter, devices=[dev],
                         document=forged) as watch:
        fleet.publish_raw(dev, forged)
        outcomes = watch.wait(60)
    assert outcomes[0].result == "refused"
    assert "not signed by the trusted deployment key" in (outcomes[0].reason or "")


class _TunedAgent(AgentProc):
    """An agent whose [health] section gets extra lines (``health``)."""

    health = ""

    def write_config(self, window_s: float) -> None:
        super().write_config(window_s)
        text = self.config.read_text()
        self.config.write_text(text.replace("[health]\n", f"[health]\n{self.health}"))


def test_deploy_wait_reports_a_model_rolled_back_after_its_health_window_as_failed(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    dev = "w-rollback"
    agent = _TunedAgent(fleet, tmp_path, dev)
    agents.append(agent)
    agent.start()
    fleet.deploy(dev, "1")
    fleet.wait_event(dev, "committed", "1")
    # Any real model is slower than 1 ns at p99: the next one fails its health window
    # after the swap and is rolled back.
    agent.stop()
    agent.health = "max_p99_ms = 0.000001\n"
    agent.write_config(window_s=0.5)
    agent.start()
    code = main(cli_args(fleet, "deploy", "--model", "adder", "--version", "2", "--device", dev,
                     "--wait", "--timeout", "60"))
    out, err = capsys.readouterr()
    assert code == 3, out + err
    assert any(line.split()[:2] == [dev, "rolled_back"] for line in out.splitlines()), out
    last = err.strip().splitlines()[-1]
    assert f"{dev} rolled_back" in last and "p99 latency" in last
    assert "committed on all" not in out
    assert agent.infer() == ("1", 2.0)
    state = wait_for(lambda: (s := fleet.states.get(dev)) and s["last_update"]["result"]
                     == "rolled_back" and s)
    assert state["last_update"]["deployment"] == state["deployment"]


def _string_model(path: Path) -> Path:
    """score float32 [batch] from text string [batch] (a lookup): a string-input model."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    node = helper.make_node("LabelEncoder", ["text"], ["score"], domain="ai.onnx.ml",
                            keys_strings=["the", "edge"], values_floats=[1.0, 2.0],
                            default_float=0.0)
    model = helper.make_model(
        helper.make_graph([node], "words", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _release(fleet: Fleet, src: Path, name: str, version: str,
             sample: dict[str, np.ndarray] | None) -> None:
    art = edge_sdk.build_artifact(src, fleet.arts / f"{name}-{version}", name=name,
                                  version=version, sample=sample)
    fleet.repo.add_artifact(art.path)


def test_model_failing_its_own_sample_in_warm_up_fails_its_deployment_once(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    dev = "warmup"
    fleet.arts.mkdir(exist_ok=True)
    # Its own sample is a batch of 2, which its Reshape cannot take: onnxruntime raises
    # in the first warm-up run.
    src = _models.batch1_only_model(fleet.arts / "adder-20.onnx")
    _release(fleet, src, "adder", "20", {"x": np.zeros((2, 4), np.float32)})
    agent = new_agent(fleet, tmp_path, agents, dev).start()
    fleet.deploy(dev, "1")
    fleet.wait_event(dev, "committed", "1")
    code = main(cli_args(fleet, "deploy", "--model", "adder", "--version", "20", "--device", dev,
                     "--wait", "--timeout", "60"))
    out, err = capsys.readouterr()
    assert code == 3, out + err
    last = err.strip().splitlines()[-1]
    assert f"{dev} failed" in last and "warm-up run 1" in last, last
    wait_for(lambda: "failed" in fleet.kinds(dev), 10)  # the state goes out before it
    failed = fleet.last(dev, "failed")
    assert failed["stage"] == "smoke_test" and failed["deployment"]["artifact_version"] == "20"
    assert "internal" not in [e.get("stage") for e in fleet.events[dev]]
    assert agent.infer() == ("1", 2.0)

    def installs() -> int:
        return sum(1 for e in fleet.events[dev] if e["event"] == "install_started"
                   and e["deployment"]["artifact_version"] == "20")

    # Reconnects and restarts bring the retained deployment back: it is not tried again.
    agent.stop()
    agent.start()
    fleet.heartbeats.wait_more(dev, 2)
    assert installs() == 1 and agent.infer() == ("1", 2.0)


def test_string_input_model_without_a_sample_passes_its_smoke_test_and_commits(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    dev = "words"
    fleet.arts.mkdir(exist_ok=True)
    _release(fleet, _string_model(fleet.arts / "words-1.onnx"), "words", "1", None)
    new_agent(fleet, tmp_path, agents, dev).start()
    code = main(cli_args(fleet, "deploy", "--model", "words", "--version", "1", "--device", dev,
                     "--wait", "--timeout", "60"))
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "committed on all 1 device(s)" in out
