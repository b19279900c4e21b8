"""Deploying an artifact to an agent behind a thin link (as a device on a cellular link is).

The agent runs in its own network namespace, joined to ours by a veth pair shaped
with ``tc qdisc ... tbf`` in both directions; the broker (a real Mosquitto) and the
responder run here. For each rate a fresh agent (new device id, empty state) gets a
signed deployment of the same artifact, and the run measures:

- time / ideal: deployment published → ``committed`` reported, over artifact bytes /
  link rate (the artifact: the target files fetched, model and sample);
- bytes sent / artifact: every byte the responder sent (metadata included) over that;
- duplicates: chunks the responder sent more than once;
- failed attempts: ``failed`` events (transient ones included) of the deployment;
- tbf drops: packets the shaper dropped (its queue full).

    sudo .venv/bin/python bench/thin_link.py [--mb 3.05] [--rates 256k,1M,2M,10M]

Needs root (namespaces, tc). Goals: time ≤ 1.25× ideal, bytes ≤ 1.05×, 0 failed, at
every rate. Traffic stays on the veth pair and loopback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.transport import RepoResponder  # noqa: E402
from edge_sdk.transport import _chunks as proto  # noqa: E402
from tests import _models  # noqa: E402
from tests._broker import Mosquitto, free_port  # noqa: E402
from tests._e2e import AgentProc, Fleet  # noqa: E402
from tests._netns import ThinLink, unavailable  # noqa: E402


class CountingResponder(RepoResponder):
    """The real responder, counting what it sends per chunk (``answer`` is its hook)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.sent: dict[tuple[str, int], int] = {}
        self.by_path: dict[str, int] = {}
        self.duplicates = 0

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        resp = super().answer(req)
        if resp.status == proto.OK and resp.payload:
            with self.lock:
                key = (req.path, req.offset)
                if key in self.sent:
                    self.duplicates += 1
                self.sent[key] = len(resp.payload)
                self.by_path[req.path] = self.by_path.get(req.path, 0) + len(resp.payload)
        return resp

    def reset(self) -> None:
        with self.lock:
            self.sent.clear()
            self.by_path.clear()
            self.duplicates = 0
            self.stats.bytes_sent = 0

    def target_bytes(self) -> int:
        with self.lock:
            return sum(n for (path, _), n in self.sent.items() if path.startswith("targets/"))


def parse_rate(text: str) -> int:
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    t = text.strip().lower().removesuffix("bit").removesuffix("bps")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def label(rate: int) -> str:
    return f"{rate / 1e6:g} Mbit/s" if rate >= 1_000_000 else f"{rate / 1e3:g} kbit/s"


def run_rate(fleet: Fleet, responder: CountingResponder, link: ThinLink, url: str,
             tmp: Path, rate: int, version: str, timeout: float) -> dict[str, float]:
    link.shape(rate)
    device = f"thin-{rate}"
    agent = AgentProc(fleet, tmp, device, broker_url=url, wrap=link.wrap)
    agent.start()
    try:
        deadline = time.monotonic() + 60
        while device not in fleet.states and time.monotonic() < deadline:
            time.sleep(0.05)  # its retained state: the agent is connected and subscribed
        drops0 = link.drops()
        responder.reset()
        t0 = time.time()
        fleet.deploy(device, version)
        fleet.wait_event(device, "committed", version, timeout=timeout)
        took = fleet.last(device, "committed")["ts"] - t0
        failed = [e for e in fleet.events[device] if e["event"] == "failed"]
        art = responder.target_bytes()
        ideal = art / (rate / 8)
        return {"rate": rate, "time": took, "ideal": ideal, "art": art,
                "bytes": responder.stats.bytes_sent / art, "dups": responder.duplicates,
                "failed": len(failed), "drops": link.drops() - drops0}
    finally:
        agent.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=3.05, help="Model size in MiB.")
    ap.add_argument("--rates", default="256k,1M,2M,10M")
    ap.add_argument("--latency-ms", type=int, default=500,
                    help="tbf queue bound (what the link buffers).")
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"thin_link: {why}")
    rates = [parse_rate(r) for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-thin-"))
    rows = []
    try:
        with ThinLink(rates[0], latency_ms=args.latency_ms) as link:
            port = free_port()
            with Mosquitto(tmp / "broker", extra_conf=f"listener {port} {link.host_ip}\n") as b:
                fleet = Fleet(tmp / "fleet", b)
                try:
                    fleet.responder.stop()
                    responder = CountingResponder(fleet.host, fleet.repo.path)
                    responder.start()
                    fleet.responder = responder
                    size = int(args.mb * 1024 * 1024)
                    url = f"mqtt://{link.host_ip}:{port}"
                    for i, rate in enumerate(rates):
                        version = str(i + 1)
                        fleet.release(version, builder=lambda p, v=version: _models.
                                      padded_offset_model(p, float(v), size))
                        ideal = size * 8 / rate
                        row = run_rate(fleet, responder, link, url, tmp, rate, version,
                                       timeout=max(120.0, 4 * ideal))
                        rows.append(row)
                        print(f"{label(rate):>12}: {row['time']:7.1f} s vs {row['ideal']:6.1f} s "
                              f"ideal", file=sys.stderr, flush=True)
                finally:
                    fleet.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    art = rows[0]["art"] if rows else 0
    print(f"artifact {art / 2**20:.2f} MiB (model + sample), tbf both ways, queue "
          f"{args.latency_ms} ms; fresh agent per rate")
    print(f"{'link':>12}  {'time':>7}  {'ideal':>7}  {'time/ideal':>10}  {'bytes/artifact':>14}  "
          f"{'duplicates':>10}  {'failed':>6}  {'tbf drops':>9}")
    for r in rows:
        print(f"{label(int(r['rate'])):>12}  {r['time']:6.1f}s  {r['ideal']:6.1f}s  "
              f"{r['time'] / r['ideal']:9.2f}×  {r['bytes']:13.3f}×  {int(r['dups']):>10}  "
              f"{int(r['failed']):>6}  {int(r['drops']):>9}")
    ok = all(r["time"] <= 1.25 * r["ideal"] and r["bytes"] <= 1.05 and not r["failed"]
             for r in rows)
    print("goals (time ≤ 1.25× ideal, bytes ≤ 1.05×, 0 failed): "
          + ("met at every rate" if ok else "NOT met"))


if __name__ == "__main__":
    main()
