"""The fleet page shows a gated rollout's shadow figures per device and per wave, and a
device's running shadow run, in a real headless Chromium (Debian's chromium) reading the
real page and API from a fleet database as the controller and registry leave it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._web import WebConfig, WebServer
from tests import _browser
from tests._browser import page_text
from tests._process import wait_for
from tests._shadow_records import gated_rollout

browser = _browser.browser  # a headless Chromium per test
FLEET = "plant"


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[tuple[str, int]]:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        rid = gated_rollout(db, FLEET)
        server = WebServer(db, fleet=FLEET, config=WebConfig(port=0)).start()
        try:
            yield server.url, rid
        finally:
            server.stop()


@pytest.mark.slow
def test_the_page_shows_each_devices_shadow_figures_and_each_waves(
        page: tuple[str, int], browser: Any) -> None:
    url, rid = page
    browser.get(url)
    art = f"#rollout-{rid}"
    wait_for(lambda: "agreement" in page_text(browser, f"{art} table.shadows"), 30,
             lambda: page_text(browser, art))
    assert "gate agreement>=0.99 over 100 requests within 1h · no traffic: skip" in \
        page_text(browser, f"{art} .gate")
    wave = page_text(browser, f'{art} [data-wave="1"]')
    assert "shadow: 1 shadowing, 1 passed, 1 failed" in wave, wave
    assert "1 gate failed" in wave, wave
    rows = {d: page_text(browser, f'{art} table.shadows tr[data-device="{d}"]')
            for d in ("cam-1", "cam-2", "cam-3")}
    assert "failed 100 0.500" in rows["cam-2"], rows
    assert "passed 100 1.000" in rows["cam-3"] and "1.25" in rows["cam-3"], rows
    assert "shadowing" in rows["cam-1"], rows
    assert "agreement 0.5 over 100 (gate agreement>=0.99)" in page_text(
        browser, f"{art} .failures")
    # The device table: the running shadow run its state reports.
    dev = page_text(browser, 'tr[data-device="cam-1"] [data-shadow]')
    assert dev == ("shadow det 2 running: agreement 0.95 over 20, worst 0.4 "
                   "(class 3 -> 5), latency 1.50x"), dev
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert logs == [], logs
