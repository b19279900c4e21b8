"""Subprocesses the tests start and stop, and waiting on what they do.

``edge_sdk_cli()`` is the ``edge-sdk`` command of the interpreter running the tests (the
console script beside it, else ``python -m edge_sdk``), so a run from any virtualenv
starts its own CLI.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def edge_sdk_cli() -> list[str]:
    """The command line that runs ``edge-sdk`` in the interpreter running the tests."""
    exe = Path(sys.executable).with_name("edge-sdk")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_sdk"]


class ManagedProcess:
    """A subprocess a test starts, kills (SIGKILL) or stops (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_for(cond: Callable[[], Any], timeout: float = 60,
             why: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(why() if why else "condition not reached within the deadline")


def wait_until(pred: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Wait until ``pred()`` is true; fail saying what never came."""
    wait_for(pred, timeout, lambda: f"timed out waiting for {what}")
