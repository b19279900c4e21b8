"""A rollout to 100 simulated devices on the real agent code, through the real controller
and responders on a private Mosquitto (bench/fleet.py runs the same at 1000)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._broker import Mosquitto
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
    # Each device fetched (and verified) the whole model itself: no shared download.
    assert r.bytes_served >= N * r.model_bytes
    assert r.db_rows["devices"] == N and r.db_rows["rollout_devices"] == N
