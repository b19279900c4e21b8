"""A fleet database holding a gated rollout mid-way, as the controller and the registry
leave it: devices reporting with and without a shadow run, and a rollout whose devices
shadow, passed the gate, failed it. Shared by the API and the page's tests."""

from __future__ import annotations

import json
import time
from typing import Any

from edge_sdk.fleet import FleetDB
from edge_sdk.fleet._machine import DeviceProgress, RolloutSpec
from edge_sdk.fleet._manage import start_rollout
from edge_sdk.fleet._registry import ingest_state
from edge_sdk.fleet._store import load_state, save_state
from edge_sdk.quality import Gate, ShadowFigures

GATE = Gate.parse("agreement>=0.99 over 100 requests")
#: A running shadow block as an agent reports it in its state.
RUNNING = {"deployment": 7, "model": "det", "version": "2", "started": 1000.0,
           "status": "running", "figures": ShadowFigures(
               compared=20, agreed=19, worst=0.4, worst_detail="class 3 -> 5",
               serving_ms_p50=2.0, shadow_ms_p50=3.0).to_json()}


def state(device: str, **extra: Any) -> bytes:
    """A device's retained state serving det 1."""
    return json.dumps({"device": device, "online": True, "ts": time.time(),
                       "model": {"name": "det", "version": "1"},
                       "models": [{"name": "det", "version": "1"}], **extra}).encode()


def gated_rollout(db: FleetDB, fleet: str) -> int:
    """cam-1 shadowing (its state reports the run), cam-2 failed the gate, cam-3 passed
    and was sent the release; returns the rollout's id."""
    with db.begin() as c:
        assert ingest_state(c, fleet, "cam-1", state("cam-1", shadow=RUNNING))
        for d in ("cam-2", "cam-3"):
            assert ingest_state(c, fleet, d, state(d))
    rid = start_rollout(db, fleet=fleet, model="det", version="2",
                        selector={"devices": ["cam-1", "cam-2", "cam-3"]},
                        spec=RolloutSpec(waves=("100%",), gate=GATE), actor="alice")
    with db.begin() as c:
        st, old = load_state(c, rid), load_state(c, rid)
        st.status, st.wave, st.waves = "running", 1, 1
        st.devices = {
            "cam-1": DeviceProgress(1, status="shadowing", shadow_counter=7),
            "cam-2": DeviceProgress(1, status="gate_failed", shadow_counter=7,
                                    reason="agreement 0.5 over 100 (gate agreement>=0.99)",
                                    shadow_verdict="failed", shadow_figures=ShadowFigures(
                                        compared=100, agreed=50).to_json()),
            "cam-3": DeviceProgress(1, status="sent", counter=8, shadow_counter=7,
                                    shadow_verdict="passed", shadow_figures=ShadowFigures(
                                        compared=100, agreed=100, serving_ms_p50=2.0,
                                        shadow_ms_p50=2.5).to_json())}
        save_state(c, st, old)
    return rid
