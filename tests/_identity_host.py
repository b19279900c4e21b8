"""The host side of the identity tests: a dynsec broker (``edge-sdk broker init``'s
accounts), the repository and its responder, ``edge-sdk serve --enrol`` as ``edge-serve``,
the fleet DB, a claim, and agents that hold only that claim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from tests._dynsec import MONITOR
from tests._e2e import FLEET, AgentProc, Fleet
from tests._process import ROOT, ManagedProcess, wait_for

BATCH = "line1"
#: Short, so that the agents renew (at a third of it left) several times in one test.
LIFETIME_S = 12


class Host(ManagedProcess):
    """The operator's side: broker, repository (and its chunk responder), ``serve --enrol``
    (registry, controller and enroller, as ``edge-serve``), the fleet DB and a claim."""

    def __init__(self, tmp: Path, broker: Any, creds: dict[str, str], *,
                 lifetime_s: float = LIFETIME_S, ca_bundle: Path | None = None,
                 serve_args: list[str] | None = None) -> None:
        """``lifetime_s``: of the credentials serve issues; ``ca_bundle``: the CA
        certificates serve gives devices with their credentials (``--ca-bundle``);
        ``serve_args``: more options for serve."""
        self.tmp, self.broker, self.creds = tmp, broker, creds
        self.fleet = Fleet(tmp, broker, auth=(MONITOR, creds[MONITOR]))
        self.db_url = f"sqlite:///{tmp / 'fleet.db'}"
        self.claim_file = tmp / "claim.txt"
        assert self.op("claim", "create", BATCH, "--out", str(self.claim_file)) == 0
        self.log = tmp / "serve.log"
        self.cmd = [sys.executable, "-m", "edge_sdk", "serve", "--only", "fleet",
                    "--repo", str(self.fleet.repo.path), "--broker", broker.url,
                    "--fleet", FLEET, "--db", self.db_url, "--username", "edge-serve",
                    "--poll", "0.2", "--enrol", "--credential-lifetime", f"{int(lifetime_s)}s",
                    "--enrol-limit", "poll_s=0.1", "--enrol-limit", "sweep_s=0.5"]
        if ca_bundle is not None:
            self.cmd += ["--ca-bundle", str(ca_bundle)]
        self.cmd += serve_args or []
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "EDGE_MQTT_PASSWORD": creds["edge-serve"]}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=log, env=env)
        self.db = FleetDB.open(self.db_url)
        # The claim exists at the broker once the enroller applied it.
        wait_for(lambda: self.claims().get(BATCH, {}).get("secret_pending") is False
                 or self.proc.poll() is not None, 30,
                 lambda: f"claim never applied: {self.log.read_text()[-3000:]}")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def op(self, *args: str) -> int:
        return main([*args, "--db", self.db_url, "--fleet", FLEET, "--operator", "tester"])

    def claims(self) -> dict[str, dict[str, Any]]:
        return {c["batch"]: c for c in self.db.claims(FLEET)}

    def enrolment(self, device: str) -> dict[str, Any] | None:
        rows = [e for e in self.db.enrolments(FLEET) if e["device_id"] == device]
        return rows[0] if rows else None

    def wait_state(self, device: str, state: str, timeout: float = 60) -> dict[str, Any]:
        wait_for(lambda: (self.enrolment(device) or {}).get("state") == state, timeout,
                 lambda: f"{device} never {state}: {self.enrolment(device)}; serve: "
                         f"{self.log.read_text()[-2000:]}")
        row = self.enrolment(device)
        assert row is not None
        return row

    def agent(self, device: str, **kw: Any) -> AgentProc:
        """A started agent holding the claim of :data:`BATCH` (``kw``: AgentProc's)."""
        ident = {"batch": BATCH, "claim_password_file": str(self.claim_file),
                 "poll_s": 0.5, "answer_wait_s": 2}
        return AgentProc(self.fleet, self.tmp / "agents", device, identity=ident,
                         **kw).start()

    def close(self) -> None:
        self.stop()
        self.db.close()
        self.fleet.close()


