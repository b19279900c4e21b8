"""An honest device's pull while another device floods the responder, vs no flood.

The fleet as it runs: a real Mosquitto with the example ACL and the example config's
queue limits, a real ``edge-sdk serve --only responder`` (with ``--metrics``), one
device flooding its own request topic with valid chunk requests as fast as a raw socket
goes (``tests/_mqttflood.py``), and real ``edge-sdk pull`` processes of honest devices
(their own credentials) of a released model. Measured, side by side:

- honest only:  a pull with nobody flooding (the baseline, the median of ``rounds``);
- during flood: a pull started ``lead_s`` into the flood: its time, and when it ended
  relative to the flood's end;
- after flood:  a pull started as the flood ends: its time (the issue's acceptance:
  it succeeds within 30 s of the flood's end, without restarting serve);
- the flood (requests, rate) and what the responder did with it (dropped before any
  work, answered, slowed, watchdog stalls).

    .venv/bin/python -m bench._abuse_requests [--flood-s 10] [--mb 2.4] [--rounds 3]
        [--no-queues] [--flooder '--qos 1 --pad 60000 --no-read']

``request_flood(...)`` is what ``bench/fleet_abuse.py`` calls. ``--no-queues`` keeps
the test broker's queue limits (nothing in flight capped, 100000 queued) instead of
the example config's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_sdk.release import Repository  # noqa: E402
from tests._acl import FLEET, example_broker  # noqa: E402
from tests._trust_env import make_artifact  # noqa: E402

EDGE_SDK = str(Path(sys.executable).with_name("edge-sdk"))
FLOODER, HONEST = "flooder", ("honest-a", "honest-b", "honest-c")


@dataclass
class _Fleet:
    url: str
    host: str
    port: int
    creds: dict[str, str]
    repo: Path
    target: str
    metrics: str
    work: Path


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {k: float(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines())
            if k and not k.startswith("#")}


@contextmanager
def _fleet(work: Path, mb: float, queues: bool) -> Iterator[_Fleet]:
    repo = Repository.init(work / "repo", work / "keys")
    art = make_artifact(work / "arts", "m", "1.0", n=int(mb * 1e6 / 4), sample=False)
    rel = repo.add_artifact(art.path)
    d, _, base = rel.path.rpartition("/")
    with example_broker(work, {dev: [] for dev in (FLOODER, *HONEST)}, queues=queues) \
            as (broker, creds):
        log = work / "serve.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [EDGE_SDK, "serve", "--repo", str(repo.path), "--broker", broker.url,
                 "--fleet", FLEET, "--username", "edge-repo", "--only", "responder",
                 "--metrics", "127.0.0.1:0"],
                stderr=out, env={**os.environ, "EDGE_MQTT_PASSWORD": creds["edge-repo"]})
        try:
            end = time.monotonic() + 60
            while "serving" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"edge-sdk serve did not start: {log.read_text()}")
                time.sleep(0.1)
            m = re.search(r"responder metrics on (\S+)", log.read_text())
            assert m is not None
            yield _Fleet(broker.url, broker.host, broker.port, creds, repo.path,
                         f"targets/{d}/{rel.sha256}.{base}", m.group(1), work)
            if proc.poll() is not None:
                raise SystemExit(f"edge-sdk serve died: {log.read_text()[-2000:]}")
        finally:
            proc.terminate()
            proc.wait(10)


def _start_pull(f: _Fleet, device: str, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [EDGE_SDK, "pull", "m", "--root", str(f.repo / "metadata" / "root.json"),
         "--device", device, "-q", "-o", str(f.work / f"pulled-{tag}"),
         "--state", str(f.work / f"state-{tag}"), "--broker", f.url, "--fleet", FLEET,
         "--username", device],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_MQTT_PASSWORD": f.creds[device]})


def _finish(proc: subprocess.Popen[str], started: float, limit: float) -> float | None:
    """Seconds from ``started`` to the pull's success; None if it failed or ran past
    ``limit`` seconds (then it is killed)."""
    try:
        proc.communicate(timeout=max(1.0, started + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return time.monotonic() - started if proc.returncode == 0 else None


def request_flood(*, flood_s: float = 10.0, mb: float = 2.4, rounds: int = 3,
                  lead_s: float = 2.0, queues: bool = True, limit_s: float = 120.0,
                  flooder_args: Sequence[str] = (),
                  say: Callable[[str], object] = print) -> dict[str, float | None]:
    """Run the scenario of the module doc once and print its figures (via ``say``);
    returns them (seconds; None for a pull that failed or took over ``limit_s``).
    ``flooder_args`` go to ``tests._mqttflood`` (``--qos 1``, ``--pad N``, ``--no-read``)."""
    with tempfile.TemporaryDirectory(prefix="bench-req-flood-") as tmp, \
            _fleet(Path(tmp), mb, queues) as f:
        base = []
        for i in range(rounds):
            t0 = time.monotonic()
            base.append(_finish(_start_pull(f, HONEST[0], f"base{i}"), t0, limit_s))
        before = _scrape(f.metrics)
        flooder = subprocess.Popen(
            [sys.executable, "-m", "tests._mqttflood", "--host", f.host, "--port",
             str(f.port), "--user", FLOODER, "--password", f.creds[FLOODER], "--fleet", FLEET,
             "--path", f.target, "--seconds", str(flood_s), *flooder_args],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert flooder.stdout is not None
        flooder.stdout.readline()  # "flooding"
        time.sleep(lead_s)
        t_during = time.monotonic()
        during = _start_pull(f, HONEST[1], "during")
        out, _ = flooder.communicate(timeout=flood_s + 120)
        flood_end = time.monotonic()
        after_s = _finish(_start_pull(f, HONEST[2], "after"), flood_end, limit_s)
        during_s = _finish(during, t_during, limit_s)
        after = _scrape(f.metrics)
    flood = json.loads(out.splitlines()[-1])
    ok = [b for b in base if b is not None]
    honest = statistics.median(ok) if ok else None

    def secs(v: float | None) -> str:
        return "FAILED" if v is None else f"{v:6.1f} s"

    def ratio(v: float | None) -> str:
        return f"{v / honest:5.1f}x" if v is not None and honest else "   -  "

    during_end = None if during_s is None else during_s - (flood_end - t_during)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    say(f"request flood: {flood['requests']} requests in {flood['seconds']} s "
        f"({flood['per_s']}/s) by one device {' '.join(flooder_args)}; {mb} MB pulls; "
        f"broker queues: {'example config' if queues else 'test broker'}")
    say(f"  honest only        {secs(honest)}  (median of {rounds}; {len(ok)} ok)")
    say(f"  during the flood   {secs(during_s)}  {ratio(during_s)}  (started {lead_s:g} s "
        f"in; done {'-' if during_end is None else f'{during_end:+.1f} s'} from the "
        "flood's end)")
    say(f"  after the flood    {secs(after_s)}  {ratio(after_s)}  (from the flood's end; "
        "acceptance: < 30 s)")
    say(f"  responder: {d.get('edge_responder_requests_total', 0):.0f} requests read, "
        f"{d.get('edge_responder_dropped_requests_total', 0):.0f} dropped over the rate, "
        f"{d.get('edge_responder_chunks_total', 0):.0f} chunks, "
        f"{d.get('edge_responder_slow_downs_total', 0):.0f} slow-downs, "
        f"{d.get('edge_responder_stalls_total', 0):.0f} watchdog stalls")
    return {"flood_requests": float(flood["requests"]), "flood_per_s": float(flood["per_s"]),
            "honest_s": honest, "during_s": during_s, "during_end_s": during_end,
            "after_s": after_s, "stalls": d.get("edge_responder_stalls_total", 0.0),
            "dropped": d.get("edge_responder_dropped_requests_total", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood-s", type=float, default=10.0)
    ap.add_argument("--mb", type=float, default=2.4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-queues", action="store_true",
                    help="the test broker's queue limits instead of the example config's")
    ap.add_argument("--flooder", default="",
                    help="more flooder options, e.g. '--qos 1 --pad 60000 --no-read'")
    args = ap.parse_args()
    request_flood(flood_s=args.flood_s, mb=args.mb, rounds=args.rounds,
                  queues=not args.no_queues, flooder_args=args.flooder.split())


if __name__ == "__main__":
    main()
