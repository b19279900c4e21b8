"""The memory a device gets back when it lets go of a model. Run in a fresh interpreter
(``tests._child.in_child``), so that nothing else the test session allocates moves the
resident set measured: a real agent serving one model over HTTP, and a model of 32 MiB
of weights loaded, served, asked and dropped again and again next to it."""

from __future__ import annotations

import http.client
import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from device_agent._models import LoadedModels, releases
from device_agent._state import StateStore
from edge_sdk._internal import load_model_file
from tests import _models
from tests._agent_local import deployment
from tests._http_agent import serving, wait_for

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": X.reshape(-1).tolist()}]}).encode()
#: Weights of the big model: 4 x 2 Mi float32 (32 MiB; an 8 MiB activation per run).
WIDTH = 2 << 20


def big_artifact(workdir: Path, version: str, seed: int = 0) -> edge_sdk.Artifact:
    """``big`` ``version``: y = x + 1 carrying 32 MiB of weights that run."""
    w = np.random.default_rng(seed).standard_normal((4, WIDTH), dtype=np.float32)
    model = _models.weighted_offset_model(workdir / f"big-{version}.onnx", 1.0, w)
    return edge_sdk.build_artifact(model, workdir / f"big-{version}", name="big",
                                   version=version, sample={"x": X})


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def released(served: Any) -> Any:
    """A wait for ``served``'s memory to be released: once the caller drops its last
    reference, the model is freed and then memory released (see ``_models``)."""
    freed_at: list[int] = []
    weakref.finalize(served, lambda: freed_at.append(releases()))
    label = served.record.label()  # the wait must not hold the model itself

    def wait() -> None:
        wait_for(lambda: bool(freed_at), f"{label} to be freed", 10)
        wait_for(lambda: releases() > freed_at[0], "memory to be released", 10)

    return wait


def _infer(port: int, name: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{name}/infer", body=BODY)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, raw[:300]


def unload_cycles(workdir: str, cycles: int) -> dict[str, list[float]]:
    """Load ``big`` (verified, smoke-tested), serve it next to ``bee``, ask both over
    HTTP, then swap it out and forget it, ``cycles`` times. Returns the resident set
    (MiB) with ``big`` loaded and after letting go, each against before the first load."""
    d = Path(workdir)
    art = big_artifact(d, "1")
    store = StateStore(d / "big-state")
    record = store.adopt(art, None)
    with serving(d, _models.offset_model(d / "bee.onnx", 100.0), "bee", {"x": X}) as agent:
        assert agent.http is not None
        port = agent.http.port
        models = LoadedModels(agent.config, store, load_model_file)

        def cycle() -> tuple[float, float]:
            big = models.load(record)
            wait = released(big)
            agent.slots.swap({"big": big})
            del big
            for name in ("big", "bee", "big"):
                _infer(port, name)
            loaded = rss_mib()
            agent.slots.swap({"big": None})
            models.forget([record])
            wait()
            return loaded, rss_mib()

        cycle()  # the runtime's first load maps its code and thread pools for good
        before = rss_mib()
        out: dict[str, list[float]] = {"loaded": [], "after": []}
        for _ in range(cycles):
            loaded, after = cycle()
            out["loaded"].append(loaded - before)
            out["after"].append(after - before)
        _infer(port, "bee")
    return out


def replace_cycles(workdir: str, cycles: int) -> dict[str, list[float]]:
    """Deploy ``big`` 1 and 2 in turn, ``cycles`` times after the first (each replaces the
    other through the agent's install: load, smoke test, swap, health window, commit,
    cleanup). Returns the resident set (MiB) after each commit against after the first."""
    d = Path(workdir)
    arts = [big_artifact(d, "1", seed=1), big_artifact(d, "2", seed=2)]
    with serving(d, _models.offset_model(d / "bee.onnx", 100.0), "bee", {"x": X},
                 health={"window_s": 0.05, "probe_interval_s": 0.01}) as agent:
        assert agent.http is not None
        port = agent.http.port

        def deploy(counter: int) -> None:
            art = arts[counter % 2]
            old = agent.slots.get("big")
            wait = None if old is None else released(old)
            del old
            agent.submit(deployment(art, counter))
            wait_for(lambda: agent.installer.state.deployment_counter == counter
                     and agent.installer.state.phase == "committed", f"#{counter} to commit")
            served = agent.slots.get("big")
            assert served is not None and served.version == art.manifest.version
            del served
            _infer(port, "big")
            if wait is not None:
                wait()

        deploy(2)
        deploy(3)  # both versions were loaded once
        before = rss_mib()
        out: dict[str, list[float]] = {"after": []}
        for counter in range(4, 4 + cycles):
            deploy(counter)
            out["after"].append(rss_mib() - before)
    return out
