"""Storage arithmetic and faults without a broker: the space the trust client reserves
before a download (against the repository simulator), the agent's refusal of what does
not fit, and the report queue on a full disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import Agent
from device_agent._state import InstalledState, ModelRecord, StateStore
from device_agent._storage import NoSpaceError
from device_agent._telemetry import Outbox
from edge_sdk import Artifact
from tests import _agent_local
from tests._agent_local import LocalSource, config, deployment, events
from tests._delta_env import DeltaEnv, two_versions

arts = _agent_local.arts  # artifacts v1, v2, v3, nan (fails its smoke test), batch1
make_agent = _agent_local.make_agent  # in-process agents on a LocalSource, stopped after


class Refuse(Exception):
    pass


@pytest.fixture
def d(tmp_path: Path) -> DeltaEnv:
    return two_versions(tmp_path)


def reserved(d: DeltaEnv, tmp: Path, **kw: object) -> int:
    """The bytes fetching v2 reserves (the reserve refuses, so nothing is downloaded)."""
    asked: list[int] = []

    def reserve(n: int) -> None:
        asked.append(n)
        raise Refuse

    client = d.client()
    with pytest.raises(Refuse):
        client.fetch(d.deploy(version="2"), tmp / "out", reserve=reserve, **kw)  # type: ignore[arg-type]
    model = f"/{d.arts['2'].manifest.sha256}."
    assert not [r for r in d.sim.requests if model in r.path], "model bytes were asked for"
    assert list(client.partial_dir.iterdir()) == [] and not (tmp / "out").exists()
    assert len(asked) == 1
    return asked[0]


def companions(d: DeltaEnv) -> int:
    rt = d.repo.find("m", "2")
    return sum((d.arts["2"].path / name).stat().st_size for name in rt.files)


def test_full_download_reserves_the_signed_model_and_file_lengths(d: DeltaEnv,
                                                                  tmp_path: Path) -> None:
    need = reserved(d, tmp_path)
    assert need == d.arts["2"].manifest.size_bytes + companions(d)


def test_delta_download_reserves_the_delta_plus_the_model_it_rebuilds(d: DeltaEnv,
                                                                      tmp_path: Path) -> None:
    (ref,) = d.repo.find("m", "2").deltas
    need = reserved(d, tmp_path, have=[d.held("1")])
    assert need == ref.length + d.arts["2"].manifest.size_bytes + companions(d)


def test_resumed_download_reserves_only_what_is_missing(d: DeltaEnv, tmp_path: Path) -> None:
    model = d.arts["2"].model_path.read_bytes()
    partial = d.state / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / f"{d.arts['2'].manifest.sha256}.part").write_bytes(model[:1000])
    asked: list[int] = []
    client = d.client()
    client.fetch(d.deploy(version="2"), tmp_path / "out", reserve=asked.append)
    assert asked == [len(model) - 1000 + companions(d)]
    assert Artifact.from_dir(tmp_path / "out").manifest.sha256 == d.arts["2"].manifest.sha256


def test_agent_refuses_a_deployment_that_leaves_less_than_the_reserve(
        make_agent, arts: dict[str, Artifact], tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    agent: Agent = make_agent(config(tmp_path / "state", limits={"reserve_bytes": free}),
                              LocalSource())
    agent.installer.apply(deployment(arts["v1"], 1))
    failed = [e for e in events(agent) if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "space"
    assert failed[0]["deployment"]["counter"] == 1
    assert failed[0]["needed_bytes"] > 0 and failed[0]["reserve_bytes"] == free
    assert agent.slots.current is None
    assert list(agent.store.staging.iterdir()) == []
    # Recorded: the same deployment delivered again is not tried again.
    agent.installer.apply(deployment(arts["v1"], 1))
    assert [e["event"] for e in events(agent)].count("failed") == 1


def test_no_space_error_names_the_numbers_and_the_config_key() -> None:
    err = NoSpaceError(needed=3000, free=2000, reserve=500)
    assert str(err) == ("not enough space in the state directory: the download needs 3000 "
                        "bytes, 2000 are free and 500 must stay free (limits.reserve_bytes); "
                        "free space and deploy again")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        msg = f"cannot mount a tmpfs at {mnt} (needs root): {r.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_outbox_on_a_full_disk_drops_the_oldest_and_keeps_the_newest(tiny_disk: Path) -> None:
    box = Outbox(tiny_disk / "outbox", limit=1000)
    for i in range(5):
        box.put({"event": "e", "i": i, "pad": "x" * 2000})
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    box.put({"event": "new", "pad": "x" * 2000})
    assert box.dropped >= 1
    sent = []
    while (item := box.peek()) is not None:
        sent.append(item[1])
        box.remove(item[0])
    assert sent[-1]["event"] == "new"  # the newest report is never the one dropped
    assert [r["i"] for r in sent[:-1]] == list(range(5))[5 - len(sent) + 1:]


def test_outbox_on_a_read_only_disk_keeps_reports_in_memory_in_order(tiny_disk: Path) -> None:
    box = Outbox(tiny_disk / "outbox", limit=3)
    box.put({"event": "old"})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    box = Outbox(tiny_disk / "outbox", limit=3)  # a restart on the read-only disk
    for i in range(4):
        box.put({"event": "new", "i": i})
    assert len(box) == 3 and box.dropped == 2
    sent = []
    while (item := box.peek()) is not None:
        sent.append(item[1])
        box.remove(item[0])  # the file cannot be deleted: it is not sent twice
    assert [r.get("i") for r in sent] == [1, 2, 3]
    assert json.loads((tiny_disk / "outbox" / "000000000001.json").read_text())["event"] == "old"


def test_cleanup_keeps_current_previous_and_the_saved_state_and_drops_stale_files(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    recs = [ModelRecord(f"m-{i}", "m", str(i), str(i) * 64) for i in range(4)]
    for r in recs:
        (store.models / r.id).mkdir()
    stale = [store.models / ".m-9.abc.tmp", store.staging / "digest",
             store.root / ".installed.json.x.tmp", store.partial / "ab.applied"]
    store.partial.mkdir()
    for f in stale:
        f.mkdir() if f.parent == store.models or f.parent == store.staging else f.write_text("x")
    (store.partial / "cd.part").write_text("resumable")
    in_memory = InstalledState(models={"m": recs[2]}, previous={"m": recs[1]})
    on_disk = InstalledState(models={"m": recs[1]}, previous={"m": recs[0]})  # a save failed
    store.clean(in_memory, on_disk)
    assert sorted(d.name for d in store.models.iterdir()) == ["m-0", "m-1", "m-2"]
    assert [f for f in stale if f.exists()] == []
    assert (store.partial / "cd.part").exists()  # a partial download resumes


def test_a_schema_1_trial_migrates_to_a_set_that_rolls_back_to_the_old_model() -> None:
    old = ModelRecord("a-1-x", "a", "1", "1" * 64, "d1")
    new = ModelRecord("b-2-y", "b", "2", "2" * 64, "d2")
    raw = {"schema": 1, "current": dataclasses.asdict(new), "previous": dataclasses.asdict(old),
           "phase": "trial", "trial_boots": 1, "deployment_version": 7, "deployment_key": "d2",
           "failed": {}, "last_result": {"result": "retrying", "deployment": 7, "ts": 1.0}}
    st = InstalledState.from_json(raw, "installed.json")
    # One slot: the model on trial took the place of another model, which comes back.
    assert st.models == {"b": new} and st.trial == {"b": None, "a": old}
    assert (st.phase, st.trial_boots, st.floor, st.counters) == ("trial", 1, 7, {"b": 7})
    assert st.scope_counter("group:any") == 7 and st.results == (raw["last_result"],)
    again = InstalledState.from_json(json.loads(json.dumps(st.to_json())), "x")
    assert again == st and st.to_json()["schema"] == 2


def test_counters_of_many_models_stay_bounded_and_old_ones_stay_refused() -> None:
    from device_agent._state import MAX_COUNTERS

    st = InstalledState()
    for i in range(MAX_COUNTERS + 10):
        st = st.with_counters("device", i + 1, [f"m{i}"])
    assert len(st.counters) == MAX_COUNTERS and st.floor == 10
    assert st.counter_of("m0") == 10  # forgotten: a deployment #10 of it is not newer


def test_results_keep_the_last_eight_one_per_deployment() -> None:
    st = InstalledState()
    for c in range(12):
        st = st.with_result({"result": "retrying", "deployment": c, "ts": 0.0})
        st = st.with_result({"result": "committed", "deployment": c, "ts": 1.0})
    assert [r["deployment"] for r in st.results] == list(range(4, 12))
    assert {r["result"] for r in st.results} == {"committed"}
