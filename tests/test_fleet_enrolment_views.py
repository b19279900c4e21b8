"""What operators see of enrolment: ``edge-sdk status --db`` and the fleet page (its API
and, in a real headless Chromium, the page) show revoked devices as revoked and list the
devices waiting to enrol — as text, whatever facts a device sent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet import _enrol as enrol
from edge_sdk.fleet import _operators as ops
from edge_sdk.fleet._registry import ingest_state
from edge_sdk.fleet._web import FleetApi, Request, WebConfig, WebServer
from tests import _browser, _fleetdb
from tests._enrolreq import request
from tests._process import wait_for
from tests._signin import PASSWORD, post, sign_in

db_url = _fleetdb.db_url
browser = _browser.browser
FLEET = "lab"


@pytest.fixture
def db(db_url: str) -> Iterator[FleetDB]:
    with FleetDB.open(db_url) as d:
        yield d


def _fleet(db: FleetDB) -> None:
    """cam-1 and cam-2 enrolled and reporting, cam-2 then revoked; cam-3 accepted and
    revoked before it ever reported; two devices waiting, one with hostile facts."""
    now = time.time()
    for d in ("cam-1", "cam-2", "cam-3"):
        enrol.record_request(db, FLEET, request(d), now=now, max_pending=100)
    enrol.accept_devices(db, FLEET, ["cam-1", "cam-2", "cam-3"], actor="alice")
    for d in ("cam-1", "cam-2"):
        with db.begin() as c:
            assert ingest_state(c, FLEET, d, json.dumps(
                {"online": True, "phase": "idle", "model": None}).encode())
    enrol.revoke_device(db, FLEET, "cam-2", reason="stolen", actor="bob")
    enrol.revoke_device(db, FLEET, "cam-3", reason="lost", actor="bob")
    enrol.record_request(db, FLEET, request("new-1", batch="line-3"), now=now, max_pending=100)
    enrol.record_request(db, FLEET, request("evil", facts={
        "model": '<img src=x onerror="window.__pwned=1">'}), now=now, max_pending=100)


def test_status_shows_revoked_devices_and_who_waits_to_enrol(
        db: FleetDB, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _fleet(db)
    assert main(["status", "--db", db_url, "--fleet", FLEET]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("cam-")}
    assert lines["cam-2"].split()[1] == "revoked"
    assert lines["cam-1"].split()[1] == "yes"
    # Accepted, so assigned (no groups): listed as never reported, and revoked.
    assert lines["cam-3"].split()[1] == "revoked" and "never reported" in lines["cam-3"]
    assert "! 2 device(s) waiting to enrol (evil, new-1)" in out
    assert "not in the registry" not in out
    assert main(["device", "remove", "cam-3", "--db", db_url, "--fleet", FLEET]) == 0
    assert main(["status", "--db", db_url, "--fleet", FLEET]) == 0
    assert "revoked, not in the registry: cam-3" in capsys.readouterr().out
    assert main(["status", "--db", db_url, "--fleet", FLEET, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cam-2"]["revoked"]["reason"] == "stolen" and "revoked" not in doc["cam-1"]


def test_the_api_lists_pending_enrolments_and_revoked_devices(db: FleetDB) -> None:
    _fleet(db)
    api = FleetApi(db, fleet=FLEET)
    status, _, body = api.handle("GET", "/api/enrolments")
    doc = json.loads(body)
    assert status == 200 and doc["counts"] == {"accepted": 1, "pending": 2, "revoked": 2}
    assert [e["device_id"] for e in doc["enrolments"]] == ["evil", "new-1"]
    assert "public_key" not in doc["enrolments"][0]
    status, _, body = api.handle("GET", "/api/enrolments?state=revoked&limit=1")
    assert status == 200 and [e["device_id"] for e in json.loads(body)["enrolments"]] == [
        "cam-2"]
    status, _, body = api.handle("GET", "/api/enrolments?state=bogus")
    assert status == 400 and "state must be one of" in json.loads(body)["error"]
    status, _, body = api.handle("GET", "/api/devices")
    revoked = {d["id"]: d["revoked"] for d in json.loads(body)}
    assert revoked["cam-1"] is None and revoked["cam-2"]["by"] == "bob"


def test_the_page_shows_revoked_devices_and_pending_enrolment_as_text(
        tmp_path: Any, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from tests._browser import page_text

    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        _fleet(db)
        with WebServer(db, fleet=FLEET, config=WebConfig(port=0)) as server:
            browser.get(server.url)
            wait_for(lambda: "2 devices waiting" in page_text(browser, "#enrolments caption"),
                     30, lambda: page_text(browser, "#enrolments"))
            assert "2 revoked" in page_text(browser, "#enrolments caption")
            row = page_text(browser, 'tr[data-enrolment="new-1"]')
            assert "line-3" in row and "arch=aarch64" in row
            assert "onerror" in page_text(browser, 'tr[data-enrolment="evil"]')
            wait_for(lambda: "revoked" in page_text(browser, 'tr[data-device="cam-2"] td.revoked'),
                     30, lambda: page_text(browser, "#devices"))
            assert "revoked" not in page_text(browser, 'tr[data-device="cam-1"]')
            assert browser.execute_script("return window.__pwned === undefined") is True
            assert browser.find_elements(By.CSS_SELECTOR, "#enrolments img") == []


def test_a_signed_in_operator_accepts_and_rejects_from_the_page_audited_by_name(
        db: FleetDB) -> None:
    _fleet(db)
    ops.add_operator(db, "carol", PASSWORD, "root")
    api = FleetApi(db, fleet=FLEET)
    # Not signed in: refused, nothing changes; a GET is no way to decide.
    status, doc, _ = post(api, "/api/enrolments/new-1/accept")
    assert status == 401
    ans = api.serve(Request("GET", "/api/enrolments/new-1/accept"))
    assert ans.status == 405
    cookie, csrf = sign_in(api, "carol")
    status, doc, _ = post(api, "/api/enrolments/new-1/accept", cookie=cookie, csrf="x" * 43)
    assert status == 403
    assert enrol.enrolment(db, FLEET, "new-1")["state"] == "pending"  # type: ignore[index]
    status, doc, _ = post(api, "/api/enrolments/new-1/accept", cookie=cookie, csrf=csrf)
    assert (status, doc) == (202, {"device": "new-1", "command": "accept", "by": "carol"})
    status, doc, _ = post(api, "/api/enrolments/evil/reject", {"reason": "unknown box"},
                          cookie=cookie, csrf=csrf)
    assert status == 202
    states = {r["device_id"]: (r["state"], r["decided_by"]) for r in db.enrolments(FLEET)}
    assert states["new-1"] == ("accepted", "carol") and states["evil"] == ("rejected", "carol")
    audit = [(a["actor"], a["action"], a["params"].get("via")) for a in db.audit()]
    assert ("carol", "device.accept", "page") in audit
    assert ("carol", "device.reject", "page") in audit
    # What the CLI refuses, the page refuses too (one line, 409).
    status, doc, _ = post(api, "/api/enrolments/cam-1/reject", cookie=cookie, csrf=csrf)
    assert status == 409 and "cam-1 is accepted" in doc["error"]
    status, doc, _ = post(api, "/api/enrolments/ghost/accept", cookie=cookie, csrf=csrf)
    assert status == 409 and "no enrolment request from ghost" in doc["error"]
    status, doc, _ = post(api, "/api/enrolments/new-1/accept", {"groups": ["x"]},
                          cookie=cookie, csrf=csrf)
    assert status == 400


def test_the_page_accepts_a_device_with_a_click_once_signed_in(
        tmp_path: Any, browser: Any) -> None:
    from tests._browser import page_click, page_text

    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        _fleet(db)
        ops.add_operator(db, "carol", PASSWORD, "root")
        with WebServer(db, fleet=FLEET, config=WebConfig(port=0)) as server:
            browser.get(server.url)
            wait_for(lambda: "2 devices waiting" in page_text(browser, "#enrolments caption"),
                     30, lambda: page_text(browser, "#enrolments"))
            assert "Accept" not in page_text(browser, 'tr[data-enrolment="new-1"]')
            browser.find_element("css selector", "#signin-name").send_keys("carol")
            browser.find_element("css selector", "#signin-password").send_keys(PASSWORD)
            page_click(browser, '#signin-form button[type="submit"]')
            page_click(browser, 'tr[data-enrolment="new-1"] button[data-action="accept"]')
            wait_for(lambda: "1 device waiting" in page_text(browser, "#enrolments caption"),
                     30, lambda: page_text(browser, "#enrolments"))
            row = enrol.enrolment(db, FLEET, "new-1")
            assert row is not None and (row["state"], row["decided_by"]) == (
                "accepted", "carol")
