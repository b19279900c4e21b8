"""The install pipeline and state store, driven in-process through a local ArtifactSource.

Real onnxruntime models, real state directory; no broker (the MQTT path is
covered by test_agent_e2e.py with real agents and a real Mosquitto).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent, AgentConfig
from device_agent._state import StateStore
from device_agent._telemetry import Outbox
from edge_sdk import Artifact, build_artifact
from edge_sdk.errors import ConfigError
from tests import _agent_local, _models, _process
from tests._agent_local import LocalSource, X, config, deployment, events

arts = _agent_local.arts  # artifacts v1, v2, v3, nan (fails its smoke test), batch1
make_agent = _agent_local.make_agent  # in-process agents on a LocalSource, stopped after


wait_for = functools.partial(_process.wait_for, timeout=30.0)


def kinds(agent: Agent) -> list[str]:
    return [e["event"] for e in events(agent)]


def served_version(agent: Agent) -> str | None:
    cur = agent.slots.current
    return None if cur is None else cur.version


def predict(agent: Agent) -> float:
    cur = agent.slots.current
    assert cur is not None
    return float(cur.predict({"x": X})["y"][0, 0])


def redeliver(agent: Agent, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Hand the agent a deployment it has handled, and wait for its word that it did."""
    caplog.set_level(logging.DEBUG, logger="device_agent")

    def said() -> int:
        return sum("already handled" in r.getMessage() for r in caplog.records)

    n = said()
    agent.submit(payload)
    wait_for(lambda: said() > n)


def install(agent: Agent, art: Artifact, version: int, final: str = "committed") -> None:
    n = kinds(agent).count(final)
    agent.submit(deployment(art, version))
    wait_for(lambda: kinds(agent).count(final) > n)


def test_first_deployment_installs_verifies_and_serves(make_agent, arts) -> None:
    agent = make_agent()
    assert agent.slots.current is None
    install(agent, arts["v1"], 1)
    assert served_version(agent) == "v1"
    assert predict(agent) == 2.0
    assert kinds(agent) == ["install_started", "verified", "swapped", "committed"]
    state = agent.store.load()
    assert state.current is not None and state.current.version == "v1"
    assert state.phase == "committed" and state.deployment_counter == 1


def test_swap_to_v2_keeps_v1_on_disk_as_previous(make_agent, arts) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    install(agent, arts["v2"], 2)
    assert predict(agent) == 3.0
    state = agent.store.load()
    assert state.current.version == "v2" and state.previous["adder"].version == "v1"
    assert agent.store.open_model(state.previous["adder"]).manifest.version == "v1"
    install(agent, arts["v3"], 3)
    dirs = sorted(p.name for p in agent.store.models.iterdir())
    assert len(dirs) == 2 and all("v1" not in d for d in dirs)


def test_model_with_nan_outputs_fails_smoke_test_and_v1_keeps_serving(make_agent, arts,
                                                                      caplog) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    install(agent, arts["nan"], 2, final="failed")
    failed = [e for e in events(agent) if e["event"] == "failed"][-1]
    assert failed["stage"] == "smoke_test" and "non-finite" in failed["reason"]
    assert served_version(agent) == "v1" and predict(agent) == 2.0
    state = agent.store.load()
    assert state.current.version == "v1" and state.last_result["result"] == "failed"
    # The same deployment redelivered (retained message after a reconnect) is not retried.
    redeliver(agent, deployment(arts["nan"], 2), caplog)
    assert kinds(agent).count("install_started") == 2


def test_model_failing_in_health_window_is_rolled_back_to_previous(make_agent, arts,
                                                                   tmp_path) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    agent.stop()
    agent2 = make_agent(config(tmp_path / "state",
                               health={"window_s": 60.0, "probe_interval_s": 0.05}))
    agent2.submit(deployment(arts["batch1"], 2))
    wait_for(lambda: served_version(agent2) == "b1")
    cur = agent2.slots.current
    with pytest.raises(Exception, match=r"Reshape|reshape"):
        cur.predict({"x": np.ones((2, 4), np.float32)})  # a real request that the model fails
    wait_for(lambda: "rolled_back" in kinds(agent2))
    rb = [e for e in events(agent2) if e["event"] == "rolled_back"][-1]
    assert "inferences failed in the health window" in rb["reason"]
    assert served_version(agent2) == "v1"
    state = agent2.store.load()
    assert state.current.version == "v1" and state.previous == {}
    assert state.last_result["result"] == "rolled_back"


def test_unauthorised_deployment_is_refused_and_current_keeps_serving(make_agent, arts) -> None:
    source = LocalSource()
    agent = make_agent(source=source)
    install(agent, arts["v1"], 1)
    agent.submit(deployment(arts["v2"], 2, key=b"someone-else"))
    wait_for(lambda: "refused" in kinds(agent))
    assert served_version(agent) == "v1" and source.fetches == 1
    refused = [e for e in events(agent) if e["event"] == "refused"][-1]
    assert "signature" in refused["reason"]


def test_replayed_older_deployment_is_refused(make_agent, arts) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 5)
    install(agent, arts["v2"], 6)
    # Another document under counter 5 (the very same one again is a redelivery: its
    # outcome stands, see test_sets_attacks).
    agent.submit(deployment(arts["v1"], 5, again=1))
    wait_for(lambda: "refused" in kinds(agent))
    assert served_version(agent) == "v2"
    assert "not newer" in [e for e in events(agent) if e["event"] == "refused"][-1]["reason"]


def test_signed_rollback_to_previous_reuses_the_copy_on_disk(make_agent, arts) -> None:
    source = LocalSource()
    agent = make_agent(source=source)
    install(agent, arts["v1"], 1)
    install(agent, arts["v2"], 2)
    install(agent, arts["v1"], 3)
    assert served_version(agent) == "v1" and source.fetches == 2
    assert [e.get("source") for e in events(agent) if e["event"] == "verified"][-1] == \
        "local copy"


def test_restart_boots_straight_into_the_installed_model(make_agent, arts, tmp_path) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    agent.stop()
    again = make_agent(config(tmp_path / "state"))
    assert served_version(again) == "v1" and predict(again) == 2.0


def schema_1(state: dict, *, old_keys: bool = False) -> dict:
    """A schema-2 state file of one model as an agent of one model per device wrote it
    (``old_keys``: as the first agents named its counter and digest)."""
    ((name, current),) = state["models"].items()
    old = {"schema": 1, "current": current, "previous": state["previous"].get(name),
           "phase": state["phase"], "trial_boots": state["trial_boots"],
           "deployment_counter": state["deployment_counter"],
           "deployment_digest": state["deployment_digest"], "failed": state["failed"],
           "last_result": state["last_result"]}
    if old_keys:
        old["deployment_version"] = old.pop("deployment_counter")
        old["deployment_key"] = old.pop("deployment_digest")
    return old


@pytest.mark.parametrize("old_keys", [False, True])
def test_state_file_of_an_agent_of_one_model_migrates_and_refuses_replays(
    make_agent, arts, tmp_path, old_keys
) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 4)
    install(agent, arts["v2"], 5)
    agent.stop()
    path = agent.store.root / "installed.json"
    new = json.loads(path.read_text())
    path.write_text(json.dumps(schema_1(new, old_keys=old_keys)))
    again = make_agent(config(tmp_path / "state"))
    assert served_version(again) == "v2"
    loaded = again.store.load()
    assert (loaded.deployment_counter, loaded.deployment_digest, loaded.floor) == \
        (5, new["deployment_digest"], 5)
    assert loaded.previous["adder"].version == "v1"
    again.submit(deployment(arts["v3"], 5))
    wait_for(lambda: "refused" in kinds(again))
    assert served_version(again) == "v2"
    assert "not newer" in [e for e in events(again) if e["event"] == "refused"][-1]["reason"]
    install(again, arts["v3"], 6)
    written = json.loads(path.read_text())
    assert written["schema"] == 2 and written["counters"] == {"adder": 6}
    assert written["models"]["adder"]["version"] == "v3"
    assert not {"deployment_version", "deployment_key", "current"} & set(written)


def test_corrupted_current_model_boots_into_previous(make_agent, arts, tmp_path) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    install(agent, arts["v2"], 2)
    agent.stop()
    state = agent.store.load()
    model = agent.store.model_dir(state.current) / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    again = make_agent(config(tmp_path / "state"))
    assert served_version(again) == "v1"
    assert "rolled_back" in kinds(again)
    assert again.store.load().current.version == "v1"


def test_restart_inside_health_window_resumes_once_then_rolls_back(make_agent, arts,
                                                                   tmp_path, caplog) -> None:
    long = {"window_s": 60.0, "probe_interval_s": 0.05}
    agent = make_agent()
    install(agent, arts["v1"], 1)
    agent.stop()
    agent = make_agent(config(tmp_path / "state", health=long))
    agent.submit(deployment(arts["v2"], 2))
    wait_for(lambda: kinds(agent).count("swapped") == 2)
    agent.stop()  # inside the window: the trial stays pending on disk
    assert agent.store.load().phase == "trial"
    agent = make_agent(config(tmp_path / "state", health=long))
    assert served_version(agent) == "v2"  # first restart: resume the window
    assert agent.store.load().trial_boots == 1
    agent.stop()
    agent = make_agent(config(tmp_path / "state", health=long))
    assert served_version(agent) == "v1"  # second restart in the same window: roll back
    assert kinds(agent)[-1] == "rolled_back"
    # and v2 is not retried when its deployment is redelivered
    redeliver(agent, deployment(arts["v2"], 2), caplog)
    assert served_version(agent) == "v1"


def test_outbox_keeps_reports_across_restarts_and_drops_oldest_beyond_limit(tmp_path) -> None:
    box = Outbox(tmp_path / "outbox", limit=3)
    for i in range(5):
        box.put({"event": "e", "i": i})
    again = Outbox(tmp_path / "outbox", limit=3)
    assert len(again) == 3 and box.dropped == 2
    name, first = again.peek()
    assert first["i"] == 2
    again.remove(name)
    assert again.put({"event": "e", "i": 5}) == 6


def test_state_store_ignores_leftover_temp_files(tmp_path, arts) -> None:
    store = StateStore(tmp_path / "s")
    (store.root / ".installed.json.abc.tmp").write_text("{half")
    (store.models / ".adder-v1.x.tmp").mkdir()
    store.clean(store.load())
    assert not list(store.root.glob(".*.tmp")) and not list(store.models.iterdir())


def test_unknown_config_key_is_a_clear_error(tmp_path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n[http]\nprot = 8080\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) http.prot"):
        AgentConfig.from_file(p)


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('fleet = "f"\nstate_dir = "s"\n', "missing required key 'device_id'"),
        ('device_id = "a/b"\nfleet = "f"\nstate_dir = "s"\n', "device_id"),
        ('device_id = "d\\n"\nfleet = "f"\nstate_dir = "s"\n', "device_id"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n[http]\nport = "80"\n',
         "http.port must be an integer"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n[broker]\nurl = "http://x"\n',
         "broker.url"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n[trust]\nroot = "nope.json"\n',
         "trust.root"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n[health]\nmax_error_rate = 2\n',
         "max_error_rate"),
        ("device_id = \n", "invalid TOML"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\ntags = ["berlin"]\n',
         "tags must be a table of strings"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\ntags = {line = 3}\n',
         "tags must be a table of strings"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\ntags = {"a b" = "x"}\n',
         "tags.a b: a tag name must be"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\ntags = {site = "b\\n"}\n',
         "tags.site: must be at most 128 characters without control"),
        ('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n'
         + "tags = {" + ", ".join(f't{i} = "v"' for i in range(33)) + "}\n",
         "33 tags, at most 32"),
    ],
)
def test_invalid_config_values_are_clear_errors(tmp_path, toml, match) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        AgentConfig.from_file(p)


def test_tags_are_read_as_a_read_only_table_of_strings(tmp_path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s"\n'
                 'tags = {site = "berlin", "line.no" = "3"}\n')
    cfg = AgentConfig.from_file(p)
    assert dict(cfg.tags) == {"site": "berlin", "line.no": "3"}
    with pytest.raises(TypeError):
        cfg.tags["site"] = "paris"  # type: ignore[index]
    assert dict(AgentConfig.from_dict({"device_id": "d", "fleet": "f",
                                       "state_dir": "s"}).tags) == {}


def test_relative_paths_in_config_are_relative_to_the_file(tmp_path) -> None:
    (tmp_path / "conf").mkdir()
    p = tmp_path / "conf" / "agent.toml"
    p.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "state"\n')
    assert AgentConfig.from_file(p).state_dir == tmp_path / "conf" / "state"


def test_missing_sample_uses_synthetic_inputs_for_the_smoke_test(make_agent, tmp_path) -> None:
    m = _models.offset_model(tmp_path / "plain.onnx", 1.0)
    art = build_artifact(m, tmp_path / "plain", name="adder", version="plain")
    agent = make_agent()
    install(agent, art, 1)
    assert served_version(agent) == "plain"
    shutil.rmtree(tmp_path / "plain")


def test_example_config_is_valid_and_documents_every_key(tmp_path) -> None:
    import dataclasses
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "examples" / "agent.toml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    data["trust"] = {}  # the provisioned files do not exist on the test machine
    cfg = AgentConfig.from_dict(data)
    assert cfg.http.bind == "127.0.0.1"
    text = (root / "examples" / "agent.toml").read_text()
    for section in ("http", "health", "limits", "telemetry"):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"{f.name} =" in text, f"{section}.{f.name} missing from examples/agent.toml"


def test_unreadable_state_file_boots_the_newest_verified_model(make_agent, arts,
                                                               tmp_path) -> None:
    agent = make_agent()
    install(agent, arts["v1"], 1)
    install(agent, arts["v2"], 2)
    agent.stop()
    (tmp_path / "state" / "installed.json").write_text("{not json")
    again = make_agent(config(tmp_path / "state"))
    assert served_version(again) == "v2" and predict(again) == 3.0
    assert "recovered with the newest verified model" in events(again)[-1]["reason"]
