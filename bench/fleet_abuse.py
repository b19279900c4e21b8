"""One device flooding a running fleet with its own credentials, beside an honest-only run.

Each scenario gets a fresh fleet (tests/_abuserig.py): Mosquitto with the example ACL and
queue limits, ``edge-sdk serve --only responder`` (``edge-repo``), ``edge-sdk serve --only
fleet`` (``edge-fleet``; registry, controller, page) and three real agents. A 3-device
rollout starts as the scenario does, while an honest reporter device sends ``--reports``
numbered, broker-acknowledged events spread over ``--seconds``. Printed per scenario:
the rollout's outcome and time, the fleet process's resident memory (before, peak,
after), the database's growth, the honest reports the registry wrote / counted as not
written / sent, the registry's dropped and lost totals, and what the attacker sent.

Scenarios (``--scenario``, repeatable; ``honest`` always runs first for the comparison):

- ``honest``: no attacker.
- ``event_flood``: the attacker sends ``--size`` byte events (default 120 KB) on its own
  events topic as fast as the broker takes them.
- ``small_event_flood``: the same with 200-byte events (the registry's message rate, and
  the broker's queue for the fleet's subscription, are what give out first).
- ``request_flood``: chunk requests on the attacker's own ``repo/req`` topic for
  ``--seconds`` (bench/_abuse_requests.py, its own fleet: a responder and honest devices'
  ``edge-sdk pull``): honest pull time with no flood, during it and right after it,
  printed side by side after the table.

    python bench/fleet_abuse.py [--scenario event_flood] [--seconds 20] [--size 120000]
        [--qos 0] [--reports 200] [--db sqlite|postgresql]

Goals (issue 23): under the 20 s large-event flood the rollout completes, the fleet process
grows by at most 150 MiB and the database by at most 64 MiB, and every honest report is
written or counted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._abuse_requests import request_flood  # noqa: E402
from tests._abuserig import AbuseResult, run  # noqa: E402
from tests._fleetdb import make_db  # noqa: E402


def _db(args: argparse.Namespace, tmp: Path) -> tuple[str, Callable[[], None]]:
    dbs = make_db(args.db, tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    return next(dbs), dbs.close


def _run(name: str, args: argparse.Namespace, tmp: Path, **kw: object) -> AbuseResult:
    url, close = _db(args, tmp / "db")
    try:
        return run(tmp, name, flood_s=args.seconds, reports=args.reports, db_url=url,
                   wave_timeout=args.wave_timeout, **kw)  # type: ignore[arg-type]
    finally:
        close()


def honest(args: argparse.Namespace, tmp: Path) -> AbuseResult:
    """The same rollout and reports with nobody attacking: the figures to compare with."""
    return _run("honest", args, tmp)


def event_flood(args: argparse.Namespace, tmp: Path) -> AbuseResult:
    """Large events (``--size``) on the attacker's own events topic."""
    return _run("event_flood", args, tmp, size=args.size, qos=args.qos)


def small_event_flood(args: argparse.Namespace, tmp: Path) -> AbuseResult:
    """Many small events on the attacker's own events topic."""
    return _run("small_event_flood", args, tmp, size=200, qos=args.qos)


SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], AbuseResult]] = {
    "honest": honest,
    "event_flood": event_flood,
    "small_event_flood": small_event_flood,
}

_ROWS: list[tuple[str, Callable[[AbuseResult], str]]] = [
    ("rollout", lambda r: r.rollout[:32]),
    ("rollout s", lambda r: f"{r.rollout_s:.1f}"),
    ("fleet RSS before MiB", lambda r: f"{r.rss_before_mib:.0f}"),
    ("fleet RSS peak MiB", lambda r: f"{r.rss_peak_mib:.0f}"),
    ("fleet RSS growth MiB", lambda r: f"{r.rss_peak_mib - r.rss_before_mib:.0f}"),
    ("fleet RSS after MiB", lambda r: f"{r.rss_after_mib:.0f}"),
    ("DB growth MiB", lambda r: f"{r.db_after_mib - r.db_before_mib:.1f}"),
    ("honest reports sent", lambda r: str(r.honest_sent)),
    ("honest written", lambda r: str(r.honest_received)),
    ("honest counted lost", lambda r: str(r.honest_counted)),
    ("honest unaccounted", lambda r: str(max(0, r.honest_sent - r.honest_received
                                              - r.honest_counted))),
    ("registry dropped", lambda r: str(r.dropped)),
    ("registry lost", lambda r: str(r.lost)),
    ("attacker sent", lambda r: str(r.flood_sent)),
    ("attacker MiB", lambda r: f"{r.flood_mib:.0f}"),
    ("attacker dropped", lambda r: str(r.attacker_dropped)),
    ("attacker rows in DB", lambda r: str(r.attacker_rows)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", action="append", choices=[*(s for s in SCENARIOS
                                                              if s != "honest"),
                                                            "request_flood"],
                    help="Repeatable (default: event_flood).")
    ap.add_argument("--seconds", type=float, default=20.0, help="How long the flood lasts.")
    ap.add_argument("--size", type=int, default=120_000, help="event_flood's event size.")
    ap.add_argument("--qos", type=int, choices=[0, 1], default=0,
                    help="QoS of the attacker's publishes.")
    ap.add_argument("--reports", type=int, default=200,
                    help="Numbered reports the honest reporter sends during the flood.")
    ap.add_argument("--wave-timeout", type=float, default=120.0)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = ap.parse_args()
    asked = args.scenario or ["event_flood"]
    names = ["honest", *(n for n in asked if n in SCENARIOS)]
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-abuse-bench-") as tmp_s:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results.append(SCENARIOS[name](args, Path(tmp_s) / name))
    width = max(14, *(len(r.scenario) for r in results),
                *(len(cell(r)) for _, cell in _ROWS for r in results))
    print(f"{'':<22}" + "".join(f"{r.scenario:>{width + 2}}" for r in results))
    for label, cell in _ROWS:
        print(f"{label:<22}" + "".join(f"{cell(r):>{width + 2}}" for r in results))
    for r in results:
        for note in r.notes:
            print(f"note ({r.scenario}): {note[:400]}")
    if "request_flood" in asked:
        print("running request_flood ...", file=sys.stderr, flush=True)
        request_flood(flood_s=args.seconds)


if __name__ == "__main__":
    main()
