"""Shadow runs in the installer's pure state machine: how a shadow document is installed
beside the served models, saved, resumed after a restart and ended."""

from __future__ import annotations

from typing import Any

import pytest

from device_agent import InstallRequest, ModelChange
from device_agent._events import (
    Accepted,
    Adopted,
    Boot,
    CrashPoint,
    Fetched,
    Loaded,
    Report,
    SaveState,
    ShadowEnded,
    SmokeTested,
    StartShadow,
    StopShadow,
    Swap,
    Verified,
)
from device_agent._interfaces import ShadowRequest
from device_agent._lifecycle import Life, LifecycleError, Mode, handled, step
from device_agent._state import InstalledState, ModelRecord, ShadowRun
from tests._lifecycle_driver import Run

V1 = ModelRecord("adder-v1-aaaaaaaaaaaa", "adder", "v1", "a" * 64, "k1")
V2 = ModelRecord("adder-v2-bbbbbbbbbbbb", "adder", "v2", "b" * 64, "k2")
V3 = ModelRecord("adder-v3-cccccccccccc", "adder", "v3", "c" * 64, "k5")
R1 = ModelRecord("rec-r1-dddddddddddd", "rec", "r1", "d" * 64, "k1")
R2 = ModelRecord("rec-r2-eeeeeeeeeeee", "rec", "r2", "e" * 64, "k6")
FIGURES = {"compared": 3, "agreed": 3}


def change(r: ModelRecord, length: int | None = None) -> ModelChange:
    return ModelChange(r.name, r.version, r.sha256, length)


def shadow_dep(counter: int, *candidates: ModelRecord, served: tuple[ModelRecord, ...] = (V1,),
               length: int | None = None, **spec: Any) -> InstallRequest:
    return InstallRequest(f"k{counter}", counter, models=tuple(change(r) for r in served),
                          shadow=ShadowRequest(tuple(change(c, length) for c in candidates),
                                               **spec))


def plain(counter: int, *arts: ModelRecord) -> InstallRequest:
    return InstallRequest(f"k{counter}", counter, models=tuple(change(a) for a in arts))


def serving(*records: ModelRecord, **kw: Any) -> Run:
    st = InstalledState(models={r.name: r for r in records}, deployment_counter=1,
                        counters=dict.fromkeys((r.name for r in records), 1),
                        scopes={"device": 1}, deployment_digest="k1")
    return Run().feed(Boot(st, max_restarts=1, **kw))


def shadowing(run: Run, d: InstallRequest, *stored: ModelRecord) -> Run:
    run.feed(Accepted(d, ts=100.0))
    for s in stored:
        run.feed(Fetched(), Verified(), Adopted(s))
    return run.feed(*(Loaded() for _ in stored), SmokeTested(ts=200.0))


def started(run: Run) -> list[StartShadow]:
    return [e for e in run.effects if isinstance(e, StartShadow)]


def test_shadow_document_installs_the_candidate_beside_the_served_model_and_saves_the_run(
        ) -> None:
    run = shadowing(serving(V1), shadow_dep(2, V2, sample_rate=0.25, min_requests=50,
                                            time_limit_s=60.0), V2)
    st = run.life.installed
    assert run.life.mode is Mode.IDLE
    assert st.models == {"adder": V1} and dict(run.life.serving) == {"adder": V1}
    assert st.shadow == ShadowRun(2, "k2", (V2,), 0.25, 50, 60.0, None, 200.0)
    assert st.phase == "committed" and st.deployment_digest == "k2"
    # Saved before it starts: a crash after the save resumes the run at the next boot.
    i = run.effects.index(SaveState(st))
    assert run.effects[i + 1] == CrashPoint("shadow_saved")
    assert run.effects[i + 2] == StartShadow(st.shadow)
    # Nothing is swapped: the served model keeps answering.
    assert not [e for e in run.effects[i:] if isinstance(e, Swap)]
    assert "shadow_started" in run.reports() and "swapped" not in run.reports()


def test_shadow_of_a_model_the_device_does_not_serve_fails_naming_it() -> None:
    run = serving(V1).feed(Accepted(shadow_dep(2, R2), ts=1.0))
    st = run.life.installed
    assert run.life.mode is Mode.IDLE and st.shadow is None
    assert st.last_result is not None and st.last_result["result"] == "failed"
    assert st.last_result["reason"] == "serves no model rec to compare with"
    assert st.last_result["models"] == ["rec"]
    assert handled(st, "k2")  # never tried again


def test_shadow_document_whose_baseline_is_not_what_serves_fails() -> None:
    run = serving(V1).feed(Accepted(shadow_dep(2, V3, served=(V2,))))
    result = run.life.installed.last_result
    assert result is not None and result["result"] == "failed"
    assert "serves adder v1, the shadow document compares with adder v2" in result["reason"]


def test_shadow_model_over_the_memory_budget_fails_before_any_download() -> None:
    run = serving(V1, max_models_bytes=1000).feed(
        Accepted(shadow_dep(2, V2, length=600), served_bytes=600))
    result = run.life.installed.last_result
    assert run.life.mode is Mode.IDLE  # nothing fetched
    assert result is not None and result["result"] == "failed"
    assert "limits.max_models_bytes" in result["reason"]


def test_ended_run_leaves_a_result_with_its_figures_and_keeps_the_files() -> None:
    run = shadowing(serving(V1), shadow_dep(2, V2, min_requests=3), V2)
    mark = len(run.effects)
    run.feed(ShadowEnded(2, "shadow_passed", "3 requests compared", FIGURES, ts=300.0))
    st = run.life.installed
    assert st.shadow is None and st.shadow_kept == {"adder": V2}
    assert st.results[-1] == {
        "result": "shadow_passed", "ts": 300.0, "deployment": 2, "digest": "k2",
        "reason": "3 requests compared", "models": ["adder"],
        "model": {"name": "adder", "version": "v2"}, "shadow": FIGURES}
    assert st.models == {"adder": V1}
    effects = run.effects[mark:]
    assert effects[:3] == [SaveState(st), CrashPoint("shadow_ended"), StopShadow()]
    assert run.reports(mark) == ["shadow_ended"]


def test_normal_deployment_of_the_shadowed_name_ends_the_run_then_installs() -> None:
    run = shadowing(serving(V1), shadow_dep(2, V2), V2)
    run.feed(Accepted(plain(3, V3), shadow_figures=FIGURES, ts=400.0))
    assert run.life.mode is Mode.INSTALLING
    st = run.life.installed
    assert st.shadow is None
    ended = next(r for r in st.results if r["deployment"] == 2)
    assert ended["result"] == "shadow_insufficient"
    assert ended["reason"] == "replaced by deployment 3" and ended["shadow"] == FIGURES
    saved = [e for e in run.effects if isinstance(e, SaveState)][-1]
    assert saved.state.shadow is None  # the end is durable before the install goes on
    assert StopShadow() in run.effects


def test_plain_document_already_served_still_ends_the_run() -> None:
    """An aborted gate signs the device its before-versions: that ends the run."""
    run = shadowing(serving(V1), shadow_dep(2, V2), V2)
    run.feed(Accepted(plain(3, V1), shadow_figures=FIGURES))
    st = run.life.installed
    assert st.shadow is None and st.models == {"adder": V1}
    assert [r["result"] for r in st.results[-2:]] == ["shadow_insufficient", "committed"]


def test_deployment_of_another_model_leaves_the_run_going() -> None:
    run = shadowing(serving(V1, R1), shadow_dep(2, V2, served=(V1,)), V2)
    run.feed(Accepted(plain(3, R2)))
    assert run.life.installed.shadow is not None
    assert StopShadow() not in run.effects


def test_new_shadow_document_replaces_the_running_one() -> None:
    run = shadowing(serving(V1), shadow_dep(2, V2), V2)
    shadowing(run, shadow_dep(3, V3), V3)
    st = run.life.installed
    assert st.shadow is not None and st.shadow.deployment == 3
    assert [r["result"] for r in st.results if r["deployment"] == 2] == ["shadow_insufficient"]


def test_restart_resumes_the_saved_run_after_the_served_models_are_up() -> None:
    st = shadowing(serving(V1), shadow_dep(2, V2), V2).life.installed
    run = Run().feed(Boot(st, max_restarts=1))
    kinds = [type(e).__name__ for e in run.effects]
    assert kinds.index("StartShadow") > kinds.index("Swap")
    assert started(run) == [StartShadow(st.shadow)]  # type: ignore[arg-type]
    assert run.life.installed.shadow == st.shadow


def test_verdict_for_a_run_already_ended_is_ignored() -> None:
    run = shadowing(serving(V1), shadow_dep(2, V2), V2)
    run.feed(Accepted(plain(3, V1)))
    before = run.life
    assert step(before, ShadowEnded(2, "shadow_passed", "late")) == (before, [])


def test_the_running_shadow_document_delivered_again_is_a_no_op() -> None:
    run = shadowing(serving(V1, R1), shadow_dep(2, V2), V2)
    run.feed(Accepted(plain(3, R1)))  # the state now names another digest
    mark = len(run.effects)
    run.feed(Accepted(shadow_dep(2, V2)))
    assert run.effects[mark:] == [] and run.life.installed.shadow is not None


def test_failed_candidate_install_is_recorded_like_any_failed_deployment() -> None:
    from device_agent._events import Failed

    run = serving(V1).feed(Accepted(shadow_dep(2, V2)), Fetched(), Failed("bad signature"))
    st = run.life.installed
    assert st.shadow is None and st.last_result is not None
    assert st.last_result["result"] == "failed" and handled(st, "k2")
    assert [e.fields.get("stage") for e in run.effects if isinstance(e, Report)
            and e.kind == "failed"] == ["verify"]


def test_verdict_outside_idle_is_a_callers_bug() -> None:
    with pytest.raises(LifecycleError, match="ShadowEnded is not expected in mode boot"):
        step(Life(), ShadowEnded(2, "shadow_passed", "x"))


def test_shadow_run_survives_the_state_file_round_trip() -> None:
    st = shadowing(serving(V1), shadow_dep(2, V2, gate={"metric": "agreement"}), V2
                   ).life.installed
    st = InstalledState.from_json(st.to_json(), "x")
    assert st.shadow is not None and st.shadow.gate == {"metric": "agreement"}
    ended = Run().feed(Boot(st, max_restarts=1),
                       ShadowEnded(2, "shadow_failed", "agreement 0.5", FIGURES))
    kept = InstalledState.from_json(ended.life.installed.to_json(), "x")
    assert kept.shadow_kept == {"adder": V2} and kept.shadow is None
