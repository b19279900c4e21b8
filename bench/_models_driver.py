"""The agent side of ``bench/agent.py`` [8] (several models), run as its own process so
that the load generator does not share its interpreter: a real agent serving ``bee``
over HTTP, and ``ant`` (a model of ``--model-mib`` MiB of weights, versions 1 and 2)
swapped in, replaced and dropped in-process through the agent's own parts: the
verified store, ``LoadedModels`` (re-verify the hash, open, smoke test with warm-up),
``ModelSlots.swap``, and the release of what was dropped; on a thread of lowered CPU
priority, as the agent's install worker runs.

Commands, one JSON object a line on stdin, each answered by one JSON line on stdout:
``{"do": "swap"}`` serves the other version of ``ant`` (loaded, swapped in, the old
one dropped); ``{"do": "unload"}`` stops serving ``ant`` and waits until its memory is
released; ``{"do": "quit"}``. The first line out is ``{"port": P, "pid": N}``.

    python bench/_models_driver.py WORKDIR MODEL_MIB
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edge_sdk  # noqa: E402
from device_agent import Agent  # noqa: E402
from device_agent._agent import _lower_thread_priority  # noqa: E402
from device_agent._models import LoadedModels, releases  # noqa: E402
from device_agent._state import StateStore  # noqa: E402
from edge_sdk._internal import load_model_file  # noqa: E402
from tests import _models  # noqa: E402
from tests._agent_local import LocalSource, config, deployment  # noqa: E402

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def ant(workdir: Path, version: int, mib: int) -> edge_sdk.Artifact:
    w = np.random.default_rng(version).standard_normal((4, (mib << 20) // 16),
                                                       dtype=np.float32)
    model = _models.weighted_offset_model(workdir / f"ant-{version}.onnx", float(version), w)
    return edge_sdk.build_artifact(model, workdir / f"ant-{version}", name="ant",
                                   version=str(version), sample={"x": X})


def main(workdir: Path, mib: int) -> None:
    bee = edge_sdk.build_artifact(_models.offset_model(workdir / "bee.onnx", 100.0),
                                  workdir / "bee", name="bee", version="1", sample={"x": X})
    agent = Agent(config(workdir / "state", threads=1, http={"port": 0}),
                  source=LocalSource(), connect=False)
    agent.start()
    agent.submit(deployment(bee, 1))
    deadline = time.monotonic() + 60
    while agent.installer.state.phase != "committed" or agent.slots.get("bee") is None:
        if time.monotonic() > deadline:
            raise SystemExit("bee did not commit")
        time.sleep(0.02)
    store = StateStore(workdir / "ant-state")
    records = [store.adopt(ant(workdir, v, mib), None) for v in (1, 2)]
    models = LoadedModels(agent.config, store, load_model_file)
    assert agent.http is not None
    _say({"port": agent.http.port, "pid": os.getpid()})
    worker = threading.Thread(target=_commands, args=(agent, models, records),
                              name="driver-worker")
    worker.start()
    worker.join()
    agent.stop()


def _commands(agent: Agent, models: LoadedModels, records: list[Any]) -> None:
    _lower_thread_priority()
    swaps = 0
    for line in sys.stdin:
        cmd = json.loads(line)["do"]
        if cmd == "swap":
            record = records[swaps % 2]
            swaps += 1
            new = models.load(record)
            old = agent.slots.swap({"ant": new})["ant"]
            del new
            if old is not None:
                models.forget([old.record])
            del old
            _say({"serving": record.version})
        elif cmd == "unload":
            old = agent.slots.swap({"ant": None})["ant"]
            freed_at: list[int] = []
            if old is not None:
                weakref.finalize(old, _note_release, freed_at)
                models.forget([old.record])
            del old
            deadline = time.monotonic() + 10
            while (not freed_at or releases() == freed_at[0]) and \
                    time.monotonic() < deadline:
                time.sleep(0.005)
            _say({"released": bool(freed_at) and releases() > freed_at[0]})
        elif cmd == "quit":
            break


def _note_release(into: list[int]) -> None:
    into.append(releases())


def _say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
