"""Artifact transfer throughput over MQTT vs a raw paho publish/subscribe loop.

Both run in the same process layout through the same private Mosquitto, with the
same bytes and chunk size, interleaved in one run:

- raw:      a paho publisher process pushes the file as QoS 1 messages of CHUNK bytes
            to a paho subscriber here (no requests, no verification: the ceiling).
- download: ``ChunkClient.download`` of the released model file from an
            ``edge-sdk serve --only responder`` process, into a buffer in memory.
- fetch:    ``UpdateClient.fetch`` end to end: TUF refresh over MQTT, deployment
            cross-check, resumable download to disk, sha256 verification, atomic
            artifact directory.

What is measured is the default path: ``FetchConfig()``, the responder's default
budgets apart from the per-device ceiling (:data:`CEILING_LIFTED`: a lone device
must not be held to it), and a Mosquitto with its default settings
(``max_inflight_messages 20``, ``max_queued_messages 1000``: the config has a
listener, a log and nothing else). ``--tuned`` raises the broker's queue limits
instead, as ``tests/_broker.py`` does. Each phase of each round uses a device id
of its own: the responder drops a request for a chunk it sent the same device
within that device's retransmit timeout, so reusing one would measure that rule.

Besides the rates it prints what went wrong on the way: chunks asked for again,
duplicates, timeouts and slow-downs (device side), requests dropped and resends
dropped (responder, from its ``--metrics``), messages the broker dropped (its log).

    .venv/bin/python -u bench/transfer.py [--mb 64] [--rounds 3] [--tuned]

Goal: fetch ≥ 0.7× raw with the broker's default settings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The per-device ceiling, lifted (one device alone should get what the responder can
#: give); every other budget keeps its default. The one place to adjust at a merge.
CEILING_LIFTED = ("bytes_per_s=1099511627776", "burst_bytes=1073741824")
#: Broker settings besides the listener: none (Mosquitto's defaults), or raised queues.
TUNED_BROKER = "max_inflight_messages 0\nmax_queued_messages 100000\n"
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_sdk.release import Repository, create_deployment  # noqa: E402
from edge_sdk.transport import (  # noqa: E402
    ChunkClient,
    DeviceLimits,
    FetchConfig,
    FetchStats,
    MqttConfig,
    MqttConnection,
)
from edge_sdk.trust import UpdateClient, load_public_key, verify_deployment  # noqa: E402
from tests._broker import Mosquitto, free_port  # noqa: E402
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


def default_broker(workdir: Path, *, tuned: bool) -> Mosquitto:
    """A Mosquitto on a free port with its default limits (``tuned``: raised queues).

    tests/_broker.py writes raised limits for the test suite; here its config is
    rewritten to the listener, the user, anonymous access and the log (``notice``
    too: that is where Mosquitto says it dropped messages for a client)."""
    broker = Mosquitto(workdir)
    keep = [line for line in broker.conf.read_text().splitlines()
            if line.split(" ", 1)[0] in ("listener", "user", "allow_anonymous", "persistence",
                                         "log_dest", "log_type")]
    broker.conf.write_text("\n".join(keep) + "\nlog_type notice\n"
                           + (TUNED_BROKER if tuned else ""))
    return broker


def broker_drops(broker: Mosquitto) -> int:
    """Times the broker's log says it dropped messages for a client."""
    text = broker.log.read_text() if broker.log.exists() else ""
    return len(re.findall(r"dropp", text, re.IGNORECASE))


def cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has used so far, all its threads (the scheduler's
    nanosecond count: a transfer lasts a fraction of a second, many clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def responder_counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"edge_responder_(\w+)_total (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


#: Seconds between two phases: the previous device no longer counts as asking.
IDLE_S = DeviceLimits().active_ms / 1000 + 0.1


def raw_round(broker: Mosquitto, size: int, chunk: int,
              timed: Callable[[Callable[[], object]], float]) -> float:
    """One pass of the raw loop; ``timed`` runs and times the part that moves the bytes."""
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

    def go() -> None:
        c.publish("bench/go", b"1", qos=1)
        seen, quiet_since = -1, time.monotonic()
        while not done.wait(0.5):
            if got[0] != seen:
                seen, quiet_since = got[0], time.monotonic()
            elif time.monotonic() - quiet_since > 3:
                raise RawLoopLost(got[0], size, n)

    try:
        dt = timed(go)
    finally:
        c.loop_stop()
        c.disconnect()
    return size / dt


class RawLoopLost(RuntimeError):
    """The raw loop's subscriber stopped short: the broker dropped messages. The
    publisher pushes every chunk at once, and past ``max_queued_messages`` (1000 by
    default) waiting for a subscriber Mosquitto drops QoS 1 messages too. (A fetch
    never has more than ``FetchConfig.window`` answers queued, so it is not hit.)"""

    def __init__(self, got: int, size: int, n: int) -> None:
        super().__init__(f"raw loop: the subscriber got {got} of {size} bytes ({n} "
                         "chunks): the broker dropped the rest (max_queued_messages)")


class Buffer:
    """The download's sink: the bytes in memory, allocated once (a growing bytearray
    copies itself on every resize, which would be the bench's cost, not the fetch's)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.at = 0

    def write(self, chunk: bytes) -> None:
        self.view[self.at:self.at + len(chunk)] = chunk
        self.at += len(chunk)


class Trouble:
    """What went wrong during one phase, summed over rounds."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def add(self, **kw: float) -> None:
        for k, v in kw.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def line(self) -> str:
        return ", ".join(f"{k} {int(v)}" for k, v in self.counts.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=FetchConfig.chunk_size,
                    help="Chunk size of the raw loop and the fetch's largest chunk.")
    ap.add_argument("--window", type=int, default=FetchConfig.window)
    ap.add_argument("--batch", type=int, default=FetchConfig.batch)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tuned", action="store_true",
                    help="Raise the broker's queue limits (max_queued_messages 100000, "
                         "max_inflight_messages 0) instead of its defaults.")
    ap.add_argument("--skip-fetch", action="store_true", help="Only raw and download.")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-bench-transfer-"))
    broker = default_broker(work / "broker", tuned=args.tuned)
    broker.start()
    procs: list[subprocess.Popen[str]] = []
    metrics = f"127.0.0.1:{free_port()}"
    metrics_url = f"http://{metrics}/metrics"
    trouble = {"download": Trouble(), "fetch": Trouble()}
    #: CPU seconds per wall second of each process, per phase (a process near 1.0 is
    #: what limits the phase: the GIL keeps a Python process to one core).
    busy: dict[str, list[tuple[float, float, float]]] = {"raw": [], "download": [],
                                                          "fetch": []}
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
            [str(Path(sys.executable).with_name("edge-sdk")), "serve", "--only", "responder",
             "--repo", str(repo.path), "--broker", broker.url, "--fleet", fleet,
             "--metrics", metrics, *(f"--device-limit={kv}" for kv in CEILING_LIFTED)],
            stderr=subprocess.PIPE, text=True)
        procs.append(serve)
        assert serve.stderr is not None
        said = [serve.stderr.readline() for _ in range(1)]
        while "serving" not in said[-1] and said[-1] and len(said) < 20:
            said.append(serve.stderr.readline())
        if "serving" not in said[-1]:
            raise RuntimeError(f"serve did not start: {''.join(said)}")
        pub = subprocess.Popen(
            [sys.executable, "-c", RAW_PUBLISHER, broker.host, str(broker.port), str(size),
             str(args.chunk), str(art.model_path)], stdout=subprocess.PIPE, text=True)
        procs.append(pub)
        assert pub.stdout is not None and pub.stdout.readline().strip() == "ready"

        cfg = FetchConfig()
        if (args.chunk, args.window, args.batch) != (cfg.chunk_size, cfg.window, cfg.batch):
            cfg = FetchConfig(chunk_size=args.chunk, window=args.window, batch=args.batch)
        conn = MqttConnection(MqttConfig(url=broker.url, fleet=fleet), name="bench-device")
        conn.connect()
        raw: list[float] = []
        dl: list[float] = []
        full: list[float] = []

        assert broker.proc is not None
        pids = (os.getpid(), serve.pid, broker.proc.pid)

        def timed(phase: str, other: int, run: Callable[[], object]) -> float:
            ours = (pids[0], other, pids[2])
            cpu0 = [cpu_s(p) for p in ours]
            t0 = time.perf_counter()
            run()
            took = time.perf_counter() - t0
            a, b, c = ((cpu_s(p) - c0) / took for p, c0 in zip(ours, cpu0, strict=True))
            busy[phase].append((a, b, c))
            return took

        def measured(phase: str, stats: FetchStats, run: Callable[[], object]) -> float:
            before, drops = responder_counters(metrics_url), broker_drops(broker)
            took = timed(phase, serve.pid, run)
            after = responder_counters(metrics_url)
            trouble[phase].add(
                resent=stats.chunks_resent, duplicates=stats.duplicates,
                timeouts=stats.timeouts, slowdowns=stats.slowdowns,
                requests=stats.requests_sent,
                dropped=after.get("dropped_requests", 0) - before.get("dropped_requests", 0),
                resends_dropped=after.get("resends_dropped", 0)
                - before.get("resends_dropped", 0),
                broker_drop_lines=broker_drops(broker) - drops)
            return took

        dirname, _, base = rel.path.rpartition("/")
        target = f"targets/{dirname}/{rel.sha256}.{base}"
        raw_lost = 0
        for r in range(args.rounds):
            for attempt in range(3):
                try:
                    raw.append(raw_round(broker, size, args.chunk,
                                         functools.partial(timed, "raw", pub.pid)))
                    break
                except RawLoopLost as err:
                    raw_lost += 1
                    if attempt == 2:
                        raise
                    print(f"{err}; measuring it again", file=sys.stderr)
                    time.sleep(2)  # the publisher's last round drains
            # A device id per phase and round (see the module doc), alone: the
            # responder counts a device as asking for DeviceLimits.active_ms after its
            # last request and holds a device to a few milliseconds of its queue while
            # another one asks (the fair share).
            time.sleep(IDLE_S)
            chunks = ChunkClient(conn, f"dl-{r}", config=cfg)
            took = measured("download", chunks.stats,
                            functools.partial(chunks.download, target, Buffer(size).write,
                                              length=size))
            dl.append(size / took)
            chunks.close()
            if args.skip_fetch:
                continue
            time.sleep(IDLE_S)
            state = work / f"device-{r}"
            client = UpdateClient(trusted_root=repo.root_path.read_bytes(),
                                  metadata_dir=state / "tuf", partial_dir=state / "part",
                                  connection=conn, device_id=f"fetch-{r}", fetch_config=cfg)
            took = measured("fetch", client.stats,
                            functools.partial(client.fetch, dep, state / "model"))
            full.append(size / took)
            client.close()
            shutil.rmtree(state)
        conn.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    def cpu(phase: str, who: str) -> str:
        shares = busy[phase]
        if not shares:
            return ""
        med = [statistics.median(x[i] for x in shares) for i in range(3)]
        return f"   cpu: device {med[0]:.2f}, {who} {med[1]:.2f}, broker {med[2]:.2f}"

    def mbps(xs: list[float]) -> float:
        return statistics.median(xs) / 1e6

    def ratio(xs: list[float]) -> float:
        # Per-round ratios: each round measures raw and ours back to back, so a busy
        # moment on a shared machine hits both sides of a ratio.
        return statistics.median(x / r for x, r in zip(xs, raw, strict=True))

    print(f"artifact {size / 1e6:.1f} MB, chunk {args.chunk} B, FetchConfig "
          f"{'default' if cfg == FetchConfig() else cfg}, rounds {args.rounds}, broker "
          f"{'tuned (raised queues)' if args.tuned else 'default settings'}, "
          f"cpus {os.cpu_count()}")
    print(f"raw paho pub/sub      {mbps(raw):8.1f} MB/s   (median of rounds)"
          + cpu("raw", "publisher")
          + (f"   [{raw_lost} rounds lost messages in the broker, measured again]"
             if raw_lost else ""))
    print(f"ChunkClient.download  {mbps(dl):8.1f} MB/s   {ratio(dl):.2f}× raw   "
          f"[{trouble['download'].line()}]" + cpu("download", "responder"))
    if full:
        print(f"UpdateClient.fetch    {mbps(full):8.1f} MB/s   {ratio(full):.2f}× raw   "
              f"[{trouble['fetch'].line()}] (goal ≥ 0.7×; includes TUF refresh, sha256, "
              "fsync, atomic install)" + cpu("fetch", "responder"))


if __name__ == "__main__":
    main()
