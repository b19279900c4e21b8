"""How one responder shares its capacity among devices downloading at once.

A private Mosquitto on a free port, one ``edge-sdk serve --only responder`` process,
and one process per device (its own connection, its own device id) running
``ChunkClient.download`` of the same file. Three parts, in one run:

- ten:    ten devices with the default ``FetchConfig``, default budgets. Each device's
          throughput over the common interval (from the last start to the first end,
          when all ten are downloading) and its ratio to an equal share of what the
          ten got together. Goal: each within 20 % (0.80–1.20).
- greedy: the same with one device asking for as much as a ``FetchConfig`` allows
          (window 256, batch 64, 127 KiB chunks: the biggest window a fetcher can
          have): does its bigger burst of requests starve the others?
- lone:   one device alone, default budgets against the ceiling lifted
          (``bytes_per_s`` and ``burst_bytes`` huge): the ratio is what the default
          ceiling costs a lone device here (loopback; goal ≈ 1.0).

    .venv/bin/python -u bench/fair_share.py [--mb 16] [--devices 10] [--rounds 1]

Each part also prints the responder's slow-down count (from its metrics page).

What the responder can even out is what waits in its own queue: a device that bursts
more into it than the others (the greedy one) is held to about the others' part. On a
2-core loopback host the ten device processes share the CPU with the broker and the
responder, so the queue drains within milliseconds and what separates equal devices is
downstream of it (which device process gets the CPU, what each one's pace measures):
the devices getting the most are often ones never told to slow down.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.transport import MAX_CHUNK, ChunkClient, FetchConfig, MqttConfig, MqttConnection  # noqa: E402
from tests._broker import Mosquitto  # noqa: E402

FLEET = "bench"
TARGET = "targets/blob.bin"
LIFTED = ("bytes_per_s=1099511627776", "burst_bytes=1073741824")
GREEDY = {"window": 256, "batch": 64, "chunk_size": MAX_CHUNK, "min_chunk_size": MAX_CHUNK}


def worker(url: str, device: str, size: int, fetch: dict[str, int]) -> None:
    """One device: connect, say ready, download on "go", print its timeline as JSON."""
    conn = MqttConnection(MqttConfig(url=url, fleet=FLEET), name=device)
    conn.connect()
    client = ChunkClient(conn, device, config=FetchConfig(**fetch))
    stamps: list[tuple[float, int]] = []
    got = [0]

    def sink(b: bytes) -> None:
        got[0] += len(b)
        stamps.append((time.monotonic(), got[0]))  # CLOCK_MONOTONIC: one clock for all

    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    client.download(TARGET, sink, length=size)
    s = client.stats
    print(json.dumps({"device": device, "start": t0, "stamps": stamps,
                      "slowdowns": s.slowdowns, "resent": s.chunks_resent,
                      "timeouts": s.timeouts}), flush=True)
    client.close()
    conn.close()


def bytes_at(stamps: Sequence[Sequence[float]], t: float) -> float:
    """Bytes a device had received at time ``t`` (linear between its samples)."""
    prev_t, prev_b = stamps[0][0], 0.0
    for st, sb in stamps:
        if st >= t:
            if st == prev_t:
                return float(sb)
            return prev_b + (sb - prev_b) * (t - prev_t) / (st - prev_t)
        prev_t, prev_b = st, float(sb)
    return prev_b


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {k: float(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines())
            if k and not k.startswith("#")}


class Responder:
    def __init__(self, work: Path, broker: Mosquitto, limits: Sequence[str]) -> None:
        self.log = work / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("edge-sdk")), "serve", "--repo",
                 str(work / "repo"), "--broker", broker.url, "--fleet", FLEET,
                 "--only", "responder", "--metrics", "127.0.0.1:0",
                 *(f"--device-limit={kv}" for kv in limits)],
                stderr=out, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        end = time.monotonic() + 30
        while "serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"serve did not start: {self.log.read_text()}")
            time.sleep(0.05)
        m = re.search(r"responder metrics on (\S+)", self.log.read_text())
        assert m, self.log.read_text()
        self.metrics = m.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if os.environ.get("FAIR_DEBUG"):
            print(self.log.read_text())


def run(broker: Mosquitto, size: int, fetches: Sequence[dict[str, int]]) -> list[dict]:
    """Download with one process per device, all told "go" at once; their timelines."""
    procs = [subprocess.Popen(
        [sys.executable, "-u", __file__, "--worker", broker.url, f"dev{i}", str(size),
         json.dumps(f)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}) for i, f in enumerate(fetches)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            text, _ = p.communicate(timeout=600)
            out.append(json.loads(text.splitlines()[-1]))
            assert out[-1]["stamps"][-1][1] == size, out[-1]["device"]
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def shares(results: list[dict], labels: Sequence[str]) -> tuple[float, float]:
    """Print each device's throughput over the common interval and its ratio to an
    equal share; return (worst ratio's distance from 1, total MB/s)."""
    begin = max(r["start"] for r in results)
    end = min(r["stamps"][-1][0] for r in results)
    span = end - begin
    rates = [(bytes_at(r["stamps"], end) - bytes_at(r["stamps"], begin)) / span
             for r in results]
    total = sum(rates)
    fair = total / len(rates)
    print(f"  common interval {span:.2f} s, all together {total / 1e6:.1f} MB/s, "
          f"equal share {fair / 1e6:.1f} MB/s")
    for r, rate, label in zip(results, rates, labels, strict=True):
        whole = r["stamps"][-1][1] / (r["stamps"][-1][0] - r["start"])
        print(f"  {r['device']:6} {label:7} {rate / 1e6:7.1f} MB/s  {rate / fair:5.2f}× share"
              f"   (whole download {whole / 1e6:6.1f} MB/s, slow-downs {r['slowdowns']}, "
              f"resent {r['resent']}, timeouts {r['timeouts']})")
    return max(abs(rate / fair - 1) for rate in rates), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=16, help="file size per download")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", choices=("ten", "greedy", "lone"))
    ap.add_argument("--limit", action="append", default=[], metavar="KEY=N",
                    help="a serve --device-limit for every part (repeatable)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        url, device, size, fetch = args.worker
        worker(url, device, int(size), json.loads(fetch))
        return

    work = Path(tempfile.mkdtemp(prefix="edge-bench-fair-"))
    size = args.mb * 1024 * 1024
    (work / "repo" / "metadata").mkdir(parents=True)
    (work / "repo" / "targets").mkdir()
    (work / "repo" / TARGET).write_bytes(os.urandom(size))
    broker = Mosquitto(work / "broker")
    broker.start()
    print(f"{args.devices} devices × {args.mb} MiB, one responder, Mosquitto on "
          f"{broker.url}, cpus {os.cpu_count()}, device limits {args.limit or 'default'}")
    try:
        for rnd in range(args.rounds):
            if args.only in (None, "ten"):
                resp = Responder(work, broker, args.limit)
                try:
                    print(f"ten: {args.devices} devices, default FetchConfig, default budgets"
                          f" (round {rnd + 1})")
                    res = run(broker, size, [{}] * args.devices)
                    worst, _ = shares(res, ["default"] * args.devices)
                    print(f"  worst device {worst * 100:.0f} % from an equal share (goal ≤ 20 %);"
                          f" responder slow-downs "
                          f"{scrape(resp.metrics)['edge_responder_slow_downs_total']:.0f}")
                finally:
                    resp.stop()
            if args.only in (None, "greedy"):
                resp = Responder(work, broker, args.limit)
                try:
                    print(f"greedy: dev0 with window 256 × 127 KiB, batch 64; "
                          f"{args.devices - 1} default (round {rnd + 1})")
                    res = run(broker, size, [GREEDY] + [{}] * (args.devices - 1))
                    worst, _ = shares(res, ["greedy"] + ["default"] * (args.devices - 1))
                    print(f"  worst device {worst * 100:.0f} % from an equal share; responder "
                          f"slow-downs "
                          f"{scrape(resp.metrics)['edge_responder_slow_downs_total']:.0f}")
                finally:
                    resp.stop()
            if args.only in (None, "lone"):
                figures: dict[str, list[float]] = {}
                slowed: dict[str, int] = {}
                for name, limits in (("default", ()), ("lifted", LIFTED)) * 3:
                    resp = Responder(work, broker, (*args.limit, *limits))
                    try:
                        (r,) = run(broker, size, [{}])
                        rate = size / (r["stamps"][-1][0] - r["start"])
                        figures.setdefault(name, []).append(rate)
                        slowed[name] = slowed.get(name, 0) + r["slowdowns"]
                    finally:
                        resp.stop()
                d, u = (statistics.median(figures[k]) for k in ("default", "lifted"))
                print(f"lone device (round {rnd + 1}): default budgets {d / 1e6:.1f} MB/s, "
                      f"ceiling lifted {u / 1e6:.1f} MB/s: {d / u:.2f}× (median of 3 each, "
                      f"interleaved; slow-downs {slowed['default']} and {slowed['lifted']})")
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
