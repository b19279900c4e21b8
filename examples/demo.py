"""edge-sdk demo: the whole path on one machine.

Build a small model, make an artifact, inspect it, predict offline, convert a small CNN
(every candidate measured); then convert the classifier, init a signed release
repository, serve it on a broker (the system Mosquitto if present, else the pure-Python
amqtt) with the fleet page, start a device agent, deploy v1, predict through the agent's
local endpoint, release and deploy v2 while predictions keep flowing (the agent swaps
with none failing), watch a tampered update refused, and deploy the CNN beside the
classifier (two models on one device, each at its own endpoint). Then the operator's
path: two more agents join, the operator assigns the three to a group, rolls the CNN out
to them, fine-tunes it, converts v2 with ``--base`` v1 and rolls it out in two waves
with an approval between them; each device downloads a delta of a few percent, and on
the first device the CNN updates alone while the classifier serves on untouched.

Run it with the README's first command (`bash .ci/demo`), or directly inside the
venv: `python examples/demo.py [--workdir DIR] [--offline-only]`. Every step is the
CLI a user would type, echoed before it runs; the fleet page's address is printed once
`serve` is up, and the page lives until the demo ends. `--agent-cmd PREFIX` starts the
first agent (dev-001) as `PREFIX agent --config FILE` instead, e.g. inside an arm64
rootfs through qemu (tests/test_arm64.py): the work directory must be reachable there at
the same path; the two agents that join later run here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edge_sdk


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str, expect: int = 0) -> str:
    cmd = [sys.executable, "-m", "edge_sdk", *args]
    print("$ edge-sdk " + " ".join(shlex.quote(a) for a in args), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(res.stdout, end="", flush=True)
    if res.returncode != expect:
        print(res.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo: step failed with exit code {res.returncode}")
    if expect:
        print(res.stderr.strip().splitlines()[-1] + f"   (exit code {expect}, as expected)")
    return res.stdout


def build_classifier(path: Path, seed: int = 42) -> None:
    """A 2-layer MLP classifier: 8 features → 3 class probabilities, dynamic batch."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (16, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "classifier", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_cnn(path: Path, size: int = 64) -> None:
    """A small image classifier: three 3×3 conv + ReLU layers (stride 2), global average
    pool, a dense layer to 10 classes; input [batch, 3, size, size]."""
    rng = np.random.default_rng(3)
    nodes, inits, prev, cin = [], [], "image", 3
    for i, cout in enumerate((32, 64, 128)):
        w = rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4,
                                   strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", cout
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, (cin, 10)).astype(np.float32), "fc"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fcb"),
              numpy_helper.from_array(np.array([-1, cin], np.int64), "flat")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["pool"]),
              helper.make_node("Reshape", ["pool", "flat"], ["vec"]),
              helper.make_node("MatMul", ["vec", "fc"], ["mm"]),
              helper.make_node("Add", ["mm", "fcb"], ["logits"])]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    model = helper.make_model(helper.make_graph(nodes, "cnn", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def convert_demo(work: Path) -> None:
    step("8. convert a small CNN: every candidate measured here, the fastest within "
         "budget kept")
    src = work / "cnn.onnx"
    build_cnn(src)
    images = np.random.default_rng(4).uniform(0, 1, (64, 3, 64, 64)).astype(np.float32)
    np.savez(work / "images.npz", image=images)
    run("convert", str(src), "-o", str(work / "cnn-art"), "--calibration",
        str(work / "images.npz"), "--threads", "1", "--overwrite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep outputs here (default: a temp dir)")
    parser.add_argument("--offline-only", action="store_true",
                        help="stop after the offline steps (no broker, no agent)")
    parser.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                        help="which local broker to run (auto: Mosquitto if installed)")
    parser.add_argument("--agent-cmd", metavar="PREFIX",
                        help="start the first agent (dev-001) as PREFIX agent --config FILE "
                        "(a shell-quoted command, e.g. 'chroot ROOT /opt/venv/bin/edge-sdk'; "
                        "default: this Python's edge-sdk); it must see the work directory at "
                        "the same path and reach 127.0.0.1")
    args = parser.parse_args()
    started, fleet_s = time.monotonic(), None
    with tempfile.TemporaryDirectory(prefix="edge-sdk-demo-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)

        step("1. build a small model (an ONNX MLP classifier)")
        src = work / "classifier.onnx"
        build_classifier(src)
        print(f"wrote {src} ({src.stat().st_size} bytes)")

        step("2. make an artifact: manifest with signature and hash, sample input")
        sample = {"features": np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32)}
        art = edge_sdk.build_artifact(src, work / "classifier-1.0.0", name="classifier",
                                      version="1.0.0", sample=sample, overwrite=True)
        print(f"wrote {art.path}: {', '.join(sorted(p.name for p in art.path.iterdir()))}")

        step("3. inspect it")
        run("inspect", str(art.path))

        step("4. predict offline with the CLI")
        inputs = work / "inputs.npz"
        np.savez(inputs, features=np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32))
        run("predict", str(art.path), "--input", str(inputs), "-o", str(work / "outputs.npz"))

        step("5. predict offline from Python")
        model = edge_sdk.load(art.path)
        out = model.predict(np.ones((1, 8), np.float32))
        print(f"edge_sdk.load({art.path.name!r}).predict(...) -> "
              f"class {int(out['probabilities'].argmax())}, p={out['probabilities'].round(3)}")

        step("6. a bad input is a clear one-line error, not a traceback")
        res = subprocess.run([sys.executable, "-m", "edge_sdk", "predict", str(art.path),
                              "--input", str(work / "missing.npz")], capture_output=True, text=True)
        print(f"exit {res.returncode}: {res.stderr.strip()}")

        step("7. latency on this machine")
        run("bench", str(art.path), "--runs", "200")
        convert_demo(work)
        if not args.offline_only:
            with Processes() as procs:
                agent_cmd = shlex.split(args.agent_cmd) if args.agent_cmd else None
                fleet_s = on_broker(work, src, procs, args.broker, agent_cmd)
        took = time.monotonic() - started
        print(f"\ndemo finished OK in {took:.0f} s"
              + (f" (the fleet part: {fleet_s:.0f} s)" if fleet_s is not None else ""))


# -- part 2: release, broker, agent, deployments ------------------------------------------

FLEET = "demo"
DEVICE = "dev-001"
GROUP = "cameras"
BROKER_SCRIPT = """
import asyncio, sys
from amqtt.broker import Broker

async def main(port):
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                 {"allow_anonymous": True}}})
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


class Processes:
    """Background processes of the demo, stopped (SIGTERM, then kill) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        return proc

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path,
              timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: {what} did not listen on port {port}")


def start_broker(work: Path, procs: Processes, choice: str) -> tuple[str, bool]:
    """Start a local broker; return its URL and whether it supports shared subscriptions."""
    port = free_port()
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    log = work / "broker.log"
    if choice in ("auto", "mosquitto") and mosquitto:
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 100000\n")
        proc = procs.start("mosquitto", [mosquitto, "-c", str(conf)], log)
        print(f"started the system Mosquitto ({mosquitto}) on 127.0.0.1:{port}")
        shared = True
    elif choice in ("auto", "amqtt"):
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise SystemExit("demo: no broker: install Mosquitto (apt-get install mosquitto) "
                             "or amqtt (pip install 'edge-sdk[demo]')") from None
        proc = procs.start("amqtt", [sys.executable, "-c", BROKER_SCRIPT, str(port)], log)
        print(f"started the embedded pure-Python amqtt broker on 127.0.0.1:{port}"
              + ("" if choice == "amqtt" else " (Mosquitto is not installed)"))
        shared = False  # amqtt has no $share subscriptions: one responder, plain subscription
    else:
        raise SystemExit("demo: mosquitto is not installed")
    wait_port(port, proc, "the broker", log)
    return f"mqtt://127.0.0.1:{port}", shared


def infer(port: int, x: np.ndarray, model: str = "classifier",
          tensor: str = "features") -> tuple[str, np.ndarray]:
    """One KServe v2 JSON request to ``model`` on the agent's local endpoint."""
    body = json.dumps({"inputs": [{"name": tensor, "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                 data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        res = json.loads(resp.read())
    out = res["outputs"][0]
    return res["model_version"], np.array(out["data"], np.float32).reshape(out["shape"])


def repository_index(port: int) -> list[dict[str, Any]]:
    """The models the agent serves, with versions and states (``/v2/repository/index``)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/index", data=b"",
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        got: list[dict[str, Any]] = json.loads(resp.read())
    return got


class Events:
    """Prints the agents' reports (events over MQTT) as an operator's console would."""

    def __init__(self, broker: str) -> None:
        from edge_sdk.transport import MqttConfig, MqttConnection

        self.seen: list[tuple[str, dict[str, Any]]] = []
        #: Which events are printed (None: all); the fleet part shows only the outcomes.
        self.shown: set[str] | None = None
        self.conn = MqttConnection(MqttConfig(url=broker, fleet=FLEET), name="demo-console")
        self.conn.connect()
        self.conn.subscribe(f"edge/{FLEET}/dev/+/events", self._on_event)

    def _on_event(self, topic: str, payload: bytes) -> None:
        ev = json.loads(payload)
        if ev.get("event") == "heartbeat":
            return
        device = topic.split("/")[-2]
        self.seen.append((device, ev))
        if self.shown is not None and ev["event"] not in self.shown:
            return
        label = self._label(ev)
        reason = f" — {ev['reason']}" if ev.get("reason") else ""
        got = ev.get("download")
        if isinstance(got, dict) and got.get("message"):
            reason = f" — {got['message']}"  # "delta from 1.0.0 (N bytes)" or the full size
        print(f"  [{device} event] {ev['event']:<15} {label.strip()}{reason}", flush=True)

    @staticmethod
    def _label(ev: dict[str, Any]) -> str:
        if ev.get("model"):
            return f"{ev['model']['name']} {ev['model']['version']}"
        dep = ev.get("deployment") or {}
        if isinstance(dep, dict) and ("models" in dep or "remove" in dep):  # a set
            return ", ".join([f"{m['name']} {m['artifact_version']}" for m in dep["models"]]
                             + [f"remove {r}" for r in dep.get("remove", [])])
        return f"{dep.get('name', '')} {dep.get('artifact_version', '')}".strip()

    def about(self, model: str, since: int = 0, device: str = DEVICE) -> list[str]:
        """The events ``device`` reported about ``model`` after the first ``since`` ones."""
        return [ev["event"] for d, ev in self.seen[since:]
                if d == device and model in self._label(ev).replace(",", " ").split()]

    def wait(self, kind: str, label: str, device: str = DEVICE,
             timeout: float = 60) -> dict[str, Any]:
        """The first event ``kind`` about ``label`` ("NAME VERSION") from ``device``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d, ev in list(self.seen):
                if d == device and ev["event"] == kind and self._label(ev) == label:
                    return ev
            time.sleep(0.05)
        raise SystemExit(f"demo: {device} did not report {kind} for {label} (its events so "
                         f"far: {[e['event'] for d, e in self.seen if d == device]})")

    def close(self) -> None:
        self.conn.close()


@dataclass
class Site:
    """What the parts on a broker share: the work directory, repository, broker, server
    and the operator's console."""

    work: Path
    repo: Path
    broker: str
    mqtt: list[str]
    procs: Processes
    events: Events
    page: str  # the fleet page's address
    #: Where the operator's console stood (events seen) when a step began, by step name.
    marks: dict[str, int] = field(default_factory=dict)
    #: The first device's HTTP port.
    port: int = 0

    def start_agent(self, device_id: str, agent_cmd: list[str] | None = None) -> int:
        """Provision and start one device agent; return its HTTP port once it listens."""
        device = self.work / device_id
        shutil.rmtree(device, ignore_errors=True)
        device.mkdir()
        shutil.copyfile(self.repo / "metadata" / "1.root.json", device / "root.json")
        shutil.copyfile(self.repo / "deployment.pub.json", device / "deployment.pub.json")
        port = free_port()
        cfg = device / "agent.toml"
        cfg.write_text(
            f'device_id = "{device_id}"\nfleet = "{FLEET}"\nstate_dir = "state"\n'
            # The group deployments it follows; only the operator's assignment (step 19)
            # makes a rollout select it.
            f'groups = ["{GROUP}"]\n'
            f'[broker]\nurl = "{self.broker}"\n'
            '[trust]\nroot = "root.json"\ndeployment_key = "deployment.pub.json"\n'
            f"[http]\nport = {port}\n"
            "[health]\nwindow_s = 2.0\nprobe_interval_s = 0.2\n")
        if device_id == DEVICE:
            print(cfg.read_text().rstrip())
        prefix = shlex.join(agent_cmd) if agent_cmd else "edge-sdk"
        print(f"$ {prefix} agent --config {cfg} &")
        cmd = agent_cmd or [sys.executable, "-m", "edge_sdk"]
        log = self.work / f"{device_id}.log"
        agent = self.procs.start(device_id, [*cmd, "agent", "--config", str(cfg)], log)
        # An agent started another way (emulated, say) may take minutes to import its runtime.
        wait_port(port, agent, f"the agent {device_id}", log, 600 if agent_cmd else 60)
        return port

    def api(self, path: str) -> Any:
        """One GET of the fleet page's JSON API (what the page itself polls)."""
        with urllib.request.urlopen(self.page + path.lstrip("/"), timeout=10) as resp:
            return json.loads(resp.read())

    def wait_api(self, path: str, done: Callable[[Any], bool], what: str,
                 timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = self.api(path)
            if done(got):
                return got
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {what} within {timeout:g} s; {path}: "
                                 f"{json.dumps(got)[:1500]}")
            time.sleep(0.2)


def on_broker(work: Path, src: Path, procs: Processes, broker_choice: str,
              agent_cmd: list[str] | None = None) -> float:
    """Parts 2 and 3; return the seconds part 3 (the fleet) took."""
    step("9. convert the model (and a retrained v2) into verified artifacts")
    # Calibration data: feature vectors like the ones the device will see. Part is held
    # back to measure every candidate's accuracy against the source model.
    calib = work / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, features=rng.normal(0, 1, (96, 8)).astype(np.float32))
    run("convert", str(src), "-o", str(work / "art-1.0.0"), "--name", "classifier",
        "--version", "1.0.0", "--calibration", str(calib), "--metric", "top1", "--overwrite")
    src2 = work / "classifier-v2.onnx"
    build_classifier(src2, seed=7)
    run("convert", str(src2), "-o", str(work / "art-2.0.0"), "--name", "classifier",
        "--version", "2.0.0", "--calibration", str(calib), "--quantize", "none",
        "--overwrite")

    step("10. init a signed release repository (keys kept outside it) and add v1")
    repo, keys = work / "repo", work / "keys"
    for d in (repo, keys):
        shutil.rmtree(d, ignore_errors=True)
    run("release", "init", str(repo), "--keys", str(keys))
    run("release", "add", str(repo), str(work / "art-1.0.0"))

    step("11. a broker, and the repository served on it with the fleet page")
    broker, shared = start_broker(work, procs, broker_choice)
    mqtt = ["--broker", broker, "--fleet", FLEET]
    page_port = free_port()
    # No --db: every command given the repository uses its fleet.db (registry, rollouts,
    # assignments and the audit log in one place).
    serve = ["serve", "--repo", str(repo), "--http", f"127.0.0.1:{page_port}", *mqtt,
             *([] if shared else ["--no-shared"])]
    print(f"$ edge-sdk {' '.join(serve)} &")
    server = procs.start("serve", [sys.executable, "-m", "edge_sdk", *serve],
                         work / "serve.log")
    wait_port(page_port, server, "edge-sdk serve", work / "serve.log")
    page = f"http://127.0.0.1:{page_port}/"
    print(f"the fleet page is live at {page} while the demo runs: open it to watch the "
          f"devices and rollouts (its record: {repo / 'fleet.db'})")
    site = Site(work, repo, broker, mqtt, procs, Events(broker), page)
    try:
        one_device(site, agent_cmd)
        started = time.monotonic()
        fleet(site)
        return time.monotonic() - started
    finally:
        site.events.close()


def one_device(site: Site, agent_cmd: list[str] | None) -> None:
    work, repo, mqtt = site.work, site.repo, site.mqtt
    step("12. start a device agent (provisioned with the trusted root and deployment key)")
    http_port = site.port = site.start_agent(DEVICE, agent_cmd)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5)
    except urllib.error.HTTPError as err:
        print(f"agent is live on 127.0.0.1:{http_port}; ready: {err.code} (no model yet)")

    step("13. deploy v1 to the device and wait until it has committed it")
    run("deploy", "--repo", str(repo), "--device", DEVICE, "--model", "classifier",
        "--version", "1.0.0", "--wait", "--timeout", "120", *mqtt)

    step("14. predict through the agent's local endpoint (KServe v2 JSON)")
    x = np.random.default_rng(3).normal(size=(1, 8)).astype(np.float32)
    version, probs = infer(http_port, x)
    print(f"POST /v2/models/classifier/infer -> model_version {version}, "
          f"probabilities {[round(float(v), 3) for v in probs[0]]}")

    step("15. release a retrained v2 (no delta: every weight is new) and deploy it while a "
         "client keeps predicting")
    run("release", "add", str(repo), str(work / "art-2.0.0"))
    answered: Counter[str] = Counter()
    failed: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answered[infer(http_port, x)[0]] += 1
            except Exception as err:
                failed.append(repr(err))

    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(0.5)
        run("deploy", "--repo", str(repo), "--device", DEVICE, "--model", "classifier",
            "--version", "2.0.0", "--wait", "--timeout", "120", *mqtt)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    print(f"predictions during the update: {dict(answered)}, failed: {len(failed)}")
    if failed or set(answered) != {"1.0.0", "2.0.0"}:
        raise SystemExit(f"demo: the swap was not seamless: {failed[:3]}")

    step("16. a tampered update is refused; v2 keeps serving")
    build_classifier(work / "classifier-v3.onnx", seed=11)
    run("convert", str(work / "classifier-v3.onnx"), "-o", str(work / "art-3.0.0"),
        "--name", "classifier", "--version", "3.0.0", "--quantize", "none", "--overwrite")
    run("release", "add", str(repo), str(work / "art-3.0.0"))
    sha = json.loads((work / "art-3.0.0" / "manifest.json").read_text())["sha256"]
    target = next((repo / "targets").rglob(f"{sha}.*"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    print(f"(an attacker flipped one byte of {target.relative_to(repo)} on the server)")
    run("deploy", "--repo", str(repo), "--device", DEVICE, "--model", "classifier",
        "--version", "3.0.0", "--wait", "--timeout", "120", *mqtt, expect=3)
    site.events.wait("failed", "classifier 3.0.0")
    version, _ = infer(http_port, x)
    print(f"the agent still serves model_version {version}")
    if version != "2.0.0":
        raise SystemExit("demo: the tampered update changed the served model")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                     timeout=5).read().decode()
    print("metrics: " + "; ".join(line for line in metrics.splitlines()
                                  if line.startswith("edge_agent_update_events_total")))

    step("17. a second model on the same device: the CNN of step 8 beside the classifier")
    run("release", "add", str(repo), str(work / "cnn-art"))
    run("deploy", "--repo", str(repo), "--device", DEVICE, "--model", "cnn", "--version",
        "1.0.0", "--wait", "--timeout", "120", *mqtt)
    site.marks["cnn"] = len(site.events.seen)
    image = np.random.default_rng(5).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    try:
        both = {"classifier": infer(http_port, x),
                "cnn": infer(http_port, image, "cnn", "image")}
    except urllib.error.HTTPError as err:
        raise SystemExit(f"demo: {err.url} answered {err.code}: {err.read().decode()}") from None
    for name, (version, out) in both.items():
        print(f"POST /v2/models/{name}/infer -> model_version {version}, class "
              f"{int(out[0].argmax())}")
    served = repository_index(http_port)
    print(f"POST /v2/repository/index -> {json.dumps(served)}")
    if {(m["name"], m["version"]) for m in served} != {("classifier", "2.0.0"),
                                                        ("cnn", "1.0.0")}:
        raise SystemExit("demo: the device does not serve both models")

    step("18. the device as it reports itself")
    run("status", *mqtt)


# -- part 3: a fleet of three, a staged rollout of a fine-tuned v2 by delta ------------------

FLEET_DEVICES = (DEVICE, "dev-002", "dev-003")


def fine_tune_head(src: Path, dst: Path, images: np.ndarray, steps: int = 10,
                   lr: float = 0.01) -> str:
    """v2 of the CNN: its dense head (``fc``, ``fcb``) trained ``steps`` steps of gradient
    descent (cross-entropy) to tell the images with the brighter red channel apart; the
    conv layers are frozen. Returns a line on what changed."""
    import onnxruntime as ort

    model = onnx.load(str(src))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("vec", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = sess.run(["vec"], {"image": images})[0].astype(np.float64)
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits["fc"]).astype(np.float64)
    b = numpy_helper.to_array(inits["fcb"]).astype(np.float64)
    red = images[:, 0].mean(axis=(1, 2))
    labels = (red > np.median(red)).astype(int)
    rows = np.arange(len(labels))

    def loss_grad(w: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
        z = feats @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[rows, labels]).mean())
        p[rows, labels] -= 1
        return loss, p / len(labels)

    w0 = w.copy()
    first, _ = loss_grad(w, b)
    for _ in range(steps):
        _, g = loss_grad(w, b)
        w -= lr * feats.T @ g
        b -= lr * g.sum(axis=0)
    last, _ = loss_grad(w, b)
    for name, value in (("fc", w), ("fcb", b)):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.save(model, str(dst))
    return (f"fine-tuned the dense head ({w.size} of {count_weights(model)} weights) for "
            f"{steps} steps: loss {first:.3f} -> {last:.3f}, largest weight change "
            f"{np.abs(w - w0).max():.3f}; wrote {dst}")


def count_weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 1)


def start_rollout(site: Site, version: str, waves: str, *more: str) -> str:
    """``rollout start`` for the group; return the rollout's id."""
    out = run("rollout", "start", "--model", "cnn", "--version", version, "--group", GROUP,
              "--waves", waves, *more, "--wave-timeout", "300", "--repo", str(site.repo),
              "--fleet", FLEET)
    return out.split()[1].rstrip(":")  # "rollout 3: cnn 1.1.0 recorded; ..."


def wait_rollout(site: Site, rid: str, want: tuple[str, ...]) -> None:
    """Wait until the rollout is in one of the ``want`` states (else stop the demo)."""
    got = site.wait_api(f"api/rollouts/{rid}", lambda r: r["status"] not in (
        {"pending", "running", "paused"} - set(want)), f"rollout {rid} did not finish",
        timeout=330)
    if got["status"] not in want:
        raise SystemExit(f"demo: rollout {rid} is {got['status']}: {got.get('reason')}")


def fleet(site: Site) -> None:
    work, repo = site.work, site.repo
    fleet_opt = ["--repo", str(repo), "--fleet", FLEET]
    site.events.shown = {"downloaded", "committed", "failed", "rolled_back"}

    step(f"19. two more devices join; the operator puts all three in group {GROUP!r}")
    for device in FLEET_DEVICES[1:]:
        site.start_agent(device)
    run("device", "set", *FLEET_DEVICES, "--group", GROUP, *fleet_opt)
    site.wait_api("api/devices", lambda rows: sum(
        r["id"] in FLEET_DEVICES and r["online"] and r["registered"] for r in rows) == 3,
        "the three devices did not all register")

    step("20. put the image model of step 8 (released in step 17) on the group")
    cnn_v1 = work / "cnn-art"
    # A rollout, not 'deploy --group': the controller sends each device the operator
    # assigned its own deployment (a device subscribes only to the groups it says it is in).
    rid = start_rollout(site, "1.0.0", "100%")
    wait_rollout(site, rid, ("completed",))
    run("rollout", "status", rid, "--repo", str(repo))

    step("21. v2: fine-tune the model, convert it with --base v1 (v1's scheme, scales and "
         "zero points: weights the fine-tune left alone keep v1's bytes) and release it")
    images = np.load(work / "images.npz")["image"]
    print(fine_tune_head(work / "cnn.onnx", work / "cnn-v2.onnx", images))
    run("convert", str(work / "cnn-v2.onnx"), "-o", str(work / "cnn-art-1.1.0"), "--name",
        "cnn", "--version", "1.1.0", "--calibration", str(work / "images.npz"), "--threads",
        "1", "--base", str(cnn_v1), "--overwrite")
    out = run("release", "add", str(repo), str(work / "cnn-art-1.1.0"))
    if "delta from 1.0.0:" not in out:
        raise SystemExit("demo: v2 was released without a delta from v1")

    step("22. roll v2 out in waves: one device first, then hold for the operator's approval")
    rid = start_rollout(site, "1.1.0", "1,100%", "--pause-after-wave")
    wait_rollout(site, rid, ("paused",))
    run("rollout", "status", rid, "--repo", str(repo))

    step("23. the operator approves the next wave")
    run("rollout", "approve", rid, "--repo", str(repo))
    wait_rollout(site, rid, ("completed",))
    run("rollout", "status", rid, "--repo", str(repo))

    step("24. what v2 cost: each device downloaded the delta, not the model")
    full = (work / "cnn-art-1.1.0" / "model.onnx").stat().st_size
    got_by = {d: site.events.wait("downloaded", "cnn 1.1.0", d).get("download") or {}
              for d in FLEET_DEVICES}
    for d in FLEET_DEVICES:
        dl = got_by.get(d, {})
        print(f"  {d}: {dl.get('message', 'no download reported')}")
    sizes = [int(dl.get("bytes", full)) for dl in got_by.values() if dl.get("kind") == "delta"]
    if len(sizes) != len(FLEET_DEVICES):
        raise SystemExit(f"demo: not every device took the delta: {got_by}")
    print(f"v2 by delta: {max(sizes)} bytes per device, {max(sizes) / full:.1%} of the full "
          f"model ({full} bytes); {sum(sizes)} bytes for the fleet instead of "
          f"{full * len(sizes)}")

    step(f"25. on {DEVICE}, the CNN updated alone: the classifier was not touched")
    touched = site.events.about("classifier", site.marks["cnn"])
    served = repository_index(site.port)
    print(f"POST /v2/repository/index -> {json.dumps(served)}")
    print(f"classifier events since step 17: {touched or 'none'}; it still answers "
          f"model_version {infer(site.port, np.zeros((1, 8), np.float32))[0]}")
    if touched or {(m["name"], m["version"]) for m in served} != {("classifier", "2.0.0"),
                                                                   ("cnn", "1.1.0")}:
        raise SystemExit("demo: the CNN's update touched the classifier")

    step("26. the fleet, as the registry records it (and the page shows it)")
    run("status", *fleet_opt)
    rows = [r for r in site.api("api/devices") if r["id"] in FLEET_DEVICES]
    print(f"GET {site.page}api/devices -> " + ", ".join(
        f"{r['id']} " + " + ".join(f"{m['name']} {m['version']}" for m in r.get("models")
                                   or [{"name": r["model"], "version": r["version"]}])
        for r in rows))
    trail = site.api("api/audit?limit=8")
    print(f"GET {site.page}api/audit -> " + "; ".join(
        f"{time.strftime('%H:%M:%S', time.localtime(a['ts']))} {a['actor']} {a['action']}"
        for a in trail))


if __name__ == "__main__":
    main()
