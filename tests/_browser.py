"""The fleet page in a real headless Chromium (Debian's chromium + chromium-driver): the
``browser`` fixture (skipped where selenium or Chromium is missing), helpers that read and
click through a page that re-renders while they look, and the module-scoped ``fleet`` the
browser tests serve (a broker and a repository with versions 1 and 2). A module takes the
fixtures by assignment (``browser = _browser.browser``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._broker import Mosquitto
from tests._e2e import Fleet
from tests._process import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


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


def fresh(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, answering None while the page re-renders the elements it reads (the page
    rebuilds its tables every poll, so an element found a moment ago may be gone)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def run() -> Any:
        try:
            return fn()
        except (StaleElementReferenceException, NoSuchElementException):
            return None

    return run


def page_text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    got = wait_for(fresh(lambda: "\n".join(e.text for e in driver.find_elements(
        By.CSS_SELECTOR, css)) or " "), 10)
    return str(got).strip()


def page_click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    def go() -> bool:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(fresh(go), 10, lambda: f"could not click {css}")
