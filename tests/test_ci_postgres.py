"""The PostgreSQL the fleet database tests need: a run without it fails in CI and skips
with its reason elsewhere; the test command's setup (.ci/postgres.sh) leaves a server
that answers alone and says in one line why it cannot start one. (Installing and starting
a server is not run here: that would change the machine's PostgreSQL.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._broker import free_port
from tests._fleetdb import PG_ADMIN
from tests._process import ROOT

_TEST = '''
from tests._fleetdb import make_db


def test_needs_postgresql(tmp_path):
    for url in make_db("postgresql", tmp_path):
        assert url
'''


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_postgresql_fails_the_run_in_ci_and_skips_with_its_reason_elsewhere(
        tmp_path: Path, ci: bool) -> None:
    (tmp_path / "test_pg.py").write_text(_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"PYTHONPATH": str(ROOT),
            "EDGE_TEST_PG": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
            **({"CI": "true"} if ci else {})}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest",
                        "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), str(tmp_path / "test_pg.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "no PostgreSQL at postgresql://postgres@127.0.0.1:" in out, out
    assert "starts one when run as root, or set EDGE_TEST_PG" in out, out
    if ci:
        assert p.returncode == 1 and "skipped in CI, which must not happen" in out, out
    else:
        assert p.returncode == 0 and "1 skipped" in out, out


def _setup(port: int, *, user: str | None = None) -> subprocess.CompletedProcess[str]:
    script = (f'set -euo pipefail; ROOT="{ROOT}"; source "$ROOT/.ci/postgres.sh"; '
              f"test_postgres {port}")
    cmd = ["bash", "-c", script]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.skipif(PG_ADMIN != "postgresql://postgres@127.0.0.1:5432/test",
                    reason="EDGE_TEST_PG names another server than the setup's")
def test_setup_leaves_a_postgresql_that_answers_alone_and_says_nothing() -> None:
    p = _setup(5432)  # the server these tests use: it answers and lets them in
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the setup as another user")
def test_setup_without_root_and_without_a_server_says_so_in_one_line() -> None:
    p = _setup(free_port(), user="nobody")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("setup: no PostgreSQL on 127.0.0.1:") and \
        "not root to start one: its tests skip (in CI they fail)" in p.stderr
    assert len(p.stderr.splitlines()) == 1
