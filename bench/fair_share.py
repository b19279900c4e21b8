"""How one responder shares its capacity among devices downloading at once.

A private Mosquitto on a free port, one ``edge-sdk serve --only responder`` process,
and one process per device (its own connection, its own device id) running
``ChunkClient.download`` of the same file. Two set-ups, in one run:

- shaped:   the responder in its own network namespace, joined to the broker's by a
            veth pair shaped with ``tc qdisc ... tbf`` both ways (``--rate``, 200 Mbit/s
            by default); the devices on loopback beside the broker. The responder's
            link is the one shared resource and each device could take all of it:
            this is what the fair share is for. Also prints the total against the
            link rate (the share must not leave the link idle).
- loopback: everything on loopback (CPU-bound on a small host: see below).

and in each, these parts:

- ten:    ten devices with the default ``FetchConfig``, default budgets. Each device's
          throughput over the common interval (from the last start to the first end,
          when all ten are downloading) and its ratio to an equal share of what the
          ten got together. Goal: each within 20 % (0.80–1.20).
- greedy: the same with one device asking for as much as a ``FetchConfig`` allows
          (window 256, batch 64, 127 KiB chunks: the biggest window a fetcher can
          have): does its bigger burst of requests starve the others, or is it held
          below its share?
- lone:   one device alone. Shaped: its rate against the link's. Loopback: default
          budgets against the ceiling lifted (``bytes_per_s`` and ``burst_bytes``
          huge): the ratio is what the default ceiling costs a lone device (≈ 1.0).

    sudo .venv/bin/python -u bench/fair_share.py [--mb 16] [--devices 10] [--rate 200M]
        [--only ten|greedy|lone] [--setup shaped|loopback] [--rounds 1]

Each part also prints the responder's slow-down count and what waits in its process
(from its metrics page; the socket holds the rest of its queue). ``FAIR_TRACE=1`` prints
each device's bytes every half second, ``FAIR_DEBUG=1`` the responder's log.

What the responder can even out is what waits in its own queue. On a 2-core loopback
host the ten device processes share the CPU with the broker and the responder, so
the queue drains within milliseconds and what separates equal devices is downstream
of it (which device process gets the CPU, what each one's pace measures): the
loopback figures are of a CPU-bound host, not of the fair share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.transport import MAX_CHUNK, ChunkClient, FetchConfig, MqttConfig, MqttConnection  # noqa: E402
from tests._broker import Mosquitto, free_port  # noqa: E402
from tests._netns import ThinLink, unavailable  # noqa: E402

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
    """``edge-sdk serve --only responder`` on ``url``; inside ``link``'s namespace if given
    (its metrics page then listens on the namespace's end of the veth pair)."""

    def __init__(self, work: Path, url: str, limits: Sequence[str],
                 link: ThinLink | None = None) -> None:
        self.log = work / f"serve-{time.monotonic_ns()}.log"
        metrics = "127.0.0.1:0" if link is None else f"{link.device_ip}:0"
        argv = [str(Path(sys.executable).with_name("edge-sdk")), "serve", "--repo",
                str(work / "repo"), "--broker", url, "--fleet", FLEET,
                "--only", "responder", "--metrics", metrics,
                *(f"--device-limit={kv}" for kv in limits)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv if link is None else link.wrap(argv),
                stderr=out, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            end = time.monotonic() + 30
            while "serving" not in self.log.read_text():
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"serve did not start: {self.log.read_text()}")
                time.sleep(0.05)
            m = re.search(r"responder metrics on (\S+)", self.log.read_text())
            assert m, self.log.read_text()
            self.metrics = m.group(1)
        except BaseException:
            self.stop()
            raise

    def slow_downs(self) -> float:
        return scrape(self.metrics)["edge_responder_slow_downs_total"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if os.environ.get("FAIR_DEBUG"):
            print(self.log.read_text())


def run(broker: Mosquitto, size: int, fetches: Sequence[dict[str, int]]) -> list[dict]:
    """Download with one process per device (on loopback beside the broker), all told
    "go" at once; their timelines."""
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
            text, _ = p.communicate(timeout=300)
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
    if os.environ.get("FAIR_TRACE"):
        t0 = min(r["start"] for r in results)
        for r in results:
            print(f"  {r['device']:6} start +{r['start'] - t0:.2f} s, MiB at each 0.5 s:",
                  " ".join(f"{bytes_at(r['stamps'], t0 + k / 2) / 2**20:.0f}"
                           for k in range(int((r['stamps'][-1][0] - t0) * 2) + 2)))
    return max(abs(rate / fair - 1) for rate in rates), total


def spread(name: str, resp: Responder, broker: Mosquitto, size: int,
           fetches: Sequence[dict[str, int]], labels: Sequence[str],
           link_rate: float | None) -> tuple[float, float]:
    """One part with many devices: their shares, the worst, the total against the link."""
    queued: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            with contextlib.suppress(OSError, KeyError):
                queued.append(scrape(resp.metrics)["edge_responder_queued_bytes"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        res = run(broker, size, fetches)
    finally:
        done.set()
        sampler.join()
    worst, total = shares(res, labels)
    versus = "" if link_rate is None else \
        f"; all together {total * 8 / link_rate:.2f}× the link's {link_rate / 1e6:g} Mbit/s"
    busy = statistics.median(queued) / 2**20 if queued else float("nan")
    print(f"  {name}: worst device {worst * 100:.0f} % from an equal share (goal ≤ 20 %)"
          f"{versus}; responder slow-downs {resp.slow_downs():.0f}, waiting in its process "
          f"{busy:.2f} MiB (median of {len(queued)} samples)")
    return worst, total


def parts(args: argparse.Namespace, work: Path, broker: Mosquitto, url: str, size: int,
          link: ThinLink | None, rnd: int) -> None:
    where = "loopback, CPU-bound" if link is None else \
        f"shaped, responder behind {link.rate_bit / 1e6:g} Mbit/s"
    rate = None if link is None else float(link.rate_bit)
    n = args.devices
    if args.only in (None, "ten"):
        resp = Responder(work, url, args.limit, link)
        try:
            print(f"[{where}] ten: {n} devices, default FetchConfig, default budgets "
                  f"(round {rnd + 1})")
            spread("ten", resp, broker, size, [{}] * n, ["default"] * n, rate)
        finally:
            resp.stop()
    if args.only in (None, "greedy"):
        resp = Responder(work, url, args.limit, link)
        try:
            print(f"[{where}] greedy: dev0 with window 256 × 127 KiB, batch 64; "
                  f"{n - 1} default (round {rnd + 1})")
            spread("greedy", resp, broker, size, [GREEDY] + [{}] * (n - 1),
                   ["greedy"] + ["default"] * (n - 1), rate)
        finally:
            resp.stop()
    if args.only in (None, "lone") and link is not None:
        resp = Responder(work, url, args.limit, link)
        try:
            (r,) = run(broker, size, [{}])
            got = size / (r["stamps"][-1][0] - r["start"])
            print(f"[{where}] lone device (round {rnd + 1}): {got * 8 / 1e6:.0f} Mbit/s, "
                  f"{got * 8 / link.rate_bit:.2f}× the link (whole download, start-up "
                  f"included; slow-downs {r['slowdowns']})")
        finally:
            resp.stop()
    if args.only in (None, "lone") and link is None:
        figures: dict[str, list[float]] = {}
        slowed: dict[str, int] = {}
        for name, limits in (("default", ()), ("lifted", LIFTED)) * 3:
            resp = Responder(work, url, (*args.limit, *limits))
            try:
                (r,) = run(broker, size, [{}])
                figures.setdefault(name, []).append(size / (r["stamps"][-1][0] - r["start"]))
                slowed[name] = slowed.get(name, 0) + r["slowdowns"]
            finally:
                resp.stop()
        d, u = (statistics.median(figures[k]) for k in ("default", "lifted"))
        print(f"[{where}] lone device (round {rnd + 1}): default budgets {d / 1e6:.1f} MB/s, "
              f"ceiling lifted {u / 1e6:.1f} MB/s: {d / u:.2f}× (median of 3 each, "
              f"interleaved; slow-downs {slowed['default']} and {slowed['lifted']})")


def parse_rate(text: str) -> int:
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    t = text.strip().lower().removesuffix("bit")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=16, help="file size per download (shaped)")
    ap.add_argument("--loopback-mb", type=int, default=96,
                    help="file size per download on loopback (long enough to measure there)")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rate", default="200M", help="the responder's link, shaped set-up")
    ap.add_argument("--latency-ms", type=int, default=20,
                    help="tbf's queue bound on the responder's link")
    ap.add_argument("--only", choices=("ten", "greedy", "lone"))
    ap.add_argument("--setup", choices=("shaped", "loopback"))
    ap.add_argument("--limit", action="append", default=[], metavar="KEY=N",
                    help="a serve --device-limit for every part (repeatable)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        url, device, size, fetch = args.worker
        worker(url, device, int(size), json.loads(fetch))
        return
    why = unavailable() if args.setup != "loopback" else None
    if why and args.setup == "shaped":
        raise SystemExit(f"fair_share: {why}")

    work = Path(tempfile.mkdtemp(prefix="edge-bench-fair-"))
    (work / "repo" / "metadata").mkdir(parents=True)
    (work / "repo" / "targets").mkdir()

    def blob(mb: int) -> int:
        size = mb * 1024 * 1024
        (work / "repo" / TARGET).write_bytes(os.urandom(size))
        return size

    print(f"{args.devices} devices × {args.mb} MiB (shaped) or {args.loopback_mb} MiB "
          f"(loopback), one responder, cpus {os.cpu_count()}, device limits "
          f"{args.limit or 'default'}")
    try:
        if args.setup != "loopback":
            size = blob(args.mb)
            if why:
                print(f"shaped set-up skipped: {why}")
            else:
                with ThinLink(parse_rate(args.rate), latency_ms=args.latency_ms) as link:
                    port = free_port()
                    with Mosquitto(work / "broker-shaped",
                                   extra_conf=f"listener {port} {link.host_ip}\n") as broker:
                        for rnd in range(args.rounds):
                            parts(args, work, broker, f"mqtt://{link.host_ip}:{port}", size,
                                  link, rnd)
        if args.setup != "shaped":
            size = blob(args.loopback_mb)
            with Mosquitto(work / "broker") as broker:
                for rnd in range(args.rounds):
                    parts(args, work, broker, broker.url, size, None, rnd)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
