"""An operator signs in to the fleet page in a real headless Chromium and approves,
pauses, resumes and aborts a rollout from it: a real `edge-sdk serve --http` subprocess,
a real Mosquitto and two real agents; the operator is made by the real CLI, and the
audit log names them for every action."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from edge_sdk.fleet import FleetDB
from tests import _browser
from tests._broker import free_port
from tests._browser import fresh, page_click, page_text
from tests._fleet_host import Serve, start, start_fleet
from tests._process import ROOT, wait_for

browser = _browser.browser  # a headless Chromium per test
fleet = _browser.fleet  # a broker and a repository with versions 1 and 2

PASSWORD = "correct horse battery"


def _type(driver: Any, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(value)


def _visible(driver: Any, css: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(fresh(lambda: any(e.is_displayed() for e in driver.find_elements(
        By.CSS_SELECTOR, css)))())


def _buttons(driver: Any, art: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return list(wait_for(fresh(lambda: [b.get_attribute("data-action") for b in
                                         driver.find_elements(By.CSS_SELECTOR,
                                                              f"{art} .actions button")]
                                or ["none"]), 10))


@pytest.mark.slow
def test_a_signed_in_operator_approves_pauses_resumes_and_aborts_from_the_page(
        fleet, tmp_path, agents, browser) -> None:
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    made = subprocess.run(
        [sys.executable, "-m", "edge_sdk", "operator", "add", "alice", "--db", db_url,
         "--password-stdin"], input=f"{PASSWORD}\n", capture_output=True, text=True,
        cwd=ROOT, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    port = free_port()
    serve = Serve(fleet, db_url, tmp_path)
    serve.cmd += ["--http", f"127.0.0.1:{port}"]
    serve.start()
    try:
        start_fleet(fleet, tmp_path, agents, "signin", 2, db_url)
        # Wave 2 waits for approval, then for the rate (0.1 a minute): it stays running
        # long enough to be paused, resumed and aborted from the page.
        rid = start(db_url, "--version", "2", "--group", "signin", "--waves", "1,100%",
                    "--wave-timeout", "120", "--pause-after-wave", "--rate", "0.1")
        art = f"#rollout-{rid}"
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(lambda: "paused" in page_text(browser, f"{art} h3")
                 and "waiting for approval" in page_text(browser, f"{art} .reason"), 90,
                 lambda: f"{page_text(browser, art)}; log: {serve.log.read_text()[-2000:]}")
        # Not signed in: read-only, no buttons.
        wait_for(lambda: _visible(browser, "#signin-form"), 10)
        assert _buttons(browser, art) == ["none"]
        # A wrong password is refused on the page, in one line.
        _type(browser, "#signin-name", "alice")
        _type(browser, "#signin-password", "not the password")
        page_click(browser, "#signin-form button[type=submit]")
        wait_for(lambda: "wrong name or password" in page_text(browser, "#action-status"), 20)
        _type(browser, "#signin-password", PASSWORD)
        page_click(browser, "#signin-form button[type=submit]")
        wait_for(lambda: "Signed in as alice" in page_text(browser, "#signed-in"), 20,
                 lambda: page_text(browser, "#signin"))
        assert not _visible(browser, "#signin-form")
        # Only the buttons that apply to each state.
        wait_for(lambda: _buttons(browser, art) == ["approve", "abort"], 20,
                 lambda: str(_buttons(browser, art)))
        page_click(browser, f'{art} button[data-action="approve"]')
        wait_for(lambda: "running" in page_text(browser, f"{art} h3")
                 and _buttons(browser, art) == ["pause", "abort"], 30,
                 lambda: f"{page_text(browser, art)} {_buttons(browser, art)}")
        page_click(browser, f'{art} button[data-action="pause"]')
        wait_for(lambda: "paused by alice" in page_text(browser, f"{art} .reason")
                 and _buttons(browser, art) == ["resume", "abort"], 30,
                 lambda: f"{page_text(browser, art)} {_buttons(browser, art)}")
        page_click(browser, f'{art} button[data-action="resume"]')
        wait_for(lambda: "running" in page_text(browser, f"{art} h3")
                 and _buttons(browser, art) == ["pause", "abort"], 30,
                 lambda: f"{page_text(browser, art)} {_buttons(browser, art)}")
        # Abort asks for a reason first; cancelling it does nothing.
        page_click(browser, f'{art} button[data-action="abort"]')
        wait_for(lambda: _visible(browser, "#abort-dialog"), 10)
        page_click(browser, "#abort-cancel")
        page_click(browser, f'{art} button[data-action="abort"]')
        _type(browser, "#abort-reason", "wrong build")
        page_click(browser, "#abort-confirm")
        wait_for(lambda: "aborted by alice" in page_text(browser, f"{art} .reason")
                 and _buttons(browser, art) == ["none"], 60,
                 lambda: f"{page_text(browser, art)} {_buttons(browser, art)}")
        # A request from the page's own origin without the CSRF token is refused.
        status = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"fetch('/api/rollouts/{rid}/pause', {{method: 'POST', headers: "
            "{'Content-Type': 'application/json'}, body: '{}'}).then(r => done(r.status))")
        assert status == 403
        with FleetDB.open(db_url) as db:
            log = [(a["action"], a["params"]) for a in db.audit(50)
                   if a["actor"] == "alice" and a["action"].startswith("rollout.")]
            assert log == [("rollout.approve", {"rollout": rid, "via": "page"}),
                           ("rollout.pause", {"rollout": rid, "via": "page"}),
                           ("rollout.resume", {"rollout": rid, "via": "page"}),
                           ("rollout.abort", {"rollout": rid, "via": "page",
                                              "reason": "wrong build"})]
            assert db.rollout(rid)["status"] in ("aborting", "aborted")
        # Signing out takes the buttons away again.
        page_click(browser, "#signout")
        wait_for(lambda: _visible(browser, "#signin-form")
                 and not page_text(browser, "#signed-in").strip(), 20)
        severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        # Chromium logs the refused requests the test made on purpose; nothing else.
        assert all("status of 401" in m or "status of 403" in m for m in severe), severe
    finally:
        serve.stop()
