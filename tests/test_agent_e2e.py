"""End to end: real agents as subprocesses, a real Mosquitto, a real signed release
repository served by the real responder, deployments signed and published as an
operator would."""

from __future__ import annotations

import http.client
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import edge_sdk
from device_agent._crash import CRASH_POINTS
from edge_sdk.release import (
    Repository,
    create_deployment,
    deployment_state,
    publish_deployment,
)
from edge_sdk.transport import RepoResponder
from tests import _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, Fleet, X, cli_args, group_on_v1, new_agent, offset_of
from tests._process import edge_sdk_cli, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("agent-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3", "4", "5", "6"):
            f.release(v)
        yield f
        f.close()


def test_v1_installs_then_repeated_swaps_under_load_drop_no_request(fleet, tmp_path,
                                                                    agents) -> None:
    agent = new_agent(fleet, tmp_path, agents, "swap").start(cli=True)
    fleet.deploy("swap", "1")
    agent.wait_version("1")
    assert agent.infer() == ("1", 2.0)

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}")
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    np.testing.assert_array_equal(client.infer("adder", [inp]).as_numpy("y"), X + 1.0)
    client.close()

    stop = threading.Event()
    failures: list[str] = []
    seen: list[tuple[str, float]] = []

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        while not stop.is_set():
            try:
                version, y = agent.infer(conn)
                seen.append((version, y))
                if y != X[0, 0] + offset_of(version):
                    failures.append(f"version {version} answered {y}")
            except Exception as err:
                failures.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in ("2", "3", "4", "5", "6"):
            fleet.deploy("swap", v)
            fleet.wait_event("swap", "committed", v)
            assert agent.version() == v
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {v for v, _ in seen} >= {"1", "6"} and len(seen) > 100
    kinds = fleet.kinds("swap")
    assert kinds.count("swapped") == 6 and kinds.count("committed") == 6
    state = wait_for(lambda: (s := fleet.states.get("swap")) and s["model"]["version"] == "6"
                     and s)
    assert state["online"] is True and state["previous"]["version"] == "5"
    assert state["last_update"]["result"] == "committed"
    agent.stop()
    wait_for(lambda: fleet.states["swap"].get("online") is False)


def test_model_failing_its_smoke_test_is_refused_reported_and_old_model_serves(
    fleet, tmp_path, agents
) -> None:
    fleet.release("7", offset=float("nan"))
    agent = new_agent(fleet, tmp_path, agents, "smoke").start()
    fleet.deploy("smoke", "1")
    agent.wait_version("1")
    fleet.deploy("smoke", "7")
    wait_for(lambda: "failed" in fleet.kinds("smoke"))
    failed = fleet.last("smoke", "failed")
    assert failed["stage"] == "smoke_test" and "non-finite" in failed["reason"]
    assert agent.infer() == ("1", 2.0)
    state = wait_for(lambda: (s := fleet.states.get("smoke")) and s["last_update"]
                     and s["last_update"]["result"] == "failed" and s)
    assert state["model"]["version"] == "1"


def test_health_window_failure_rolls_back_and_reports(fleet, tmp_path, agents) -> None:
    fleet.release("8", builder=_models.batch1_only_model)
    agent = new_agent(fleet, tmp_path, agents, "health").start()
    fleet.deploy("health", "1")
    fleet.wait_event("health", "committed", "1")
    agent.stop()
    agent.write_config(window_s=60.0)
    agent.start()
    fleet.deploy("health", "8")
    agent.wait_version("8")
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                   "data": [0.0] * 8}]})
    conn.request("POST", "/v2/models/adder/infer", body=body)
    resp = conn.getresponse()
    assert resp.status == 500 and "Reshape" in json.loads(resp.read())["error"]
    conn.close()
    wait_for(lambda: "rolled_back" in fleet.kinds("health"))
    assert "inferences failed" in fleet.last("health", "rolled_back")["reason"]
    assert agent.infer() == ("1", 2.0)


def test_heartbeats_keep_coming_while_a_long_install_holds_the_worker(fleet, tmp_path,
                                                                     agents) -> None:
    beats: list[float] = []  # device clock, like the events' ts

    def on_event(topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("event") == "heartbeat":
            beats.append(doc["ts"])

    sub = fleet.host.subscribe(fleet.topics.events("busy"), on_event)
    try:
        # heartbeat_s is 1; the install holds the worker for its whole 5 s health window.
        new_agent(fleet, tmp_path, agents, "busy", window_s=5.0).start()
        fleet.deploy("busy", "1")
        fleet.wait_event("busy", "committed", "1")
        started = fleet.last("busy", "install_started")["ts"]
        committed = fleet.last("busy", "committed")["ts"]
        assert committed - started >= 5.0
        during = [t for t in beats if started < t < committed]
        took = committed - started
        assert len(during) >= 3, f"{len(during)} heartbeats during a {took:.1f} s install"
    finally:
        sub.cancel()


def test_heartbeats_name_the_newest_event_the_broker_acknowledged(fleet, tmp_path,
                                                                  agents) -> None:
    """The registry counts events it never received from the gaps in their numbers; a
    heartbeat naming the newest one sent shows the loss of the last ones too."""
    beats: list[int] = []

    def on_event(topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("event") == "heartbeat" and "last_seq" in doc:
            beats.append(doc["last_seq"])

    sub = fleet.host.subscribe(fleet.topics.events("numbered"), on_event)
    try:
        new_agent(fleet, tmp_path, agents, "numbered").start()
        fleet.deploy("numbered", "1")
        fleet.wait_event("numbered", "committed", "1")
        newest = max(e["seq"] for e in fleet.events["numbered"])
        wait_for(lambda: newest in beats, 30, lambda: f"newest {newest}, beats {beats[-5:]}")
    finally:
        sub.cancel()


def test_tampered_unauthorised_and_corrupt_updates_are_refused_while_v1_serves(
    fleet, tmp_path, agents
) -> None:
    agent = new_agent(fleet, tmp_path, agents, "tamper").start()
    fleet.deploy("tamper", "1")
    agent.wait_version("1")

    # A deployment changed in transit (same signature, different target).
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="2",
                           devices=["tamper"])
    doc = json.loads(sd.document)
    doc["signed"]["version"] = "3"
    fleet.publish_raw("tamper", json.dumps(doc).encode())
    wait_for(lambda: fleet.kinds("tamper").count("refused") >= 1)
    assert "not signed by the trusted deployment key" in fleet.last("tamper", "refused")["reason"]

    # A deployment signed by someone else's key.
    other = Repository.init(tmp_path / "other-repo", tmp_path / "other-keys")
    art = edge_sdk.Artifact.from_dir(fleet.arts / "adder-2")
    other.add_artifact(art.path)
    rogue = create_deployment(other, model="adder", fleet=FLEET, version="2",
                              devices=["tamper"])
    fleet.publish_raw("tamper", rogue.document)
    wait_for(lambda: fleet.kinds("tamper").count("refused") >= 2)
    assert "deployment failed verification" in fleet.last("tamper", "refused")["reason"]

    # A correctly signed deployment whose artifact bytes were altered on the server.
    art9 = fleet.release("9")
    target = next((fleet.repo.path / "targets").rglob(f"{art9.manifest.sha256}.*"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    fleet.deploy("tamper", "9")
    wait_for(lambda: "failed" in fleet.kinds("tamper"))
    failed = fleet.last("tamper", "failed")
    assert failed["stage"] == "fetch" and "sha256" in failed["reason"]
    for _ in range(20):
        assert agent.infer() == ("1", 2.0)
    assert fleet.kinds("tamper").count("swapped") == 1


def test_broker_down_at_start_serves_and_reports_arrive_when_it_returns(
    tmp_path, agents
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistent=True)
    broker.start()
    f = Fleet(tmp_path / "fleet", broker)
    try:
        f.release("1")
        f.release("2")
        agent = new_agent(f, tmp_path, agents, "offline").start()
        f.deploy("offline", "1")
        agent.wait_version("1")
        f.deploy("offline", "2")
        agent.wait_version("2")
        wait_for(lambda: f.kinds("offline").count("committed") == 2)
        agent.stop()
        # Damage the current model on disk, then start with no broker reachable.
        state = json.loads((agent.state / "installed.json").read_text())
        model = agent.state / "models" / state["models"]["adder"]["id"] / "model.onnx"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        broker.stop()
        agent.start()
        assert agent.infer() == ("1", 2.0)  # serves the verified previous model, offline
        queued = list((agent.state / "outbox").glob("*.json"))
        assert queued, "the rollback report should wait on disk"
        broker.start()  # same port
        wait_for(lambda: "rolled_back" in f.kinds("offline"), 30)
        assert "failed verification at boot" in f.last("offline", "rolled_back")["reason"]
        wait_for(lambda: (s := f.states.get("offline")) and s["online"] and
                 s["model"]["version"] == "1", 30)
        wait_for(lambda: not list((agent.state / "outbox").glob("*.json")), 30)
    finally:
        f.close()
        broker.stop()


def test_deploy_wait_follows_devices_to_commit_and_status_shows_them(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main
    from tests._fleetdb import assign

    solo = new_agent(fleet, tmp_path, agents, "w-solo").start()
    member = new_agent(fleet, tmp_path, agents, "w-member", groups=("w-lobby",)).start()
    assign(fleet.repo.path, FLEET, ["w-member"], "w-lobby")
    wait_for(lambda: {"w-solo", "w-member"} <= fleet.states.keys())
    assert main(cli_args(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                     "w-solo", "--group", "w-lobby", "--wait", "--timeout", "60")) == 0
    out, err = capsys.readouterr()
    assert "committed on all 2 device(s)" in out
    assert "w-solo: install_started adder 1" in err and "w-member: committed adder 1" in err
    assert solo.infer() == ("1", 2.0) and member.infer() == ("1", 2.0)

    # Deploying what a device already serves is a success without an install.
    assert main(cli_args(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                     "w-solo", "--wait", "--timeout", "60")) == 0
    assert "committed on all 1 device(s)" in capsys.readouterr().out

    argv = ["status", "--broker", fleet.broker.url, "--fleet", FLEET]
    assert main([*argv, "--device", "w-solo", "--device", "w-member"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["w-solo"].split()[1:4] == ["yes", "adder", "1"]
    assert "committed" in rows["w-member"] and "adder 1" in rows["w-member"]
    hw = fleet.states["w-solo"]["hardware"]
    assert isinstance(hw["cpu_features"], list) and hw["threads"] == 1
    assert f"{hw['arch']}/{hw['cores']}c" in rows["w-solo"]
    assert main([*argv, "--json", "--device", "w-member"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["w-member"]["groups"] == ["w-lobby"] and doc["w-member"]["model"]["version"] == "1"
    assert doc["w-member"]["hardware"]["cpu_features"] == hw["cpu_features"]
    assert main([*argv, "--device", "w-nobody"]) == 2
    assert "no state reported by device(s) w-nobody" in capsys.readouterr().err


def test_group_deployment_supersedes_the_devices_own_older_one_without_refusals(
    fleet, tmp_path, agents
) -> None:
    agent = new_agent(fleet, tmp_path, agents, "g-dev", groups=("g-lab",),
                      wrap=lambda cmd: [*cmd, "--log-level", "debug"]).start()
    fleet.deploy("g-dev", "1")
    agent.wait_version("1")
    sd = create_deployment(fleet.repo, model="adder", fleet=FLEET, version="2",
                           groups=["g-lab"])
    publish_deployment(fleet.host, sd)
    agent.wait_version("2")
    fleet.wait_event("g-dev", "committed", "2")
    # After a restart both retained documents arrive again: the newer one stays, the
    # older one is passed over, and nothing is reported as refused.
    agent.stop()
    seen = len(agent.log.read_text())
    agent.start()
    wait_for(lambda: agent.version() == "2")

    def handled() -> bool:  # the agent's word that it has dealt with both documents
        log = agent.log.read_text()[seen:]
        return "already handled" in log and \
            f"{fleet.topics.desired('g-dev')} superseded by #{sd.deployment.counter}" in log

    wait_for(handled, 30, lambda: agent.log.read_text()[seen:][-3000:])
    assert agent.version() == "2"
    assert "event refused" not in agent.log.read_text()[seen:]
    assert "refused" not in fleet.kinds("g-dev")
    assert fleet.kinds("g-dev").count("committed") == 2


def test_deploy_wait_sees_through_a_retried_install(fleet, tmp_path, agents, capsys) -> None:
    from edge_sdk.cli import main

    agent = new_agent(fleet, tmp_path, agents, "w-retry").start()
    fleet.responder.stop()  # the repository is away: the agent's fetch fails and retries

    def come_back() -> None:
        # Nothing answers: the fetch gives up after FetchConfig.stall_timeout (60 s).
        wait_for(lambda: any(e.get("retry") for e in fleet.events["w-retry"]), 150)
        fleet.responder = RepoResponder(fleet.host, fleet.repo.path)
        fleet.responder.start()

    t = threading.Thread(target=come_back)
    t.start()
    try:
        code = main(cli_args(fleet, "deploy", "--model", "adder", "--version", "1", "--device",
                         "w-retry", "--wait", "--timeout", "240"))
    finally:
        t.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "w-retry: failed adder 1" in err and "committed on all 1 device(s)" in out
    assert agent.infer() == ("1", 2.0)


def test_deploy_wait_fails_in_one_line_on_a_rollback_and_on_a_silent_device(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    if "7" not in fleet.released:
        fleet.release("7", offset=float("nan"))
    agent = new_agent(fleet, tmp_path, agents, "w-bad").start()
    fleet.deploy("w-bad", "1")
    agent.wait_version("1")
    code = main(cli_args(fleet, "deploy", "--model", "adder", "--version", "7", "--device",
                     "w-bad", "--wait", "--timeout", "60"))
    out, err = capsys.readouterr()
    assert code == 3
    assert any(line.split()[:2] == ["w-bad", "failed"] for line in out.splitlines())
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-sdk: error: deployment ") and "did not succeed on 1 of 1" in last
    assert "w-bad failed" in last and "non-finite" in last
    assert agent.infer() == ("1", 2.0)

    code = main(cli_args(fleet, "deploy", "--model", "adder", "--version", "2", "--device",
                     "w-ghost", "--wait", "--timeout", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "w-ghost no answer (the device has never reported)" in err
    code = main(cli_args(fleet, "deploy", "--model", "adder", "--group", "w-empty", "--wait",
                     "--timeout", "5"))
    assert code == 3 and "no device is assigned to group(s) w-empty" in \
        capsys.readouterr().err


def test_waves_are_cumulative_and_put_every_device_in_exactly_one() -> None:
    from edge_sdk.errors import UsageError
    from edge_sdk.release import plan_waves

    devs = [f"d{i:02}" for i in range(20)]
    plan = plan_waves(devs, ["1", "10%", "50%", "100%"])
    assert [len(w) for w in plan] == [1, 1, 8, 10] and [d for w in plan for d in w] == devs
    # Waves that add nobody are dropped; a last wave always covers the rest.
    assert [len(w) for w in plan_waves(devs[:3], ["1", "10%", "50%"])] == [1, 1, 1]
    assert plan_waves(devs[:2], ["5"]) == [devs[:2]]
    for bad in ("0", "0%", "150%", "ten"):
        with pytest.raises(UsageError, match="must be a device count"):
            plan_waves(devs, [bad])


def test_rollout_goes_wave_by_wave_and_commits_everywhere(fleet, tmp_path, agents,
                                                          capsys) -> None:
    from edge_sdk.cli import main

    procs = group_on_v1(fleet, tmp_path, agents, "ro-ok", 3)
    assert main(cli_args(fleet, "rollout", "run", "--model", "adder", "--version", "2", "--group",
                     "ro-ok", "--waves", "1,100%", "--wave-timeout", "60")) == 0
    out, err = capsys.readouterr()
    assert "wave 1: deployment #" in err and "to 1 device(s): ro-ok-0" in err
    assert "to 2 device(s): ro-ok-1, ro-ok-2" in err
    assert "committed on every device" in out
    for p in procs:
        assert p.infer() == ("2", 3.0)


def test_rollout_aborts_on_a_silent_device_and_sends_the_others_back(
    fleet, tmp_path, agents, capsys
) -> None:
    from edge_sdk.cli import main

    procs = group_on_v1(fleet, tmp_path, agents, "ro-bad", 3)
    offline = procs[1]
    offline.stop()
    wait_for(lambda: fleet.states[offline.device]["online"] is False)
    code = main(cli_args(fleet, "rollout", "run", "--model", "adder", "--version", "2", "--group",
                     "ro-bad", "--waves", "1,100%", "--wave-timeout", "8"))
    out, err = capsys.readouterr()
    assert "rollback ro-bad-1" in out and "sent" in out
    last = err.strip().splitlines()[-1]
    assert code == 3, err
    assert "aborted in wave 2 of 2" in last and "ro-bad-1 no answer (the device is offline)" \
        in last and "2 device(s) sent back" in last
    # Online devices went first: the canary and the other online device had committed 2.
    assert "to 1 device(s): ro-bad-0" in err and "to 2 device(s): ro-bad-2, ro-bad-1" in err
    for p in (procs[0], procs[2]):
        assert p.infer() == ("1", 2.0)
        # The state (which the rollout follows) goes out before the event it summarises.
        wait_for(lambda d=p.device: fleet.last(d, "committed")["model"]["version"] == "1", 10)
    # The device that was away finds the rollback, not version 2, when it returns.
    rollback_counter = deployment_state(fleet.repo)["counter"]
    offline.start()
    wait_for(lambda: (s := fleet.states.get(offline.device)) and s["online"] and
             s["deployment"] == rollback_counter and s["phase"] == "committed")
    assert offline.infer() == ("1", 2.0)
    assert not [e for e in fleet.events[offline.device]
                if (e.get("deployment") or e.get("model") or {}).get("version") == "2"
                or (e.get("deployment") or {}).get("artifact_version") == "2"]


def test_agent_cli_reports_config_errors_in_one_line(tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\nthreds = 2\n')
    assert main(["agent", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) threds" in err and "Traceback" not in err
    cfg.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n')
    assert main(["agent", "--config", str(cfg), "--check"]) == 0
    assert "config ok" in capsys.readouterr().out
    res = subprocess.run([*edge_sdk_cli(), "agent", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert res.returncode == 2 and "no such config file" in res.stderr


#: The crashes that bring an agent to a boot-time crash point: one inside the trial
#: (the next boot resumes it), or health.max_restarts (1) + 1 of them (the next boot
#: rolls the trial back).
LEAD_IN = {"boot_trial_saved": ("health_probe",),
           "rollback_saved": ("health_probe", "health_probe")}


@pytest.mark.slow
def test_kill_9_at_any_point_of_an_install_restarts_into_a_verified_model(
    fleet, tmp_path, agents
) -> None:
    versions = [str(v) for v in range(10, 34)]
    for v in versions:
        fleet.release(v)
    agent = new_agent(fleet, tmp_path, agents, "crash", window_s=0.3).start()
    fleet.deploy("crash", "1")
    agent.wait_version("1")
    rng = random.Random(7)
    points = [*CRASH_POINTS, *(f"random:{rng.uniform(0.0, 1.2):.3f}" for _ in range(12))]
    assert set(CRASH_POINTS) <= set(points[:len(versions)])
    served = "1"

    def settled(counter: int) -> bool:
        st = json.loads((agent.state / "installed.json").read_text())
        return bool(st["phase"] == "committed" and st["deployment_counter"] >= counter)

    for point, version in zip(points, versions, strict=False):
        agent.stop()
        before = served
        if point.startswith("random:"):
            agent.start()
            counter = fleet.deploy("crash", version)
            time.sleep(float(point.split(":")[1]))
            agent.kill()
        else:
            first, *then = [*LEAD_IN.get(point, ()), point]
            agent.start(crash_at=first)
            counter = fleet.deploy("crash", version)
            assert agent.proc is not None
            assert agent.proc.wait(60) == -signal.SIGKILL, (point, first)
            for step in then:
                agent.start(crash_at=step, wait=False)
                assert agent.proc.wait(60) == -signal.SIGKILL, (point, step)
        agent.start()
        wait_for(lambda: agent.get("/v2/health/ready")[0] == 200, 30)
        got, y = agent.infer()
        assert got in (before, version), (point, got)
        assert y == X[0, 0] + offset_of(got), point
        # The retained deployment is then finished (or settled) by the restarted agent.
        wait_for(lambda c=counter: settled(c), 60)
        served = agent.version() or before
        assert served in (before, version), (point, served)
    assert len(points) >= 20
    agent.stop()


@pytest.mark.slow
def test_kill_9_at_any_point_of_a_set_install_restarts_into_one_whole_verified_set(
    fleet, tmp_path, agents
) -> None:
    # Two models deployed together: "adder" adds its version, "rec" 100 + its version.
    versions = [str(v) for v in range(40, 56)]
    for v in versions:
        fleet.release(v)
    for v in ["1", *versions]:
        fleet.release(v, name="rec", offset=100.0 + float(v))
    agent = new_agent(fleet, tmp_path, agents, "crash-set", window_s=0.3).start()
    fleet.deploy_set("crash-set", [("adder", "1"), ("rec", "1")])
    wait_for(lambda: agent.version("rec") == "1" and agent.version("adder") == "1", 60)
    points = [*CRASH_POINTS, "fetched:adder", "fetched:rec"]
    served = "1"

    def settled(counter: int) -> bool:
        st = json.loads((agent.state / "installed.json").read_text())
        return bool(st["phase"] == "committed" and st["deployment_counter"] >= counter)

    for point, version in zip(points, versions, strict=False):
        agent.stop()
        before = served
        first, *then = [*LEAD_IN.get(point, ()), point]
        agent.start(crash_at=first)
        counter = fleet.deploy_set("crash-set", [("adder", version), ("rec", version)])
        assert agent.proc is not None
        assert agent.proc.wait(60) == -signal.SIGKILL, (point, first)
        for step in then:
            agent.start(crash_at=step, wait=False)
            assert agent.proc.wait(60) == -signal.SIGKILL, (point, step)
        agent.start()
        wait_for(lambda: agent.get("/v2/health/ready")[0] == 200, 30)
        # One whole set serves: both models at the old version, or both at the new one.
        got = {m: agent.infer(model=m) for m in ("adder", "rec")}
        assert got["adder"][0] == got["rec"][0] in (before, version), (point, got)
        assert got["rec"][1] == X[0, 0] + 100.0 + float(got["rec"][0]), point
        wait_for(lambda c=counter: settled(c), 60)
        served = agent.version("adder") or before
        assert agent.version("rec") == served, point
    agent.stop()
