from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import _models
from tests._broker import Mosquitto
from tests._child import in_one_child

if TYPE_CHECKING:
    from tests._e2e import AgentProc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# In CI every part is installed by the test command; a skip there (a missing broker,
# runtime or framework) would hide a broken setup, so it is reported as a failure.
_STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if _STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must not happen: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def add_onnx(model_dir: Path) -> Path:
    return _models.add_model(model_dir / "add.onnx")


@pytest.fixture(scope="session")
def multi_onnx(model_dir: Path) -> Path:
    return _models.multi_io_model(model_dir / "multi.onnx")


@pytest.fixture(scope="session")
def cnn_onnx(model_dir: Path) -> Path:
    return _models.small_cnn(model_dir / "cnn.onnx")


@pytest.fixture(scope="session")
def tflite_dense(model_dir: Path) -> tuple[Path, Path]:
    """The float and the int8 dense model, built in one child (one TensorFlow import)."""
    float_path, int8_path = in_one_child([
        ("tests._models:tflite_dense", (model_dir / "dense.tflite",), {}),
        ("tests._models:tflite_dense", (model_dir / "dense_int8.tflite",), {"int8": True}),
    ])
    return float_path, int8_path


@pytest.fixture(scope="session")
def tflite_float(tflite_dense: tuple[Path, Path]) -> Path:
    return tflite_dense[0]


@pytest.fixture(scope="session")
def tflite_int8(tflite_dense: tuple[Path, Path]) -> Path:
    return tflite_dense[1]


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto for one test; the test may stop/restart it."""
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One private Mosquitto for tests that only need a working broker."""
    with Mosquitto(tmp_path_factory.mktemp("shared-broker")) as b:
        yield b


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    """The agent subprocesses a test starts (``tests._e2e.new_agent``), killed after it."""
    procs: list[AgentProc] = []
    yield procs
    for p in procs:
        p.kill()
