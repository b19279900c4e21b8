"""Values no rollout runs with are refused where a Python caller meets them —
:class:`~edge_sdk.fleet.RolloutSpec`, :class:`~edge_sdk.release.RolloutConfig`,
:func:`~edge_sdk.fleet.start_rollout` — with the one-line errors the CLI prints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError, UsageError
from edge_sdk.fleet._machine import RolloutSpec
from edge_sdk.release import RolloutConfig


@pytest.mark.parametrize(("bad", "message"), [
    ({"waves": ()}, "name at least one wave"),
    ({"waves": ("1", "-10%")}, "wave '-10%' must be a device count >= 1 or a percentage"),
    ({"waves": ("0",)}, "wave '0' must be a device count"),
    ({"waves": "1,10%"}, "name at least one wave"),
    ({"waves": (1, "100%")}, "each is a text"),
    ({"wave_timeout": 0}, "--wave-timeout must be > 0 and --rate >= 0"),
    ({"wave_timeout": math.nan}, "--wave-timeout must be > 0 and --rate >= 0"),
    ({"rate": -1}, "--wave-timeout must be > 0 and --rate >= 0"),
    ({"rate": math.inf}, "--rate must be a finite number"),
    ({"max_failure_rate": -0.1}, r"--max-failure-rate must be in \[0, 1\)"),
    ({"max_failure_rate": 1.0}, r"--max-failure-rate must be in \[0, 1\)"),
    ({"max_silent_rate": math.nan}, r"--max-silent-rate must be in \[0, 1\)"),
    ({"min_finished": 0}, "--min-finished must be >= 1"),
    ({"republish_s": -1}, "republish_s must be >= 0"),
])
def test_a_python_caller_gets_the_clis_one_line_error_for_a_bad_rollout_spec(
        bad: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        RolloutSpec(**bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_a_rollout_spec_keeps_good_values_and_takes_a_list_of_waves() -> None:
    spec = RolloutSpec(waves=["1", "50%"], rate=0.5, max_failure_rate=0.2,  # type: ignore[arg-type]
                       max_silent_rate=0.1, min_finished=3, republish_s=0)
    assert spec.waves == ("1", "50%") and RolloutSpec.from_json(spec.to_json()) == spec


def test_a_rollout_recorded_with_no_wave_still_loads_as_one_wave_of_everyone() -> None:
    # `rollout start --waves ,` was taken before empty waves were refused.
    assert RolloutSpec.from_json({**RolloutSpec().to_json(), "waves": []}).waves == ("100%",)


@pytest.mark.parametrize(("bad", "message"), [
    ({"max_failures": -1}, "max failures must be >= 0"),
    ({"max_failures": math.nan}, "max failures must be >= 0"),
    ({"wave_timeout": -5}, "wave timeout must be > 0 seconds"),
    ({"waves": ()}, "name at least one wave"),
    ({"waves": ("1", "abc")}, "wave 'abc' must be a device count"),
    ({"expires_days": 0}, "deployment expiry must be > 0 days"),
    ({"max_silent": -1}, "abort limits"),
    ({"min_finished": 0}, "--min-finished must be >= 1"),
])
def test_a_python_caller_gets_one_line_for_a_bad_rollout_config(bad: dict[str, object],
                                                                 message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        RolloutConfig(**bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("selector", "error", "message"), [
    ({"devices": ["cam/1"]}, ConfigError, "device id 'cam/1' must be 1-64 characters"),
    ({"groups": ["lobby+"]}, ConfigError, "group 'lobby\\+' must be 1-64 characters"),
    ({"group": ["lobby"]}, UsageError, "unknown selector key\\(s\\) 'group'"),
    ({"groups": "lobby"}, UsageError, "selector groups: a list of names"),
])
def test_start_rollout_refuses_a_malformed_selector_before_recording_anything(
        tmp_path: Path, selector: dict[str, list[str]], error: type[Exception],
        message: str) -> None:
    from edge_sdk.fleet import FleetDB, start_rollout

    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db:
        with pytest.raises(error, match=message):
            start_rollout(db, fleet="lab", model="m", version="2", selector=selector,
                          spec=RolloutSpec(), actor="alice")
        with pytest.raises(ConfigError, match=r"fleet 'a\.b'"):
            start_rollout(db, fleet="a.b", model="m", version="2",
                          selector={"devices": ["cam-1"]}, spec=RolloutSpec(), actor="alice")
        assert db.rollouts() == [] and db.audit(10) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--waves", "1,0%"], "wave '0%' must be a device count >= 1 or a percentage"),
    (["--max-failure-rate", "1"], "--max-failure-rate must be in [0, 1)"),
    (["--rate", "-2"], "--wave-timeout must be > 0 and --rate >= 0"),
    (["--device", "a/b"], "device id 'a/b' must be 1-64 characters"),
])
def test_rollout_start_prints_one_line_and_opens_no_database_for_a_bad_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    from edge_sdk.cli import main

    db = tmp_path / "fleet.db"
    code = main(["rollout", "start", "--db", f"sqlite:///{db}", "--model", "m", "--version",
                 "2", "--group", "lobby", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"edge-sdk: error: {message}")
    assert not db.exists()
