"""Deploying an artifact to an agent behind a shaped link, from a cellular modem (256 kbit/s)
to a factory LAN (1 Gbit/s).

The agent runs in its own network namespace, joined to ours by a veth pair shaped
with ``tc qdisc ... tbf`` in both directions; the broker (a real Mosquitto) and the
responder run here. For each rate a fresh agent (new device id, empty state) gets a
signed deployment of an artifact sized for that rate, and the run measures:

- e2e / ideal: deployment published → ``committed`` reported (refresh, download,
  verification, load, smoke test, health window), over artifact bytes / link rate
  (the artifact: the target files fetched, model and sample);
- dl / ideal: first target byte answered → ``downloaded`` reported, the transfer
  alone (at 1 Gbit/s the install steps around it take as long as the transfer);
  before / after: the seconds around it (refresh of the metadata; verification, load,
  smoke test and health window); cpu: cores busy during the download in the agent, the
  broker and this process (the responder), which tells a CPU limit from a pace limit;
  mid / link, start+, tail: the send rate from 10 % to 90 % of the bytes over the link
  rate (≈0.95: TCP/IP headers take the rest), how much longer the first 10 % took than
  at that rate (start-up; negative when it filled the queues faster than the link
  drains them), and last chunk sent → downloaded (the queue draining, the sample file,
  the staging of the artifact);
- paho / ideal and tcp / ideal: the same bytes over the same link, without the SDK,
  measured in the same run: a raw paho QoS 1 publish → subscribe loop through the same
  broker in chunks of the agent's size, and one plain TCP stream across the veth pair
  (what the shaper lets through: ≈1.045, its header overhead, when tbf carries the
  rate);
- bytes sent / artifact: every byte the responder sent (metadata included) over that;
- duplicates: chunks the responder sent more than once;
- failed attempts: ``failed`` events (transient ones included) of the deployment;
- slowed: ``SLOW_DOWN`` answers (the responder's per-device budget);
- tbf drops: packets the shaper dropped (its queue full).

    sudo .venv/bin/python -u bench/thin_link.py [--rates 256k,1M,2M,10M,100M,1G]
        [--budgets default,lifted] [--seconds 4] [--max-mb 64] [--agent-code DIR]
        [--mosquitto-defaults] [--profile DIR]

Artifact size per rate: the larger of ``--mb`` (3.05 MiB: what the thin rates always
used) and ``--seconds`` of the link's rate, capped at ``--max-mb``. 100 Mbit/s gets
≈48 MiB (4 s). 1 Gbit/s would want 500 MB for 4 s, but a run keeps about five copies
of each artifact (source, artifact dir, repository, the agent's download and model)
and the agent loads the model into memory, so the cap of 64 MiB (0.54 s at 1 Gbit/s,
still hundreds of sub-millisecond round trips past any start-up) keeps a run within
what a CI machine's disk and RAM take; 128 and 256 MiB gave the same transfer
ratios. ``--budgets default,lifted`` runs each rate twice, against the responder's
default per-device budget and with it lifted, side by side. ``--agent-code DIR`` runs
the agents from another checkout (a branch under test); the broker and the responder
stay this checkout's.

Needs root (namespaces, tc). Goals: transfer (dl) ≤ 1.25× ideal, bytes ≤ 1.05×, 0
failed, at every rate. The goal is judged on the transfer, not on e2e: the install
steps after it take about half a second whatever the link (0.5-0.6 s for 48-64 MiB
here), which is nothing at 256 kbit/s and as long as the whole transfer at 1 Gbit/s.
Traffic stays on the veth pair and loopback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_sdk.transport import DeviceLimits, FetchConfig, RepoResponder, ResponderConfig  # noqa: E402
from edge_sdk.transport import _chunks as proto  # noqa: E402
from tests import _models  # noqa: E402
from tests._broker import Mosquitto, free_port  # noqa: E402
from tests._e2e import AgentProc, Fleet  # noqa: E402
from tests._netns import ThinLink, unavailable  # noqa: E402

MiB = 1024 * 1024
#: The responder's per-device budgets (bytes and requests per second) out of the way
#: (the ``lifted`` runs): what the transfer does when the link, not the policy, is the
#: limit. The bounds on responses waiting to be written stay: they are back-pressure.
LIFTED = ResponderConfig(limits=DeviceLimits(
    bytes_per_s=1 << 40, burst_bytes=1 << 30, requests_per_s=1e6, burst_requests=1_000_000))
BUDGETS = {"default": ResponderConfig(), "lifted": LIFTED}
#: Mosquitto's own limits, which tests/_broker.py raises (the last setting counts).
MOSQUITTO_DEFAULTS = "max_inflight_messages 20\nmax_queued_messages 1000\n"


class CountingResponder(RepoResponder):
    """The real responder, counting what it sends per chunk (``answer`` is its hook)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        #: (path, offset) → (bytes, when last answered: wall clock, as the agents' reports).
        self.sent: dict[tuple[str, int], tuple[int, float]] = {}
        self.first_target: float | None = None

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        resp = super().answer(req)
        if resp.status == proto.OK and resp.payload:
            with self.lock:
                now = time.time()
                self.sent[(req.path, req.offset)] = (len(resp.payload), now)
                if self.first_target is None and req.path.startswith("targets/"):
                    self.first_target = now
        return resp

    @property
    def duplicates(self) -> int:
        """Chunks sent more than once. Not counted in ``answer``: the responder reads a
        chunk before its budget check and may then answer ``SLOW_DOWN`` instead; every
        chunk asked for is sent at least once by the end of a transfer."""
        with self.lock:
            return self.stats.chunks - len(self.sent)

    def reset(self) -> None:
        with self.lock:
            self.sent.clear()
            self.first_target = None
            self.stats.bytes_sent = self.stats.chunks = self.stats.slowed = 0

    def target_bytes(self) -> int:
        with self.lock:
            return sum(n for (path, _), (n, _) in self.sent.items()
                       if path.startswith("targets/"))

    def shape(self) -> dict[str, float]:
        """The transfer's shape from when each target chunk was last answered (sent, when
        nothing was slowed down): ``mid`` the rate (bytes/s) from 10 % to 90 % of the
        bytes, ``start`` how much longer the first 10 % took than at that rate (the
        start-up's cost), ``last`` when the last chunk went (wall clock)."""
        with self.lock:
            got = sorted((t, n) for (path, _), (n, t) in self.sent.items()
                         if path.startswith("targets/"))
        if len(got) < 10 or self.first_target is None:
            return {}
        total = sum(n for _, n in got)
        done, t10, t90, b10, b90 = 0, 0.0, 0.0, 0, 0
        for t, n in got:
            done += n
            if not t10 and done >= 0.1 * total:
                t10, b10 = t, done
            if not t90 and done >= 0.9 * total:
                t90, b90 = t, done
        mid = (b90 - b10) / (t90 - t10) if t90 > t10 else 0.0
        start = (t10 - self.first_target) - (b10 / mid if mid else 0.0)
        return {"mid": mid, "start": start, "last": got[-1][0]}


# -- the same bytes without the SDK ---------------------------------------------------------

#: The raw loop's flow control: the subscriber says every ACK_EVERY messages how many it
#: has, and the publisher stays at most AHEAD messages (16 MiB of 64 KiB chunks, 130 ms
#: of 1 Gbit/s) ahead, well under a default Mosquitto's queue per client (1000
#: messages) past which it drops QoS 1 messages.
ACK_EVERY, AHEAD = 16, 256

RAW_SUBSCRIBER = """
import sys, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
every = int(sys.argv[6])
got, n, done, subscribed = [0], [0], threading.Event(), threading.Event()
def on_message(c, u, m):
    got[0] += len(m.payload)
    n[0] += 1
    if n[0] % every == 0:
        c.publish(topic + "/ack", str(n[0]), qos=0)
    if got[0] >= total:
        done.set()
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=topic + "-sub")
c.on_message = on_message
c.on_subscribe = lambda *a: subscribed.set()
c.connect(host, port)
c.subscribe(topic, 1)
c.loop_start()
subscribed.wait(30)
print("ready", flush=True)
print("done" if done.wait(float(sys.argv[5])) else f"lost {total - got[0]}", flush=True)
"""

RAW_SINK = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
total, got = int(sys.argv[2]), 0
while got < total:
    b = c.recv(1 << 20)
    if not b:
        break
    got += len(b)
c.sendall(b"k")
"""


def _inside(link: ThinLink, code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(link.wrap([sys.executable, "-c", code, *map(str, args)]),
                            stdout=subprocess.PIPE, text=True)


def raw_paho(link: ThinLink, broker: Mosquitto, link_port: int, size: int, chunk: int,
             timeout: float) -> float:
    """Seconds a paho QoS 1 publisher here takes to get ``size`` bytes, in ``chunk``-byte
    messages through ``broker`` (here on loopback, as the responder), to a subscriber in
    the namespace on ``link_port`` (the agent's path)."""
    topic = f"bench/raw{os.getpid()}"
    sub = _inside(link, RAW_SUBSCRIBER, link.host_ip, link_port, topic, size, timeout,
                  ACK_EVERY)
    pub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                      client_id=f"{topic}-pub")
    acked = [0]
    moved = threading.Condition()

    def on_ack(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        with moved:
            acked[0] = max(acked[0], int(m.payload))
            moved.notify()

    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("raw subscriber did not start")
        data = os.urandom(size)
        pub.max_inflight_messages_set(64)
        pub.on_message = on_ack
        pub.connect(broker.host, broker.port)
        pub.subscribe(f"{topic}/ack", 0)
        pub.loop_start()
        time.sleep(0.2)  # subscribed to the acknowledgements
        t0 = time.perf_counter()
        for i, off in enumerate(range(0, size, chunk)):
            with moved:
                while i - acked[0] >= AHEAD:
                    if not moved.wait(timeout):
                        raise RuntimeError("raw paho loop: the subscriber stopped acking")
            pub.publish(topic, data[off:off + chunk], qos=1)
        said = sub.stdout.readline().strip()
        took = time.perf_counter() - t0
        if said != "done":
            raise RuntimeError(f"raw paho loop: {said or 'no answer'}")
        return took
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.kill()
        sub.wait(10)


def raw_tcp(link: ThinLink, size: int) -> float:
    """Seconds one TCP stream from here takes to push ``size`` bytes to a sink in the
    namespace (what the shaper itself carries)."""
    sink = _inside(link, RAW_SINK, link.device_ip, size)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        data = os.urandom(size)
        with socket.create_connection((link.device_ip, port), timeout=120) as s:
            t0 = time.perf_counter()
            s.sendall(data)
            if s.recv(1) != b"k":
                raise RuntimeError("raw TCP sink closed early")
            return time.perf_counter() - t0
    finally:
        sink.kill()
        sink.wait(10)


# -- where the CPU goes --------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuSampler:
    """CPU seconds of named processes, sampled every ``every`` seconds on a thread with
    wall-clock stamps, so a window (the download) can be cut out afterwards."""

    def __init__(self, pids: dict[str, int], every: float = 0.02) -> None:
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), {k: cpu_seconds(p) for k, p in self.pids.items()}))
            self._stop.wait(self.every)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def share(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per wall second of each process between ``t0`` and ``t1``
        (1.0: one core busy all the time)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (a, ca), (b, cb) = inside[0], inside[-1]
        return {k: (cb[k] - ca[k]) / (b - a) for k in self.pids}


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid``'s Python stacks (every thread) into ``out`` (collapsed stacks) until
    interrupted."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("thin_link: --profile needs py-spy on PATH (pip install py-spy)")
    spy = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "500", "--threads",
                            "--nonblocking", "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the transfer starts
    return spy


# -- one deployment ------------------------------------------------------------------------

def parse_rate(text: str) -> int:
    units = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    t = text.strip().lower().removesuffix("bit").removesuffix("bps")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def label(rate: int) -> str:
    if rate >= 1_000_000_000:
        return f"{rate / 1e9:g} Gbit/s"
    return f"{rate / 1e6:g} Mbit/s" if rate >= 1_000_000 else f"{rate / 1e3:g} kbit/s"


def artifact_size(rate: int, mb: float, seconds: float, max_mb: float) -> int:
    """Model bytes for ``rate``: ``seconds`` of the link, at least ``mb`` and at most
    ``max_mb`` MiB (see the module doc for why the cap)."""
    return int(min(max_mb * MiB, max(mb * MiB, rate / 8 * seconds)))


def code_wrap(link: ThinLink, code: str | None) -> object:
    """How agents start: inside the namespace, from ``code`` (a checkout) if given. The
    agent runs ``python -m device_agent`` in its working directory, which comes first on
    its import path, so the checkout is both its working directory and PYTHONPATH."""
    if code is None:
        return link.wrap

    def wrap(argv: Sequence[str]) -> list[str]:
        return link.wrap(["env", "-C", code, f"PYTHONPATH={code}", *argv])
    return wrap


def run_one(fleet: Fleet, responder: CountingResponder, link: ThinLink, url: str, tmp: Path,
            rate: int, budget: str, version: str, timeout: float,
            agent_code: str | None, profile: Path | None) -> dict[str, Any]:
    # A device id of its own per row: a new agent of an earlier row's id would first
    # fetch the deployment still retained for that id.
    device = f"thin-{version}-{budget}"
    agent = AgentProc(fleet, tmp, device, broker_url=url,
                      wrap=code_wrap(link, agent_code))  # type: ignore[arg-type]
    agent.start()
    try:
        deadline = time.monotonic() + 60
        while device not in fleet.states and time.monotonic() < deadline:
            time.sleep(0.05)  # its retained state: the agent is connected and subscribed
        drops0 = link.drops()
        responder.reset()
        assert agent.proc is not None and fleet.broker.proc is not None
        pids = {"agent": agent.proc.pid, "broker": fleet.broker.proc.pid, "host": os.getpid()}
        spies = [] if profile is None else [
            py_spy(pid, profile / f"{device}-{name}.txt") for name, pid in pids.items()
            if name != "broker"]
        with CpuSampler(pids) as cpu:
            t0 = time.time()
            fleet.deploy(device, version)
            try:
                fleet.wait_event(device, "committed", version, timeout=timeout)
            finally:
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
        took = fleet.last(device, "committed")["ts"] - t0
        downloaded = fleet.last(device, "downloaded")["ts"]
        failed = [e for e in fleet.events[device] if e["event"] == "failed"]
        art = responder.target_bytes()
        first = responder.first_target or t0
        shape = responder.shape()
        return {"mid": shape.get("mid", 0.0) * 8 / rate, "start": shape.get("start", 0.0),
                "tail": downloaded - shape.get("last", downloaded),
                **{f"cpu_{k}": v for k, v in cpu.share(first, downloaded).items()},
                "rate": rate, "time": took, "ideal": art / (rate / 8), "art": art,
                "dl": downloaded - first, "pre": first - t0,
                "post": took - (downloaded - t0),
                "bytes": responder.stats.bytes_sent / art, "dups": responder.duplicates,
                "failed": len(failed), "slowed": responder.stats.slowed,
                "drops": link.drops() - drops0}
    finally:
        agent.stop()
        shutil.rmtree(agent.dir, ignore_errors=True)  # its copy of a large artifact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=3.05, help="Smallest model size in MiB.")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="Size each artifact so the ideal transfer lasts this long.")
    ap.add_argument("--max-mb", type=float, default=64.0, help="Largest model size in MiB.")
    ap.add_argument("--rates", default="256k,1M,2M,10M,100M,1G")
    ap.add_argument("--budgets", default="default",
                    help="Responder budgets per rate: default, lifted or both (comma).")
    ap.add_argument("--raw-max-s", type=float, default=20.0,
                    help="Measure the raw paho and TCP loops where the ideal time is at "
                         "most this (they take as long as the transfer).")
    ap.add_argument("--raw-chunk", type=int, default=FetchConfig.chunk_size,
                    help="Message size of the raw paho loop (the agent's chunk size).")
    ap.add_argument("--latency-ms", type=int, default=500,
                    help="tbf queue bound (what the link buffers).")
    ap.add_argument("--agent-code", default=None,
                    help="Run the agents from this checkout (a branch under test).")
    ap.add_argument("--mosquitto-defaults", action="store_true",
                    help="Mosquitto's own queue limits (what users run) instead of the "
                         "test broker's raised ones.")
    ap.add_argument("--profile", type=Path, default=None,
                    help="Record py-spy stacks of the agent and of this process (the "
                         "responder) during each deployment into this directory.")
    args = ap.parse_args()
    profile = args.profile.resolve() if args.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    why = unavailable()
    if why:
        raise SystemExit(f"thin_link: {why}")
    rates = [parse_rate(r) for r in args.rates.split(",")]
    budgets = [b.strip() for b in args.budgets.split(",")]
    if unknown := [b for b in budgets if b not in BUDGETS]:
        raise SystemExit(f"thin_link: unknown --budgets {unknown} (default, lifted)")
    agent_code = str(Path(args.agent_code).resolve()) if args.agent_code else None
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-thin-"))
    rows: list[dict[str, Any]] = []
    try:
        with ThinLink(rates[0], latency_ms=args.latency_ms) as link:
            port = free_port()
            conf = f"listener {port} {link.host_ip}\n" + (MOSQUITTO_DEFAULTS if
                                                           args.mosquitto_defaults else "")
            with Mosquitto(tmp / "broker", extra_conf=conf) as b:
                fleet = Fleet(tmp / "fleet", b)
                try:
                    fleet.responder.stop()
                    url = f"mqtt://{link.host_ip}:{port}"
                    for i, rate in enumerate(rates):
                        link.shape(rate)
                        version = str(i + 1)
                        size = artifact_size(rate, args.mb, args.seconds, args.max_mb)
                        fleet.release(version, builder=partial(
                            _models.padded_offset_model, offset=float(version), pad_bytes=size))
                        ideal = size * 8 / rate
                        raw: dict[str, float] = {}
                        for budget in budgets:
                            fleet.responder.stop()
                            responder = CountingResponder(fleet.host, fleet.repo.path,
                                                          config=BUDGETS[budget])
                            responder.start()
                            fleet.responder = responder
                            row = run_one(fleet, responder, link, url, tmp, rate, budget,
                                          version, max(120.0, 4 * ideal), agent_code,
                                          profile)
                            if not raw and ideal <= args.raw_max_s:
                                art = int(row["art"])
                                raw["paho"] = raw_paho(link, b, port, art, args.raw_chunk,
                                                       max(60.0, 4 * ideal))
                                raw["tcp"] = raw_tcp(link, art)
                            row.update(raw)
                            row["budget"] = budget
                            rows.append(row)
                            print(f"{label(rate):>12} {budget:>7}: {row['time']:7.2f} s vs "
                                  f"{row['ideal']:6.2f} s ideal", file=sys.stderr, flush=True)
                        shutil.rmtree(fleet.arts / f"adder-{version}", ignore_errors=True)
                finally:
                    fleet.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args.latency_ms, agent_code, args.mosquitto_defaults)


def report(rows: list[dict[str, Any]], latency_ms: int, agent_code: str | None,
           mosquitto_defaults: bool) -> None:
    def ratio(r: dict[str, Any], key: str) -> str:
        return f"{r[key] / r['ideal']:6.2f}×" if key in r else f"{'-':>7}"

    print(f"tbf both ways, queue {latency_ms} ms; fresh agent per row; Mosquitto "
          + ("defaults" if mosquitto_defaults else "with raised queue limits")
          + (f"; agents from {agent_code}" if agent_code else ""))
    print(f"{'link':>12} {'budget':>7} {'MiB':>6} {'ideal':>7} {'dl/ideal':>8} "
          f"{'e2e/ideal':>9} {'paho':>7} {'tcp':>7} {'bytes/art':>9} {'dups':>5} "
          f"{'failed':>6} {'slowed':>6} {'drops':>6}")
    for r in rows:
        print(f"{label(int(r['rate'])):>12} {r['budget']:>7} {r['art'] / MiB:6.1f} "
              f"{r['ideal']:6.2f}s {ratio(r, 'dl'):>8} {ratio(r, 'time'):>9} "
              f"{ratio(r, 'paho')} {ratio(r, 'tcp')} {r['bytes']:8.3f}× {int(r['dups']):>5} "
              f"{int(r['failed']):>6} {int(r['slowed']):>6} {int(r['drops']):>6}")
    print("dl: first target byte → downloaded; e2e: deployment → committed; paho, tcp: the "
          "same bytes over the same link without the SDK (raw paho QoS 1 loop; one TCP "
          "stream); all over the ideal time (bytes / link rate)")
    print(f"\n{'link':>12} {'budget':>7} {'before':>7} {'after':>6} {'tail':>6} "
          f"{'start+':>6} {'mid/link':>8} {'cpu:agent':>9} {'broker':>6} {'host':>6}")
    for r in rows:
        print(f"{label(int(r['rate'])):>12} {r['budget']:>7} {r['pre']:6.2f}s "
              f"{r['post']:5.2f}s {r['tail']:5.2f}s {r['start']:5.2f}s {r['mid']:7.2f}× "
              f"{r.get('cpu_agent', 0):9.2f} {r.get('cpu_broker', 0):6.2f} "
              f"{r.get('cpu_host', 0):6.2f}")
    print("where the time goes: before (deployment → first target byte), after "
          "(downloaded → committed), tail (last chunk sent → downloaded), start+ (first "
          "10 % of the bytes beyond the mid rate), mid/link (send rate from 10 % to 90 % "
          "over the link rate; ≈0.95 is the link full), cpu (cores busy during the "
          "download: agent, Mosquitto, this process with the responder)")
    ok = all(r["dl"] <= 1.25 * r["ideal"] and r["bytes"] <= 1.05 and not r["failed"]
             for r in rows)
    print("goals (transfer ≤ 1.25× ideal, bytes ≤ 1.05×, 0 failed): "
          + ("met at every rate" if ok else "NOT met"))


if __name__ == "__main__":
    main()
