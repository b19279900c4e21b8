"""Input drift on a real agent: live requests are summed per channel off the request path
(bounded queue, rate cap, sliding window) and reported with the heartbeat."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent import AgentConfig
from device_agent._config import DriftConfig
from device_agent._drift import DriftTap
from edge_sdk.errors import ConfigError
from tests._drift_rig import analysed, drift_agent, drift_artifact, evaluation_like, infer
from tests._http_agent import metric, wait_for


def _fed(tmp: Path, shift: float, n: int = 260) -> dict[str, object]:
    art = drift_artifact(tmp)
    with drift_agent(tmp, art) as agent:
        for feed in evaluation_like(n, seed=5, shift=shift):
            infer(agent, feed)
        wait_for(lambda: analysed(agent) >= n, "every request to be analysed")
        assert agent.drift is not None
        beat = agent.drift.report()
        psi_metric = metric(agent, "edge_agent_input_psi", model="adder", input="x")
        state = agent.snapshot()["drift"]
    return {"beat": beat, "psi_metric": psi_metric, "state": state}


def test_evaluation_like_inputs_stay_below_the_warning_level(tmp_path: Path) -> None:
    got = _fed(tmp_path, shift=0.0)
    x = got["beat"]["adder"]["x"]  # type: ignore[index]
    assert x["n"] == 260 and len(x["channels"]) == 4 and len(x["psi"]) == 4
    assert x["psi_max"] < 0.1
    assert got["psi_metric"] == pytest.approx(x["psi_max"])
    assert got["state"] == {"adder": {"x": {"n": 260, "psi_max": x["psi_max"]}}}
    # the figures are the requests' own
    wide = x["channels"][3]
    assert 5.0 < wide["std"] < 15.0 and abs(wide["mean"]) < 2.0
    assert all(len(c["hist"]) == 12 for c in x["channels"])


def test_shifted_inputs_are_flagged_on_the_device(tmp_path: Path) -> None:
    got = _fed(tmp_path, shift=1.0)
    x = got["beat"]["adder"]["x"]  # type: ignore[index]
    assert x["psi_max"] > 0.25 and min(x["psi"]) > 0.25
    assert got["psi_metric"] > 0.25


def test_a_full_queue_skips_and_counts_without_waiting(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None and agent.drift is None
        release = threading.Event()
        tap = DriftTap(DriftConfig(max_per_s=10_000, queue=2),
                       on_worker_start=lambda: release.wait(30))
        try:
            feed = evaluation_like(1, seed=0)[0]
            calls = 0
            # The worker is stuck: the tap never waits for it (else this loop would).
            while tap.counts().get("adder", {}).get("skipped", {}).get("queue", 0) < 50:
                assert calls < 1_000_000, "a full queue never skipped a request"
                tap.served(served, feed, {}, 0.001)
                calls += 1
            skipped = tap.counts()["adder"]["skipped"]
            # two queued, and one more the worker may have taken before it blocked
            assert calls - sum(skipped.values()) in (2, 3)
            assert tap.counts()["adder"]["analysed"] == 0
        finally:
            release.set()
            tap.stop()


def test_the_rate_cap_skips_requests_over_max_per_s(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"max_per_s": 0.01}) as agent:
        for feed in evaluation_like(30, seed=2):
            infer(agent, feed)
        assert agent.drift is not None
        wait_for(lambda: analysed(agent) == 1, "the first request to be analysed")
        assert agent.drift.counts()["adder"]["skipped"] == {"rate": 29}
        assert metric(agent, "edge_agent_drift_skipped_total", model="adder",
                      why="rate") == 29
        assert metric(agent, "edge_agent_drift_analysed_total", model="adder") == 1


def test_the_window_keeps_the_last_requests_in_slots(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None
        tap = DriftTap(DriftConfig(window=40, slots=4))
        # old requests far off, recent ones like the evaluation set: only these count
        for feed in evaluation_like(100, seed=3, shift=5.0) + evaluation_like(40, seed=4):
            tap.analyse(served, feed)
        x = tap.figures()["adder"]["x"]
        assert x["n"] == 40 and abs(x["channels"][0]["mean"]) < 1.0  # the shifted: 5
        tap.analyse(served, evaluation_like(1, seed=6, shift=5.0)[0])
        assert tap.figures()["adder"]["x"]["n"] == 31  # a new slot pushed the oldest out


def test_inputs_over_max_input_bytes_are_skipped(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None
        tap = DriftTap(DriftConfig(max_input_bytes=15))
        try:
            tap.served(served, evaluation_like(1, seed=0)[0], {}, 0.001)  # 16 bytes
            assert tap.counts()["adder"] == {"analysed": 0, "cpu_s": 0.0,
                                             "skipped": {"size": 1}}
        finally:
            tap.stop()


def test_inputs_that_do_not_fit_the_reference_are_counted_not_added(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None
        tap = DriftTap(DriftConfig())
        tap.analyse(served, {"x": np.zeros((1, 7), np.float32)})
        assert tap.counts()["adder"]["skipped"] == {"shape": 1}
        assert tap.figures()["adder"] == {}


def test_the_heartbeat_block_is_bounded_and_rotates_through_models(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None
        tap = DriftTap(DriftConfig(max_report_bytes=1024))
        rng = np.random.default_rng(0)
        # a model of many inputs: its figures need more than one report
        feed = {f"in{i}": rng.normal(size=(1, 4)).astype(np.float32) for i in range(8)}
        tap.analyse(served, feed)
        seen: set[str] = set()
        for _ in range(8):
            block = tap.report()
            assert len(json.dumps(block)) <= 1024
            seen.update(block["adder"])
        assert seen == set(feed)


def test_a_model_no_longer_served_leaves_no_figures(tmp_path: Path) -> None:
    art = drift_artifact(tmp_path)
    with drift_agent(tmp_path, art, drift={"enabled": False}) as agent:
        served = agent.slots.current
        assert served is not None
        serving: dict[str, object] = {"adder": served}
        tap = DriftTap(DriftConfig(), serving=lambda: serving)  # type: ignore[arg-type,return-value]
        tap.analyse(served, evaluation_like(1, seed=0)[0])
        assert set(tap.figures()) == {"adder"}
        assert tap.report() == {"adder": tap.figures()["adder"]}
        serving.clear()
        # once an empty block (the host drops what it kept), then nothing at all
        assert tap.figures() == {} and tap.report() == {} and tap.report() is None


@pytest.mark.parametrize(("key", "value"), [
    ("max_per_s", 0), ("window", 5), ("slots", 0), ("queue", 0), ("max_report_bytes", 100),
    ("max_input_bytes", 0),
])
def test_bad_drift_settings_name_their_key(tmp_path: Path, key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"drift.{key}"):
        AgentConfig.from_dict({"device_id": "d", "fleet": "f", "state_dir": str(tmp_path),
                               "drift": {key: value}})
