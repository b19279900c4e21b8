"""A rollout of a ~1 MB model to 10, 100 and 1000 simulated devices, measured side by side.

Every device is the real agent code (its own MQTT client, TUF client, chunked fetch of its
own bytes, install state machine, health window, reports; see tests/_fleetsim.py), spread
over processes of 125 taking installs in turns (``--installs`` at once in all). The host
side is ``edge-sdk serve --only fleet --db`` (registry, controller, page) plus
``--responders`` ``edge-sdk serve --only responder`` processes, on a private Mosquitto
started here with a raised open-file limit. Per size it prints the
time to 100 % committed, devices lost, chunks and bytes served, CPU seconds of the
responders, the fleet process and the devices, and the database rows; at the largest
size also the time of ``edge-sdk status --db`` and of the page's device list
(``GET /api/devices``). Goals: the largest size all committed, 0 lost; 1000 devices
≤ 10× the time of 100; status of 1000 devices ≤ 1 s.

    python bench/fleet.py [--sizes 10,100,1000] [--responders 2] [--no-shared]
        [--db postgresql://...] [--model-bytes 1048576]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests._broker import Mosquitto  # noqa: E402
from tests._fleetdb import make_db  # noqa: E402
from tests._fleetrig import ScaleResult, run_rollout  # noqa: E402
from tests._fleetsim import raise_nofile  # noqa: E402


def _row(r: ScaleResult) -> str:
    rows = sum(r.db_rows.values())
    per_model = r.bytes_served / max(1, r.devices * r.model_bytes)
    return (f"{r.devices:>6} {r.rollout_s:>9.1f} {r.committed:>9} {len(r.lost):>5} "
            f"{r.chunks:>8} {r.bytes_served / 2**20:>9.1f} {per_model:>6.2f} "
            f"{r.responder_cpu:>8.1f} {r.controller_cpu:>8.1f} {r.broker_cpu:>8.1f} "
            f"{r.devices_cpu:>8.1f} {rows:>8} {r.half_s:>6.1f} {r.p90_s:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--responders", type=int, default=1)
    ap.add_argument("--no-shared", action="store_true",
                    help="Responders on plain subscriptions, partitioned by device id.")
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite",
                    help="Fleet database: a fresh SQLite file, or a fresh database on the "
                         "local PostgreSQL (EDGE_TEST_PG admin URL), per size.")
    ap.add_argument("--model-bytes", type=int, default=1 << 20)
    ap.add_argument("--per-process", type=int, default=0)
    ap.add_argument("--installs", type=int, default=16,
                    help="Installs running at once over all simulator processes.")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    nofile = raise_nofile()
    print(f"open-file limit {nofile}; {args.db}; {args.responders} responder(s) "
          f"({'partitioned' if args.no_shared else '$share'}); model {args.model_bytes} B",
          flush=True)
    results: list[ScaleResult] = []
    head = (f"{'devs':>6} {'commit_s':>9} {'committed':>9} {'lost':>5} {'chunks':>8} "
            f"{'MiB_out':>9} {'x_mdl':>6} {'resp_cpu':>8} {'ctl_cpu':>8} {'mqtt_cpu':>8} "
            f"{'dev_cpu':>8} {'db_rows':>8} {'p50_s':>6} {'p90_s':>6}")
    with tempfile.TemporaryDirectory(prefix="edge-fleet-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with Mosquitto(tmp / "broker", extra_conf="max_connections -1\n") as broker:
            for n in sizes:
                dbs = make_db(args.db, tmp / f"db{n}")
                (tmp / f"db{n}").mkdir(parents=True, exist_ok=True)
                db_url = next(dbs)
                try:
                    r = run_rollout(
                        tmp / f"n{n}", n, broker_urls=[broker.url],
                        responders=args.responders, shared=not args.no_shared, db_url=db_url,
                        model_bytes=args.model_bytes, per_process=args.per_process or None,
                        installs=args.installs,
                        broker_pids=[broker.proc.pid] if broker.proc else [],
                        measure_reads=n == max(sizes))
                finally:
                    dbs.close()  # drops a PostgreSQL database
                results.append(r)
                print(head if len(results) == 1 else "", end="\n" if len(results) == 1 else "")
                print(_row(r), flush=True)
                for note in r.notes:
                    print(f"       note: {note}", flush=True)
                if r.lost:
                    print(f"       lost: {', '.join(r.lost[:10])}", flush=True)
    big = results[-1]
    print(f"\nDB rows at {big.devices}: {big.db_rows}")
    print(f"CPU seconds per device at {big.devices}: devices "
          f"{big.devices_cpu / big.devices * 1000:.0f} ms, fleet process "
          f"{big.controller_cpu / big.devices * 1000:.1f} ms, responders "
          f"{big.responder_cpu / big.devices * 1000:.1f} ms, broker "
          f"{big.broker_cpu / big.devices * 1000:.1f} ms")
    print(f"edge-sdk status --db at {big.devices} devices: {big.status_s:.2f} s "
          f"({big.status_lines} lines; goal <= 1 s)")
    print(f"GET /api/devices at {big.devices} devices: {big.page_devices_s * 1000:.0f} ms "
          f"({big.page_devices} devices)")
    by = {r.devices: r for r in results}
    if 100 in by and 1000 in by:
        ratio = by[1000].rollout_s / by[100].rollout_s
        print(f"time 1000 / time 100: {ratio:.1f}x (goal <= 10x)")
    print(f"lost at {big.devices}: {len(big.lost)} (goal 0)")


if __name__ == "__main__":
    main()
