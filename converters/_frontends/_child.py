"""The framework child process: torch, TensorFlow/Keras and scikit-learn run only there.

PyTorch's default Linux wheel (a CUDA build) and TensorFlow segfault when they share
one interpreter, and any framework can crash, hang or exhaust memory on a model it
does not like. So the converting process never imports a framework: a
:class:`FrameworkChild` starts a fresh interpreter (same ``sys.executable``) that
loads the model, exports it into the work directory and answers reference
predictions over a private socket. Whatever happens to the child comes back as one
:class:`~edge_sdk.errors.ConversionError` line naming the framework, the signal or
exit code, and the last line the child printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_sdk.errors import ConversionError, EdgeError

# What the frameworks are called in messages, by front-end kind.
FRAMEWORKS = {"torch": "PyTorch", "keras": "TensorFlow", "sklearn": "scikit-learn",
              "tflite": "TensorFlow (tf2onnx)"}
_LOG_NAME = "framework.log"
_TAIL_BYTES = 8192
_LINE_LIMIT = 200


class FrameworkChild:
    """One child interpreter serving one framework model; use as a context manager.

    ``call(op, **kwargs)`` runs ``op`` in the child (see ``_worker.OPS``) and returns
    its result. An error the child raised on purpose (:class:`EdgeError`) is raised
    here as it was; any other exception comes back as ``RuntimeError("Type: text")``
    so no framework type is ever unpickled in this process. A child that dies or
    takes longer than ``timeout_s`` for one call is a :class:`ConversionError`.
    """

    def __init__(self, kind: str, work: Path, *, timeout_s: float) -> None:
        self.framework = FRAMEWORKS.get(kind, kind)
        self.timeout_s = timeout_s
        self.log_path = Path(work) / _LOG_NAME
        ours, theirs = socket.socketpair()
        try:
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "converters._frontends._worker",
                     str(theirs.fileno())],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(theirs.fileno(),), env=_child_env(),
                )
        except OSError as err:
            ours.close()
            raise ConversionError(
                f"cannot start a child interpreter for {self.framework} "
                f"({sys.executable}): {err.strerror or err}"
            ) from err
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        # The child mirrors this interpreter's imports: its path (the user's packages, a
        # factory's module) and any module deliberately hidden here (sys.modules[x] = None).
        hidden = sorted(k for k, v in sys.modules.items() if v is None)
        try:
            self._conn.send(("hello", {"sys_path": list(sys.path), "hidden": hidden,
                                       "cwd": os.getcwd()}))
            self.call("ping", what="while starting")
        except BaseException:
            self._kill()
            self._conn.close()
            raise

    def call(self, op: str, *, what: str | None = None, **kwargs: Any) -> Any:
        """Run ``op`` in the child; ``what`` names the step in error messages."""
        step = what or f"during {op!r}"
        try:
            self._conn.send((op, kwargs))
            if not self._conn.poll(self.timeout_s):
                self._kill()
                raise ConversionError(
                    f"{self.framework} took longer than {self.timeout_s:g} s {step} and was "
                    f"stopped (raise ConvertConfig.framework_timeout_s){self._last_output()}"
                )
            status, payload = self._conn.recv()
        except (EOFError, OSError) as err:
            raise self._died(step) from err
        if status == "ok":
            return payload
        if status == "edge":
            raise payload
        raise RuntimeError(payload)

    def close(self) -> None:
        """Stop the child (politely, then for good); safe to call twice."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._conn.send(("exit", {}))
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        self._conn.close()

    def __enter__(self) -> FrameworkChild:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self._kill()
        self.close()

    # -- failure -----------------------------------------------------------------------

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def _died(self, step: str) -> ConversionError:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._proc.returncode
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"was killed by {name}"
            if -code == signal.SIGKILL:
                how += " (out of memory?)"
        else:
            how = f"exited with code {code}"
        return ConversionError(
            f"the {self.framework} child process {how} {step}{self._last_output()}"
        )

    def _last_output(self) -> str:
        line = last_line(self.log_path)
        return f"; its last output: {line!r}" if line else "; it printed nothing"


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, capped; '' when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return ""
    text = " ".join(lines[-1].split())
    return text if len(text) <= _LINE_LIMIT else text[: _LINE_LIMIT - 1] + "…"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONUNBUFFERED"] = "1"  # so the last line printed before a crash is in the log
    return env


def portable_error(err: BaseException) -> tuple[str, Any]:
    """How the child sends an exception: an EdgeError as itself (or, when it does not
    pickle, as the nearest edge_sdk.errors class with its text); anything else as text."""
    import pickle

    if isinstance(err, EdgeError):
        try:
            pickle.loads(pickle.dumps(err))
            return "edge", err
        except Exception:
            base = next(c for c in type(err).__mro__ if c.__module__ == EdgeError.__module__)
            return "edge", base(str(err))
    text = " ".join(str(err).split())
    return "error", f"{type(err).__name__}: {text}" if text else type(err).__name__


__all__ = ["FRAMEWORKS", "FrameworkChild", "last_line", "portable_error"]
