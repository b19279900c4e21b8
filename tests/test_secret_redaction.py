"""Passwords never reach serve's output, a log line or an error message: a real `edge-sdk
serve` on a real Mosquitto with the example password file and ACL and a real PostgreSQL,
given passwords in the broker URL, in the database URL and with --password; then the
errors a mistyped URL, a refused login or an unreachable broker or database produce."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk._redact import redact, redact_url
from edge_sdk.release import Repository
from tests._acl import FLEET, example_broker
from tests._broker import Mosquitto, free_port
from tests._fleetdb import make_db
from tests._process import ROOT, wait_for

DB_SECRET = "Db-S3cret-pw"
CLI_SECRET = "Cli-S3cret-pw"


def _run(args: list[str], *, timeout: float = 60, env: dict[str, str] | None = None
         ) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "edge_sdk", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return p.returncode, p.stdout + p.stderr


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return Repository.init(tmp_path / "repo", tmp_path / "keys").path


@pytest.fixture()
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL database, its URL carrying a password (trust auth ignores it)."""
    for url in make_db("postgresql", tmp_path):
        yield url.replace("://postgres@", f"://postgres:{DB_SECRET}@")


def _assert_clean(out: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in out, f"secret {s[:3]}… printed:\n{out[-3000:]}"


def test_serve_start_line_and_logs_show_no_broker_or_database_password(
        tmp_path, repo, pg_url) -> None:
    with example_broker(tmp_path, {"cam-1": []}) as (broker, creds):
        secret = creds["edge-serve"]
        url = broker.url.replace("://", f"://edge-serve:{secret}@")
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", "serve", "--repo", str(repo), "--db",
                 pg_url, "--broker", url, "--fleet", FLEET, "--only", "fleet", "--http",
                 f"127.0.0.1:{free_port()}"], cwd=ROOT, stdout=out, stderr=out,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_for(lambda: "fleet page on" in log.read_text(), 60,
                     lambda: log.read_text()[-3000:])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        text = log.read_text()
        # The line names the broker and the database, with the passwords masked.
        assert "edge-serve:***@127.0.0.1" in text and "postgres:***@127.0.0.1" in text
        _assert_clean(text, secret, DB_SECRET)


def test_connection_errors_show_no_password(tmp_path, repo, pg_url) -> None:
    sqlite = f"sqlite:///{tmp_path / 'fleet.db'}"
    dead = f"127.0.0.1:{free_port()}"
    with Mosquitto(tmp_path / "open") as open_broker, \
            example_broker(tmp_path, {"cam-1": []}) as (broker, creds):
        cases: list[tuple[list[str], str]] = [
            # The database: unreachable, a port that is no number, a password in the query.
            (["--db", pg_url.replace("127.0.0.1:5432", dead)], "cannot reach database"),
            (["--db", pg_url.replace(":5432", ":54x2")], "is not valid"),
            (["--db", f"postgresql://postgres@127.0.0.1:1/x?password={DB_SECRET}"],
             "password=***"),
            (["--db", f"mysql://root:{DB_SECRET}@db/x"], "must start with"),
            # The broker: a bad port, a refused login (in the URL and with --password).
            (["--db", sqlite, "--broker", f"mqtt://u:{CLI_SECRET}@127.0.0.1:1:2"],
             "invalid port"),
            (["--db", sqlite, "--broker", broker.url.replace(
                "://", f"://edge-serve:{CLI_SECRET}@")], "refused the connection"),
            (["--db", sqlite, "--broker", broker.url, "--username", "edge-serve",
              "--password", CLI_SECRET, "--debug"], "refused the connection"),
        ]
        for extra, words in cases:
            debug = ["--debug"] if "--debug" in extra else []  # tracebacks too
            args = [*debug, "serve", "--repo", str(repo), "--fleet", FLEET, "--only", "fleet"]
            if "--broker" not in extra:
                args += ["--broker", open_broker.url]
            code, out = _run(args + [e for e in extra if e != "--debug"])
            assert code != 0 and words in out, (extra, out[-2000:])
            _assert_clean(out, DB_SECRET, CLI_SECRET, creds["edge-serve"])
        # An unreachable broker, the password in the environment (--password's variable).
        code, out = _run(["status", "--broker", f"mqtt://op@{dead}", "--username", "op",
                          "--fleet", FLEET], env={"EDGE_MQTT_PASSWORD": CLI_SECRET},
                         timeout=120)
        assert code != 0 and "could not connect" in out, out
        _assert_clean(out, CLI_SECRET)


def test_every_log_line_masks_the_secrets_the_process_was_given(tmp_path) -> None:
    # A library's own message that echoes a password it was handed (a driver's DSN error, a
    # URL in a warning) goes through the same funnel as edge-sdk's: the log record.
    script = textwrap.dedent(f"""
        import logging
        from edge_sdk.cli import main
        from edge_sdk.transport import MqttConfig
        main(["--version"])  # the CLI sets up redaction before any command runs
        MqttConfig(url="mqtt://op:{CLI_SECRET}@127.0.0.1:1", password="{DB_SECRET}")
        log = logging.getLogger("some.library")
        log.warning("dsn host=db password={DB_SECRET} user=op failed")
        log.warning("retrying %s", "mqtt://op:{CLI_SECRET}@127.0.0.1:1")
        try:
            raise RuntimeError("login {DB_SECRET} refused")
        except RuntimeError:
            log.exception("handler failed")
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert "password=***" in p.stderr and "op:***@127.0.0.1" in p.stderr, p.stderr
    assert "login *** refused" in p.stderr
    _assert_clean(p.stderr, DB_SECRET, CLI_SECRET)


def test_the_agent_shows_no_broker_password_in_a_config_error(tmp_path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(textwrap.dedent(f"""
        device_id = "dev-1"
        fleet = "{FLEET}"
        state_dir = "{tmp_path / 'state'}"
        [broker]
        url = "mqtt://dev-1:{CLI_SECRET}@127.0.0.1:port"
        [trust]
        root = "{tmp_path / 'root.json'}"
        deployment_key = "{tmp_path / 'key.json'}"
    """))
    code, out = _run(["agent", "--config", str(cfg), "--check"])
    assert code != 0 and "broker.url" in out and "dev-1:***@" in out, out
    _assert_clean(out, CLI_SECRET)


@pytest.mark.parametrize(("url", "shown"), [
    ("mqtt://op:pw-1234@h:1883", "mqtt://op:***@h:1883"),
    ("mqtts://op:p@ss:w/rd@h:8883", "mqtts://op:***@h:8883"),  # '@', ':', '/' unencoded
    ("mqtt://op:a,b@h1:1883,mqtt://op:c@h2:1883", "mqtt://op:***@h1:1883,mqtt://op:***@h2:1883"),
    ("postgresql://u:s%40cret@db:5432/fleet?sslmode=require&password=x",
     "postgresql://u:***@db:5432/fleet?sslmode=require&password=***"),
    ("postgresql://db/fleet?PassWord=x&sslpassword=y",
     "postgresql://db/fleet?PassWord=***&sslpassword=***"),
    ("mqtt://token-only@h", "mqtt://token-only@h"),  # a user name is not a secret
    ("sqlite:////var/lib/fleet.db", "sqlite:////var/lib/fleet.db"),
])
def test_a_url_keeps_user_host_and_path_and_loses_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact(f"error: cannot reach {url} (retrying)") == f"error: cannot reach {shown} " \
                                                              "(retrying)"
