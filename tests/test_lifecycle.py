"""The installer's pure state machine, driven event by event: no files, no broker, no runtime.

The driver below answers LoadModel with ModelLoaded (or ModelUnusable for the models
named broken) and WatchHealth with the health verdict asked for, as the Installer does
with real models.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from device_agent import InstallRequest, ModelChange
from device_agent._crash import CRASH_POINTS
from device_agent._events import (
    Accepted,
    Adopted,
    Boot,
    CrashPoint,
    Event,
    Failed,
    Fetched,
    Healthy,
    Loaded,
    LoadModel,
    ModelLoaded,
    ModelUnusable,
    NoSpace,
    Refused,
    Report,
    Resume,
    Retry,
    SaveState,
    SmokeTested,
    Swap,
    Unhealthy,
    Unwritable,
    Verified,
    WatchHealth,
)
from device_agent._lifecycle import (
    Life,
    LifecycleError,
    Mode,
    handled,
    step,
)
from device_agent._state import InstalledState, ModelRecord
from tests._lifecycle_driver import A1, A2, B1, B2, Run, install_set, set_dep

V1 = ModelRecord("adder-v1-aaaaaaaaaaaa", "adder", "v1", "a" * 64, "k1")
V2 = ModelRecord("adder-v2-bbbbbbbbbbbb", "adder", "v2", "b" * 64, "k2")


def dep(counter: int, art: ModelRecord = V2, *, rollback: bool = False) -> InstallRequest:
    return InstallRequest(f"k{counter}", counter, art.name, art.version, art.sha256,
                          rollback=rollback)


def booted(state: InstalledState, **kw: Any) -> Run:
    return Run(**kw).feed(Boot(state, max_restarts=1))


def install(run: Run, d: InstallRequest, art: ModelRecord = V2) -> Run:
    return run.feed(Accepted(d), Fetched(), Verified(), Adopted(art), Loaded(), SmokeTested())


def one(record: ModelRecord) -> dict[str, ModelRecord]:
    return {record.name: record}


def serving_v1() -> Run:
    return booted(InstalledState(models=one(V1), deployment_counter=1, counters={"adder": 1},
                                 scopes={"device": 1}, deployment_digest="k1"))


# -- every state x event --------------------------------------------------------------------

SAMPLES: list[Event] = [
    Boot(InstalledState(), 1), ModelLoaded(V1), ModelUnusable(V1, "x"), Resume(),
    Refused("kx", 3, "bad"), Accepted(dep(5)), Fetched(), Verified(), Verified(V2),
    Adopted(V2), Loaded(), SmokeTested(), Failed("x"), Retry("x"), Healthy(), Unhealthy("x"),
    NoSpace(10, 5, 1), Unwritable(dep(5), "read-only"),
]
LEGAL = {
    Mode.BOOT: {Boot},
    Mode.LOADING: {ModelLoaded, ModelUnusable},
    Mode.IDLE: {Resume, Refused, Accepted, Unwritable},
    Mode.INSTALLING: {Fetched, Verified, Adopted, Loaded, SmokeTested, Failed, Retry, NoSpace},
    Mode.TRIAL: {Healthy, Unhealthy},
    Mode.ROLLING_BACK: {ModelLoaded, ModelUnusable},
}
TRIAL_V1_V2 = InstalledState(models=one(V2), previous=one(V1), phase="trial",
                             trial=one(V1), deployment_counter=2, counters={"adder": 2},
                             scopes={"device": 2}, deployment_digest="k2")
LIVES = {
    Mode.BOOT: Life(),
    Mode.LOADING: Life(TRIAL_V1_V2, Mode.LOADING),
    Mode.IDLE: Life(InstalledState(models=one(V1)), Mode.IDLE, serving=one(V1)),
    Mode.INSTALLING: Life(InstalledState(models=one(V1)), Mode.INSTALLING, serving=one(V1),
                          deployment=dep(2), members=dep(2).models, decides=("adder",),
                          progress="started"),
    Mode.TRIAL: Life(TRIAL_V1_V2, Mode.TRIAL, serving=one(V2)),
    Mode.ROLLING_BACK: Life(TRIAL_V1_V2, Mode.ROLLING_BACK, serving=one(V2), reason="slow",
                            loading=(V1,)),
}


@pytest.mark.parametrize("mode", list(Mode))
def test_every_event_outside_its_modes_raises_a_clear_error(mode: Mode) -> None:
    assert set(LIVES) == set(Mode)
    for event in SAMPLES:
        if type(event) in LEGAL[mode]:
            continue
        with pytest.raises(LifecycleError, match=f"{type(event).__name__} is not expected"):
            step(LIVES[mode], event)


def test_install_steps_out_of_order_raise_a_clear_error() -> None:
    life = LIVES[Mode.INSTALLING]
    for event in (Verified(), Adopted(V2), Loaded(), SmokeTested()):
        with pytest.raises(LifecycleError, match="not expected after started"):
            step(life, event)
    fetched, _ = step(life, Fetched())
    with pytest.raises(LifecycleError):
        step(fetched, Verified(V2))  # a local copy cannot turn up after a fetch


def test_a_load_answer_for_another_model_raises() -> None:
    with pytest.raises(LifecycleError, match="expected"):
        step(LIVES[Mode.LOADING], ModelLoaded(V1))
    with pytest.raises(LifecycleError, match="expected"):
        step(LIVES[Mode.ROLLING_BACK], ModelLoaded(V2))


def test_resume_without_a_pending_trial_is_a_no_op() -> None:
    assert step(LIVES[Mode.IDLE], Resume()) == (LIVES[Mode.IDLE], [])


# -- installs -------------------------------------------------------------------------------

def test_install_saves_trial_before_swapping_and_commits_after_a_healthy_window() -> None:
    run = install(serving_v1(), dep(2))
    kinds = [type(e).__name__ if not isinstance(e, CrashPoint) else e.name
             for e in run.effects[3:]]
    assert kinds.index("SaveState") < kinds.index("trial_saved") < kinds.index("Swap")
    assert run.reports()[-4:] == ["install_started", "verified", "swapped", "committed"]
    st = run.life.installed
    assert (st.current, st.previous, st.phase, st.deployment_counter) == \
        (V2, one(V1), "committed", 2)
    assert run.life.mode is Mode.IDLE and run.life.serving == one(V2)


def test_local_copy_is_installed_without_fetch_or_adopt() -> None:
    run = serving_v1().feed(Accepted(dep(2)), Verified(V2), Loaded(), SmokeTested())
    names = [e.name for e in run.effects if isinstance(e, CrashPoint)]
    assert "fetched" not in names and "adopted" not in names
    assert run.life.installed.current == replace(V2, deployment="k2")


def test_unhealthy_window_rolls_back_to_previous_and_never_retries_it() -> None:
    run = Run(serving_v1().life, health="p99 too slow")
    install(run, dep(2))
    st = run.life.installed
    assert (st.current, st.previous, st.phase) == (V1, {}, "committed")
    assert run.life.serving == one(V1)
    assert [e.changes for e in run.effects if isinstance(e, Swap)][-1] == one(V1)
    assert run.reports()[-1] == "rolled_back"
    assert st.last_result is not None and st.last_result["result"] == "rolled_back"
    assert handled(st, "k2")
    before = run.life
    assert step(run.life, Accepted(dep(2))) == (before, [])


def test_unhealthy_window_with_nothing_to_go_back_to_keeps_the_model() -> None:
    run = Run(booted(InstalledState()).life, health="errors")
    install(run, dep(1))
    assert run.life.serving == one(V2) and run.life.installed.phase == "committed"
    assert run.reports()[-1] == "failed"


def test_rollback_whose_previous_will_not_load_leaves_the_trial_serving() -> None:
    run = Run(serving_v1().life, health="errors", broken=(V1,))
    install(run, dep(2))
    assert run.life.mode is Mode.IDLE and run.life.serving == one(V2)
    assert run.life.installed.phase == "trial"


@pytest.mark.parametrize("event", [Failed("smoke test: NaN"), Refused("k2", 10, "bad sig", 2)])
def test_failed_or_refused_deployment_is_never_retried(event: Event) -> None:
    run = serving_v1()
    if isinstance(event, Failed):
        run.feed(Accepted(dep(2)), Fetched(), Verified(), Adopted(V2), Loaded(), event)
        assert run.life.installed.deployment_counter == 2
    else:
        run.feed(event)
    assert handled(run.life.installed, "k2")
    n = len(run.effects)
    run.feed(Accepted(dep(2)))
    assert len(run.effects) == n  # a redelivery: no-op
    assert run.life.serving == one(V1)


def test_failure_is_reported_under_the_stage_it_happened_in() -> None:
    for events, stage in (([], "fetch"), ([Fetched()], "verify"),
                          ([Fetched(), Verified()], "verify"),
                          ([Fetched(), Verified(), Adopted(V2)], "load"),
                          ([Verified(V2)], "load"),
                          ([Verified(V2), Loaded()], "smoke_test")):
        run = serving_v1().feed(Accepted(dep(2)), *events, Failed("boom"))
        report = [e for e in run.effects if isinstance(e, Report)][-1]
        assert report.fields["stage"] == stage
        assert run.life.installed.failed["k2"] == f"{stage}: boom"


def test_transient_interruption_is_retried_not_recorded_as_failed() -> None:
    run = serving_v1().feed(Accepted(dep(2)), Retry("responder away"))
    st = run.life.installed
    assert not handled(st, "k2") and st.deployment_counter == 1
    assert st.last_result is not None and st.last_result["result"] == "retrying"
    install(run, dep(2))
    assert run.life.installed.current == V2


@pytest.mark.parametrize("rollback", [False, True])
def test_deployment_at_or_below_the_counter_is_refused_even_as_a_signed_rollback(
        rollback: bool) -> None:
    # Rollback permission is about the artifact (checked by the source), never the counter.
    run = install(serving_v1(), dep(5))
    for version in (5, 3):
        run.feed(Accepted(replace(dep(version, V1, rollback=rollback), digest=f"old{version}")))
        assert run.reports()[-1] == "refused"
        assert run.life.serving == one(V2)
    assert run.life.installed.deployment_counter == 5


def test_signed_rollback_with_a_newer_counter_installs_the_older_model() -> None:
    run = install(serving_v1(), dep(5))
    run.feed(Accepted(dep(6, V1, rollback=True)), Verified(V1), Loaded(), SmokeTested())
    assert run.life.serving == one(replace(V1, deployment="k6"))
    assert run.life.installed.deployment_counter == 6


def test_deployment_of_the_served_model_commits_without_an_install() -> None:
    run = serving_v1().feed(Accepted(dep(4, V1)))
    st = run.life.installed
    assert (st.deployment_counter, st.deployment_digest, st.current) == (4, "k4", V1)
    assert run.reports() == [] and run.life.mode is Mode.IDLE


# -- boot -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_restarts", [0, 1, 3])
def test_restarts_inside_the_health_window_resume_up_to_max_restarts_then_roll_back(
        max_restarts: int) -> None:
    state = TRIAL_V1_V2
    for boot in range(max_restarts + 1):
        run = Run(health="stop").feed(Boot(state, max_restarts))
        state = run.life.installed
        if boot < max_restarts:
            assert state.phase == "trial" and state.trial_boots == boot + 1
            assert run.life.trial_pending and run.life.serving == one(V2)
            run.feed(Resume())
            assert run.effects[-1] == WatchHealth(("adder",))
        else:
            assert (state.current, state.previous, state.phase) == (V1, {}, "committed")
            assert run.life.serving == one(V1) and handled(state, "k2")
            assert CrashPoint("rollback_saved") in run.effects


def test_resumed_trial_commits_naming_the_deployment_by_its_counter() -> None:
    run = booted(TRIAL_V1_V2).feed(Resume())
    report = [e for e in run.effects if isinstance(e, Report)][-1]
    assert report.kind == "committed" and report.fields["deployment"] == {"counter": 2}
    assert run.life.installed.phase == "committed"


def test_broken_current_boots_into_previous_and_rolls_back() -> None:
    run = booted(replace(TRIAL_V1_V2, phase="committed", trial={}), broken=(V2,))
    assert run.life.serving == one(V1) and run.life.installed.current == V1
    assert run.reports() == ["failed", "rolled_back"]


def test_nothing_loadable_boots_serving_nothing_with_a_cleared_state() -> None:
    run = booted(TRIAL_V1_V2, broken=(V1, V2))
    assert run.life.serving == {} and run.life.mode is Mode.IDLE
    assert run.life.installed.models == {} and run.life.installed.previous == {}
    n = len(run.effects)
    run.feed(Resume())  # a no-op: nothing serves
    assert len(run.effects) == n


def test_unreadable_state_file_is_replaced_and_reported() -> None:
    run = Run().feed(Boot(InstalledState(models=one(V1)), 1, "installed.json: invalid JSON"))
    assert run.effects[0] == SaveState(InstalledState(models=one(V1)))
    assert run.reports()[0] == "failed" and run.life.serving == one(V1)


def _install_run_to(point: str) -> InstalledState:
    """The state on disk when the agent dies at ``point``: the last one saved before it."""
    runs = {
        "boot_trial_saved": lambda: Run(health="stop").feed(Boot(TRIAL_V1_V2, 1)),
        "rollback_saved": lambda: Run(health="stop").feed(
            Boot(replace(TRIAL_V1_V2, trial_boots=1), 1)),
    }
    if point in runs:
        run = runs[point]()
        start = TRIAL_V1_V2 if point == "boot_trial_saved" else replace(TRIAL_V1_V2,
                                                                          trial_boots=1)
    else:
        run = install(Run(serving_v1().life, health="stop"), dep(2))
        run.feed(Healthy())
        start = serving_v1().life.installed
    saved = start
    for e in run.effects:
        if isinstance(e, SaveState):
            saved = e.state
        if (isinstance(e, CrashPoint) and e.name == point) or \
                (isinstance(e, WatchHealth) and point == "health_probe"):
            return saved
    raise AssertionError(f"{point} not reached")


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_every_crash_point_boots_into_a_served_verified_model(point: str) -> None:
    state = _install_run_to(point)
    for _ in range(3):  # and again, should it die at the same point every time
        run = Run(health="stop").feed(Boot(state, 1))
        assert run.life.mode is Mode.IDLE
        assert run.life.serving in (one(V1), one(V2))
        assert run.life.serving == run.life.installed.models
        state = run.life.installed


# -- how the model was downloaded ------------------------------------------------------------

DELTA = {"kind": "delta", "bytes": 1234, "from": "v1", "message": "delta from v1 (1234 bytes)"}


def test_a_delta_download_is_reported_and_kept_in_the_committed_result() -> None:
    run = serving_v1().feed(Accepted(dep(2)), Fetched(DELTA), Verified(), Adopted(V2),
                            Loaded(), SmokeTested())
    (got,) = [e for e in run.effects if isinstance(e, Report) and e.kind == "downloaded"]
    assert got.fields["download"] == DELTA and got.fields["deployment"] == dep(2)
    saved = run.saved()
    assert saved is not None and saved.phase == "committed"
    assert saved.last_result is not None
    assert saved.last_result["download"] == "delta from v1 (1234 bytes)"
    # The next install, fetched without a description, does not inherit it.
    run.feed(Accepted(dep(3, V1, rollback=True)), Verified(V1), Loaded(), SmokeTested())
    last = run.saved()
    assert last is not None and last.last_result is not None
    assert "download" not in last.last_result


def test_a_failure_after_the_download_names_how_it_came() -> None:
    run = serving_v1().feed(Accepted(dep(2)), Fetched(DELTA), Failed("bad manifest"))
    saved = run.saved()
    assert saved is not None and saved.last_result is not None
    assert saved.last_result["result"] == "failed"
    assert saved.last_result["download"] == "delta from v1 (1234 bytes)"


# -- storage ------------------------------------------------------------------------------

def test_download_that_does_not_fit_is_refused_recorded_and_cleaned_up() -> None:
    run = serving_v1().feed(Accepted(dep(2)))
    start = len(run.effects)
    run.feed(NoSpace(needed=16 << 20, free=7 << 20, reserve=1 << 20, ts=5.0))
    assert run.life.mode is Mode.IDLE and run.life.serving == one(V1)
    effects = run.effects[start:]
    assert [type(e).__name__ for e in effects] == ["SaveState", "CleanModels", "CleanPartial",
                                                  "Report"]
    (rep,) = [e for e in effects if isinstance(e, Report)]
    assert rep.kind == "failed" and rep.fields["stage"] == "space"
    assert rep.fields["deployment"] == dep(2)
    assert (rep.fields["needed_bytes"], rep.fields["free_bytes"],
            rep.fields["reserve_bytes"]) == (16 << 20, 7 << 20, 1 << 20)
    assert "16777216 bytes, 7340032 are free" in rep.fields["reason"]
    st = run.saved()
    assert st is not None and st.current == V1 and st.deployment_counter == 2
    assert st.failed["k2"].startswith("space: not enough space")
    assert st.last_result == {"result": "failed", "ts": 5.0, "deployment": 2,
                              "models": ["adder"], "digest": "k2",
                              "reason": st.failed["k2"]}
    assert st.results[-1] == st.last_result
    # Not retried when the retained deployment is delivered again.
    assert handled(st, "k2")
    before = len(run.effects)
    run.feed(Accepted(dep(2)))
    assert run.effects[before:] == [] and run.life.mode is Mode.IDLE


def test_no_space_is_only_a_refusal_before_the_download() -> None:
    run = serving_v1().feed(Accepted(dep(2)), Fetched())
    with pytest.raises(LifecycleError, match="NoSpace is not expected"):
        step(run.life, NoSpace(1, 0, 0))


def test_deployment_while_the_state_cannot_be_written_is_reported_and_not_recorded() -> None:
    run = serving_v1()
    start = len(run.effects)
    run.feed(Unwritable(dep(2), "/state: Read-only file system (EROFS)"))
    assert run.life.mode is Mode.IDLE and run.life.installed == serving_v1().life.installed
    effects = run.effects[start:]
    assert len(effects) == 1 and isinstance(effects[0], Report)
    assert effects[0].kind == "failed" and effects[0].fields["stage"] == "storage"
    assert effects[0].fields["retry"] is True and "Read-only" in effects[0].fields["reason"]
    # Once the directory can be written, the same deployment installs.
    install(run, dep(2))
    assert run.life.serving == one(V2)


def test_unwritable_redelivery_of_a_handled_deployment_says_nothing() -> None:
    run = serving_v1()
    before = len(run.effects)
    run.feed(Unwritable(dep(1, V1), "full"))  # k1: the deployment that installed v1
    assert run.effects[before:] == []


# -- sets of models ---------------------------------------------------------------------------

def serving_a1_b1(budget: int = 0, **kw: Any) -> Run:
    state = InstalledState(models={"det": A1, "rec": B1}, counters={"det": 1, "rec": 2},
                           scopes={"device": 2}, deployment_counter=2, deployment_digest="s2")
    return Run(**kw).feed(Boot(state, 1, max_models_bytes=budget))


def touched(run: Run, start: int) -> set[str]:
    """The model names the effects after ``start`` loaded, swapped or watched."""
    names: set[str] = set()
    for e in run.effects[start:]:
        if isinstance(e, LoadModel):
            names.add(e.record.name)
        elif isinstance(e, Swap):
            names.update(e.changes)
        elif isinstance(e, WatchHealth):
            names.update(e.names)
    return names


def test_updating_one_model_never_loads_swaps_or_watches_the_others() -> None:
    run = serving_a1_b1()
    start = len(run.effects)
    install_set(run, set_dep(3, A2), A2)
    assert touched(run, start) == {"det"}
    assert run.life.serving == {"det": A2, "rec": B1}
    st = run.life.installed
    assert st.models == {"det": A2, "rec": B1} and st.previous == {"det": A1}
    assert st.counters == {"det": 3, "rec": 2} and st.phase == "committed"


def test_a_set_is_saved_swapped_watched_and_committed_once() -> None:
    run = serving_a1_b1()
    start = len(run.effects)
    install_set(run, set_dep(3, A2, B2), A2, B2)
    effects = run.effects[start:]
    assert [e for e in effects if isinstance(e, Swap)] == [Swap({"det": A2, "rec": B2})]
    assert [e for e in effects if isinstance(e, WatchHealth)] == [WatchHealth(("det", "rec"))]
    assert run.reports()[-2:] == ["swapped", "committed"]
    assert sum(isinstance(e, CrashPoint) and e.name == "trial_saved" for e in effects) == 1
    assert [e.name for e in effects if isinstance(e, CrashPoint)][:4] == \
        ["install_started", "fetched", "fetched:det", "adopted"]
    assert run.life.installed.models == {"det": A2, "rec": B2}


def test_a_set_whose_second_model_fails_keeps_both_old_versions_with_one_failed_event() -> None:
    run = serving_a1_b1()
    start = len(run.effects)
    run.feed(Accepted(set_dep(3, A2, B2)), Fetched(), Verified(), Adopted(A2), Fetched(),
             Verified(), Adopted(B2), Loaded(), Loaded(), Failed("smoke test: NaN"))
    assert run.reports(start).count("failed") == 1
    assert [e for e in run.effects[start:] if isinstance(e, Swap)] == []
    st = run.life.installed
    assert st.models == {"det": A1, "rec": B1} and run.life.serving == st.models
    assert handled(st, "s3") and st.results[-1]["result"] == "failed"
    assert st.results[-1]["models"] == ["det", "rec"]


def test_an_unhealthy_set_rolls_back_as_one_and_added_models_go() -> None:
    C1 = ModelRecord("kw-1-eeeeeeeeeeee", "kw", "1", "5" * 64, "s3")
    run = serving_a1_b1(health="errors")
    start = len(run.effects)
    install_set(run, set_dep(3, A2, C1, remove=("rec",)), A2, C1)
    assert run.reports(start).count("rolled_back") == 1
    st = run.life.installed
    assert st.models == {"det": A1, "rec": B1} and run.life.serving == st.models
    assert st.phase == "committed" and st.trial == {} and handled(st, "s3")
    assert [e for e in run.effects if isinstance(e, Swap)][-1] == \
        Swap({"det": A1, "kw": None, "rec": B1})


def test_a_removal_is_swapped_out_and_committed_at_once() -> None:
    run = serving_a1_b1()
    start = len(run.effects)
    run.feed(Accepted(set_dep(3, remove=("det",))))
    assert [e for e in run.effects[start:] if isinstance(e, (Swap, WatchHealth))] == \
        [Swap({"det": None})]
    assert run.reports()[-1] == "committed"
    st = run.life.installed
    assert st.models == {"rec": B1} and "det" not in st.previous and st.counters["det"] == 3
    assert run.life.serving == {"rec": B1} and run.life.mode is Mode.IDLE


@pytest.mark.parametrize(("budget", "length", "refused"), [
    (0, 1 << 40, False), (3000, 1000, False), (3000, 1001, True)])
def test_a_set_over_the_memory_budget_is_refused_before_any_download(
        budget: int, length: int, refused: bool) -> None:
    run = serving_a1_b1(budget=budget)
    run.feed(Accepted(set_dep(3, A2, length=length), served_bytes=2000))
    if not refused:
        assert run.life.mode is Mode.INSTALLING
        return
    assert run.life.mode is Mode.IDLE and run.reports()[-1] == "refused"
    (rep,) = [e for e in run.effects if isinstance(e, Report) and e.kind == "refused"]
    assert "limits.max_models_bytes" in rep.fields["reason"]
    assert f"{2000 + length} bytes" in rep.fields["reason"] and "3000" in rep.fields["reason"]
    assert handled(run.life.installed, "s3")


def test_a_member_over_the_artifact_limit_refuses_the_whole_set() -> None:
    run = Run().feed(Boot(serving_a1_b1().life.installed, 1, max_artifact_bytes=100))
    run.feed(Accepted(InstallRequest("s3", 3, models=(
        ModelChange("det", "2", A2.sha256, 10), ModelChange("rec", "2", B2.sha256, 101)))))
    assert run.life.mode is Mode.IDLE and run.reports()[-1] == "refused"
    assert "limits.max_artifact_bytes" in run.life.installed.failed["s3"]
    assert run.life.installed.models == {"det": A1, "rec": B1}


A15 = ModelRecord("det-15-ffffffffffff", "det", "1.5", "6" * 64, "s5")


@pytest.mark.parametrize("order", ["device_first", "group_first"])
def test_per_model_the_newest_counter_wins_whichever_scope_comes_first(order: str) -> None:
    device_doc = (set_dep(7, A2), "device", (A2,))
    group_doc = (set_dep(5, A15, B2, groups=("line",)), "group:line", (A15, B2))
    run = serving_a1_b1()
    for d, scope, arts in ([device_doc, group_doc] if order == "device_first"
                           else [group_doc, device_doc]):
        # What the installer stores is what the machine asks for (superseded ones left out).
        run.feed(Accepted(d, scope=scope))
        if run.life.mode is Mode.INSTALLING:
            todo = [a for a in arts if a.name in {m.name for m in run.life.members}]
            for a in todo:
                run.feed(Fetched(), Verified(), Adopted(a))
            run.feed(*(Loaded() for _ in todo), SmokeTested())
    st = run.life.installed
    # det: #7 (the device's) is newer than #5 (the group's); rec only the group decided.
    assert st.models["det"] == A2 and st.models["rec"] == B2
    assert st.counters == {"det": 7, "rec": 5}
    assert st.scopes == {"device": 7, "group:line": 5}


def test_replays_are_refused_per_scope_and_passed_over_quietly_when_asked() -> None:
    run = serving_a1_b1()
    install_set(run, set_dep(9, A2), A2)
    # An older group document is not a replay of the device's: it decides rec.
    install_set(run, set_dep(4, B2, groups=("line",)), B2, scope="group:line")
    assert run.life.installed.models["rec"] == B2
    n = len(run.effects)
    run.feed(Accepted(replace(set_dep(4, B2, groups=("line",)), digest="again"),
                      scope="group:line", quiet=True))
    assert run.effects[n:] == []
    run.feed(Accepted(replace(set_dep(8, A1), digest="old"), scope="device"))
    assert run.reports()[-1] == "refused"
    assert "not newer" in run.life.installed.failed["old"]


def test_a_member_decided_by_a_newer_deployment_is_skipped_and_the_rest_installs() -> None:
    run = serving_a1_b1()
    install_set(run, set_dep(9, A2), A2)
    start = len(run.effects)
    run.feed(Accepted(set_dep(5, A15, B2, groups=("g",)), scope="group:g"))
    assert [m.name for m in run.life.members] == ["rec"]
    rep = next(e for e in run.effects[start:] if isinstance(e, Report))
    assert rep.fields["skipped"] == [{"name": "det", "reason": "superseded by #9"}]


def _set_run_to(point: str) -> InstalledState:
    """The state on disk when an agent installing the set {det 2, rec 2} over {det 1,
    rec 1} dies at ``point``."""
    start = serving_a1_b1().life.installed
    trial = replace(start, models={"det": A2, "rec": B2}, previous={"det": A1, "rec": B1},
                    phase="trial", trial={"det": A1, "rec": B1},
                    counters={"det": 3, "rec": 3}, scopes={"device": 3})
    runs = {
        "boot_trial_saved": (trial, lambda: Run(health="stop").feed(Boot(trial, 1))),
        "rollback_saved": (replace(trial, trial_boots=1), lambda: Run(health="stop").feed(
            Boot(replace(trial, trial_boots=1), 1))),
    }
    if point in runs:
        saved, make = runs[point]
        run = make()
    else:
        saved = start
        run = install_set(Run(serving_a1_b1().life, health="stop"), set_dep(3, A2, B2),
                          A2, B2)
        run.feed(Healthy())
    for e in run.effects:
        if isinstance(e, SaveState):
            saved = e.state
        if (isinstance(e, CrashPoint) and e.name == point) or \
                (isinstance(e, WatchHealth) and point == "health_probe"):
            return saved
    raise AssertionError(f"{point} not reached")


@pytest.mark.parametrize("point", [*CRASH_POINTS, "fetched:det", "fetched:rec"])
def test_kill_at_every_crash_point_of_a_set_boots_into_one_whole_set(point: str) -> None:
    state = _set_run_to(point)
    for _ in range(3):
        run = Run(health="stop").feed(Boot(state, 1))
        assert run.life.mode is Mode.IDLE
        assert run.life.serving in ({"det": A1, "rec": B1}, {"det": A2, "rec": B2}), point
        assert run.life.serving == run.life.installed.models
        state = run.life.installed


def test_a_broken_model_of_a_set_on_trial_at_boot_rolls_the_whole_set_back() -> None:
    trial = InstalledState(models={"det": A2, "rec": B2}, previous={"det": A1, "rec": B1},
                           phase="trial", trial={"det": A1, "rec": B1},
                           counters={"det": 3, "rec": 3})
    run = Run(health="stop").feed(Boot(trial, 1))
    assert run.life.trial_pending
    run = Run(broken=(B2,), health="stop").feed(Boot(trial, 1))
    assert run.life.serving == {"det": A1, "rec": B1}
    assert run.reports().count("rolled_back") == 1 and not run.life.trial_pending
