"""A rollout to 100 simulated devices on the real agent code, through the real controller
and responders on a private Mosquitto (bench/fleet.py runs the same at 1000)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from edge_sdk.transport._responder import partition_of
from tests._broker import Mosquitto, free_port
from tests._fleetrig import run_rollout

N = 100


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["share", "partitioned"])
def test_rollout_to_100_simulated_devices_commits_everywhere_each_fetching_its_own_bytes(
        tmp_path: Path, shared: bool) -> None:
    with Mosquitto(tmp_path / "broker", extra_conf="max_connections -1\n") as broker:
        r = run_rollout(tmp_path / "run", N, broker_urls=[broker.url], responders=2,
                        shared=shared, timeout=120)
    assert r.notes == []
    assert r.lost == [] and r.committed == N
    assert r.registry_new == N, "every device's registry row names the new version"
    # Each device fetched (and verified) the whole model itself: no shared download;
    # and each was answered by one responder, not by both.
    assert N * r.model_bytes <= r.bytes_served < 1.5 * N * r.model_bytes
    assert r.db_rows["devices"] == N and r.db_rows["rollout_devices"] == N


def test_partition_of_is_stable_and_gives_every_responder_a_share() -> None:
    devices = [f"sim-{i:04d}" for i in range(1000)]
    parts = [partition_of(d, 4) for d in devices]
    assert parts == [zlib.crc32(d.encode()) % 4 for d in devices]  # same on every host
    counts = [parts.count(k) for k in range(4)]
    assert min(counts) > 200, counts


@pytest.mark.parametrize(("args", "says"), [
    (["--partition", "1/2"], "--partition needs --no-shared"),
    (["--no-shared", "--partition", "2/2"], "must be K/N with 0 <= K < N"),
    (["--no-shared", "--partition", "x"], "must be K/N"),
    (["--only", "responder", "--db", "sqlite:///x.db"], "--only responder runs no registry"),
])
def test_serve_refuses_a_bad_partition_or_role_in_one_line(tmp_path: Path, capsys, args,
                                                            says) -> None:
    from edge_sdk.cli import main
    from edge_sdk.release import Repository

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    code = main(["serve", "--repo", str(repo.path), "--broker", "mqtt://127.0.0.1:1",
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_partitioned_responder_refuses_a_shared_subscription() -> None:
    from edge_sdk.errors import ConfigError
    from edge_sdk.transport import ResponderConfig

    assert ResponderConfig(shared=False, partition=(1, 2)).partition == (1, 2)
    with pytest.raises(ConfigError, match="needs a plain subscription"):
        ResponderConfig(partition=(0, 2))


def test_serve_only_responder_ignores_the_fleet_hosts_edge_db(tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    from edge_sdk.cli import main
    from edge_sdk.release import Repository

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    monkeypatch.setenv("EDGE_DB", f"sqlite:///{tmp_path / 'fleet.db'}")
    # Nothing listens there: the responder gets past the option checks and fails to connect.
    code = main(["serve", "--repo", str(repo.path), "--only", "responder",
                 "--broker", f"mqtt://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code != 0 and "--only responder runs no registry" not in err, err
    assert len(err.strip().splitlines()) == 1, err
