"""A private Mosquitto per test (or per session), on a free port, with a config the test writes.

Tests can stop, restart or cut the broker, and give it passwords and an ACL.
Never a mocked broker: if ``mosquitto`` is missing the test fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).exists():
            return cand
    raise RuntimeError("mosquitto is not installed (run the README's test command, which "
                       "installs it from the system packages)")


class Mosquitto:
    """One mosquitto process. ``extra_conf`` lines are appended to the generated config.
    ``persistent`` keeps retained messages and persistent sessions across restarts.
    ``run_as`` is the user mosquitto drops to when started as root (default: ours); the
    workdir is given to that user, and every directory above it must let it in."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_conf: str = "",
                 allow_anonymous: bool = True, persistent: bool = False,
                 run_as: str | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        user = run_as or pwd.getpwuid(os.geteuid()).pw_name
        if run_as is not None:
            account = pwd.getpwnam(run_as)
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Started as root, mosquitto would drop to its own user and could not
            # write the log or the persistence file in our workdir.
            f"user {user}\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            + (f"persistence true\npersistence_location {self.workdir}/\n" if persistent
               else "persistence false\n")
            + f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "message_size_limit 0\n"
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited at start: {err} {log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        if downtime:
            time.sleep(downtime)
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
