"""Artifact transfer throughput over MQTT vs a raw paho publish/subscribe loop.

Both run in the same process layout through the same private Mosquitto, with the
same bytes and chunk size, interleaved in one run:

- raw:      a paho publisher process pushes the file as QoS 1 messages of CHUNK bytes
            to a paho subscriber here (no requests, no verification: the ceiling).
- download: ``ChunkClient.download`` of the released model file from an
            ``edge-sdk serve`` process (requests, windowing, ordering), into memory.
- fetch:    ``UpdateClient.fetch`` end to end: TUF refresh over MQTT, deployment
            cross-check, resumable download to disk, sha256 verification, atomic
            artifact directory.

    .venv/bin/python bench/transfer.py [--mb 32] [--chunk 65536] [--rounds 3] [--nodelay]

Goal: fetch ≥ 0.5× raw. ``--nodelay`` adds ``set_tcp_nodelay true`` to the broker
(the examples/mosquitto config does); without it Nagle's algorithm delays the small
request messages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNLIMITED = ("bytes_per_s=1099511627776", "burst_bytes=1073741824",
             "requests_per_s=1000000", "burst_requests=1000000",
             "max_inflight_bytes=1073741824")
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_sdk.release import Repository, create_deployment  # noqa: E402
from edge_sdk.transport import ChunkClient, FetchConfig, MqttConfig, MqttConnection  # noqa: E402
from edge_sdk.trust import UpdateClient, load_public_key, verify_deployment  # noqa: E402
from tests._broker import Mosquitto  # noqa: E402
from tests._trust_env import make_artifact  # noqa: E402

RAW_PUBLISHER = """
import sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, total, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = open(sys.argv[5], "rb").read()
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-pub")
c.max_inflight_messages_set(64)
go = []
c.on_message = lambda cl, u, m: go.append(1)
c.connect(host, port)
c.subscribe("bench/go", 1)
c.loop_start()
print("ready", flush=True)
while True:
    while not go:
        time.sleep(0.001)
    go.clear()
    infos = [c.publish("bench/raw", data[off:off + chunk], qos=1)
             for off in range(0, total, chunk)]
    infos[-1].wait_for_publish(60)
"""


def raw_round(broker: Mosquitto, pub: subprocess.Popen[str], size: int, chunk: int) -> float:
    n = (size + chunk - 1) // chunk
    done = threading.Event()
    got = [0]

    def on_message(cl: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        got[0] += len(m.payload)
        if got[0] >= size:
            done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-sub")
    c.on_message = on_message
    c.connect(broker.host, broker.port)
    c.subscribe("bench/raw", 1)
    c.loop_start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    c.publish("bench/go", b"1", qos=1)
    if not done.wait(120):
        raise RuntimeError(f"raw loop received {got[0]} of {size} bytes ({n} chunks)")
    dt = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return size / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64 * 1024)
    ap.add_argument("--window", type=int, default=FetchConfig.window)
    ap.add_argument("--batch", type=int, default=FetchConfig.batch)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodelay", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-bench-transfer-"))
    extra = "set_tcp_nodelay true\n" if args.nodelay else ""
    broker = Mosquitto(work / "broker", extra_conf=extra)
    broker.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        repo = Repository.init(work / "repo", work / "keys")
        art = make_artifact(work / "arts", "bench", "1.0", n=args.mb * 262_144,
                            sample=False)
        rel = repo.add_artifact(art.path)
        size = rel.length
        fleet = "bench"
        signed = create_deployment(repo, model="bench", fleet=fleet, devices=["d1"])
        dep = verify_deployment(signed.document, load_public_key(repo.deployment_key_path),
                                device_id="d1")
        serve = subprocess.Popen(
            [str(Path(sys.executable).with_name("edge-sdk")), "serve", "--repo",
             str(repo.path), "--broker", broker.url, "--fleet", fleet,
             # This measures the transfer path, not the per-device budget.
             *(f"--device-limit={kv}" for kv in UNLIMITED)],
            stderr=subprocess.PIPE, text=True)
        procs.append(serve)
        assert serve.stderr is not None and "serving" in serve.stderr.readline()
        pub = subprocess.Popen(
            [sys.executable, "-c", RAW_PUBLISHER, broker.host, str(broker.port), str(size),
             str(args.chunk), str(art.model_path)], stdout=subprocess.PIPE, text=True)
        procs.append(pub)
        assert pub.stdout is not None and pub.stdout.readline().strip() == "ready"

        cfg = FetchConfig(chunk_size=args.chunk, window=args.window, batch=args.batch)
        conn = MqttConnection(MqttConfig(url=broker.url, fleet=fleet), name="d1")
        conn.connect()
        raw, dl, full = [], [], []
        for r in range(args.rounds):
            raw.append(raw_round(broker, pub, size, args.chunk))
            chunks = ChunkClient(conn, "d1", config=cfg)
            sha = rel.sha256
            dirname, _, base = rel.path.rpartition("/")
            sink = bytearray()
            t0 = time.perf_counter()
            chunks.download(f"targets/{dirname}/{sha}.{base}", sink.extend, length=size)
            dl.append(size / (time.perf_counter() - t0))
            chunks.close()
            state = work / f"device-{r}"
            client = UpdateClient(trusted_root=repo.root_path.read_bytes(),
                                  metadata_dir=state / "tuf", partial_dir=state / "part",
                                  connection=conn, device_id="d1", fetch_config=cfg)
            t0 = time.perf_counter()
            client.fetch(dep, state / "model")
            full.append(size / (time.perf_counter() - t0))
            client.close()
            shutil.rmtree(state)
        conn.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    def mbps(xs: list[float]) -> float:
        return statistics.median(xs) / 1e6

    print(f"artifact {size / 1e6:.1f} MB, chunk {args.chunk} B, window {args.window}, "
          f"rounds {args.rounds}, broker tcp_nodelay={'on' if args.nodelay else 'off'}, "
          f"cpus {os.cpu_count()}")
    def ratio(xs: list[float]) -> float:
        # Per-round ratios: each round measures raw and ours back to back, so a busy
        # moment on a shared machine hits both sides of a ratio.
        return statistics.median(x / r for x, r in zip(xs, raw, strict=True))

    print(f"raw paho pub/sub      {mbps(raw):8.1f} MB/s   (median of rounds)")
    print(f"ChunkClient.download  {mbps(dl):8.1f} MB/s   {ratio(dl):.2f}× raw")
    print(f"UpdateClient.fetch    {mbps(full):8.1f} MB/s   {ratio(full):.2f}× raw "
          "(goal ≥ 0.5×; includes TUF refresh, sha256, fsync, atomic install)")


if __name__ == "__main__":
    main()
