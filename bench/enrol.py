"""Enrolment and acceptance of many simulated devices through a real broker, two ways side
by side.

Every device is the real agent code with an ``[identity]`` section (tests/_fleetsim.py:
processes of ``--per-process`` agents, 50): it generates its key, asks through its session
account of its batch's claim, waits, and connects as itself once accepted. The host side is
Mosquitto with the dynamic security plugin as ``edge-sdk broker init`` sets it up, and
``edge-sdk serve --only fleet --enrol`` (registry, controller, enroller) as ``edge-serve``.

- ``operator``: the devices boot and ask; once all are pending, one ``edge-sdk device
  accept`` names them all; then each learns it on its next poll and connects as itself.
- ``allow``: the production line's allow-list (``edge-sdk device allow``) is written
  before the devices boot; each is accepted as it asks.

Per mode it prints the time until every device was pending (operator), the accept
command's own time, the time until every device was online as itself, CPU seconds of the
broker, of serve and of the devices, the enrolment rows, and the dynsec file's size. The
claim is 16 broker accounts ("sessions", ``claim create``'s default) and each device asks
through one of them: the broker names a connection after its user
(``use_username_as_clientid``), so devices on the same session take turns, and the retries
a taken-over connection costs are part of the time ('takeovers': from the broker's log).

    python bench/enrol.py [--devices 1000] [--per-process 50] [--poll 5] [--db URL]
        [--modes operator,allow]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests._dynsec import dynsec_broker  # noqa: E402
from tests._e2e import FLEET  # noqa: E402
from tests._fleetsim import FleetSim, proc_cpu, raise_nofile  # noqa: E402
from tests._identity_host import BATCH, Host  # noqa: E402


def _online(host: Host, prefix: str) -> int:
    """Devices that reported as themselves (over their own account)."""
    return sum(1 for d in host.db.devices(fleet=FLEET)
               if d["id"].startswith(prefix) and d["registered"])


def _count(host: Host, prefix: str, state: str) -> int:
    return sum(1 for e in host.db.enrolments(FLEET)
               if e["device_id"].startswith(prefix) and e["state"] == state)


def _takeovers(host: Host) -> int:
    """Claim connections the broker closed because another took their session (its log
    says "Client _claim... already connected, closing old connection")."""
    try:
        text = host.broker.log.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()
               if "Client _claim" in line and "already connected" in line)


def _wait(what: str, cond: object, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.25)
    raise SystemExit(f"bench: {what} not reached within {timeout:.0f} s")


def run_mode(host: Host, tmp: Path, mode: str, n: int, per_process: int, poll: float,
             timeout: float) -> dict[str, float]:
    prefix = f"{mode[:2]}"
    sim = FleetSim(tmp / f"sim-{mode}", n=n, broker_urls=[host.broker.url],
                   root=host.fleet.repo.meta / "1.root.json",
                   deployment_key=host.fleet.repo.deployment_key_path, fleet=FLEET,
                   prefix=prefix, per_process=per_process, heartbeat_s=300.0,
                   wait_connected=False,
                   agent_config={"identity": {"batch": BATCH, "poll_s": poll,
                                              "claim_password_file": str(host.claim_file)}})
    ids = sim.devices
    out: dict[str, float] = {"devices": n}
    broker_cpu0 = proc_cpu(host.broker.proc.pid)  # type: ignore[union-attr]
    serve_cpu0 = proc_cpu(host.proc.pid)  # type: ignore[union-attr]
    takeovers0 = _takeovers(host)
    if mode == "allow":
        t = time.monotonic()
        assert host.op("device", "allow", *ids) == 0
        out["allow_cmd_s"] = time.monotonic() - t
    t0 = time.monotonic()
    sim.start(timeout=300)
    try:
        if mode == "operator":
            out["pending_s"] = _wait("every device pending",
                                     lambda: _count(host, prefix, "pending") >= n, timeout)
            t = time.monotonic()
            assert host.op("device", "accept", *ids) == 0
            out["accept_cmd_s"] = time.monotonic() - t
        _wait("every device online as itself", lambda: _online(host, prefix) >= n, timeout)
        out["online_s"] = time.monotonic() - t0
        out["broker_cpu_s"] = proc_cpu(host.broker.proc.pid) - broker_cpu0  # type: ignore[union-attr]
        out["serve_cpu_s"] = proc_cpu(host.proc.pid) - serve_cpu0  # type: ignore[union-attr]
        out["devices_cpu_s"] = sim.cpu_seconds()
        out["accepted_rows"] = _count(host, prefix, "accepted")
        out["takeovers"] = _takeovers(host) - takeovers0
    finally:
        sim.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    # paho's select() cannot watch a file descriptor numbered 1024 or more: its client
    # then drops the link as lost before CONNECT goes out, again and again. Each enrolling
    # agent holds two clients (its link and the claim exchange) of 3 descriptors each, so
    # fewer agents per process than the rollout bench's 125.
    ap.add_argument("--per-process", type=int, default=50)
    ap.add_argument("--poll", type=float, default=5.0,
                    help="the agents' [identity] poll_s (default 5; the agent's own: 30)")
    ap.add_argument("--modes", default="operator,allow")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    raise_nofile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-enrol-") as d:
        tmp = Path(d)
        with dynsec_broker(tmp) as (broker, creds):
            host = Host(tmp, broker, creds, lifetime_s=30 * 86400, serve_args=[
                "--enrol-rate", "1000/s"])
            try:
                for mode in args.modes.split(","):
                    rows.append((mode, run_mode(host, tmp, mode, args.devices,
                                                args.per_process, args.poll, args.timeout)))
            finally:
                host.close()
            size = (tmp / "dynsec" / "dynamic-security.json").stat().st_size
    print(f"{'mode':<9} {'devices':>7} {'pending s':>9} {'accept s':>8} {'online s':>8} "
          f"{'broker cpu':>10} {'serve cpu':>9} {'devices cpu':>11} {'accepted':>8} "
          f"{'takeovers':>9}")
    for mode, r in rows:
        pend = f"{r['pending_s']:.1f}" if "pending_s" in r else "-"
        acc = r.get("accept_cmd_s", r.get("allow_cmd_s", 0.0))
        print(f"{mode:<9} {int(r['devices']):>7} {pend:>9} {acc:>8.2f} {r['online_s']:>8.1f} "
              f"{r['broker_cpu_s']:>10.1f} {r['serve_cpu_s']:>9.1f} "
              f"{r['devices_cpu_s']:>11.1f} {int(r['accepted_rows']):>8} "
              f"{int(r['takeovers']):>9}")
    print(f"dynsec file after both: {size / 1024:.0f} KiB; agents poll every {args.poll:g} s "
          "(±50 %); 'accept s' is the accept (operator) or allow (allow) command")


if __name__ == "__main__":
    main()
