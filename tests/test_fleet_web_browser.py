"""The fleet page in a real headless Chromium (Debian's chromium + chromium-driver), served
by a real `edge-sdk serve --http` subprocess over a real Mosquitto and three real agents:
the page lists the fleet and follows a rollout while it runs."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.fleet import FleetDB
from tests._broker import Mosquitto
from tests._e2e import FLEET, Fleet, new_agent
from tests._fleet_host import Serve, start, start_fleet
from tests._fleetdb import assign
from tests._process import wait_for
from tests.test_delta_e2e import release as release_with_delta

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Set to a path to refresh the README's screenshot from this test.
SHOT = os.environ.get("EDGE_FLEET_SCREENSHOT")



@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-web")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        for v in ("1", "2"):
            f.release(v)
        yield f
        f.close()


@pytest.fixture()
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'edge-sdk[dev]')")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(.ci/setup.sh installs them as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, answering None while the page re-renders the elements it reads (the page
    rebuilds its tables every poll, so an element found a moment ago may be gone)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def run() -> Any:
        try:
            return fn()
        except (StaleElementReferenceException, NoSuchElementException):
            return None

    return run


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    got = wait_for(_fresh(lambda: "\n".join(e.text for e in driver.find_elements(
        By.CSS_SELECTOR, css)) or " "), 10)
    return str(got).strip()


def _click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    def go() -> bool:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(_fresh(go), 10, lambda: f"could not click {css}")


@pytest.mark.slow
def test_the_page_lists_the_fleet_and_follows_a_rollout_while_it_runs(
        fleet, tmp_path, agents, browser) -> None:
    from selenium.webdriver.common.by import By

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    port = _free_port()
    serve = Serve(fleet, db_url, tmp_path)
    serve.cmd += ["--http", f"127.0.0.1:{port}"]
    serve.start()
    try:
        procs = start_fleet(fleet, tmp_path, agents, "web", 3, db_url)
        browser.get(f"http://127.0.0.1:{port}/")
        rows = "#devices tbody tr"
        wait_for(_fresh(lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 3), 30,
                 lambda: f"devices table: {_text(browser, rows)!r}; log: "
                         f"{serve.log.read_text()[-2000:]}")
        for p in procs:
            text = _text(browser, f'tr[data-device="{p.device}"]')
            assert "online" in text and "adder" in text and " 1 " in f" {text} "
        # Sorting by clicking a column header reverses the order.
        ids = wait_for(_fresh(lambda: [r.get_attribute("data-device") for r in
                                       browser.find_elements(By.CSS_SELECTOR, rows)]), 10)
        _click(browser, 'th[data-key="id"] button')
        wait_for(_fresh(lambda: [r.get_attribute("data-device") for r in browser.find_elements(
            By.CSS_SELECTOR, rows)] == ids[::-1]), 10)

        rid = start(db_url, "--version", "2", "--group", "web", "--waves", "1,100%",
                    "--wave-timeout", "60", "--pause-after-wave")
        art = f"#rollout-{rid}"
        # Mid-rollout: paused for approval after wave 1, which shows 1 of 1 committed.
        wait_for(lambda: "paused" in _text(browser, f"{art} h3")
                 and "1 committed" in _text(browser, f'{art} [data-wave="1"]'), 60,
                 lambda: _text(browser, art))
        assert "2 pending" in _text(browser, f'{art} [data-wave="2"]')
        assert "waiting for approval" in _text(browser, f"{art} .reason")
        bar = f'{art} [data-wave="1"] .bar'
        role, label = wait_for(_fresh(lambda: tuple(
            browser.find_element(By.CSS_SELECTOR, bar).get_attribute(a)
            for a in ("role", "aria-label"))), 10)
        assert role == "img" and "1 of 1 committed" in label
        # A device's history opens on a click and shows its update to v2.
        with FleetDB.open(db_url) as db:
            first = next(d["device"] for d in db.rollout(rid)["devices"] if d["wave"] == 1)
        _click(browser, f'tr[data-device="{first}"] button')
        wait_for(lambda: f"History of {first}" in _text(browser, "#history h2")
                 and "adder 2" in _text(browser, "#history-table"), 20,
                 lambda: _text(browser, "#history"))
        if SHOT:
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(SHOT)
        # Approve wave 2: the same page, without a reload, follows it to the end.
        from edge_sdk.cli import main

        assert main(["rollout", "resume", str(rid), "--db", db_url, "--operator",
                     "tester"]) == 0
        wait_for(lambda: "completed" in _text(browser, f"{art} h3")
                 and "2 committed" in _text(browser, f'{art} [data-wave="2"]'), 90,
                 lambda: _text(browser, art))
        wait_for(lambda: "adder\n2\n3\n3" in _text(browser, "#models tbody")
                 .replace("\t", "\n").replace(" ", "\n"), 30,
                 lambda: _text(browser, "#models"))
        # A device claiming the group in its own state: listed as it reports itself,
        # flagged, its values shown as text; the honest ones are not flagged.
        claim = fleet.topics.state("web-claim")
        fleet.host.publish_wait(claim, json.dumps({
            "online": True, "groups": ["web"], "tags": {"site": {"toString": 1}},
        }).encode(), qos=1, retain=True)
        row = 'tr[data-device="web-claim"]'
        wait_for(lambda: "⚠ web · site={\"toString\":1}" in _text(browser, row), 30,
                 lambda: _text(browser, "#devices"))
        assert "⚠" not in _text(browser, f'tr[data-device="{first}"]')
        assert "web" in _text(browser, f'tr[data-device="{first}"]')
        fleet.host.publish_wait(claim, b"", qos=1, retain=True)
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        serve.stop()


def _attr(driver: Any, css: str, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(wait_for(_fresh(lambda: driver.find_element(By.CSS_SELECTOR, css)
                               .get_attribute(name)), 10))


@pytest.mark.slow
def test_the_page_tells_an_aborted_wave_a_delta_a_rollback_and_an_idle_device_as_they_are(
        fleet, tmp_path, agents, browser) -> None:
    """Three agents on version 3; a rollout of 4 (a delta from 3) commits wave 1 and is
    aborted while it waits for approval: wave 1's device is sent back to 3, wave 2 never
    gets it. A fourth agent never installed anything."""
    from edge_sdk.cli import main

    for v in ("3", "4"):
        release_with_delta(fleet, v)
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    port = _free_port()
    serve = Serve(fleet, db_url, tmp_path)
    # The agents beat every second: ten missed and a device that said online is silent.
    serve.cmd += ["--http", f"127.0.0.1:{port}", "--registry", "heartbeat_s=1",
                  "--registry", "silent_after_missed=10"]
    serve.start()
    try:
        g = "truth"
        procs = [new_agent(fleet, tmp_path, agents, f"{g}-{i}", groups=(g,)).start()
                 for i in range(3)]
        idle = new_agent(fleet, tmp_path, agents, f"{g}-idle").start()
        assign(db_url, FLEET, [p.device for p in procs], g)
        assign(db_url, FLEET, [f"{g}-ghost"], "later")  # provisioned, never reported
        for p in procs:
            fleet.deploy(p.device, "3")
        for p in procs:
            p.wait_version("3")
        with FleetDB.open(db_url) as db:
            wait_for(lambda: len([d for d in db.devices(group=g)
                                  if d["version"] == "3" and d["online"]]) == 3
                     and (db.device(idle.device) or {}).get("online"), 60,
                     lambda: f"registry has {db.devices()}")
            # The agent itself says it is idle, not "committed", before any model.
            assert db.device(idle.device)["phase"] == "idle"  # type: ignore[index]
        rid = start(db_url, "--version", "4", "--group", g, "--waves", "1,100%",
                    "--wave-timeout", "60", "--pause-after-wave")
        with FleetDB.open(db_url) as db:
            wait_for(lambda: db.rollout(rid)["status"] == "paused", 90,
                     lambda: f"{db.rollout(rid)}")
            first = next(d["device"] for d in db.rollout(rid)["devices"] if d["wave"] == 1)
            assert main(["rollout", "abort", str(rid), "--db", db_url, "--operator",
                         "tester"]) == 0
            wait_for(lambda: db.rollout(rid)["status"] == "aborted", 90,
                     lambda: f"{db.rollout(rid)}")
            hw = db.device(first)["hardware"]  # type: ignore[index]
        browser.get(f"http://127.0.0.1:{port}/#device={first}")
        art = f"#rollout-{rid}"
        wait_for(lambda: "aborted" in _text(browser, f"{art} h3"), 30,
                 lambda: _text(browser, art))
        assert _text(browser, f"{art} .reason") == "Aborted: aborted by tester"
        wave1 = _text(browser, f'{art} [data-wave="1"]')
        assert "1 rolled back" in wave1 and "committed" not in wave1, wave1
        assert _attr(browser, f'{art} [data-wave="1"]', "data-outcome") == "rolled_back"
        assert "1 of 1" not in _attr(browser, f'{art} [data-wave="1"] .bar', "aria-label")
        assert "2 skipped" in _text(browser, f'{art} [data-wave="2"]')
        assert first in _text(browser, f"{art} .failures")
        # The history of wave 1's device: its update to 4 came as a delta from 3 and was
        # rolled back by the abort.
        wait_for(lambda: "delta from 3:" in _text(browser, "#updates-table"), 30,
                 lambda: _text(browser, "#history"))
        ups = _text(browser, "#updates-table")
        assert " vs full " in ups, ups
        assert f"rolled back to 3 by rollout {rid}'s abort: aborted by tester" in ups, ups
        assert f"the rollback of rollout {rid}, away from 4" in ups, ups
        # Hardware facts: lists as their items, nested objects as "key value".
        facts = _text(browser, "#history-facts")
        features = hw["cpu_features"]
        assert f"cpu_features: {', '.join(features[:12])}" in facts, facts
        assert f"python {hw['runtimes']['python']}" in facts, facts
        assert "[" not in facts and "{" not in facts, facts
        # A device with no model reads as such, also when an older agent says "committed".
        row = f'tr[data-device="{idle.device}"]'
        wait_for(lambda: "no model" in _text(browser, row) and "idle" in _text(browser, row),
                 30, lambda: _text(browser, "#devices"))
        ghost = _text(browser, f'tr[data-device="{g}-ghost"]')
        assert "never reported" in ghost and "idle" not in ghost, ghost
        old = fleet.topics.state(f"{g}-old")
        fleet.host.publish_wait(old, json.dumps({
            "online": True, "model": None, "phase": "committed", "hardware": {
                "cpu_features": [f"f{i}" for i in range(30)],
                "runtimes": {"onnxruntime": {"version": "1.32.0"}}}}).encode(),
            qos=1, retain=True)
        try:
            row = f'tr[data-device="{g}-old"]'
            wait_for(lambda: "idle" in _text(browser, row), 30,
                     lambda: _text(browser, "#devices"))
            assert "committed" not in _text(browser, row)
            # A long list is cut with a count; a nested object reads as words.
            _click(browser, f"{row} button")
            wait_for(lambda: f"History of {g}-old" in _text(browser, "#history h2"), 20)
            facts = _text(browser, "#history-facts")
            assert "cpu_features: f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11 … and " \
                   "18 more" in facts, facts
            assert "runtimes: onnxruntime (version 1.32.0)" in facts, facts
            assert "Model\nno model installed\nPhase\nidle" in facts, facts
            # It said online once and never beat since: silent, not online.
            wait_for(lambda: "silent" in _text(browser, row), 60,
                     lambda: _text(browser, "#devices"))
            assert "online" not in _text(browser, row)
        finally:
            fleet.host.publish_wait(old, b"", qos=1, retain=True)
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        serve.stop()
