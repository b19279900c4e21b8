"""Every example script runs as a user would run it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_sdk.fleet import FleetDB, default_url

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Demo:
    work: Path
    out: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """One run of the demo, as a user would run it, for the tests of this module."""
    work = tmp_path_factory.mktemp("demo")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"),
                          "--workdir", str(work)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    return Demo(work, res.stdout)


def test_demo_runs_end_to_end(demo: Demo) -> None:
    assert "demo finished OK" in demo.out
    # The CNN step shows the measured candidate table and the choice made from it.
    cnn = demo.out.split("convert a small CNN", 1)[1].split("===", 1)[0]
    assert "int8-static-minmax" in cnn and "× latency" in cnn and "chosen:" in cnn


def test_demo_rolls_a_fine_tuned_v2_out_to_three_devices_by_delta_after_one_approval(
        demo: Demo) -> None:
    """Checked in the demo's fleet database and artifacts, not only in what it printed."""
    work, out = demo.work, demo.out
    v2 = work / "cnn-art-1.1.0"
    assert json.loads((v2 / "report.json").read_text())["base"]["version"] == "1.0.0"
    full = (v2 / "model.onnx").stat().st_size
    released = re.search(r"released cnn 1\.1\.0.*\n  delta from 1\.0\.0: (\d+) bytes "
                         r"\(([\d.]+)% of the full model", out)
    assert released, out[-3000:]
    assert 0 < int(released[1]) < full / 10 and float(released[2]) < 10
    assert "the fleet page is live at http://127.0.0.1:" in out
    with FleetDB.open(default_url(work / "repo")) as db:
        on_v2 = {d["id"]: d for d in db.devices(fleet="demo", model="cnn 1.1.0")}
        assert sorted(on_v2) == ["dev-001", "dev-002", "dev-003"]
        for d in on_v2.values():
            assert d["groups"] == ["cameras"]
            got = re.fullmatch(r"delta from 1\.0\.0 \((\d+) bytes\)",
                               d["state"]["last_update"]["download"])
            assert got and int(got[1]) == int(released[1])
        rollout = next(r for r in db.rollouts(fleet="demo") if r["version"] == "1.1.0")
        assert rollout["status"] == "completed"
        assert [w["devices"] for w in rollout["progress"]] == [1, 2]
        assert rollout["config"]["pause_after_wave"]
        approvals = [a for a in db.audit() if a["action"] == "rollout.approve"
                     and a["params"]["rollout"] == rollout["id"]]
        assert len(approvals) == 1
    # The gate held: wave 2 was sent only after the approval, which came after wave 1.
    wave = {w: [d for d in rollout["devices"] if d["wave"] == w] for w in (1, 2)}
    approved = approvals[0]["ts"]
    assert all(d["finished_at"] <= approved for d in wave[1])
    assert all(d["sent_at"] >= approved for d in wave[2])
    assert "waiting for approval after wave 1 of 2" in out


def test_demo_serves_two_models_on_one_device_and_updates_the_cnn_alone(demo: Demo) -> None:
    """The classifier and the CNN side by side on dev-001; the CNN's v2 rollout leaves the
    classifier as it was (checked in the device's own state file too)."""
    second = demo.out.split("a second model on the same device", 1)[1].split("===", 1)[0]
    assert "POST /v2/models/classifier/infer -> model_version 2.0.0" in second
    assert "POST /v2/models/cnn/infer -> model_version 1.0.0" in second
    alone = demo.out.split("the CNN updated alone", 1)[1].split("===", 1)[0]
    assert "classifier events since step 17: none" in alone
    assert "it still answers model_version 2.0.0" in alone
    state = json.loads((demo.work / "dev-001" / "state" / "installed.json").read_text())
    assert {n: r["version"] for n, r in state["models"].items()} == \
        {"classifier": "2.0.0", "cnn": "1.1.0"}
    assert state["phase"] == "committed"
