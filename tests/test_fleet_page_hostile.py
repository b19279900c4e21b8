"""One device must not blank the fleet page for every operator (issue 23, item 6).

Real parts: Mosquitto with the example password file and ACL, a real `edge-sdk serve
--only fleet --http` subprocess (as the operator user), devices that publish their own
retained state and events with their own credentials only, and Debian's headless
Chromium. The states are a generated variety of hostile JSON (keys such as toString,
__proto__ or constructor, arrays, deep nesting, huge strings, numbers as strings, null,
markup), not one payload: every section of the page must render every one of them as
text, a bad link fragment or query must be ignored, and a section that fails must fail
alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from edge_sdk.fleet import FleetDB
from edge_sdk.release import Repository
from edge_sdk.transport import Topics
from tests import _browser
from tests._acl import FLEET, connect_as, example_broker
from tests._broker import free_port
from tests._browser import fresh, page_text
from tests._process import ROOT, wait_for

browser = _browser.browser  # a headless Chromium per test

#: Marks a script or handler the page must never run: any of them sets it.
PWNED = "window.__pwned"
MARKUP = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=1</script>",
          '<a href="javascript:window.__pwned=1">x</a>', "</td></tr><tr><td>",
          '"><svg onload="window.__pwned=1">', "{{constructor.constructor('x')()}}"]
#: Keys that are methods or accessors on a JavaScript object.
KEYS = ["toString", "valueOf", "__proto__", "constructor", "hasOwnProperty", "toJSON",
        "then", "length", "prototype", "isPrototypeOf", "__defineGetter__",
        "toLocaleString", "", " ", "k", "ü\u202etxt", *MARKUP]
#: The issue's payload.
ISSUE_TAGS = {"k": {"x": {"toString": 1}}}


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """One JSON value of a random hostile shape."""
    leaves: list[Any] = [
        None, True, False, 0, -1, 2**53 + 1, 1e308, -0.0, 1.5, "123", "1e999", "NaN",
        "Infinity", "-0", "", " ", "null", "undefined", "[object Object]",
        "x" * rng.choice([300, 5000, 20000]), "\u202eevil", "\u0000\u0001",
        "\ud83d\ude00" * 50, "\ud800", rng.choice(MARKUP)]
    kind = rng.randrange(4) if depth < 8 else 0
    if kind == 0:
        return rng.choice(leaves)
    if kind == 1:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): hostile_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def hostile_state(rng: random.Random, device: str) -> dict[str, Any]:
    """A state report whose free-form parts (tags, hardware, group names, unknown keys) are
    hostile values, and whose typed parts are markup or of a wrong type the registry
    ignores (a value it must refuse, such as an over-long version, would keep the device
    off the page altogether: the registry's own tests cover those)."""
    odd = [None, {"toString": 1}, ["x"], True, "", 1.5]
    markup = rng.choice(MARKUP)
    return {
        "device": device, "fleet": FLEET,
        "online": rng.choice([True, False, "true", 1, *odd]),
        "ts": rng.choice([time.time(), "now", 1e308, {"valueOf": 1}, *odd]),
        "model": rng.choice([{"name": markup, "version": "1"}, {"name": markup, "version": 2},
                             {"name": {"toString": 1}, "version": "1"}, "adder", *odd]),
        "previous": rng.choice([{"name": markup, "version": "0"}, *odd]),
        "phase": rng.choice([markup[:60], 5, *odd]),
        "deployment": rng.choice([0, 7, "3", -1.5, *odd]),
        "last_update": rng.choice([{"result": rng.choice([markup[:60], "failed", *odd]),
                                    "deployment": rng.choice([3, "3", *odd]),
                                    "reason": rng.choice([markup + "x" * 3000, *odd])},
                                   *odd]),
        "groups": rng.choice([[markup, "cams", hostile_value(rng), "\u202eevil"], *odd]),
        "tags": {rng.choice(KEYS): hostile_value(rng) for _ in range(rng.randrange(1, 6))},
        "hardware": rng.choice([{k: hostile_value(rng) for k in KEYS[:8]}, *odd]),
        **{k: hostile_value(rng) for k in rng.sample(KEYS, 3) if k},
    }


def hostile_event(rng: random.Random, device: str) -> dict[str, Any]:
    return {"device": device, "fleet": FLEET, "ts": time.time(),
            "event": rng.choice(["failed", *MARKUP])[:64], "reason": rng.choice(MARKUP),
            "deployment": maybe_dict(rng), "model": hostile_value(rng),
            "detail": hostile_value(rng)}


def maybe_dict(rng: random.Random) -> Any:
    return {"counter": rng.choice([1, "1", None, {"toString": 1}]), "name": rng.choice(MARKUP)}


@dataclass
class HostileFleet:
    url: str
    db_url: str
    #: device id -> the state it published.
    states: dict[str, dict[str, Any]]
    honest: list[str]


HOSTILE = 24


@pytest.fixture(scope="module")
def hostile_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileFleet]:
    tmp = tmp_path_factory.mktemp("page-hostile")
    rng = random.Random(23)  # fixed: a failure names a seed that reproduces it
    devices = {f"evil-{i:02d}": [] for i in range(HOSTILE)}
    honest = ["cam-1", "cam-2"]
    devices.update({d: [] for d in honest})
    repo = Repository.init(tmp / "repo", tmp / "keys")
    db_url = f"sqlite:///{tmp / 'fleet.db'}"
    port = free_port()
    with example_broker(tmp, devices) as (broker, creds):
        log = tmp / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(repo.path),
                 "--broker", broker.url, "--fleet", FLEET, "--username", "edge-fleet",
                 "--password", creds["edge-fleet"], "--only", "fleet", "--db", db_url,
                 "--http", f"127.0.0.1:{port}",
                 # The page must show what the registry stores; states past the default
                 # per-report cap (16 KiB) never reach it, so the cap is raised here.
                 "--registry", "max_report_bytes=1048576"],
                cwd=ROOT, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_for(lambda: "fleet page on" in log.read_text(), 60,
                     lambda: log.read_text()[-3000:])
            topics = Topics(FLEET)
            states: dict[str, dict[str, Any]] = {}
            for dev in devices:
                if dev in honest:
                    state: dict[str, Any] = {
                        "device": dev, "fleet": FLEET, "online": True, "ts": time.time(),
                        "model": {"name": "adder", "version": "1", "sha256": "ab" * 32},
                        "phase": "idle", "deployment": 0, "groups": ["cams"],
                        "tags": {"site": "north"}, "hardware": {"arch": "aarch64"}}
                else:
                    state = hostile_state(rng, dev)
                    while len(json.dumps(state)) > 100_000:  # MESSAGE_MAX_BYTES is 128 KiB
                        state = hostile_state(rng, dev)
                    if dev == "evil-00":
                        state["tags"] = ISSUE_TAGS
                    if dev == "evil-01":  # numbers JavaScript cannot hold exactly
                        state["tags"] = {"big": 10**400, "tiny": 1e-400, "neg": -(2**64)}
                states[dev] = state
                # Each device with its own credentials, on its own topics only.
                conn = connect_as(broker, creds, dev)
                try:
                    payload = json.dumps(state).encode()
                    assert conn.publish(topics.state(dev), payload, retain=True).wait(10)
                    if dev not in honest:
                        for _ in range(3):
                            assert conn.publish(topics.events(dev), json.dumps(
                                hostile_event(rng, dev)).encode()).wait(10)
                finally:
                    conn.close()
            with FleetDB.open(db_url) as db:
                wait_for(lambda: len(db.devices(fleet=FLEET)) == len(devices), 60,
                         lambda: f"registry: {[d['id'] for d in db.devices(fleet=FLEET)]}; "
                                 f"log: {log.read_text()[-2000:]}")
            yield HostileFleet(f"http://127.0.0.1:{port}/", db_url, states, honest)
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()


def _page_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script("""
        const visible = [...document.querySelectorAll(".section-error")]
            .filter((e) => !e.hidden).map((e) => e.id + ": " + e.textContent);
        return {
          updated: document.getElementById("updated").textContent,
          rows: document.querySelectorAll("#devices tbody tr").length,
          broken: document.querySelectorAll("#devices tbody tr.broken").length,
          models: document.querySelectorAll("#models tbody tr").length,
          rollouts: document.getElementById("rollouts").textContent,
          errors: visible,
          historyHidden: document.getElementById("history").hidden,
          pwned: window.__pwned === undefined ? null : String(window.__pwned),
          foreign: document.querySelectorAll("img, script:not([src='/static/page.js']), svg, " +
                                             "iframe, object, embed, a[href^='javascript']").length,
        };""")


def _settled(driver: Any, rows: int) -> dict[str, Any]:
    """The page once it has rendered ``rows`` device rows (two polls later, so a render
    that fails on a poll after the first would show too)."""
    st = wait_for(fresh(lambda: (s := _page_state(driver))["updated"].startswith("updated")
                         and s["rows"] == rows and s), 30,
                  lambda: f"page never rendered {rows} rows: {_page_state(driver)}")
    # Two more polls, seen as the page's own "updated ..." line (a time to the second, or
    # "update failed"), which each poll 1.5 s apart rewrites with a new text.
    seen = [st["updated"]]

    def polled() -> bool:
        now = _page_state(driver)["updated"]
        if now != seen[-1]:
            seen.append(now)
        return len(seen) > 2

    wait_for(polled, 30, lambda: f"the page stopped polling: {seen}")
    return st


def _open_history(driver: Any, dev: str) -> None:
    from selenium.webdriver.common.by import By

    row = f'tr[data-device="{dev}"] button'
    wait_for(fresh(lambda: driver.find_element(By.CSS_SELECTOR, row).click() or True), 10)
    wait_for(lambda: f"History of {dev}" in page_text(driver, "#history h2")
             and _page_state(driver)["errors"] == [], 20,
             lambda: f"{dev}: {_page_state(driver)}")


def _assert_no_markup_ran(driver: Any) -> None:
    st = _page_state(driver)
    assert st["pwned"] is None and st["foreign"] == 0, st
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "favicon" not in e["message"]]
    assert severe == [], severe


@pytest.mark.slow
def test_hostile_device_states_render_as_text_in_every_section(hostile_fleet, browser) -> None:
    from selenium.webdriver.common.by import By

    n = len(hostile_fleet.states)
    browser.get(hostile_fleet.url)
    _settled(browser, n)
    st = _page_state(browser)
    assert st["errors"] == [] and st["broken"] == 0, st
    assert st["models"] >= 2 and "No rollouts." in st["rollouts"], st
    # The issue's device: its tag is shown as the JSON it is; the honest ones as usual.
    assert 'k={"x":{"toString":1}}' in page_text(browser, 'tr[data-device="evil-00"]')
    for dev in hostile_fleet.honest:
        text = page_text(browser, f'tr[data-device="{dev}"]')
        assert "online" in text and "adder" in text and "site=north" in text, text
    # Markup a device sent is on screen as text, and none of it ran.
    body = browser.find_element(By.ID, "devices").text
    assert '<img src=x onerror="window.__pwned=1">' in body or "<script>" in body
    _assert_no_markup_ran(browser)
    # Sorting by each column, and every hostile device's history, render too.
    for key in ("tags", "groups", "last_seen", "model", "id"):
        browser.find_element(By.CSS_SELECTOR, f'th[data-key="{key}"] button').click()
        time.sleep(0.2)
        assert _page_state(browser)["errors"] == []
    for dev in sorted(hostile_fleet.states)[::3]:
        _open_history(browser, dev)
        assert _page_state(browser)["rows"] == n
    _assert_no_markup_ran(browser)


@pytest.mark.slow
@pytest.mark.parametrize("tail", [
    "#device=%E0%A4%A",                       # the issue's link: not valid percent-encoding
    "#device=%",
    "#device=%ED%A0%80",                      # a lone surrogate, UTF-8-encoded
    "#device=%00",
    "#device=" + "a" * 5000,
    "#device=a/b",
    "#device=cam-1&x=%ZZ",
    "?%ff&group=%ZZ&<script>=1#device=%E0%A4%A",
    "?" + "q" * 1500,
])
def test_a_bad_link_fragment_or_query_is_ignored(hostile_fleet, browser, tail: str) -> None:
    browser.get(hostile_fleet.url + tail)
    st = _settled(browser, len(hostile_fleet.states))
    assert st["errors"] == [] and st["historyHidden"], st
    _assert_no_markup_ran(browser)


@pytest.mark.slow
def test_a_link_to_a_device_opens_its_history_and_an_unknown_one_fails_alone(
        hostile_fleet, browser) -> None:
    browser.get(hostile_fleet.url + "#device=" + quote("evil-00", safe=""))
    wait_for(lambda: "History of evil-00" in page_text(browser, "#history h2"), 30,
             lambda: str(_page_state(browser)))
    browser.get(hostile_fleet.url + "#device=nobody")
    st = wait_for(fresh(lambda: (s := _page_state(browser))["errors"] and s), 30,
                  lambda: str(_page_state(browser)))
    assert len(st["errors"]) == 1 and st["errors"][0].startswith("history-error")
    assert "no device 'nobody'" in st["errors"][0]
    assert st["rows"] == len(hostile_fleet.states) and st["updated"].startswith("updated")


#: Answers the page could get from a broken proxy, an older or newer controller, or a
#: record no renderer expected; each replaces one API route's real answer.
FAULTS = {
    "/api/rollouts": 'new Response(JSON.stringify({toString: 1}), {status: 200})',
    "/api/models": 'new Response("<html>bad gateway</html>", {status: 502})',
    "/api/devices?": 'fetchReal(path).then((r) => r.json()).then((devs) => new Response('
                     'JSON.stringify([5, null, {id: {toString: 1}, groups: {length: 9}}, '
                     '...devs]), {status: 200}))',
}


@pytest.mark.slow
def test_a_section_that_fails_fails_alone(hostile_fleet, browser) -> None:
    routes = ",".join(f"[{json.dumps(p)}, (path) => {js}]" for p, js in FAULTS.items())
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": f"""
        const fetchReal = window.fetch.bind(window);
        const faults = [{routes}];
        window.fetch = (path, opts) => {{
          for (const [prefix, answer] of faults) {{
            if (String(path).startsWith(prefix)) return answer(String(path));
          }}
          return fetchReal(path, opts);
        }};"""})
    browser.get(hostile_fleet.url + "#device=cam-1")
    n = len(hostile_fleet.states)
    st = wait_for(fresh(lambda: (s := _page_state(browser))["rows"] == n + 3
                         and len(s["errors"]) == 2 and s), 30,
                  lambda: str(_page_state(browser)))
    errors = " ".join(st["errors"])
    assert "rollouts-error" in errors and "not a list of rollouts" in errors, errors
    assert "models-error" in errors and "not JSON" in errors, errors
    # Two records that are no device: one line each; the odd-shaped one still renders.
    assert st["broken"] == 2, st
    assert "2 sections could not be shown" in st["updated"], st
    # The devices and the history (cam-1, from the link) render in full.
    assert "History of cam-1" in page_text(browser, "#history h2")
    assert "adder" in page_text(browser, 'tr[data-device="cam-1"]')
    _assert_no_markup_ran(browser)
