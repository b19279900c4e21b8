"""The operator's record of who may be asked for field samples: per device, per group
(through the groups the operator assigned), audited, and refused in one line otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.errors import ConfigError
from edge_sdk.fleet import FleetDB, FleetUsageError
from edge_sdk.fleet._samples import (
    allow_samples,
    check_samples_allowed,
    deny_samples,
    sample_policy,
)


@pytest.fixture
def db(tmp_path: Path) -> FleetDB:
    return FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}")


def test_device_not_allowed_is_refused_saying_how_to_allow_it(db: FleetDB) -> None:
    with pytest.raises(FleetUsageError, match="samples allow --device cam-1") as err:
        check_samples_allowed(db, "lab", "cam-1")
    assert "\n" not in str(err.value)


def test_device_allowed_by_its_own_entry(db: FleetDB) -> None:
    assert allow_samples(db, "lab", "device", "cam-1", "ops")
    assert not allow_samples(db, "lab", "device", "cam-1", "ops")  # already
    assert check_samples_allowed(db, "lab", "cam-1") == "device cam-1"
    with pytest.raises(FleetUsageError):
        check_samples_allowed(db, "other-fleet", "cam-1")
    assert deny_samples(db, "lab", "device", "cam-1", "ops")
    with pytest.raises(FleetUsageError):
        check_samples_allowed(db, "lab", "cam-1")


def test_group_permission_covers_the_devices_assigned_to_it(
        tmp_path: Path, db: FleetDB) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["device", "set", "cam-1", "--group", "line-3", "--db", url,
                 "--fleet", "lab"]) == 0
    allow_samples(db, "lab", "group", "line-3", "ops")
    assert check_samples_allowed(db, "lab", "cam-1") == "group line-3"
    deny_samples(db, "lab", "group", "line-3", "ops")
    with pytest.raises(FleetUsageError, match="groups: line-3"):
        check_samples_allowed(db, "lab", "cam-1")
    with pytest.raises(FleetUsageError):
        check_samples_allowed(db, "lab", "cam-2")


def test_every_change_is_in_the_audit_log(db: FleetDB) -> None:
    allow_samples(db, "lab", "group", "g1", "alice")
    deny_samples(db, "lab", "group", "g1", "bob")
    log = [(a["actor"], a["action"]) for a in db.audit()]
    assert ("alice", "samples.allow") in log and ("bob", "samples.deny") in log
    assert sample_policy(db, "lab") == []


def test_bad_scope_or_name_is_one_line(db: FleetDB) -> None:
    with pytest.raises(FleetUsageError, match="scope"):
        allow_samples(db, "lab", "fleet", "x", "ops")
    with pytest.raises(ConfigError, match="one MQTT topic level"):
        allow_samples(db, "lab", "device", "a/b", "ops")


def test_cli_needs_exactly_one_target(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert main(["samples", "allow", "--db", url]) != 0
    assert "exactly one of --device ID or --group NAME" in capsys.readouterr().err
