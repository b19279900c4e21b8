"""Errors raised on purpose sit in the EdgeError tree: the CLI's one catch prints them on one
line with their exit code, a Python caller catches them by domain, and a library's exception
is quoted the same way everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent._serving import SmokeTestError
from edge_sdk._internal import CAUSE_CHARS, one_line
from edge_sdk.errors import ConversionError, EdgeError, InstallError, MissingFileError, UsageError
from edge_sdk.fleet import FleetError, FleetUsageError
from edge_sdk.fleet._machine import CommandRefused, IllegalEvent, check_command


@pytest.mark.parametrize(("raised", "branch", "exit_code"), [
    (IllegalEvent, FleetError, 1),
    (CommandRefused, FleetUsageError, 2),
    (SmokeTestError, InstallError, 1),
    (MissingFileError, UsageError, 2),
])
def test_errors_raised_on_purpose_are_edge_errors_of_their_domain(
        raised: type[EdgeError], branch: type[EdgeError], exit_code: int) -> None:
    assert issubclass(raised, branch)
    assert raised("x").exit_code == exit_code


def test_a_refused_command_is_still_caught_as_itself_and_says_why() -> None:
    with pytest.raises(CommandRefused, match="it is already completed") as info:
        check_command("completed", "pause")
    assert isinstance(info.value, FleetUsageError)


def test_a_missing_profiling_candidate_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    """It escaped as a bare FileNotFoundError, which the CLI reports as an internal error
    asking for a bug report; callers catching FileNotFoundError still catch it."""
    from edge_sdk.release import Repository
    from edge_sdk.release._profile import profile_on_devices
    from edge_sdk.transport import MqttConfig, MqttConnection

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    conn = MqttConnection(MqttConfig(url="mqtt://127.0.0.1:1", fleet="lab"))  # never used
    missing = tmp_path / "missing.onnx"
    with pytest.raises(UsageError, match="no such file") as info:
        profile_on_devices(repo, conn, devices=["d"], candidates=[("c", missing)],
                           sample={"x": np.zeros(2)}, expected={"c": {"y": np.zeros(2)}})
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value).startswith(f"{missing}: ") and "\n" not in str(info.value)


def test_a_quoted_cause_is_one_capped_line_named_by_its_class() -> None:
    assert one_line(ValueError("bad\n  shape\tthere")) == "ValueError: bad shape there"
    assert one_line(KeyError()) == "KeyError"
    long = one_line(RuntimeError("x" * 10_000))
    assert len(long) == CAUSE_CHARS and long.endswith("…")


def test_a_quoted_edge_error_is_its_diagnosis_alone() -> None:
    assert one_line(ConversionError("model.onnx: invalid")) == "model.onnx: invalid"
