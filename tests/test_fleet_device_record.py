"""A device's record outlives the device's link: after a crash (its last will), a clean stop
or any report that leaves facts out, the registry keeps the last known model, previous
model, groups, tags, hardware, phase and last result, and says since when the device is
offline. Real parts: Mosquitto, ``edge-sdk serve`` with its registry and database, agents
killed with SIGKILL.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._registry import write_state
from edge_sdk.fleet._web import FleetApi
from tests import _fleet_host
from tests._e2e import FLEET, AgentProc, Fleet, new_agent
from tests._fleet_host import Serve
from tests._process import wait_for

fleet = _fleet_host.fleet  # Mosquitto, a responder and releases 1, 2, 3
db_url = _fleet_host.db_url  # SQLite and PostgreSQL

#: What a device is, kept while it is offline (the keys of FleetDB.device()).
KEPT = ("model", "version", "previous_model", "previous_version", "reported_groups",
        "reported_tags", "hardware", "phase", "deployment", "last_result",
        "last_deployment")


def _agent(fleet: Fleet, tmp: Path, agents: list[AgentProc], device: str) -> AgentProc:
    a = new_agent(fleet, tmp, agents, device, groups=("rec-lab",), tags={"site": "north"})
    # A short keepalive: the broker gives up on a silent link (a power cut) within seconds.
    text = a.config.read_text().replace("[broker]\n", "[broker]\nkeepalive_s = 5\n", 1)
    a.config.write_text(text)
    return a


def _record(db: FleetDB, device: str) -> dict[str, Any] | None:
    return db.device(device, fleet=FLEET)


def _api_device(db: FleetDB, device: str) -> dict[str, Any]:
    status, _, body = FleetApi(db, fleet=FLEET).handle("GET", "/api/devices")
    assert status == 200
    return next(d for d in json.loads(body) if d["id"] == device)


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["status", "--fleet", FLEET, *args]) in (0, None)
    return capsys.readouterr().out


def test_a_killed_or_stopped_agent_keeps_its_record_and_is_offline_since_then(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc], db_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = f"rec-{db_url[:2]}"
    serve = Serve(fleet, db_url, tmp_path / "serve").start()
    try:
        agent = _agent(fleet, tmp_path, agents, device).start()
        fleet.deploy(device, "1")
        agent.wait_version("1")
        fleet.deploy(device, "2")
        agent.wait_version("2")
        with FleetDB.open(db_url) as db:
            known = wait_for(lambda: (d := _record(db, device)) and d["online"]
                             and d["previous_version"] == "1"
                             and d["last_result"] == "committed" and d, 60,
                             lambda: f"{_record(db, device)}")
            assert known["offline_since"] is None
            assert known["reported_groups"] == ["rec-lab"]
            assert known["reported_tags"] == {"site": "north"} and known["hardware"]["arch"]

            # A clean stop: the agent says goodbye itself.
            stopped_at = time.time()
            agent.stop()
            gone = wait_for(lambda: (d := _record(db, device)) and not d["online"] and d, 30)
            assert {k: gone[k] for k in KEPT} == {k: known[k] for k in KEPT}
            assert gone["offline_since"] >= stopped_at

            agent.start()
            wait_for(lambda: (d := _record(db, device)) and d["online"] and d, 30)
            assert _record(db, device)["offline_since"] is None  # type: ignore[index]

            # kill -9: the broker publishes the agent's last will.
            killed_at = time.time()
            agent.kill()
            dead = wait_for(lambda: (d := _record(db, device)) and not d["online"] and d, 30)
            assert dead["state"]["will"] is True
            assert {k: dead[k] for k in KEPT} == {k: known[k] for k in KEPT}
            assert dead["offline_since"] >= killed_at
            shown = _api_device(db, device)
            assert {k: shown[k] for k in KEPT} == {k: known[k] for k in KEPT}
            assert shown["online"] is False and shown["offline_since"] == dead["offline_since"]
    finally:
        serve.kill()

    table = _status(capsys, "--db", db_url)
    line = next(ln for ln in table.splitlines() if ln.startswith(device))
    assert " no (" in line and "adder 2" in line and "adder 1" in line and "committed" in line
    raw = json.loads(_status(capsys, "--db", db_url, "--json", "--device", device))[device]
    assert raw["offline_since"] == dead["offline_since"]
    assert raw["groups"] == ["rec-lab"] and raw["model"]["version"] == "2"
    # What only the broker holds: the will names the facts as of the link's connect.
    will = json.loads(_status(capsys, "--broker", fleet.broker.url, "--json", "--device",
                              device))[device]
    assert (will["online"], will["model"]["version"], will["previous"]["version"],
            will["groups"], will["tags"], will["last_update"]["result"]) == \
        (False, "2", "1", ["rec-lab"], {"site": "north"}, "committed")
    assert will["hardware"]["arch"] == known["hardware"]["arch"]


def test_a_frozen_device_goes_offline_after_its_keepalive_and_comes_back_with_its_record(
        fleet: Fleet, tmp_path: Path, agents: list[AgentProc]) -> None:
    # A power cut or a hung link: no FIN reaches the broker, which gives up after 1.5
    # keepalive periods and publishes the will. SIGSTOP freezes the agent the same way.
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    device = "rec-frozen"
    serve = Serve(fleet, db_url, tmp_path / "serve").start()
    try:
        agent = _agent(fleet, tmp_path, agents, device).start()
        fleet.deploy(device, "3")
        agent.wait_version("3")
        with FleetDB.open(db_url) as db:
            known = wait_for(lambda: (d := _record(db, device)) and d["online"]
                             and d["last_result"] == "committed" and d, 60)
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGSTOP)
            try:
                dead = wait_for(lambda: (d := _record(db, device)) and not d["online"]
                                and d, 60, lambda: f"{_record(db, device)}")
            finally:
                agent.proc.send_signal(signal.SIGCONT)
            assert {k: dead[k] for k in KEPT} == {k: known[k] for k in KEPT}
            assert dead["state"]["link"] == known["state"]["link"]
            # Thawed, it finds its link dead, reconnects and says its state again.
            back = wait_for(lambda: (d := _record(db, device)) and d["online"] and d, 60,
                            lambda: f"{_record(db, device)}")
            assert back["offline_since"] is None
            assert back["state"]["link"][1] > known["state"]["link"][1]
            assert {k: back[k] for k in KEPT} == {k: known[k] for k in KEPT}
    finally:
        serve.kill()


def _state(link: list[int], *, online: bool = True, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"online": online, "link": link, **extra}
    if online:
        doc.update(model={"name": "adder", "version": "2"}, phase="idle", groups=["g"],
                   tags={"site": "north"}, hardware={"arch": "x86_64"},
                   previous={"name": "adder", "version": "1"},
                   last_update={"deployment": 4, "result": "committed"}, deployment=4)
    return json.dumps(doc).encode()


def test_a_last_will_older_than_the_link_the_device_reported_from_is_ignored(
        db_url: str) -> None:
    # A device back within its keepalive: the broker may publish the dead link's will
    # after the new link's state (a takeover, another node of a cluster).
    boot = 1_700_000_000_000
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            write_state(c, FLEET, "cam", _state([boot, 1]), now=100.0)
            write_state(c, FLEET, "cam", _state([boot, 2]), now=101.0)
            write_state(c, FLEET, "cam", _state([boot, 1], online=False, will=True),
                        now=102.0)
        d = db.device("cam", fleet=FLEET)
        assert d is not None and d["online"] is True and d["offline_since"] is None
        # A restarted process's will is newer than the old process's state.
        with db.begin() as c:
            write_state(c, FLEET, "cam", _state([boot + 5, 1], online=False, will=True),
                        now=103.0)
        d = db.device("cam", fleet=FLEET)
        assert d is not None and (d["online"], d["offline_since"], d["version"]) == \
            (False, 103.0, "2")
        # Offline since the first offline report, not the last.
        with db.begin() as c:
            write_state(c, FLEET, "cam", _state([boot + 5, 1], online=False), now=104.0)
        d = db.device("cam", fleet=FLEET)
        assert d is not None and d["offline_since"] == 103.0 and d["phase"] == "idle"


def test_a_partial_state_keeps_the_facts_it_leaves_out_and_a_will_keeps_the_newer_ones(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        with db.begin() as c:
            write_state(c, FLEET, "cam", _state([1, 1]), now=100.0)
            # A will carries the facts as of its connect: older than the stored ones.
            write_state(c, FLEET, "cam", json.dumps({
                "online": False, "will": True, "link": [1, 1], "groups": [],
                "model": {"name": "adder", "version": "1"}}).encode(), now=101.0)
        d = db.device("cam", fleet=FLEET)
        assert d is not None and (d["version"], d["reported_groups"], d["last_seen"]) == \
            ("2", ["g"], 100.0)
        with db.begin() as c:  # any report without the facts: the stored ones stay
            write_state(c, FLEET, "cam", b'{"online": true}', now=102.0)
        d = db.device("cam", fleet=FLEET)
        assert d is not None and d["online"] and (
            d["version"], d["previous_version"], d["reported_tags"], d["hardware"],
            d["last_result"]) == ("2", "1", {"site": "north"}, {"arch": "x86_64"},
                                  "committed")
        with db.begin() as c:  # a will for a device never heard of: its facts are all
            write_state(c, FLEET, "new", json.dumps({
                "online": False, "will": True, "link": [1, 1], "groups": ["g"],
                "model": {"name": "adder", "version": "1"}}).encode(), now=103.0)
        d = db.device("new", fleet=FLEET)
        assert d is not None and (d["version"], d["reported_groups"], d["online"],
                                  d["offline_since"]) == ("1", ["g"], False, 103.0)
