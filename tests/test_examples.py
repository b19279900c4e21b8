"""Every example script runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"),
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "demo finished OK" in res.stdout
    # The CNN step shows the measured candidate table and the choice made from it.
    cnn = res.stdout.split("convert a small CNN", 1)[1].split("===", 1)[0]
    assert "int8-static-minmax" in cnn and "× latency" in cnn and "chosen:" in cnn
    assert "Traceback" not in res.stdout + res.stderr
