"""The fleet page in a real headless Chromium (Debian's chromium + chromium-driver), served
by a real `edge-sdk serve --http` subprocess over a real Mosquitto and three real agents:
the page lists the fleet and follows a rollout while it runs."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from edge_sdk.fleet import FleetDB
from tests import _browser
from tests._broker import free_port
from tests._browser import fresh, page_click, page_text
from tests._e2e import FLEET, new_agent, release_with_delta
from tests._fleet_host import Serve, start, start_fleet
from tests._fleetdb import assign
from tests._process import wait_for

#: Set to a path to refresh the README's screenshot from this test.
SHOT = os.environ.get("EDGE_FLEET_SCREENSHOT")

browser = _browser.browser  # a headless Chromium per test
fleet = _browser.fleet  # a broker and a repository with versions 1 and 2


@pytest.mark.slow
def test_the_page_lists_the_fleet_and_follows_a_rollout_while_it_runs(
        fleet, tmp_path, agents, browser) -> None:
    from selenium.webdriver.common.by import By

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    port = free_port()
    serve = Serve(fleet, db_url, tmp_path)
    serve.cmd += ["--http", f"127.0.0.1:{port}"]
    serve.start().wait_page()
    try:
        procs = start_fleet(fleet, tmp_path, agents, "web", 3, db_url)
        browser.get(f"http://127.0.0.1:{port}/")
        rows = "#devices tbody tr"
        wait_for(fresh(lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == 3), 30,
                 lambda: f"devices table: {page_text(browser, rows)!r}; log: "
                         f"{serve.log.read_text()[-2000:]}")
        for p in procs:
            # Cells and the lines inside them come out with spaces or newlines between
            # them, as the browser lays the row out: compare words.
            text = " ".join(page_text(browser, f'tr[data-device="{p.device}"]').split())
            assert "online" in text and "adder" in text and " 1 " in f" {text} "
        # Sorting by clicking a column header reverses the order.
        ids = wait_for(fresh(lambda: [r.get_attribute("data-device") for r in
                                       browser.find_elements(By.CSS_SELECTOR, rows)]), 10)
        page_click(browser, 'th[data-key="id"] button')
        wait_for(fresh(lambda: [r.get_attribute("data-device") for r in browser.find_elements(
            By.CSS_SELECTOR, rows)] == ids[::-1]), 10)

        rid = start(db_url, "--version", "2", "--group", "web", "--waves", "1,100%",
                    "--wave-timeout", "60", "--pause-after-wave")
        art = f"#rollout-{rid}"
        # Mid-rollout: paused for approval after wave 1, which shows 1 of 1 committed.
        wait_for(lambda: "paused" in page_text(browser, f"{art} h3")
                 and "1 committed" in page_text(browser, f'{art} [data-wave="1"]'), 60,
                 lambda: page_text(browser, art))
        assert "2 pending" in page_text(browser, f'{art} [data-wave="2"]')
        assert "waiting for approval" in page_text(browser, f"{art} .reason")
        bar = f'{art} [data-wave="1"] .bar'
        role, label = wait_for(fresh(lambda: tuple(
            browser.find_element(By.CSS_SELECTOR, bar).get_attribute(a)
            for a in ("role", "aria-label"))), 10)
        assert role == "img" and "1 of 1 committed" in label
        # A device's history opens on a click and shows its update to v2.
        with FleetDB.open(db_url) as db:
            first = next(d["device"] for d in db.rollout(rid)["devices"] if d["wave"] == 1)
        page_click(browser, f'tr[data-device="{first}"] button')
        wait_for(lambda: f"History of {first}" in page_text(browser, "#history h2")
                 and "adder 2" in page_text(browser, "#history-table"), 20,
                 lambda: page_text(browser, "#history"))
        if SHOT:
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(SHOT)
        # Approve wave 2: the same page, without a reload, follows it to the end.
        from edge_sdk.cli import main

        assert main(["rollout", "resume", str(rid), "--db", db_url, "--operator",
                     "tester"]) == 0
        wait_for(lambda: "completed" in page_text(browser, f"{art} h3")
                 and "2 committed" in page_text(browser, f'{art} [data-wave="2"]'), 90,
                 lambda: page_text(browser, art))
        wait_for(lambda: "adder\n2\n3\n3" in page_text(browser, "#models tbody")
                 .replace("\t", "\n").replace(" ", "\n"), 30,
                 lambda: page_text(browser, "#models"))
        # A device claiming the group in its own state: listed as it reports itself,
        # flagged, its values shown as text; the honest ones are not flagged.
        claim = fleet.topics.state("web-claim")
        fleet.host.publish_wait(claim, json.dumps({
            "online": True, "groups": ["web"], "tags": {"site": {"toString": 1}},
        }).encode(), qos=1, retain=True)
        row = 'tr[data-device="web-claim"]'
        wait_for(lambda: "⚠ web · site={\"toString\":1}" in page_text(browser, row), 30,
                 lambda: page_text(browser, "#devices"))
        assert "⚠" not in page_text(browser, f'tr[data-device="{first}"]')
        assert "web" in page_text(browser, f'tr[data-device="{first}"]')
        fleet.host.publish_wait(claim, b"", qos=1, retain=True)
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        serve.stop()


def _attr(driver: Any, css: str, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(wait_for(fresh(lambda: driver.find_element(By.CSS_SELECTOR, css)
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
    port = free_port()
    serve = Serve(fleet, db_url, tmp_path)
    # The agents beat every second: ten missed and a device that said online is silent.
    serve.cmd += ["--http", f"127.0.0.1:{port}", "--registry", "heartbeat_s=1",
                  "--registry", "silent_after_missed=10"]
    serve.start().wait_page()
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
        wait_for(lambda: "aborted" in page_text(browser, f"{art} h3"), 30,
                 lambda: page_text(browser, art))
        assert page_text(browser, f"{art} .reason") == "Aborted: aborted by tester"
        wave1 = page_text(browser, f'{art} [data-wave="1"]')
        assert "1 rolled back" in wave1 and "committed" not in wave1, wave1
        assert _attr(browser, f'{art} [data-wave="1"]', "data-outcome") == "rolled_back"
        assert "1 of 1" not in _attr(browser, f'{art} [data-wave="1"] .bar', "aria-label")
        assert "2 skipped" in page_text(browser, f'{art} [data-wave="2"]')
        assert first in page_text(browser, f"{art} .failures")
        # The history of wave 1's device: its update to 4 came as a delta from 3 and was
        # rolled back by the abort.
        wait_for(lambda: "delta from 3:" in page_text(browser, "#updates-table"), 30,
                 lambda: page_text(browser, "#history"))
        ups = page_text(browser, "#updates-table")
        assert " vs full " in ups, ups
        assert f"rolled back to 3 by rollout {rid}'s abort: aborted by tester" in ups, ups
        assert f"the rollback of rollout {rid}, away from 4" in ups, ups
        # Hardware facts: lists as their items, nested objects as "key value".
        facts = page_text(browser, "#history-facts")
        features = hw["cpu_features"]
        assert f"cpu_features: {', '.join(features[:12])}" in facts, facts
        assert f"python {hw['runtimes']['python']}" in facts, facts
        assert "[" not in facts and "{" not in facts, facts
        # A device with no model reads as such, also when an older agent says "committed".
        row = f'tr[data-device="{idle.device}"]'
        wait_for(lambda: "no model" in page_text(browser, row)
                 and "idle" in page_text(browser, row), 30, lambda: page_text(browser, "#devices"))
        ghost = page_text(browser, f'tr[data-device="{g}-ghost"]')
        assert "never reported" in ghost and "idle" not in ghost, ghost
        old = fleet.topics.state(f"{g}-old")
        fleet.host.publish_wait(old, json.dumps({
            "online": True, "model": None, "phase": "committed", "hardware": {
                "cpu_features": [f"f{i}" for i in range(30)],
                "runtimes": {"onnxruntime": {"version": "1.32.0"}}}}).encode(),
            qos=1, retain=True)
        try:
            row = f'tr[data-device="{g}-old"]'
            wait_for(lambda: "idle" in page_text(browser, row), 30,
                     lambda: page_text(browser, "#devices"))
            assert "committed" not in page_text(browser, row)
            # A long list is cut with a count; a nested object reads as words.
            page_click(browser, f"{row} button")
            wait_for(lambda: f"History of {g}-old" in page_text(browser, "#history h2"), 20)
            facts = page_text(browser, "#history-facts")
            assert "cpu_features: f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11 … and " \
                   "18 more" in facts, facts
            assert "runtimes: onnxruntime (version 1.32.0)" in facts, facts
            assert "Model\nno model installed\nPhase\nidle" in facts, facts
            # It said online once and never beat since: silent, not online.
            wait_for(lambda: "silent" in page_text(browser, row), 60,
                     lambda: page_text(browser, "#devices"))
            assert "online" not in page_text(browser, row)
        finally:
            fleet.host.publish_wait(old, b"", qos=1, retain=True)
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        serve.stop()
