"""The fleet's host side as an operator runs it, for end-to-end fleet tests: ``edge-sdk
serve`` as a subprocess (:class:`Serve`, killed and restarted at will), rollouts recorded
through the CLI and followed in the database, and the fixtures a module takes by
assignment (``fleet = _fleet_host.fleet``): ``fleet`` (Mosquitto, a responder and
releases 1, 2, 3 plus two that fail on the device), ``db_url`` (SQLite and PostgreSQL) and
``serve``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._controller import CRASH_ENV, PAUSE_ENV
from tests import _fleetdb, _models
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, Fleet, group_on_v1
from tests._process import ROOT, ManagedProcess, wait_for


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-e2e")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2", "3"):
            f.release(v)
        f.release("9", offset=float("nan"))  # fails every agent's smoke test
        f.release("8", builder=_models.batch1_only_model)  # fails batches > 1 in a window
        yield f
        f.close()


@pytest.fixture(params=_fleetdb.ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _fleetdb.make_db(request.param, tmp_path)


#: Short, so that a restart after kill -9 takes the dead controller's lease over soon.
LEASE_TTL = 3.0


class Serve(ManagedProcess):
    """`edge-sdk serve` as a subprocess (kill -9 and start again at will)."""

    def __init__(self, fleet: Fleet, db_url: str, tmp: Path) -> None:
        self.cmd = [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(fleet.repo.path),
                    "--broker", fleet.broker.url, "--fleet", FLEET, "--db", db_url,
                    "--poll", "0.2", "--lease-ttl", str(LEASE_TTL)]
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = tmp / "serve.log"
        self.proc = None

    def start(self, crash_at: str | None = None, *, pause_at: str | None = None) -> Serve:
        """Start `serve`; with ``crash_at``, it kills itself at that crash point; with
        ``pause_at``, it stops itself there (SIGSTOP) until sent SIGCONT."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop(CRASH_ENV, None)
        env.pop(PAUSE_ENV, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        if pause_at:
            env[PAUSE_ENV] = pause_at
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=log, env=env)
        return self

    def wait_page(self, timeout: float = 60) -> None:
        """Wait until the page listens ("fleet page on" in the log): a serve that exited
        first (its ``--http`` port taken meanwhile, say) fails here with its log, not
        later as a registry that never heard the agents."""
        assert self.proc is not None
        proc = self.proc
        wait_for(lambda: "fleet page on" in self.log.read_text() or proc.poll() is not None,
                 timeout, lambda: f"serve never listened: {self.log.read_text()[-3000:]}")
        assert proc.poll() is None, f"serve exited {proc.returncode}: " \
            f"{self.log.read_text()[-3000:]}"

    def wait_crashed(self, timeout: float = 60) -> None:
        """Wait for the SIGKILL a crash point sends."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve never crashed: {self.log.read_text()[-3000:]}") \
                from None
        assert code == -signal.SIGKILL, (code, self.log.read_text()[-3000:])


def polled_since(db_url: str, polls: int) -> None:
    """Wait until the controller has looked at every active rollout ``polls`` more times
    (each look starts with a lease renewal, and at most one more renewal comes with the
    state it saves): what it would have done by now, it has done."""
    with FleetDB.open(db_url) as db:
        seen: list[float] = []

        def renewed() -> bool:
            lease = db.lease(FLEET)
            if lease is not None and (not seen or lease["renewed"] != seen[-1]):
                seen.append(lease["renewed"])
            return len(seen) > 2 * polls + 1

        wait_for(renewed, 30, lambda: f"the controller renewed its lease {seen}")


@pytest.fixture()
def serve(fleet: Fleet, db_url: str, tmp_path: Path) -> Iterator[Serve]:
    s = Serve(fleet, db_url, tmp_path)
    yield s
    s.kill()


def start_fleet(fleet: Fleet, tmp: Path, agents: list[AgentProc], group: str, n: int,
                db_url: str) -> list[AgentProc]:
    procs = group_on_v1(fleet, tmp, agents, group, n, db_url)
    with FleetDB.open(db_url) as db:
        wait_for(lambda: len([d for d in db.devices(group=group)
                              if d["version"] == "1" and d["online"]]) == n, 30,
                 lambda: f"registry has {db.devices(group=group)}")
    return procs


def grp(name: str, db_url: str) -> str:
    """Device and group names per engine: the module's agents share one broker."""
    return f"{name}-{db_url.split(':')[0].split('+')[0][:2]}"


def rollout(db_url: str, *args: str) -> int:
    return main(["rollout", *args, "--db", db_url, "--operator", "tester"])


def start(db_url: str, *args: str) -> int:
    code = main(["rollout", "start", "--db", db_url, "--operator", "tester", "--fleet",
                 FLEET, "--model", "adder", *args])
    assert code == 0
    with FleetDB.open(db_url) as db:
        return int(db.rollouts()[0]["id"])


def wait_status(db_url: str, rid: int, status: str, timeout: float = 90) -> dict[str, Any]:
    with FleetDB.open(db_url) as db:
        return wait_for(lambda: (r := db.rollout(rid))["status"] == status and r, timeout,
                        lambda: f"rollout {rid}: {db.rollout(rid)}")


def deployments_seen(fleet: Fleet, device: str, since: int) -> set[int]:
    """Every deployment counter above ``since`` that the device reported about."""
    out = set()
    for e in list(fleet.events[device]):
        dep = e.get("deployment")
        if isinstance(dep, dict) and isinstance(dep.get("counter"), int) \
                and dep["counter"] > since:
            out.add(dep["counter"])
    return out
