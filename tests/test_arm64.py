"""The device side on arm64: an emulated Debian bookworm rootfs (qemu-user-static through
binfmt_misc, tests/_arm64.py) with ``pip install 'edge-sdk[agent]'`` from a wheel of this
checkout. The CLI's inspect/predict/bench there agree with this machine's, and the demo's
whole deployment path passes with its agent running inside while release, serve and deploy
run here, and `convert --profile-on` / `bench --on` get that agent's own arm64 figures.

Needs root, qemu-user-static, binfmt-support, debootstrap (the test command installs them)
and, for the first (cold) build, network. The rootfs is cached in /var/cache/edge-sdk."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_sdk
from edge_sdk.cli import main
from tests import _convert_models
from tests._arm64 import Arm64Root, Unavailable
from tests._broker import Mosquitto
from tests._e2e import AgentProc
from tests._process import wait_for
from tests._profiling import Host, Serve, expected_choice, measured

# A cold build of the rootfs (the first run) takes minutes more than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]

# One interpreter inside runs every command (an emulated start with onnxruntime's import
# takes seconds): the CLI's own main(), each command's stdout written to a file.
DRIVER = """
import contextlib, json, platform, sys
from edge_sdk.cli import main

out = sys.argv[1]
codes = {"machine": platform.machine()}
for i, line in enumerate(sys.argv[2:]):
    argv = json.loads(line)
    with open(f"{out}/{i}.out", "w") as f, contextlib.redirect_stdout(f):
        codes[str(i)] = main(argv)
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Arm64Root, Path]]:
    """The prepared rootfs and a host directory it sees at the same path."""
    try:
        root = Arm64Root.prepare()
    except Unavailable as err:
        msg = f"arm64 job cannot run here: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    shared = tmp_path_factory.mktemp("arm64")
    try:
        root.bind(shared)
        yield root, shared
    finally:
        root.close()


def _host(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def _same_description(arm: dict[str, Any], host: dict[str, Any]) -> None:
    for key in ("name", "version", "format", "sha256", "size_bytes", "inputs", "outputs",
                "quantization"):
        assert arm.get(key) == host.get(key), key
    # The [agent] install has no onnx package to read an ONNX graph's ops with.
    assert arm["ops"] in (None, host["ops"])


def test_cli_on_arm64_matches_the_host_for_onnx_and_tflite(
        arm64: tuple[Arm64Root, Path], cnn_onnx: Path, tflite_float: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, shared = arm64
    rng = np.random.default_rng(7)
    models = {
        "cnn": (cnn_onnx, {"input": rng.normal(size=(2, 3, 32, 32)).astype(np.float32)}),
        "dense": (tflite_float, {"features": rng.normal(size=(3, 4)).astype(np.float32)}),
    }
    commands: list[list[str]] = []
    arts: dict[str, Path] = {}
    for name, (model, feed) in models.items():
        art = edge_sdk.build_artifact(model, shared / name, name=name, version="1.0.0",
                                      sample={k: v[:1] for k, v in feed.items()})
        arts[name] = art.path
        np.savez(shared / f"{name}-in.npz", **feed)
        commands += [["inspect", str(art.path), "--json"],
                     ["predict", str(art.path), "-i", str(shared / f"{name}-in.npz"),
                      "-o", str(shared / f"{name}-arm64.npz")],
                     ["bench", str(art.path), "--runs", "20", "--warmup", "2", "--json"]]
    outdir = shared / "out"
    outdir.mkdir()
    res = root.run(["python", "-c", DRIVER, str(outdir),
                    *(json.dumps(c) for c in commands)])
    assert res.returncode == 0, res.stderr[-3000:]
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    # Emulated, not this machine's CPU: the test cannot silently run x86.
    assert codes.pop("machine") == "aarch64"
    assert codes == {str(i): 0 for i in range(len(commands))}, res.stderr[-3000:]
    for i, name in enumerate(models):
        arm_info = json.loads((outdir / f"{3 * i}.out").read_text())
        host_info = json.loads(_host(["inspect", str(arts[name]), "--json"], capsys))
        _same_description(arm_info, host_info)
        assert arm_info["format"] == ("onnx" if name == "cnn" else "tflite")

        host_out = shared / f"{name}-host.npz"
        _host(["predict", str(arts[name]), "-i", str(shared / f"{name}-in.npz"),
               "-o", str(host_out)], capsys)
        with np.load(shared / f"{name}-arm64.npz") as got, np.load(host_out) as want:
            assert sorted(got.files) == sorted(want.files)
            for key in want.files:
                assert got[key].shape == want[key].shape
                np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)

        bench = json.loads((outdir / f"{3 * i + 2}.out").read_text())
        assert bench["model"] == name and bench["runs"] == 20
        assert 0 < bench["min_ms"] <= bench["p50_ms"] <= bench["p99_ms"]
        assert bench["throughput_per_s"] > 0


def test_demo_deploys_swaps_and_refuses_tampering_with_the_agent_on_arm64(
        arm64: tuple[Arm64Root, Path]) -> None:
    root, shared = arm64
    work = shared / "demo"
    work.mkdir()
    agent_cmd = shlex.join(root.cmd(["/opt/venv/bin/edge-sdk"]))
    # Its own session: should it hang, its broker, server and agent go down with it (the
    # agent holds the rootfs's mounts busy).
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py"),
                             "--workdir", str(work), "--agent-cmd", agent_cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    log = (work / "dev-001.log").read_text() if (work / "dev-001.log").exists() else ""
    assert proc.returncode == 0, out[-3000:] + err[-2000:] + log[-2000:]
    assert "demo finished OK" in out
    assert f"$ {agent_cmd} agent --config" in out
    # The demo itself exits non-zero when a request fails during the swap or the tampered
    # update is installed; its report says so too.
    assert "failed: 0" in out
    assert "(exit code 3, as expected)" in out
    assert "the agent still serves model_version 2.0.0" in out
    # The agent's own report, shown by the demo's closing `status`, says it ran on arm64.
    assert re.search(r"\baarch64/\d+c\b", out), out[-2000:]
    assert "Traceback" not in out + err


PROF_DEV = "arm-prof-1"


class Arm64Agent(AgentProc):
    """The agent inside the rootfs: its directory (config, trust, state) is under a host
    directory the rootfs sees at the same path. Its own session, so that killing it takes
    its profiling children along (they too hold the rootfs's mounts busy)."""

    def __init__(self, root: Arm64Root, host: Host, tmp: Path) -> None:
        self.root = root
        super().__init__(host, tmp, PROF_DEV)  # type: ignore[arg-type]

    def write_config(self, window_s: float) -> None:
        super().write_config(window_s)
        with open(self.config, "a") as f:
            f.write("[profiling]\nthreads = 1\nmax_candidates = 8\n")

    def start(self, crash_at: str | None = None, *, cli: bool = False,
              wait: bool = True) -> AgentProc:
        cmd = self.root.cmd(["/opt/venv/bin/edge-sdk", "agent", "--config", str(self.config)])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        runtime = self.state / "agent.json"

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()[-3000:]}")
            try:
                # chroot, env and the emulated Python exec one another: one pid.
                return bool(json.loads(runtime.read_text())["pid"] == self.proc.pid)
            except (OSError, ValueError, KeyError):
                return False

        # An emulated start imports onnxruntime at a fraction of native speed.
        wait_for(listening, 600, lambda: f"agent did not start: {self.log.read_text()[-3000:]}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def test_convert_profiles_every_candidate_on_the_arm64_agent_and_chooses_by_it(
        arm64: tuple[Arm64Root, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, shared = arm64
    tmp = shared / "profiling"
    tmp.mkdir()
    with Mosquitto(tmp / "broker") as broker:
        host = Host(tmp, broker, PROF_DEV)
        serve = Serve(host, tmp)
        agent = Arm64Agent(root, host, tmp)
        try:
            agent.start()
            assert agent.proc is not None and agent.proc.pid in root.processes()
            wait_for(lambda: PROF_DEV in host.states, 120, lambda: "the agent sent no state")
            _convert_and_bench_on_the_arm64_agent(host, agent, tmp, capsys)
        finally:
            agent.kill()
            serve.kill()
            host.conn.close()
    # Nothing left running inside that would keep the rootfs's mounts busy.
    assert root.processes() == []


def _convert_and_bench_on_the_arm64_agent(host: Host, agent: Arm64Agent, tmp: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The x86 test's model: emulated, each candidate's 60 runs (3 fresh sessions) still
    # take seconds at most.
    src = _convert_models.mlp_classifier(tmp / "mlp.onnx", features=256, hidden=1024)
    out = tmp / "mlp-art"
    capsys.readouterr()
    code = main(host.cli("convert", str(src), "-o", str(out), "--quantize", "auto",
                         "--prefer", "latency", "--threads", "1", "--profile-on", PROF_DEV,
                         "--json"))
    captured = capsys.readouterr()
    assert code == 0, captured.err + agent.log.read_text()[-3000:]
    report = json.loads((out / "report.json").read_text())
    # The device's hardware as the agent itself reports it (also in its state): arm64.
    dev = report["devices"][PROF_DEV]
    assert dev["hardware"]["arch"] == "aarch64"
    assert dev["hardware"]["arch"] == host.states[PROF_DEV]["hardware"]["arch"]
    assert dev["hardware"]["cpu_features"] == host.states[PROF_DEV]["hardware"]["cpu_features"]
    timed = measured(report)
    assert len(timed) >= 3
    for r in timed:
        t = r["devices"][PROF_DEV]
        assert t["error"] is None and t["median_ms"] > 0 and t["p90_ms"] >= t["median_ms"]
        assert t["peak_rss_bytes"] > 0 and t["load_ms"] > 0 and t["runs"] == 60
        assert r["device_latency_ms"] == t["median_ms"]
        assert r["host_latency_ms"] == r["latency_ms"] > 0
    assert report["chosen"] == expected_choice(report)
    assert f"latency measured on device {PROF_DEV}" in report["rule"]
    # Host and device latency side by side, the device named with its arch.
    md = (out / "report.md").read_text()
    assert f"| host ms | {PROF_DEV} ms |" in md
    assert f"Profiled on device `{PROF_DEV}`: aarch64;" in md
    # The figures, for the record (pytest -s shows them).
    with capsys.disabled():
        print("\n" + "\n".join(f"{r['name']}: host {r['latency_ms']:.3f} ms, arm64 "
                               f"{r['device_latency_ms']:.3f} ms" for r in timed)
              + f"\nchosen: {report['chosen']}")
    # The candidates are gone from the agent's state.
    wait_for(lambda: any(e["event"] == "profiling_done" for e in host.events))
    assert (agent.state / "profiling").is_dir()
    assert not any((agent.state / "profiling").iterdir())

    capsys.readouterr()
    assert main(host.cli("bench", str(out), "--on", PROF_DEV, "--runs", "20",
                         "--json")) == 0
    row = json.loads(capsys.readouterr().out)["devices"][PROF_DEV]
    assert row["hardware"]["arch"] == "aarch64"
    assert row["error"] is None and row["runs"] == 20 and row["threads"] == 1
    assert row["median_ms"] > 0 and row["peak_rss_bytes"] > 0
    with capsys.disabled():
        print(f"bench --on {PROF_DEV}: median {row['median_ms']:.3f} ms, load "
              f"{row['load_ms']:.1f} ms, peak RSS {row['peak_rss_bytes'] / 2**20:.1f} MiB")
