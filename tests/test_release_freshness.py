"""Release metadata that stays fresh: lifetimes with units (``release init --expires
timestamp=10s``), the half-lifetime rule, ``serve`` re-signing timestamp and snapshot
itself while ``release add`` writes the same repository, and the warnings of ``status``
and the fleet page about roles that expire with no online key to re-sign them."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.errors import UsageError
from edge_sdk.release import (
    FreshnessKeeper,
    Repository,
    expiry_warnings,
    format_duration,
    parse_duration,
    refresh_due,
)
from tests import _models
from tests._broker import Mosquitto, free_port
from tests._browser import browser as browser  # the Chromium fixture
from tests._browser import fresh
from tests._e2e import FLEET, AgentProc, X
from tests._process import wait_for

ROOT = Path(__file__).resolve().parents[1]


# -- durations and the half-lifetime rule -----------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("2m", 120), ("12h", 43200), ("7d", 604800), ("3", 259200), (" 1D ", 86400),
])
def test_durations_take_units_and_a_bare_number_is_days(text: str, seconds: int) -> None:
    d = parse_duration(text, "--expires x")
    assert d == timedelta(seconds=seconds)
    assert parse_duration(format_duration(d), "again") == d


@pytest.mark.parametrize("text", ["", "0", "2x", "1.5h", "-3d", "m", "2 m", "99999999d"])
def test_bad_durations_are_refused_naming_the_expected_form(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--expires x: expected (a duration|at most)"):
        parse_duration(text, "--expires x")


def test_a_role_is_due_once_half_its_lifetime_has_passed() -> None:
    signed = datetime(2026, 1, 1, tzinfo=UTC)
    life = timedelta(minutes=10)
    expires = signed + life
    assert not refresh_due(expires, life, signed)
    assert not refresh_due(expires, life, signed + life * 0.49)
    assert refresh_due(expires, life, signed + life * 0.5)
    assert refresh_due(expires, life, signed + life * 0.9)
    assert refresh_due(expires, life, expires + timedelta(seconds=1))


def test_bad_expires_options_are_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, expected in (("timestamp=2x", "expected a duration"),
                          ("timestamp", "expected ROLE=DURATION"),
                          ("timestamp=0", "expected a duration"),
                          ("nobody=2m", "unknown role 'nobody'")):
        assert main(["release", "init", str(tmp_path / "r"), "--keys", str(tmp_path / "k"),
                     "--expires", bad]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
        assert not (tmp_path / "r").exists() and not (tmp_path / "k").exists()


def test_init_stores_lifetimes_and_refresh_resigns_only_what_is_due(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "init", str(tmp_path / "r"), "--keys", str(tmp_path / "k"),
                 "--expires", "timestamp=2m", "--expires", "snapshot=3", "--expires",
                 "root=12h"]) == 0
    repo = Repository(tmp_path / "r")
    assert repo.lifetimes() == {"root": timedelta(hours=12), "targets": timedelta(days=90),
                                "snapshot": timedelta(days=3),
                                "timestamp": timedelta(minutes=2)}
    ex = repo.expiries()
    assert timedelta(0) < ex["timestamp"] - datetime.now(UTC) <= timedelta(minutes=2)
    # Just signed: nothing is due, whichever keys are online.
    assert repo.keep_fresh(["root", "targets", "snapshot", "timestamp"]) == []
    # A repository made before durations ("expires" in days) keeps its meaning.
    settings = json.loads((repo.path / "repo.json").read_text())
    del settings["expires_s"]
    settings["expires"] = {"timestamp": 2}
    (repo.path / "repo.json").write_text(json.dumps(settings))
    assert Repository(repo.path).lifetimes()["timestamp"] == timedelta(days=2)


def test_keeper_resigns_due_roles_and_leaves_offline_ones_to_the_operator(
        tmp_path: Path) -> None:
    Repository.init(tmp_path / "r", tmp_path / "k",
                    expires={"timestamp": timedelta(seconds=4)})
    # The snapshot key goes offline: the keeper re-signs the timestamp only.
    shutil.move(tmp_path / "k" / "snapshot", tmp_path / "snapshot-key")
    repo = Repository(tmp_path / "r")
    assert not repo.online("snapshot") and repo.online("timestamp")
    lines: list[str] = []
    keeper = FreshnessKeeper(repo, say=lines.append)
    assert keeper.roles == ("root", "targets", "timestamp")
    first = repo.versions()
    with keeper:
        wait_for(lambda: repo.versions()["timestamp"] >= first["timestamp"] + 2, 30)
    assert repo.versions()["snapshot"] == first["snapshot"]
    assert all(re.fullmatch(r"re-signed timestamp v\d+, expires \S+", x) for x in lines), lines
    # Within a day of expiry and no key to re-sign it: warned, naming the fix.
    warned = {w.role: w.message for w in expiry_warnings(repo, within=timedelta(days=8))}
    assert list(warned) == ["snapshot"]
    assert f"edge-sdk release refresh {repo.path} --keys DIR" in warned["snapshot"]
    assert expiry_warnings(repo) == []  # 7 days left: not within a day


# -- serve keeps a device updatable past the first timestamp's expiry -------------------


class _Host:
    """What :class:`AgentProc` needs of the host side: the repository and the broker."""

    def __init__(self, repo: Repository, broker: Mosquitto) -> None:
        self.repo = repo
        self.broker = broker


class _Serve:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", "serve", *args], cwd=ROOT, stdout=out,
                stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        found: re.Match[str] = wait_for(lambda: self.proc.poll() is None and re.search(
            pattern, self.text()), timeout, lambda: f"no {pattern!r} in: {self.text()[-3000:]}")
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture()
def serves() -> Iterator[list[_Serve]]:
    procs: list[_Serve] = []
    yield procs
    for p in procs:
        p.stop()


def _release(repo: Path, arts: Path, version: str) -> Path:
    arts.mkdir(exist_ok=True)
    src = arts / f"adder-{version}.onnx"
    _models.offset_model(src, float(version))
    return edge_sdk.build_artifact(src, arts / f"adder-{version}", name="adder",
                                   version=version, sample={"x": X}).path


def _metric(port: int, role: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(rf'^edge_release_seconds_to_expiry{{role="{role}"}} (\S+)$', body, re.M)
    assert m, body
    return float(m[1])


@pytest.mark.slow
def test_serve_resigns_timestamp_and_snapshot_so_a_device_updates_after_they_expire(
        tmp_path: Path, broker: Mosquitto, agents: list[AgentProc], serves: list[_Serve],
        capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir, arts = tmp_path / "repo", tmp_path / "arts"
    assert main(["release", "init", str(repo_dir), "--keys", str(tmp_path / "keys"),
                 "--expires", "timestamp=10s", "--expires", "snapshot=10s"]) == 0
    for v in ("1", "2"):
        assert main(["release", "add", str(repo_dir), str(_release(repo_dir, arts, v))]) == 0
    repo = Repository(repo_dir)
    first = repo.expiries()
    mport = free_port()
    mqtt = ["--broker", broker.url, "--fleet", FLEET]
    serve = _Serve(["--repo", str(repo_dir), *mqtt, "--metrics", f"127.0.0.1:{mport}"],
                   tmp_path / "serve.log")
    serves.append(serve)
    # A second responder side by side (as for throughput): both keep the metadata fresh,
    # each role re-signed once per turn under the repository's lock.
    second = _Serve(["--repo", str(repo_dir), *mqtt, "--only", "responder"],
                    tmp_path / "serve2.log")
    serves.append(second)
    for s in (serve, second):
        s.wait_line(r"keeping root, targets, snapshot, timestamp fresh \(lifetimes "
                    r"root=365d, targets=90d, snapshot=10s, timestamp=10s")
    agent = AgentProc(_Host(repo, broker), tmp_path, "fresh-1")  # type: ignore[arg-type]
    agents.append(agent.start())
    deploy = ["deploy", "--repo", str(repo_dir), "--device", "fresh-1", "--model", "adder",
              "--wait", "--timeout", "120", *mqtt]
    assert main([*deploy, "--version", "1"]) == 0
    agent.wait_version("1")

    # Every timestamp and snapshot signed before serve started has expired ...
    wait_for(lambda: datetime.now(UTC) > max(first["timestamp"], first["snapshot"]), 60)
    # ... while the serves re-signed them, one line each, never the same version twice,
    # and serve what they signed.
    resigned = [m for s in (serve, second) for m in re.findall(
        r"edge-sdk serve: re-signed (timestamp|snapshot) v(\d+)", s.text())]
    assert {"timestamp", "snapshot"} <= {role for role, _ in resigned}, serve.text()
    assert len(resigned) == len(set(resigned)), resigned
    assert 0 < _metric(mport, "timestamp") <= 10 and 0 < _metric(mport, "snapshot") <= 10
    assert _metric(mport, "root") > 364 * 86400

    # Version 2 was released before serve started: only serve's re-signing lets the
    # device verify it now.
    assert main([*deploy, "--version", "2"]) == 0
    assert "committed on all 1 device(s)" in capsys.readouterr().out
    assert agent.infer() == ("2", 3.0)

    # A release while the serves re-sign the same repository, then a deployment of it.
    assert main(["release", "add", str(repo_dir), str(_release(repo_dir, arts, "3"))]) == 0
    ts, snap = repo.load("timestamp").signed, repo.load("snapshot").signed
    assert ts.snapshot_meta.version == snap.version
    assert snap.meta["targets.json"].version == repo.load("targets").signed.version
    assert main([*deploy, "--version", "3"]) == 0
    assert agent.infer() == ("3", 4.0)
    for s in (serve, second):
        s.stop()
        assert s.proc.returncode == 0, s.text()[-3000:]
        assert "Traceback" not in s.text()


# -- warnings: status and the fleet page ---------------------------------------------


def _get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def test_status_and_the_page_warn_about_roles_expiring_with_no_online_key(
        tmp_path: Path, broker: Mosquitto, serves: list[_Serve],
        capsys: pytest.CaptureFixture[str]) -> None:
    online = Repository.init(tmp_path / "online", tmp_path / "online-keys",
                             expires={"snapshot": timedelta(hours=12)})
    assert main(["status", "--repo", str(online.path), "--fleet", FLEET]) == 0
    assert "!" not in capsys.readouterr().err  # every key online: nothing to warn about
    repo_dir = _offline_keys(tmp_path)
    assert main(["status", "--repo", str(repo_dir), "--fleet", FLEET]) == 0
    err = capsys.readouterr().err
    for role in ("snapshot", "timestamp"):
        assert re.search(rf"^! {role} metadata expires in \S+ \(.*\) and its key is not "
                         rf"online, so serve cannot re-sign it: run 'edge-sdk release "
                         rf"refresh {re.escape(str(repo_dir))} --keys DIR' with DIR holding "
                         rf"the {role} key$", err, re.M), err

    port = _serve_page(tmp_path, repo_dir, broker, serves)
    warned = _get_json(port, "/api/warnings")
    assert [w["role"] for w in warned] == ["snapshot", "timestamp"]
    for w in warned:
        assert w["command"] == f"edge-sdk release refresh {repo_dir} --keys DIR"
        assert 0 < w["seconds_left"] <= 86400 and w["message"].startswith(w["role"])


def _offline_keys(tmp_path: Path) -> Path:
    """A repository whose snapshot (12 h) and timestamp (1 d) keys are kept offline."""
    repo_dir, keys = tmp_path / "repo", tmp_path / "keys"
    Repository.init(repo_dir, keys, expires={"snapshot": timedelta(hours=12)})
    for role in ("timestamp", "snapshot"):
        shutil.move(keys / role, tmp_path / f"offline-{role}")
    return repo_dir


def _serve_page(tmp_path: Path, repo_dir: Path, broker: Mosquitto,
                serves: list[_Serve]) -> int:
    port = free_port()
    serve = _Serve(["--repo", str(repo_dir), "--broker", broker.url, "--fleet", FLEET,
                    "--http", f"127.0.0.1:{port}"], tmp_path / "serve.log")
    serves.append(serve)
    serve.wait_line(r"fleet page on ")
    serve.wait_line(r"no online key for snapshot and timestamp in ")
    return port


@pytest.mark.slow
def test_the_page_shows_the_expiry_warning(tmp_path: Path, broker: Mosquitto,
                                           serves: list[_Serve], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    port = _serve_page(tmp_path, _offline_keys(tmp_path), broker, serves)
    browser.get(f"http://127.0.0.1:{port}/")

    def shown() -> str | None:
        box = browser.find_element(By.ID, "warnings-box")
        return box.text if box.is_displayed() and "timestamp metadata" in box.text else None

    text = wait_for(fresh(shown), 30, lambda: browser.page_source[-2000:])
    assert "snapshot metadata expires in" in text and "release refresh" in text


def test_writers_racing_for_a_due_timestamp_resign_it_once(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", tmp_path / "k",
                           expires={"timestamp": timedelta(seconds=2)})
    start = repo.versions()["timestamp"]
    exp, life = repo.expiries()["timestamp"], repo.lifetimes()["timestamp"]
    wait_for(lambda: refresh_due(exp, life, datetime.now(UTC)), 30)
    barrier = threading.Barrier(8)
    results: list[list[tuple[str, int, datetime]]] = []

    def race() -> None:
        mine = Repository(repo.path)  # one per writer, as separate processes have
        barrier.wait(10)
        results.append(mine.keep_fresh(["timestamp"]))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(len(r) for r in results) == [0] * 7 + [1]
    assert repo.versions()["timestamp"] == start + 1
