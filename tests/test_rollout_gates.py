"""Gated rollouts in the pure state machine: each device shadows the release first, the
controller judges its figures with the rollout's gate, and only a device that passed is
promoted. Driven event by event (tests/_gate_sim.py): no database, broker or key."""

from __future__ import annotations

import pytest

from edge_sdk.errors import UsageError
from edge_sdk.fleet._machine import (
    Command,
    DeviceProgress,
    IllegalEvent,
    Member,
    Report,
    RolloutSpec,
    RolloutState,
    Sign,
    Signed,
    SignFailed,
    Tick,
    desired,
    holds,
    step,
)
from edge_sdk.fleet._outcome import device_outcome
from tests._gate_sim import FAILING, GATE, PASSING, THIN, GateSim, figures, gated
from tests._rollout_sim import Crash

# -- the path of a device ------------------------------------------------------------

def test_each_device_shadows_the_release_before_it_is_promoted() -> None:
    sim = GateSim(gated(), 4)
    sim.tick()
    first = sim.signs[0]
    # Wave 1's device serves what it ran and shadows the rollout's version beside it.
    assert first.shadow == (("adder", "2"),) and first.models == (("adder", "1"),)
    assert sim.status(1) == {"d00": "shadowing"} and sim.forward("d00") == set()
    sim.tick()  # its run passed: promoted by a plain deployment of the release
    assert sim.status(1) == {"d00": "sent"} and len(sim.forward("d00")) == 1
    p = sim.state.devices["d00"]
    assert p.shadow_verdict == "passed" and p.shadow_figures == figures()
    sim.run()
    assert sim.state.status == "completed"
    assert set(sim.status().values()) == {"committed"}
    for d in sim.members:
        assert len(sim.shadowed(d)) == 1 and len(sim.forward(d)) == 1


def test_devices_are_shadowed_one_document_per_distinct_before_versions() -> None:
    sim = GateSim(gated(waves=("100%",)), 4)
    sim.members["d01"] = Member(True, "adder", "0")
    sim.tick(answer=False)
    docs = sorted((s.devices, s.models) for s in sim.signs)
    assert docs == [(("d00", "d02", "d03"), (("adder", "1"),)), (("d01",), (("adder", "0"),))]


def test_a_failed_gate_is_a_failure_that_aborts_and_names_the_figures() -> None:
    sim = GateSim(gated(), 4)
    sim.shadows["d00"] = FAILING
    sim.run()
    p = sim.state.devices["d00"]
    assert p.status == "gate_failed" and p.shadow_verdict == "failed"
    assert p.reason == ("agreement 0.8 over 100, worst 0.2 (class 3 -> 5) "
                        "(gate agreement>=0.99)")
    assert sim.state.status == "aborted"
    assert "1 of 1 finished device(s) failed" in (sim.state.reason or "")
    assert "agreement 0.8 over 100" in (sim.state.reason or "")
    # It never swapped: nothing forward, nothing to send back.
    assert sim.forward("d00") == set() and sim.rollbacks("d00") == set()
    assert device_outcome(p.status, p.rollback_status) == "gate_failed"


def test_a_failed_gate_within_the_failure_budget_lets_the_rollout_go_on() -> None:
    sim = GateSim(gated(max_failure_rate=0.5, min_finished=2, waves=("2", "100%")), 4)
    sim.shadows["d01"] = FAILING
    sim.run()
    assert sim.state.status == "completed"
    assert sim.status() == {"d00": "committed", "d01": "gate_failed", "d02": "committed",
                            "d03": "committed"}


@pytest.mark.parametrize(("word", "figs", "status"), [
    ("shadow_passed", FAILING[1], "gate_failed"),  # the device's word is not taken
    ("shadow_failed", PASSING[1], "sent"),
    ("shadow_passed", THIN[1], "no_traffic"),
    ("committed", None, "no_traffic"),  # no figures: nothing compared
])
def test_the_controller_judges_the_figures_not_the_devices_word(
        word: str, figs: dict[str, object] | None, status: str) -> None:
    sim = GateSim(gated(), 4)
    sim.shadows["d00"] = (word, figs)
    sim.tick().tick()
    assert sim.status(1) == {"d00": status}


def test_figures_a_device_forged_are_read_bounded() -> None:
    sim = GateSim(gated(max_failure_rate=0.9, min_finished=9), 2)
    sim.shadows["d00"] = ("shadow_passed", {"compared": 100, "agreed": 10**30,
                                            "worst": float("nan"), "worst_detail": "x" * 999,
                                            "junk": [1] * 50})
    sim.tick().tick()
    p = sim.state.devices["d00"]
    # agreed is clamped to compared: agreement 1.0, which passes; nothing unbounded kept.
    assert p.shadow_verdict == "passed" and p.shadow_figures is not None
    assert p.shadow_figures["agreed"] == 100 and "junk" not in p.shadow_figures
    assert "worst" not in p.shadow_figures


# -- not enough traffic --------------------------------------------------------------

def test_no_traffic_counts_as_a_failure_when_the_operator_said_fail() -> None:
    sim = GateSim(gated(gate_no_traffic="fail"), 4)
    sim.shadows["d00"] = THIN
    sim.run()
    p = sim.state.devices["d00"]
    assert p.status == "no_traffic" and p.shadow_verdict == "insufficient"
    assert p.reason == "12 of 100 requests compared (agreement 1 over 12)"
    assert sim.state.status == "aborted" and sim.forward("d00") == set()


def test_no_traffic_finishes_the_device_without_the_release_when_skipped() -> None:
    sim = GateSim(gated(gate_no_traffic="skip"), 4)
    sim.shadows["d00"] = THIN
    sim.run()
    assert sim.state.status == "completed"
    assert sim.status() == {"d00": "no_traffic", "d01": "committed", "d02": "committed",
                            "d03": "committed"}
    assert sim.forward("d00") == set()


def test_no_traffic_promotes_the_device_when_the_operator_said_promote() -> None:
    sim = GateSim(gated(gate_no_traffic="promote"), 4)
    sim.shadows["d00"] = THIN
    sim.run()
    assert sim.state.status == "completed" and set(sim.status().values()) == {"committed"}
    assert sim.state.devices["d00"].shadow_verdict == "insufficient"
    assert len(sim.forward("d00")) == 1


@pytest.mark.parametrize(("policy", "status", "forward", "aborted"), [
    ("fail", "no_traffic", 0, True),
    ("skip", "no_traffic", 0, False),
    ("promote", "committed", 1, False),
])
def test_a_device_without_the_rollouts_model_has_nothing_to_compare_with(
        policy: str, status: str, forward: int, aborted: bool) -> None:
    sim = GateSim(gated(gate_no_traffic=policy), 2)
    sim.members["d00"] = Member(True, None, None, models={})
    sim.run()
    p = sim.state.devices["d00"]
    assert p.status == status and sim.shadowed("d00") == []
    assert p.shadow_verdict == "insufficient" and "serves no adder" in (p.reason or "")
    assert len(sim.forward("d00")) == forward
    assert (sim.state.status == "aborted") is aborted


def test_a_device_that_runs_the_release_already_is_promoted_without_a_shadow() -> None:
    sim = GateSim(gated(), 2)
    sim.members["d00"] = Member(True, "adder", "2")
    sim.run()
    assert sim.shadowed("d00") == [] and len(sim.forward("d00")) == 1
    assert sim.state.devices["d00"].shadow_verdict == "unchanged"
    assert sim.state.status == "completed"


# -- failures, silence, timing -------------------------------------------------------

@pytest.mark.parametrize("word", ["failed", "refused", "rolled_back"])
def test_a_shadow_that_cannot_be_installed_fails_the_device(word: str) -> None:
    sim = GateSim(gated(), 4)
    sim.shadows["d00"] = (word, None)
    sim.tick().tick()
    p = sim.state.devices["d00"]
    assert p.status == "failed"
    assert p.reason == f"shadow {word.replace('_', ' ')}: d00 said {word}"
    assert sim.state.status == "aborting" or sim.state.status == "aborted"


def test_a_shadowing_device_is_silent_only_after_the_gates_time_limit() -> None:
    sim = GateSim(gated(wave_timeout=60.0, republish_s=0), 2)
    sim.shadows["d00"] = None
    sim.tick()
    # Past the wave timeout, within the gate's 10 minutes: still shadowing.
    sim.tick(GATE.time_limit_s)
    assert sim.status(1) == {"d00": "shadowing"}
    sim.tick(61.0)
    assert sim.status(1) == {"d00": "silent"}
    assert sim.state.devices["d00"].reason == "no shadow result within 660 s"


def test_a_shadow_document_is_sent_again_until_the_device_answers() -> None:
    sim = GateSim(gated(republish_s=30.0), 2)
    sim.shadows["d00"] = None
    sim.tick()
    sim.tick(31.0)
    assert len(sim.shadowed("d00")) == 2
    assert sim.shadowed("d00")[0] == sim.shadowed("d00")[1]
    assert len(sim.signs) == 1  # the same bytes, never a second signature


def test_a_device_that_says_its_run_is_under_way_is_not_sent_the_document_again(
        ) -> None:
    sim = GateSim(gated(republish_s=30.0), 2)
    sim.shadows["d00"] = None
    sim.tick()
    counter = sim.state.devices["d00"].shadow_counter
    assert counter is not None
    for runs in ({"d00": counter - 1}, {"d00": counter}):  # another run: sent again
        sim.now += 31.0
        sim.feed(Tick(sim.now, dict(sim.members), shadow_runs=runs))
    assert len(sim.shadowed("d00")) == 2


def test_the_rate_paces_shadow_documents_but_not_promotions() -> None:
    sim = GateSim(gated(waves=("100%",), rate=1.0), 3)
    sim.shadows = {d: None for d in sim.members}
    sim.tick()
    assert sum(1 for s in sim.signs if s.shadow) == 1
    sim.shadows = {}
    sim.answered.clear()
    sim.tick()  # d00 passed; the minute is not over: only its promotion is signed
    assert [s.devices for s in sim.signs[1:]] == [("d00",)] and not sim.signs[1].shadow


def test_a_passed_device_waits_for_resume_while_the_rollout_is_paused() -> None:
    sim = GateSim(gated(), 2)
    sim.tick(answer=False)
    sim.command("pause").tick().tick()
    assert sim.status(1) == {"d00": "pending"} and sim.forward("d00") == set()
    sim.command("resume").tick()
    assert sim.status(1) == {"d00": "sent"}


def test_a_device_revoked_while_it_shadows_leaves_the_rollout() -> None:
    sim = GateSim(gated(), 2)
    sim.shadows["d00"] = None
    sim.tick()
    sim.revoked.add("d00")
    sim.tick()
    assert sim.status(1) == {"d00": "cancelled"}
    assert not holds(sim.state, "d00")


# -- restart and abort ---------------------------------------------------------------

def test_a_restart_mid_shadow_publishes_the_same_shadow_document_again() -> None:
    sim = GateSim(gated(), 2)
    sim.shadows["d00"] = None
    sim.tick()
    before = list(sim.inbox["d00"])
    sim.restart()
    assert sim.inbox["d00"] == [*before, before[0]] and len(sim.signs) == 1
    assert sim.status(1) == {"d00": "shadowing"}


def test_a_crash_before_the_shadow_was_signed_signs_it_anew_after_the_restart() -> None:
    sim = GateSim(gated(), 2, crash_at=1)
    with pytest.raises(Crash):
        sim.tick()
    assert sim.saved.devices["d00"].status == "shadow_signing"
    sim.crash_at = None
    sim.restart()
    assert sim.status(1) == {"d00": "pending"}
    sim.run()
    assert sim.state.status == "completed" and len(sim.shadowed("d00")) == 1


def test_an_abort_while_a_device_shadows_ends_its_run_with_what_it_serves() -> None:
    sim = GateSim(gated(), 4)
    sim.shadows["d00"] = None
    sim.tick()
    sim.command("abort")
    p = sim.state.devices["d00"]
    assert p.status == "cancelled" and "while it shadowed" in (p.reason or "")
    back = sim.signs[-1]
    # A plain document of its before-version, no removal: it never had the new one.
    assert back.rollback and back.devices == ("d00",) and back.targets("adder") == (
        (("adder", "1"),), ())
    assert desired(sim.saved, "d00") is not None
    assert sim.wanted()["d00"] == sim.inbox["d00"][-1]
    sim.run()
    assert sim.state.status == "aborted" and sim.forward("d00") == set()
    assert device_outcome(p.status, sim.state.devices["d00"].rollback_status) == "skipped"


def test_an_abort_cancels_passed_devices_that_were_not_promoted_yet() -> None:
    sim = GateSim(gated(), 2)
    sim.tick(answer=False)
    sim.command("pause").tick()
    assert sim.status(1) == {"d00": "pending"}
    sim.command("abort").tick()
    assert sim.status(1) == {"d00": "cancelled"} and sim.state.status == "aborted"
    assert sim.forward("d00") == set()


def test_a_set_rollout_shadows_the_models_a_device_serves_and_ends_runs_without_removals(
        ) -> None:
    st = RolloutState(1, "det", "2", gated(waves=("100%",)),
                      models=(("det", "2"), ("ocr", "5")))
    members = {"d1": Member(True, "det", "1", models={"det": "1"})}
    st, fx = step(st, Tick(1.0, members))
    sign = next(f for f in fx if isinstance(f, Sign))
    assert sign.models == (("det", "1"),) and sign.shadow == (("det", "2"),)
    st, fx = step(st, Signed(("d1",), 7, "doc", False, 2.0, shadow=True))
    st, fx = step(st, Tick(3.0, members))
    st, fx = step(st, Command("abort", 4.0, "alice"))
    back = next(f for f in fx if isinstance(f, Sign))
    assert back.rollback and back.targets("det") == ((("det", "1"),), ())


# -- records -------------------------------------------------------------------------

def test_the_desired_topic_holds_the_shadow_document_until_the_promotion() -> None:
    sim = GateSim(gated(), 2)
    sim.shadows["d00"] = None
    sim.tick()
    shadow_doc = sim.inbox["d00"][0]
    got = desired(sim.saved, "d00")
    assert got is not None and got.document == shadow_doc and got.version == "1"
    sim.shadows["d00"] = PASSING
    sim.answered.clear()
    sim.tick()
    got = desired(sim.saved, "d00")
    assert got is not None and got.document != shadow_doc and got.version == "2"


def test_a_shadow_signature_for_a_device_not_waiting_for_one_is_illegal() -> None:
    st = RolloutState(1, "adder", "2", gated(), status="running", wave=1, waves=1,
                      devices={"d1": DeviceProgress(1, status="signing")})
    with pytest.raises(IllegalEvent, match="not waiting for one"):
        step(st, Signed(("d1",), 5, "doc", False, 1.0, shadow=True))
    st.devices["d1"].status = "shadow_signing"
    with pytest.raises(IllegalEvent):
        step(st, Signed(("d1",), 5, "doc", False, 1.0))


def test_a_shadow_document_that_cannot_be_signed_fails_its_devices() -> None:
    st = RolloutState(1, "adder", "2", gated(), status="running", wave=1, waves=1,
                      devices={"d1": DeviceProgress(1, status="shadow_signing")})
    st, _ = step(st, SignFailed(("d1",), "adder 2 is yanked", False, 1.0, shadow=True))
    assert st.devices["d1"].status == "failed"
    assert st.devices["d1"].reason == ("its shadow document could not be signed: adder 2 "
                                       "is yanked")


def test_a_report_about_another_counter_does_not_end_a_shadow_run() -> None:
    sim = GateSim(gated(), 2)
    sim.shadows["d00"] = None
    sim.tick()
    counter = sim.state.devices["d00"].shadow_counter
    assert counter is not None
    sim.feed(Tick(sim.now + 1, dict(sim.members),
                  (Report("d00", counter + 50, "shadow_passed", None, figures()),)))
    assert sim.status(1) == {"d00": "shadowing"}


@pytest.mark.parametrize(("status", "held"), [
    ("shadow_signing", True), ("shadowing", True), ("gate_failed", False),
    ("no_traffic", False)])
def test_a_gated_rollout_holds_a_device_while_it_may_send_it_a_document(
        status: str, held: bool) -> None:
    st = RolloutState(1, "adder", "2", gated(), status="running", wave=1, waves=1,
                      devices={"d1": DeviceProgress(1, status=status,
                                                    before_models={"adder": "1"})})
    assert holds(st, "d1") is held


# -- the spec ------------------------------------------------------------------------

def test_a_gated_spec_survives_its_record() -> None:
    s = gated(gate_no_traffic="promote")
    again = RolloutSpec.from_json(s.to_json())
    assert again == s and again.gate == GATE
    assert s.to_json()["gate"]["threshold"] == "0.99"  # decimal strings: canonical JSON


def test_a_spec_recorded_before_gates_has_none() -> None:
    old = {k: v for k, v in gated().to_json().items()
           if k not in ("gate", "gate_no_traffic")}
    assert RolloutSpec.from_json(old).gate is None


@pytest.mark.parametrize("policy", ["", "ignore", "FAIL"])
def test_an_unknown_no_traffic_policy_is_refused(policy: str) -> None:
    with pytest.raises(UsageError, match="--gate-no-traffic must be one of fail, skip, "
                                         "promote"):
        gated(gate_no_traffic=policy)
