"""Several models per device, read on the host side (issue 29, spec section 4): what a
state report says a device serves and how its deployments ended, kept by the registry on
SQLite and PostgreSQL (and migrated into an older database), and shown by ``status``,
``/api/devices`` and the fleet page; a deployment watch that sees two deployments to one
device end back to back."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import SCHEMA_VERSION, FleetDB, FleetUsageError, RolloutSpec, start_rollout
from edge_sdk.fleet._members import members
from edge_sdk.fleet._registry import ingest_state
from edge_sdk.fleet._store import reports
from edge_sdk.fleet._web import FleetApi, WebConfig, WebServer
from edge_sdk.release import DeploymentWatch, DeviceStatus
from edge_sdk.release._watch import MAX_MODELS
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _browser, _fleetdb
from tests._broker import Mosquitto
from tests._fleetdb import assign
from tests._process import wait_for

db_url = _fleetdb.db_url  # the fixture: one empty database per engine
browser = _browser.browser
FLEET = "plant2"
SHA = "ab" * 32
MARKUP = '<img src=x onerror="window.__pwned=1">'


def model(name: str, version: str, phase: str = "committed", **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "sha256": SHA, "phase": phase, **extra}


def report(models: list[Any] | None = None, /, *, last: dict[str, Any] | None = None,
           results: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A state report as the agent of spec 29 sends it: ``models`` beside ``model`` (the
    one swapped in last), ``results`` beside ``last_update``; ``extra`` keys replace any
    of them."""
    doc: dict[str, Any] = {"online": True, "ts": time.time(), "phase": "committed",
                           "deployment": 0, "groups": ["cams"], "hardware": {},
                           "model": None, "last_update": last}
    if models is not None:
        doc["models"] = models
        ok = [m for m in models if isinstance(m, dict)]
        if ok:
            doc["model"] = {k: ok[-1].get(k) for k in ("name", "version", "sha256")}
    if results is not None:
        doc["results"] = results
    return {**doc, **extra}


def parse(doc: Any) -> DeviceStatus:
    st = DeviceStatus.parse("d", json.dumps(doc).encode())
    assert st is not None
    return st


# -- reading a state report ------------------------------------------------------------------

def test_a_state_names_every_model_it_serves_with_its_version_and_trial() -> None:
    st = parse(report([model("ocr", "2.0"), model("det", "1.1", "trial")]))
    assert st.models == {"det": "1.1", "ocr": "2.0"}
    assert [m.name for m in st.served] == ["det", "ocr"]  # sorted by name
    assert st.models_label == "det 1.1 (trial), ocr 2.0"
    assert st.ref_of("ocr") == ("ocr", "2.0") and st.ref_of("asr") is None
    assert st.model == "det 1.1"  # "model": the one swapped in last, as before


def test_an_older_agents_one_model_is_its_models_in_the_devices_phase() -> None:
    st = parse({"online": True, "phase": "trial",
                "model": {"name": "adder", "version": 2, "sha256": SHA}})
    assert st.models == {"adder": "2"}
    assert st.models_label == "adder 2 (trial)" and st.served[0].sha256 == SHA
    assert parse({"online": True, "phase": "idle", "model": None}).models == {}
    # A newer agent's empty list means none, whatever "model" still says.
    assert parse(report([], model={"name": "adder", "version": "1"})).models == {}


HOSTILE_ENTRIES: list[Any] = [
    None, 5, "det", ["det", "1"], {"name": "det"}, {"version": "1"},
    {"name": 5, "version": "1"}, {"name": "", "version": "1"},
    {"name": "n" * 129, "version": "1"}, {"name": "v", "version": "1" * 129},
    {"name": "ctl\x07", "version": "1"}, {"name": "nul\x00", "version": "1"},
    {"name": "rtl\u202e", "version": "1"}, {"name": "lone\ud800", "version": "1"},
    {"name": "obj", "version": {"v": 1}}, {"name": "flag", "version": True},
    {"name": "lst", "version": [1]}, {"name": "newline", "version": "1\n2"},
]


def test_hostile_model_entries_are_left_out_and_the_rest_kept() -> None:
    good = [model("a", "1", "trial"),
            {"name": "b", "version": "2", "sha256": "AB" * 32, "phase": "finished"},
            {"name": "a", "version": "9"}]  # a name twice: the first one stands
    st = parse(report([*HOSTILE_ENTRIES, *good]))
    assert st.models == {"a": "1", "b": "2"}
    b = st.served[1]
    assert (b.sha256, b.phase) == (None, None)  # not lower-case hex; not a phase
    assert st.models_label == "a 1 (trial), b 2"
    # "models" of a wrong type is no list: the older "model" is read instead.
    for odd in ({"det": "1"}, "det 1", 7, True):
        assert parse(report(None, models=odd, model={"name": "m", "version": "3"})).models \
            == {"m": "3"}


def test_no_more_than_max_models_are_read_from_one_report() -> None:
    st = parse(report([model(f"m{i:03d}", "1") for i in range(200)]))
    assert len(st.models) == MAX_MODELS == 64
    assert st.models == {f"m{i:03d}": "1" for i in range(64)}


def _hostile(rng: random.Random, depth: int = 0) -> Any:
    leaves: list[Any] = [None, True, 0, -1, 2**64, 1.5, "", "x" * 300, "\x00", "\ud800",
                         MARKUP, "committed", "trial", SHA, 7]
    kind = rng.randrange(4) if depth < 5 else 0
    if kind == 0:
        return rng.choice(leaves)
    if kind == 1:
        return [_hostile(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["name", "version", "sha256", "phase", "deployment", "result", "reason",
            "models", "toString"]
    return {rng.choice(keys): _hostile(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_hostile_models_and_results_never_raise_and_stay_bounded() -> None:
    rng = random.Random(29)
    for _ in range(3000):
        doc = report(None, models=_hostile(rng), results=_hostile(rng), model=_hostile(rng),
                     last_update=_hostile(rng))
        st = DeviceStatus.parse("d", json.dumps(doc).encode())
        assert st is not None and len(st.served) <= MAX_MODELS and len(st.results) <= 8
        for m in st.served:
            assert m.name.isprintable() and 0 < len(m.name) <= 128
            assert m.version.isprintable() and 0 < len(m.version) <= 128
            assert m.phase in (None, "trial", "committed")
        for r in st.results:
            assert type(r.deployment) is int and r.deployment >= 0
            assert isinstance(r.result, str) and all(isinstance(n, str) for n in r.models)


def test_results_name_how_each_recent_deployment_ended() -> None:
    results = [{"deployment": c, "result": "committed", "models": ["a"], "ts": 1.0}
               for c in range(1, 12)]
    results += [{"deployment": 12, "result": "rolled_back", "reason": "health window",
                 "models": [{"name": "b", "version": "2"}]},
                {"deployment": True, "result": "failed"}, {"deployment": 13, "result": 5}]
    st = parse(report([model("a", "1"), model("b", "1")], results=results,
                      last={"deployment": 14, "result": "refused", "reason": "replayed"}))
    assert [r.deployment for r in st.results] == [7, 8, 9, 10, 11, 12]  # newest 8, checked
    twelve = st.result_of(12)
    assert twelve is not None and (twelve.result, twelve.reason, twelve.models) == (
        "rolled_back", "health window", ("b",))
    fourteen = st.result_of(14)  # only in last_update
    assert fourteen is not None and fourteen.result == "refused"
    assert st.result_of(3) is None  # older than the newest 8
    assert st.label_of(("b",)) == "b 1" and st.label_of(()) == st.model


# -- the registry and the database -----------------------------------------------------------

def _ingest(db: FleetDB, device: str, doc: dict[str, Any], fleet: str = FLEET) -> None:
    with db.begin() as c:
        assert ingest_state(c, fleet, device, json.dumps(doc).encode())


ODD = 'we%ird_"name\\'  # LIKE's wildcards, JSON's escapes


def test_each_devices_models_round_trip_through_the_registry(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _ingest(db, "cam-1", report([model("det", "1.1", "trial"), model("ocr", "2.0")]))
        _ingest(db, "cam-2", report([model("det", "1.0"), model(ODD, "ü1")]))
        _ingest(db, "cam-3", {"online": True, "phase": "committed",  # an older agent
                              "model": {"name": "det", "version": "1.0", "sha256": SHA}})
        _ingest(db, "cam-4", report([]))
        assign(db_url, FLEET, ["cam-1", "cam-2", "cam-3", "cam-4"], "cams")
        one = db.device("cam-1", fleet=FLEET)
        assert one is not None and one["models"] == [
            {"name": "det", "version": "1.1", "sha256": SHA, "phase": "trial"},
            {"name": "ocr", "version": "2.0", "sha256": SHA, "phase": "committed"}]
        assert (one["model"], one["version"]) == ("ocr", "2.0")  # the one swapped in last

        def ids(**kw: Any) -> list[str]:
            return [d["id"] for d in db.devices(fleet=FLEET, **kw)]

        assert ids(model="det") == ["cam-1", "cam-2", "cam-3"]
        assert ids(model="det@1.0") == ["cam-2", "cam-3"]
        assert ids(model="ocr 2.0") == ["cam-1"] and ids(model="ocr@9") == []
        assert ids(model=ODD) == ["cam-2"] and ids(model="we") == []
        assert ids(model="we_ird") == [] and ids(model="%") == []
        counts = {(r["model"], r["version"]): r["devices"] for r in db.models(fleet=FLEET)}
        assert counts == {("det", "1.0"): 2, ("det", "1.1"): 1, ("ocr", "2.0"): 1,
                          (ODD, "ü1"): 1, (None, None): 1}
        # A rollout of det sees each device's det; one without det has none of it.
        mem = members(db, FLEET, {"groups": ["cams"]}, model="det")
        assert {d: (x.model, x.version) for d, x in mem.items()} == {
            "cam-1": ("det", "1.1"), "cam-2": ("det", "1.0"), "cam-3": ("det", "1.0"),
            "cam-4": (None, None)}
        assert members(db, FLEET, {"devices": ["cam-1"]}, model="ocr")["cam-1"].version \
            == "2.0"
        # A later report replaces the list, and the change is in the device's history.
        _ingest(db, "cam-1", report([model("det", "1.1")]))
        one = db.device("cam-1", fleet=FLEET)
        assert one is not None and [(m["name"], m["phase"]) for m in one["models"]] == [
            ("det", "committed")]
        assert db.device_history("cam-1", fleet=FLEET)[0]["detail"]["models"] == {
            "det": "1.1"}


def test_a_rollout_of_one_model_is_judged_by_the_devices_version_of_that_model(
        db_url: str) -> None:
    # cam-1 serves det 2.0 and swapped ocr in last: det 1.0 is a downgrade for it all the
    # same, and ocr 3.0 is not for cam-2, which has no ocr.
    with FleetDB.open(db_url) as db:
        _ingest(db, "cam-1", report([model("det", "2.0"), model("ocr", "1.0")]))
        _ingest(db, "cam-2", report([model("det", "1.0")]))
        assign(db_url, FLEET, ["cam-1", "cam-2"], "cams")
        sel = {"groups": ["cams"]}
        with pytest.raises(FleetUsageError, match=r"det 1\.0 for 1 selected device\(s\) "
                                                  r"\(cam-1 has 2\.0\) is a downgrade"):
            start_rollout(db, fleet=FLEET, model="det", version="1.0", selector=sel,
                          spec=RolloutSpec(), actor="tester")
        assert start_rollout(db, fleet=FLEET, model="ocr", version="3.0", selector=sel,
                             spec=RolloutSpec(), actor="tester") >= 1


def test_a_last_will_keeps_the_models_and_a_downgraded_agent_replaces_them(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _ingest(db, "cam-1", report([model("det", "1.1"), model("ocr", "2.0")]))
        _ingest(db, "cam-1", {"online": False, "will": True})
        d = db.device("cam-1")
        assert d is not None and [m["name"] for m in d["models"]] == ["det", "ocr"]
        assert d["online"] is False
        # An agent put back to a version that reports one "model": that is all it serves.
        _ingest(db, "cam-1", {"online": True, "phase": "committed",
                              "model": {"name": "det", "version": "1.0"}})
        d = db.device("cam-1")
        assert d is not None and [(m["name"], m["version"]) for m in d["models"]] == [
            ("det", "1.0")]


def test_a_database_of_schema_8_is_migrated_with_each_devices_one_model(
        db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _ingest(db, "old-1", {"online": True, "phase": "trial",
                              "model": {"name": "adder", "version": "3"}})
        _ingest(db, "old-2", {"online": True, "phase": "idle", "model": None})
        with db.begin() as c:  # back to the schema before: no models, no results
            c.execute(sa.text("ALTER TABLE devices DROP COLUMN models"))
            c.execute(sa.text("ALTER TABLE devices DROP COLUMN results"))
            c.execute(sa.text("DELETE FROM schema_version WHERE version >= 9"))
    with FleetDB.open(db_url) as db:
        old = db.device("old-1")
        assert old is not None and old["models"] == [
            {"name": "adder", "version": "3", "sha256": None, "phase": "trial"}]
        assert [d["id"] for d in db.devices(model="adder@3")] == ["old-1"]
        none = db.device("old-2")
        assert none is not None and none["models"] == []
        with db.read() as c:
            assert c.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() \
                == SCHEMA_VERSION
        # Its next report says every model it serves, and its results.
        _ingest(db, "old-1", report([model("adder", "3"), model("det", "1")],
                                    results=[{"deployment": 4, "result": "committed"}]))
        new = db.device("old-1")
        assert new is not None and [m["name"] for m in new["models"]] == ["adder", "det"]
        assert [r["deployment"] for r in new["results"]] == [4]


def test_the_controller_hears_how_both_of_two_deployments_back_to_back_ended(
        db_url: str) -> None:
    # Model A (#5) committed, then model B (#6) rolled back, before the controller read
    # the device: its row's last result is #6 only, its results keep #5 too.
    with FleetDB.open(db_url) as db:
        _ingest(db, "cam-1", report(
            [model("a", "1.1"), model("b", "1.0")],
            last={"deployment": 6, "result": "rolled_back", "reason": "smoke test"},
            results=[{"deployment": 4, "result": "committed", "models": ["a"]},
                     {"deployment": 5, "result": "committed", "models": ["a"]},
                     {"deployment": 6, "result": "rolled_back", "reason": "smoke test",
                      "models": ["b"]}]))
        # An older agent says its last result only.
        _ingest(db, "cam-2", {"online": True, "phase": "committed",
                              "model": {"name": "a", "version": "1.1"},
                              "last_update": {"deployment": 5, "result": "committed"}})
        got = reports(db, FLEET, {"cam-1": {5, 6}, "cam-2": {5}, "cam-3": {5}})
    assert [(r.device, r.counter, r.result, r.reason) for r in got] == [
        ("cam-1", 5, "committed", None), ("cam-1", 6, "rolled_back", "smoke test"),
        ("cam-2", 5, "committed", None)]


# -- status, /api/devices and the page -------------------------------------------------------

@pytest.fixture()
def sqlite_db(tmp_path: Path) -> Iterator[FleetDB]:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        _ingest(db, "cam-1", report([model("det", "1.1", "trial"), model("ocr", "2.0")]))
        _ingest(db, "cam-2", {"online": True, "phase": "committed",
                              "model": {"name": "det", "version": "1.0"}})
        _ingest(db, "evil", report([model(MARKUP, "</td><script>x</script>")]))
        yield db


def test_status_lists_every_model_of_each_device(
        sqlite_db: FleetDB, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sdk.cli import main

    capsys.readouterr()
    assert main(["status", "--db", sqlite_db.url, "--fleet", FLEET]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "MODELS" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "det 1.1 (trial), ocr 2.0" in rows["cam-1"]
    assert "det 1.0 " in rows["cam-2"] and "(trial)" not in rows["cam-2"]


def test_api_devices_gives_each_devices_models_and_filters_by_any_of_them(
        sqlite_db: FleetDB) -> None:
    api = FleetApi(sqlite_db, fleet=FLEET)

    def get(target: str) -> Any:
        status, _, body = api.handle("GET", target)
        assert status == 200, body
        return json.loads(body)

    devs = {d["id"]: d for d in get("/api/devices")}
    assert [(m["name"], m["version"], m["phase"]) for m in devs["cam-1"]["models"]] == [
        ("det", "1.1", "trial"), ("ocr", "2.0", "committed")]
    assert devs["evil"]["models"][0]["name"] == MARKUP
    assert [d["id"] for d in get("/api/devices?model=ocr%402.0")] == ["cam-1"]
    assert [d["id"] for d in get("/api/devices?model=det")] == ["cam-1", "cam-2"]
    assert get("/api/devices/cam-1")["device"]["models"][0]["phase"] == "trial"
    assert {(m["model"], m["version"]) for m in get("/api/models")} == {
        ("det", "1.1"), ("det", "1.0"), ("ocr", "2.0"), (MARKUP, "</td><script>x</script>")}


@pytest.mark.slow
def test_the_page_shows_each_model_of_a_device_as_text(sqlite_db: FleetDB, browser) -> None:
    from selenium.webdriver.common.by import By

    from tests._browser import page_text

    with WebServer(sqlite_db, fleet=FLEET, config=WebConfig(port=0)) as server:
        browser.get(server.url)
        row = 'tr[data-device="cam-1"]'
        wait_for(lambda: "det 1.1 (trial)" in page_text(browser, row), 30,
                 lambda: page_text(browser, "#devices"))
        cells = [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{row} td.models div")]
        assert cells == ["det 1.1 (trial)", "ocr 2.0"]
        assert "det 1.0" in page_text(browser, 'tr[data-device="cam-2"]')
        evil = page_text(browser, 'tr[data-device="evil"]')
        assert f"{MARKUP} </td><script>x</script>" in evil, evil
        browser.find_element(By.CSS_SELECTOR, 'tr[data-device="cam-1"] button').click()
        wait_for(lambda: "Models\ndet 1.1 (trial), ocr 2.0" in page_text(
            browser, "#history-facts"), 20, lambda: page_text(browser, "#history"))
        assert browser.execute_script("return window.__pwned === undefined") is True
        assert browser.find_elements(By.CSS_SELECTOR, "#devices img, #devices script") == []


# -- a deployment's outcome ------------------------------------------------------------------

def test_two_deployments_to_one_device_back_to_back_both_get_their_outcome(
        shared_broker: Mosquitto) -> None:
    # Model A (#5) then model B (#6): the device's state after both names #6 as its last
    # update; #5's outcome is in its results, and a watch on #5 sees it.
    cfg = MqttConfig(url=shared_broker.url, fleet="watch-two")
    topics = Topics.for_config(cfg)
    with MqttConnection(cfg, name="op") as op, MqttConnection(cfg, name="dev") as dev, \
            DeploymentWatch(op, 5, devices=["d"]) as five, \
            DeploymentWatch(op, 6, devices=["d"]) as six:
        state = report([model("a", "1.1"), model("b", "1.0")],
                       last={"deployment": 6, "result": "rolled_back",
                             "reason": "health window: 3 errors"},
                       results=[{"deployment": 5, "result": "committed", "models": ["a"]},
                                {"deployment": 6, "result": "rolled_back",
                                 "reason": "health window: 3 errors", "models": ["b"]}])
        dev.publish_wait(topics.state("d"), json.dumps(state).encode(), retain=True)
        [a] = five.wait(10)
        [b] = six.wait(10)
    assert (a.result, a.reason, a.model) == ("committed", None, "a 1.1")
    assert (b.result, b.reason, b.model) == ("rolled_back", "health window: 3 errors",
                                             "b 1.0")


def test_an_mqtt_rollout_is_judged_by_the_devices_version_of_its_model(
        broker: Mosquitto, tmp_path: Path) -> None:
    # m-1 serves det 2.0 and swapped ocr in last: rolling det 1.0 out to it is a downgrade.
    from edge_sdk.errors import UsageError
    from edge_sdk.release import RolloutConfig, rollout
    from tests._e2e import Fleet

    fleet = Fleet(tmp_path, broker)
    try:
        fleet.release("1.0", name="det")
        state = report([model("det", "2.0"), model("ocr", "1.0")])
        fleet.host.publish_wait(fleet.topics.state("m-1"), json.dumps(state).encode(),
                                qos=1, retain=True)
        with pytest.raises(UsageError, match=r"det 1\.0 is a downgrade for 1 device\(s\) "
                                             r"\(m-1 runs 2\.0\)"):
            # (A short wave timeout: were it not refused, nothing would answer.)
            rollout(fleet.repo, fleet.host, model="det", version="1.0", devices=["m-1"],
                    config=RolloutConfig(wave_timeout=1.0, rollback=False))
    finally:
        fleet.close()
