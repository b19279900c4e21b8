"""Retiring a release: `release yank` signs it as yanked in the TUF repository; every
newest-version default skips it, an explicit version of it is refused, and devices that
run it keep it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._store._schema import devices
from edge_sdk.fleet._web import FleetApi
from edge_sdk.release import Repository
from edge_sdk.transport import MqttConfig, MqttConnection, RepoResponder
from tests import _fleet_host
from tests._broker import Mosquitto
from tests._e2e import Fleet, new_agent
from tests._fleet_host import grp, start, start_fleet, wait_status
from tests._process import wait_for
from tests._trust_env import make_artifact

db_url = _fleet_host.db_url  # SQLite and PostgreSQL
serve = _fleet_host.serve  # `edge-sdk serve` on this module's fleet


@pytest.fixture()
def repo(tmp_path: Path) -> Repository:
    r = Repository.init(tmp_path / "repo", tmp_path / "keys")
    for i, v in enumerate(("1.0", "2.0", "3.0")):
        r.add_artifact(make_artifact(tmp_path / "arts", "m", v, seed=i).path)
    return r


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_yank_is_signed_listed_audited_and_undone_by_unyank(
        repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = repo.versions()
    assert main(["release", "yank", str(repo.path), "m", "3.0", "--reason",
                 "accuracy regression on night images", "--operator", "ana"]) == 0
    assert "yanked m 3.0 (accuracy regression" in capsys.readouterr().out
    after = repo.versions()
    assert after["targets"] == before["targets"] + 1
    assert after["timestamp"] == before["timestamp"] + 1
    assert main(["release", "list", str(repo.path)]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("m 3.0")]
    assert line.endswith("  YANKED: accuracy regression on night images")
    assert not any(x.startswith("m 2.0") and "YANKED" in x for x in out.splitlines())
    assert main(["release", "list", str(repo.path), "--json"]) == 0
    listing = {t["version"]: t for t in json.loads(capsys.readouterr().out)["targets"]}
    assert (listing["3.0"]["yanked"], listing["3.0"]["yank_reason"]) == (
        True, "accuracy regression on night images")
    assert (listing["2.0"]["yanked"], listing["2.0"]["yank_reason"]) == (False, None)
    with FleetDB.open(f"sqlite:///{repo.path / 'fleet.db'}") as db:
        (entry,) = [a for a in db.audit() if a["action"] == "release.yank"]
    assert entry["actor"] == "ana"
    assert entry["params"] | {"repo": None} == {
        "repo": None, "model": "m", "version": "3.0",
        "reason": "accuracy regression on night images"}

    assert repo.find("m").version == "2.0"  # the newest not yanked
    capsys.readouterr()
    assert main(["release", "unyank", str(repo.path), "m", "3.0"]) == 0
    assert repo.find("m").version == "3.0" and not repo.find("m").yanked
    assert main(["release", "unyank", str(repo.path), "m", "3.0"]) == 2
    assert _one_line(capsys.readouterr().err) == "edge-sdk: error: m 3.0 is not yanked"


def test_yank_of_an_unknown_release_is_one_line_and_changes_nothing(
        repo: Repository, capsys: pytest.CaptureFixture[str]) -> None:
    before = repo.versions()
    assert main(["release", "yank", str(repo.path), "m", "9.9"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("edge-sdk: error: no release m 9.9 in ") and "m 1.0" in line
    assert main(["release", "yank", str(repo.path), "nope", "1.0"]) == 2
    assert "no release nope 1.0" in _one_line(capsys.readouterr().err)
    assert repo.versions() == before


def test_deploy_defaults_skip_a_yanked_version_and_naming_it_is_refused(
        repo: Repository, shared_broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "yank", str(repo.path), "m", "3.0", "--reason", "bad"]) == 0
    mqtt = ["--broker", shared_broker.url, "--fleet", "yank-deploy"]
    capsys.readouterr()
    assert main(["deploy", "--repo", str(repo.path), "--device", "d1", "--model", "m",
                 *mqtt]) == 0
    assert "m 2.0" in capsys.readouterr().out
    assert main(["deploy", "--repo", str(repo.path), "--device", "d1", "--model", "m",
                 "--version", "3.0", *mqtt]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "edge-sdk: error: m 3.0 was yanked: bad (a yanked release is not deployed or "
        "pulled; 'edge-sdk release unyank' undoes it)")
    for v in ("1.0", "2.0"):
        main(["release", "yank", str(repo.path), "m", v])
    capsys.readouterr()
    assert main(["deploy", "--repo", str(repo.path), "--device", "d1", "--model", "m",
                 *mqtt]) == 2
    assert "every release of m in " in _one_line(capsys.readouterr().err)


def test_rollout_start_defaults_skip_a_yanked_version_and_naming_it_is_refused(
        repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with FleetDB.open(url) as db, db.begin() as c:
        c.execute(devices.insert().values(fleet="f", id="d1", first_seen=0, last_seen=0,
                                          model="m", version="1.0", online=True))
    main(["device", "set", "d1", "--group", "g", "--db", url, "--fleet", "f"])
    main(["release", "yank", str(repo.path), "m", "3.0", "--reason", "bad"])
    start = ["rollout", "start", "--db", url, "--fleet", "f", "--model", "m", "--group", "g",
             "--repo", str(repo.path)]
    capsys.readouterr()
    assert main([*start, "--version", "3.0"]) == 2
    assert "m 3.0 was yanked: bad" in _one_line(capsys.readouterr().err)
    assert main(start) == 0
    assert "rollout 1: m 2.0 recorded" in capsys.readouterr().out


def test_pull_skips_a_yanked_version_and_refuses_it_by_name(
        repo: Repository, tmp_path: Path, shared_broker: Mosquitto,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "yank", str(repo.path), "m", "3.0", "--reason", "bad"]) == 0
    mqtt = ["--broker", shared_broker.url, "--fleet", "yank-pull"]
    pull = ["pull", "m", "--root", str(repo.root_path), "--device", "p1", "-q",
            "--state", str(tmp_path / "state"), *mqtt]
    cfg = MqttConfig(url=shared_broker.url, fleet="yank-pull")
    with MqttConnection(cfg, name="host") as host, RepoResponder(host, repo.path):
        capsys.readouterr()
        assert main([*pull, "-o", str(tmp_path / "newest")]) == 0
        assert edge_sdk.Artifact.from_dir(tmp_path / "newest").manifest.version == "2.0"
        assert main([*pull, "--version", "3.0", "-o", str(tmp_path / "named")]) == 2
        assert "m 3.0 was yanked: bad" in _one_line(capsys.readouterr().err)
        assert not (tmp_path / "named").exists()


def test_the_models_api_marks_a_yanked_version(repo: Repository, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with FleetDB.open(url) as db:
        with db.begin() as c:
            for d, v in (("a", "3.0"), ("b", "2.0")):
                c.execute(devices.insert().values(
                    fleet="f", id=d, first_seen=0, last_seen=0, model="m", version=v,
                    online=True, models=json.dumps([{"name": "m", "version": v}])))
        repo.yank("m", "3.0", "bad")
        api = FleetApi(db, fleet="f", yanked=lambda: {
            (t.name, t.version): t.yank_reason for t in repo.targets() if t.yanked})
        status, _, body = api.handle("GET", "/api/models")
    assert status == 200
    rows = {r["version"]: r for r in json.loads(body)}
    assert (rows["3.0"]["yanked"], rows["3.0"]["yank_reason"]) == (True, "bad")
    assert (rows["2.0"]["yanked"], rows["2.0"]["yank_reason"]) == (False, None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("yank-agent")
    with Mosquitto(tmp / "broker") as broker:
        f = Fleet(tmp, broker)
        f.release("1")
        f.release("2")
        f.release("9", offset=float("nan"))  # fails every agent's smoke test
        yield f
        f.close()


@pytest.fixture()
def yank_v1(fleet: Fleet) -> Iterator[Callable[[], None]]:
    """Yanks release 1 of the module's repository when called; unyanks it afterwards."""
    done: list[bool] = []
    yield lambda: done.append(bool(fleet.repo.yank("adder", "1", "found a bug")))
    if done:
        fleet.repo.unyank("adder", "1")


def test_an_agent_running_a_yanked_version_keeps_serving_it(
        fleet, tmp_path, agents, yank_v1) -> None:
    """Yanked under a running device: it keeps the model through a failed update (its
    local rollback goes back to the yanked version) and a restart."""
    agent = new_agent(fleet, tmp_path, agents, "keeps").start()
    fleet.deploy("keeps", "1")
    agent.wait_version("1")
    yank_v1()
    counter = fleet.deploy("keeps", "9")  # the agent refreshes its metadata for this one
    wait_for(lambda: any(
        e["event"] in ("failed", "rolled_back") and
        (e.get("deployment") or {}).get("counter") == counter
        for e in list(fleet.events["keeps"])), 60, lambda: fleet.kinds("keeps"))
    assert agent.infer() == ("1", 2.0)
    agent.stop()
    agent.start()
    agent.wait_version("1")
    assert agent.infer() == ("1", 2.0)
    # An aborted rollout sends a device back to what it ran, yanked or not: its agent
    # fetches and installs the yanked release (its update client does not take yanked
    # for missing).
    fresh = new_agent(fleet, tmp_path, agents, "fresh").start()
    fleet.deploy("fresh", "1", rollback=True, allow_yanked=True)
    fresh.wait_version("1")
    assert fresh.infer() == ("1", 2.0)


@pytest.mark.slow
def test_an_abort_sends_devices_back_to_the_yanked_version_they_ran(
        fleet, tmp_path, agents, db_url, serve, yank_v1) -> None:
    """The controller's send-back names the version a device ran before, yanked or not:
    an aborted rollout must not leave devices on the release it stopped."""
    serve.start()
    procs = start_fleet(fleet, tmp_path, agents, g := grp("ab", db_url), 2, db_url)
    yank_v1()
    rid = start(db_url, "--version", "2", "--group", g, "--waves", "1,100%",
                "--wave-timeout", "60", "--pause-after-wave")
    wait_status(db_url, rid, "paused")
    assert main(["rollout", "abort", str(rid), "--db", db_url]) == 0
    r = wait_status(db_url, rid, "aborted")
    (d,) = [x for x in r["devices"] if x["wave"] == 1]
    assert (d["status"], d["rollback_status"]) == ("committed", "committed"), r
    for p in procs:
        assert p.infer() == ("1", 2.0)
