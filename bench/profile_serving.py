"""Serving latency while the agent profiles candidates (``convert --profile-on``), measured
side by side in one run.

A real agent subprocess serves a small model over HTTP (keep-alive client, batch 1);
a real `edge-sdk serve` serves the signed repository; the host asks the agent to time
``--candidates`` copies of a 5 MB MLP (``--runs`` timed runs each, profiling.threads =
``--threads``). Serving p50/p99 are measured steady (before and after) and during the
profiling run, with requests paced every ``--interval-ms`` in both (an unpaced client
would take all the CPU and starve the nice-19 profiler, hiding its effect); the ratio
during / steady is printed (goal p99 ≤ 2×).

    .venv/bin/python bench/profile_serving.py [--requests 3000] [--candidates 8]
        [--runs 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edge_sdk  # noqa: E402
from edge_sdk.release import (  # noqa: E402
    ProfileConfig,
    Repository,
    create_deployment,
    profile_on_devices,
    publish_deployment,
)
from edge_sdk.transport import MqttConfig, MqttConnection  # noqa: E402
from tests import _convert_models, _models  # noqa: E402
from tests._broker import Mosquitto  # noqa: E402

FLEET = "bench"
DEV = "bench-prof"
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": X.reshape(-1).tolist()}]}).encode()


def start_agent(tmp: Path, broker: Mosquitto, repo: Repository, threads: int,
                ) -> tuple[subprocess.Popen[bytes], int]:
    d = tmp / DEV
    d.mkdir()
    shutil.copyfile(repo.meta / "1.root.json", d / "root.json")
    shutil.copyfile(repo.deployment_key_path, d / "deployment.pub.json")
    (d / "agent.toml").write_text(
        f'device_id = "{DEV}"\nfleet = "{FLEET}"\nstate_dir = "state"\nthreads = 1\n'
        f'[broker]\nurl = "{broker.url}"\n'
        '[trust]\nroot = "root.json"\ndeployment_key = "deployment.pub.json"\n'
        "[http]\nport = 0\n[health]\nwindow_s = 0.3\nprobe_interval_s = 0.05\n"
        f"[profiling]\nthreads = {threads}\n")
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config", str(d / "agent.toml"),
             "--log-level", "warning"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            info = json.loads((d / "state" / "agent.json").read_text())
            if info["pid"] == proc.pid:
                return proc, int(info["url"].rsplit(":", 1)[1])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"agent did not start: {(d / 'log').read_text()[-2000:]}")


def infer(conn: http.client.HTTPConnection) -> float:
    t = time.perf_counter()
    conn.request("POST", "/v2/models/adder/infer", body=BODY)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise SystemExit(f"infer failed with {resp.status}: {data[:200]!r}")
    return (time.perf_counter() - t) * 1e3


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000, help="per steady phase")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="profiling.threads of the agent")
    ap.add_argument("--interval-ms", type=float, default=2.0, help="between requests")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    serve = agent = None
    try:
        with Mosquitto(tmp / "broker") as broker:
            repo = Repository.init(tmp / "repo", tmp / "keys")
            serve = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(repo.path),
                 "--broker", broker.url, "--fleet", FLEET], cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"),  # noqa: SIM115
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            src = _models.offset_model(tmp / "adder.onnx", 1.0)
            art = edge_sdk.build_artifact(src, tmp / "adder", name="adder", version="1",
                                          sample={"x": X})
            repo.add_artifact(art.path)
            agent, port = start_agent(tmp, broker, repo, args.threads)
            host = MqttConnection(MqttConfig(url=broker.url, fleet=FLEET))
            host.connect()
            publish_deployment(host, create_deployment(repo, model="adder", fleet=FLEET,
                                                       version="1", devices=[DEV]))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            deadline = time.monotonic() + 60
            while True:
                conn.request("GET", "/v2/models/adder")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            mlp = _convert_models.mlp_classifier(tmp / "mlp.onnx", features=256, hidden=1024)
            pred = edge_sdk.load(mlp, threads=1)
            feed = {"features": np.random.default_rng(0).standard_normal(
                (1, 256)).astype(np.float32)}
            expected = {k: np.asarray(v) for k, v in pred.predict(feed).items()}
            cands = [(f"c{i}", mlp) for i in range(args.candidates)]
            for _ in range(200):
                infer(conn)  # warm the connection and the session
            gap = args.interval_ms / 1e3

            trace: list[tuple[float, float, bool]] = []

            def has_child() -> bool:
                assert agent is not None
                try:
                    for tid in os.listdir(f"/proc/{agent.pid}/task"):
                        with open(f"/proc/{agent.pid}/task/{tid}/children") as f:
                            if f.read().strip():
                                return True
                except OSError:
                    pass
                return False

            def paced() -> float:
                ms = infer(conn)
                if os.environ.get("BENCH_TRACE"):
                    trace.append((time.perf_counter(), ms, has_child()))
                time.sleep(gap)
                return ms

            steady = [paced() for _ in range(args.requests)]
            during: list[float] = []
            outcome: dict[str, object] = {}

            def profile() -> None:
                t = time.perf_counter()
                try:
                    outcome["result"] = profile_on_devices(
                        repo, host, devices=[DEV], candidates=cands, sample=feed,
                        expected={n: expected for n, _ in cands},
                        config=ProfileConfig(timeout_s=600, runs=args.runs, warmup=20))
                except Exception as err:
                    outcome["error"] = err
                outcome["seconds"] = time.perf_counter() - t

            th = threading.Thread(target=profile)
            th.start()
            time.sleep(1.0)  # past the fetch: the children are timing
            while th.is_alive():
                during.append(paced())
            th.join()
            after = [paced() for _ in range(args.requests)]
            host.close()
            if "error" in outcome:
                raise SystemExit(f"profiling failed: {outcome['error']}")
            res = outcome["result"][DEV]  # type: ignore[index]
            figures = [t.median_ms for t in res.candidates]
            s50, s99 = percentiles(steady + after)
            d50, d99 = percentiles(during)
            print(f"profiling: {args.candidates} candidates × {args.runs} runs at "
                  f"{args.threads} thread(s), nice 19, {outcome['seconds']:.1f} s; device "
                  f"median per candidate {', '.join(f'{m:.3f}' for m in figures)} ms")
            print(f"serving steady : {len(steady) + len(after)} requests  p50 {s50:.3f} ms  "
                  f"p99 {s99:.3f} ms")
            print(f"serving during : {len(during)} requests  p50 {d50:.3f} ms  "
                  f"p99 {d99:.3f} ms  (one every {args.interval_ms:g} ms in both)")
            if trace:
                t0 = trace[0][0]
                slow = [(round(t - t0, 2), round(ms, 1), c) for t, ms, c in trace if ms > 10]
                print(f"slow (>10 ms): {len(slow)}; with a child running: "
                      f"{sum(c for _, _, c in slow)}; first: {slow[:40]}")
            print(f"ratio during/steady: p50 {d50 / s50:.2f}×  p99 {d99 / s99:.2f}× "
                  "(goal p99 ≤ 2×)")
    finally:
        for p in (agent, serve):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
