"""On-device profiling end to end: a real agent subprocess, a real Mosquitto, a real
`edge-sdk serve` serving the signed repository, and `edge-sdk convert --profile-on` /
`edge-sdk bench --on` as a user runs them. The agent profiles with 2 threads, the host
measures with 1, so the device's figures are its own."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

import edge_sdk
from edge_sdk.profiling import (
    FileRef,
    ProfileCandidate,
    ProfilingRequest,
    parse_profiling_result,
    sign_profiling_request,
)
from edge_sdk.release import create_deployment, publish_deployment
from edge_sdk.trust._keys import DEPLOYMENT_ROLE
from tests import _convert_models, _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, X
from tests._process import ROOT, wait_for
from tests._profiling import Host, Serve, expected_choice, measured

pytestmark = pytest.mark.slow
DEV = "prof-1"


class ProfilingAgent(AgentProc):
    def write_config(self, window_s: float) -> None:
        super().write_config(window_s)
        with open(self.config, "a") as f:
            f.write("[profiling]\nthreads = 2\nmax_candidates = 8\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, ProfilingAgent]]:
    tmp = tmp_path_factory.mktemp("profiling-e2e")
    with Mosquitto(tmp / "broker") as broker:
        host = Host(tmp, broker, DEV)
        serve = Serve(host, tmp)
        src = _models.offset_model(tmp / "adder.onnx", 1.0)
        art = edge_sdk.build_artifact(src, tmp / "adder-1", name="adder", version="1",
                                      sample={"x": X})
        host.repo.add_artifact(art.path)
        agent = ProfilingAgent(host, tmp, DEV)  # type: ignore[arg-type]
        try:
            agent.start()
            publish_deployment(host.conn, create_deployment(
                host.repo, model="adder", fleet=FLEET, version="1", devices=[DEV]))
            agent.wait_version("1")
            yield host, agent
        finally:
            agent.kill()
            serve.kill()
            host.conn.close()


class Load:
    """Predictions against the agent while the test runs; every one must succeed."""

    def __init__(self, agent: AgentProc) -> None:
        self.agent, self.ok, self.errors = agent, 0, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                assert self.agent.infer() == ("1", 2.0)
                self.ok += 1
            except Exception as err:
                self.errors.append(repr(err))
            time.sleep(0.02)

    def __enter__(self) -> Load:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(10)


def test_convert_chooses_by_the_device_latency_and_the_device_keeps_serving(
        setup, tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    host, agent = setup
    src = _convert_models.mlp_classifier(tmp_path / "mlp.onnx", features=256,
                                         hidden=1024)
    out = tmp_path / "mlp-art"
    with Load(agent) as load:
        code = main(host.cli("convert", str(src), "-o", str(out), "--quantize", "auto",
                         "--prefer", "latency", "--threads", "1", "--profile-on", DEV,
                         "--json"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert load.ok > 0 and load.errors == []
    report = json.loads((out / "report.json").read_text())
    # The figures came from the device: its hardware and its own thread count (2; the host
    # measured with 1).
    dev = report["devices"][DEV]
    assert dev["threads"] == 2 and dev["hardware"]["threads"] == 2
    assert dev["hardware"]["cpu_features"] == host.states[DEV]["hardware"]["cpu_features"]
    timed = measured(report)
    assert len(timed) >= 3
    for r in timed:
        t = r["devices"][DEV]
        assert t["error"] is None and t["median_ms"] > 0 and t["p90_ms"] >= t["median_ms"]
        assert t["peak_rss_bytes"] > 0 and t["load_ms"] > 0 and t["runs"] == 60
        assert r["device_latency_ms"] == t["median_ms"]
        assert r["host_latency_ms"] == r["latency_ms"]
    # auto --prefer latency over the device figures (within the budget, the fastest).
    assert report["chosen"] == expected_choice(report)
    assert f"latency measured on device {DEV}" in report["rule"]
    md = (out / "report.md").read_text()
    assert f"{DEV} ms" in md and f"Profiled on device `{DEV}`" in md
    assert (out / "report.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = next(r for r in report["candidates"] if r["name"] == report["chosen"])
    assert manifest["profiled_on"][DEV]["latency_ms"] == chosen["devices"][DEV]["median_ms"]
    # Nothing is left behind: no candidate in the agent's state, no profiling target.
    wait_for(lambda: any(e["event"] == "profiling_done" for e in host.events))
    assert (agent.state / "profiling").is_dir()
    assert not any((agent.state / "profiling").iterdir())
    assert not [p for p in host.repo.load("targets").signed.targets
                if p.startswith("profiling/")]


def test_convert_to_tflite_times_the_tflite_candidates_on_the_device(
        setup, tmp_path, capsys) -> None:
    from edge_sdk.cli import main
    from tests._child import in_child

    host, _agent = setup
    in_child("tests._models:tflite_dense", tmp_path / "dense.tflite")
    saved = tmp_path / "dense.savedmodel"  # the SavedModel it was converted from
    calib = tmp_path / "calib.npz"
    np.savez(calib, features=np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32))
    out = tmp_path / "tfl-art"
    code = main(host.cli("convert", str(saved), "-o", str(out), "--to", "tflite",
                         "--calibration", str(calib), "--prefer", "latency", "--threads", "1",
                         "--profile-on", DEV, "--json"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "tflite"
    report = json.loads((out / "report.json").read_text())
    assert report["devices"][DEV]["threads"] == 2
    timed = measured(report)
    assert {r["name"] for r in timed} == {"float32", "float16", "dynamic-range", "int8"}
    for r in timed:
        t = r["devices"][DEV]
        assert t["error"] is None and t["median_ms"] > 0 and t["runs"] == 60
        assert r["device_latency_ms"] == t["median_ms"]
    assert f"latency measured on device {DEV}" in report["rule"]
    rows = {r["name"]: r for r in report["candidates"]}
    chosen = rows[report["chosen"]]
    assert chosen["accuracy"]["drop"] <= report["metric"]["max_drop"]
    # Not slower than float32 on the device, by the choice rule's noise band.
    assert chosen["latency_ratio"]["status"] != "slower"
    assert manifest["profiled_on"][DEV]["latency_ms"] == chosen["devices"][DEV]["median_ms"]
    assert not [p for p in host.repo.load("targets").signed.targets
                if p.startswith("profiling/")]


def test_a_kept_tflite_is_timed_on_the_device(setup, tflite_float, tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    host, _agent = setup
    out = tmp_path / "kept"
    code = main(host.cli("convert", str(tflite_float), "-o", str(out), "--to", "tflite",
                         "--profile-on", DEV, "--json"))
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    (row,) = report["candidates"]
    assert row["name"] == report["chosen"] == "tflite"
    assert row["devices"][DEV]["error"] is None and row["device_latency_ms"] > 0
    assert f"latency measured on device {DEV}" in report["rule"]


def test_bench_on_prints_the_device_measurement(setup, capsys) -> None:
    from edge_sdk.cli import main

    host, agent = setup
    art = ROOT / "does-not-exist"
    assert main(host.cli("bench", str(art), "--on", DEV)) == 2
    capsys.readouterr()
    model = agent.state / "models"
    art_dir = next(p for p in model.iterdir() if (p / "manifest.json").is_file())
    assert main(host.cli("bench", str(art_dir), "--on", DEV, "--runs", "20", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    row = doc["devices"][DEV]
    assert row["error"] is None and row["runs"] == 20 and row["threads"] == 2
    assert row["median_ms"] > 0 and row["peak_rss_bytes"] > 0
    assert main(host.cli("bench", str(art_dir), "--on", "prof-nobody", "--timeout",
                     "2")) == 3
    assert "device prof-nobody did not answer the profiling request within 2 s" in \
        capsys.readouterr().err


def test_a_replayed_or_forged_copy_of_the_request_does_not_end_the_run(setup,
                                                                        capsys) -> None:
    from edge_sdk.cli import main

    host, agent = setup
    copies: list[bytes] = []

    def forge(topic: str, payload: bytes) -> None:
        doc = json.loads(payload)
        if doc.get("signatures") and not copies:  # the host's real request, once
            copies.append(payload)
            host.conn.publish(topic, json.dumps({**doc, "signatures": []}).encode())
            host.conn.publish(topic, payload)  # a QoS 1 redelivery, or a replay

    sub = host.conn.subscribe(host.topics.profile_request(DEV), forge)
    try:
        art_dir = next(p for p in (agent.state / "models").iterdir()
                       if (p / "manifest.json").is_file())
        code = main(host.cli("bench", str(art_dir), "--on", DEV, "--runs", "5", "--json"))
    finally:
        sub.cancel()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["devices"][DEV]["error"] is None
    rid = json.loads(copies[0])["signed"]["id"]
    replies = [parse_profiling_result(p) for p in host.results]
    mine = [r for r in replies if r.id == rid]
    # The forged copy was refused as unverified, the replay got no answer at all.
    assert sorted((r.status, r.verified) for r in mine) == [("done", True), ("refused", False)]
    wait_for(lambda: any(e["event"] == "profiling_replayed" and e["request"] == rid
                         for e in host.events))


def _request(host: Host, n: int) -> ProfilingRequest:
    now = datetime.now(UTC).replace(microsecond=0)
    rid = os.urandom(16).hex()
    ref = FileRef(f"profiling/{rid}/x.onnx", "0" * 64, 10)
    return ProfilingRequest(
        fleet=FLEET, device=DEV, id=rid, issued=now, expires=now + timedelta(minutes=5),
        sample=ref, candidates=tuple(ProfileCandidate(f"c{i}", ref, ref) for i in range(n)))


def test_unsigned_and_oversized_requests_are_refused_while_the_agent_serves(setup) -> None:
    host, agent = setup
    topic = host.topics.profile_request(DEV)
    signers = host.repo.keys.signers(DEPLOYMENT_ROLE)
    unsigned = json.loads(sign_profiling_request(_request(host, 1), signers))
    unsigned["signatures"] = []
    too_many = sign_profiling_request(_request(host, 9), signers)
    big_req = _request(host, 1)
    too_big = sign_profiling_request(big_req, signers)[:-1] + b" " * 40000 + b"}"
    before = len(host.results)
    with Load(agent) as load:
        host.conn.publish_wait(topic, json.dumps(unsigned).encode())
        host.conn.publish_wait(topic, too_many)
        host.conn.publish_wait(topic, too_big)
        wait_for(lambda: len(host.results) >= before + 3, 30,
                 lambda: f"replies: {host.results[before:]}")
    assert load.ok > 0 and load.errors == []
    replies = [parse_profiling_result(p) for p in host.results[before:]]
    assert [r.status for r in replies] == ["refused"] * 3
    reasons = " | ".join(str(r.reason) for r in replies)
    assert "not signed by the trusted deployment key" in reasons
    assert "max_candidates" in reasons and "max_request_bytes" in reasons
    # Even the oversized one is answered under its own id, so the host learns why.
    assert any(r.id == big_req.id and "max_request_bytes" in str(r.reason) for r in replies)
    assert len(host.refusals()) >= 3
    assert agent.infer() == ("1", 2.0)
    assert np.isfinite(agent.infer()[1])


def _profiling_ids(host: Host) -> set[str]:
    return {p.split("/")[1] for p in host.repo.load("targets").signed.targets
            if p.startswith("profiling/")}


def test_a_host_killed_mid_run_leaves_targets_the_next_run_removes(setup, capsys) -> None:
    import subprocess
    import sys

    from edge_sdk.cli import main

    host, agent = setup
    art = str(next(p for p in (agent.state / "models").iterdir()
                   if (p / "manifest.json").is_file()))

    def waiting_run() -> tuple[subprocess.Popen[bytes], str]:
        """``bench --on`` a device that never answers, in its own process: it signs its
        targets and waits."""
        before = _profiling_ids(host)
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_sdk",
             *host.cli("bench", art, "--on", "prof-nobody", "--timeout", "600")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        rid = wait_for(lambda: _profiling_ids(host) - before, 60)
        return proc, rid.pop()

    killed, dead = waiting_run()
    alive, live = waiting_run()
    try:
        killed.kill()  # SIGKILL: no cleanup runs
        killed.wait(10)
        assert dead in _profiling_ids(host)  # what the issue saw: left signed
        assert (host.repo.targets_dir / "profiling" / dead).is_dir()
        # The next run removes the dead run's targets, not the live one's, and the
        # device follows the re-signed metadata.
        assert main(host.cli("bench", art, "--on", DEV, "--runs", "5", "--json")) == 0
        assert json.loads(capsys.readouterr().out)["devices"][DEV]["error"] is None
        assert _profiling_ids(host) == {live}
        assert not (host.repo.targets_dir / "profiling" / dead).exists()
        assert not (host.repo.path / ".profiling" / f"{dead}.lock").exists()
        alive.kill()
        alive.wait(10)
        # `release refresh` (the cron job) does it too.
        assert main(["release", "refresh", str(host.repo.path)]) == 0
        assert f"removed the profiling targets of 1 run(s) no live process owns: {live[:12]}" \
            in capsys.readouterr().out
        assert _profiling_ids(host) == set()
        assert not list((host.repo.targets_dir / "profiling").iterdir())
        assert not list((host.repo.path / ".profiling").iterdir())
    finally:
        for p in (killed, alive):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_request_replayed_after_the_agent_restarts_is_refused(setup) -> None:
    """Killed with -9 and stopped cleanly: the restarted agent still knows the id (last in
    this module: it restarts the module's agent)."""
    host, agent = setup
    req = _request(host, 1)  # its files do not exist: the run fails at the fetch
    payload = sign_profiling_request(req, host.repo.keys.signers(DEPLOYMENT_ROLE))
    topic = host.topics.profile_request(DEV)

    def seen(kind: str) -> int:
        return sum(e["event"] == kind and e.get("request") == req.id for e in host.events)

    def online() -> bool:
        return bool(host.states.get(DEV, {}).get("online"))

    host.conn.publish_wait(topic, payload)
    wait_for(lambda: seen("profiling_queued") == 1)  # admitted: its id is on disk
    for restart in (agent.kill, agent.stop):
        restart()  # kill -9 as soon as it was admitted, then a clean stop
        wait_for(lambda: not online())
        agent.start()
        wait_for(online)
        replays = seen("profiling_replayed")
        host.conn.publish_wait(topic, payload)
        wait_for(lambda: seen("profiling_replayed") > replays,  # noqa: B023
                 why=lambda: f"events: {host.events[-5:]}")
    assert seen("profiling_queued") == 1 and seen("profiling_started") <= 1
    replies = [parse_profiling_result(p) for p in host.results]
    assert len([r for r in replies if r.id == req.id]) <= 1  # a replay gets no answer
    assert agent.infer() == ("1", 2.0)
