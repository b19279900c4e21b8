"""The rollout's pure state machine, driven event by event: no database, no broker, no key.

The driver (tests/_rollout_sim.py) plays the controller's part as ``Controller`` does it
and the devices' part.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from edge_sdk.fleet._machine import (
    Command,
    CommandRefused,
    DeviceProgress,
    Event,
    IllegalEvent,
    Member,
    Report,
    RolloutSpec,
    RolloutState,
    Sign,
    Signed,
    SignFailed,
    Tick,
    check_command,
    step,
)
from tests._rollout_sim import Crash, Sim, spec

# -- waves ----------------------------------------------------------------------------

def test_waves_go_out_one_after_another_each_once_finished() -> None:
    sim = Sim(spec(), 10).tick(answer=False)
    assert sim.state.status == "running" and (sim.state.wave, sim.state.waves) == (1, 3)
    assert [len(w) for w in sim.waves()] == [1, 4, 5]
    assert sim.status(1) == {"d00": "sent"} and set(sim.status(2).values()) == {"pending"}
    sim.tick(answer=False)  # wave 1 has not answered: wave 2 waits
    assert set(sim.status(2).values()) == {"pending"} and len(sim.signs) == 1
    sim.tick()
    assert sim.status(1) == {"d00": "committed"} and set(sim.status(2).values()) == {"sent"}
    assert sim.signs[1].devices == tuple(sim.waves()[1])  # one document for the wave
    sim.run()
    assert sim.state.status == "completed" and sim.state.reason is None
    assert set(sim.status().values()) == {"committed"}
    assert all(len(sim.forward(d)) == 1 for d in sim.members)


def test_waves_are_planned_online_devices_first() -> None:
    sim = Sim(spec(waves=("2", "100%")), 4)
    sim.members["d00"] = Member(False, "adder", "1")
    sim.tick(answer=False)
    assert sim.waves() == [["d01", "d02"], ["d00", "d03"]]


def test_a_selector_that_matches_nobody_aborts_without_any_effect() -> None:
    sim = Sim(spec(), 0).tick()
    assert sim.state.status == "aborted" and "matches no device" in (sim.state.reason or "")
    assert sim.signs == []


# -- pause, resume --------------------------------------------------------------------

def test_pause_after_a_wave_holds_until_resume_approves_the_next_wave() -> None:
    sim = Sim(spec(pause_after_wave=True), 10).tick().tick()
    assert sim.state.status == "paused" and sim.state.held
    assert sim.state.reason == "waiting for approval after wave 1 of 3"
    for _ in range(30):
        sim.tick()
    assert set(sim.status(2).values()) == {"pending"} and len(sim.signs) == 1
    sim.command("resume").tick()
    assert sim.state.status == "running" and set(sim.status(2).values()) == {"sent"}
    sim.tick().tick()
    # Resuming approved wave 2 only: the rollout holds again after it.
    assert sim.state.status == "paused" and "after wave 2 of 3" in (sim.state.reason or "")
    sim.run()
    assert sim.state.status == "completed"


def test_an_operator_pause_stops_sending_and_resume_continues_where_it_was() -> None:
    sim = Sim(spec(waves=("100%",), rate=6), 10).tick(answer=False)
    sent = len(sim.sends)
    sim.command("pause")
    assert sim.state.status == "paused" and sim.state.reason == "paused by alice"
    for _ in range(120):
        sim.tick()
    assert len(sim.sends) == sent  # nothing new while paused; answers still recorded
    assert set(sim.status().values()) == {"committed", "pending"}
    sim.command("resume").run()
    assert sim.state.status == "completed" and len(sim.sends) == 10


# -- abort criteria -------------------------------------------------------------------

def test_failures_below_the_minimum_finished_do_not_abort_and_over_the_share_do() -> None:
    results = {"d00": "failed", "d05": "rolled_back"}
    sim = Sim(spec(waves=("4", "100%"), max_failure_rate=0.25, min_finished=4), 8,
              results=results).tick(answer=False)
    sim.tick()  # wave 1: d00 failed, 1 of 4 finished failed = 0.25, not over it
    assert sim.status(1) == {"d00": "failed", "d01": "committed", "d02": "committed",
                             "d03": "committed"}
    assert sim.state.status == "running" and set(sim.status(2).values()) == {"sent"}
    sim.tick()  # wave 2: d05 rolled back, 2 of 8 = 0.25 — still not over
    assert sim.state.status == "completed"


def test_failure_share_over_the_limit_aborts_and_sends_committed_devices_back() -> None:
    results = {"d00": "failed", "d01": "rolled_back"}
    sim = Sim(spec(waves=("4", "100%"), max_failure_rate=0.25, min_finished=4), 8,
              results=results).tick(answer=False)
    sim.tick()
    st = sim.state
    assert st.status == "aborting"
    assert st.reason is not None and st.reason.startswith("wave 1 of 2: 2 of 4 finished")
    assert "d00 said failed" in st.reason and "d01 said rolled_back" in st.reason
    assert set(sim.status(2).values()) == {"cancelled"}  # never sent
    back = sim.signs[-1]
    assert back == Sign(("d02", "d03"), "1", True)  # only those that took version 2
    sim.run()
    assert sim.state.status == "aborted"
    for d in ("d02", "d03"):
        assert len(sim.rollbacks(d)) == 1 and sim.state.devices[d].rollback_status == \
            "committed"
    for d in ("d00", "d01"):
        assert sim.rollbacks(d) == set() and sim.state.devices[d].rollback_status is None
    assert all(sim.forward(d) == set() for d in ("d04", "d05", "d06", "d07"))


def test_silent_share_over_the_limit_aborts_after_the_wave_timeout() -> None:
    sim = Sim(spec(waves=("2", "100%"), wave_timeout=30, max_silent_rate=0.0), 4,
              results={"d01": "silent"}).tick(answer=False).tick()
    assert sim.status(1) == {"d00": "committed", "d01": "sent"}
    sim.tick(29)  # 30 s after it was sent: not yet over the timeout
    assert sim.status(1)["d01"] == "sent" and sim.state.status == "running"
    sim.tick(1.5)
    assert sim.state.devices["d01"].reason == "no answer within 30 s"
    assert sim.state.status == "aborting" and "did not answer" in (sim.state.reason or "")
    # A silent device may have installed it: it is sent back too.
    assert sim.signs[-1] == Sign(("d00", "d01"), "1", True)


def test_silent_share_at_the_limit_lets_the_rollout_go_on() -> None:
    sim = Sim(spec(waves=("2", "100%"), wave_timeout=30, max_silent_rate=0.5,
                   min_finished=2), 4, results={"d01": "silent"}).tick(answer=False).tick()
    sim.tick(31)
    assert sim.status(1) == {"d00": "committed", "d01": "silent"}
    sim.run()
    assert sim.state.status == "completed"
    assert sim.status() == {"d00": "committed", "d01": "silent", "d02": "committed",
                            "d03": "committed"}


def test_revoked_devices_leave_a_running_rollout_without_aborting_or_holding_it() -> None:
    # d01 was sent its document and will never answer (revoked: it cannot connect);
    # d03 is revoked before its wave. Neither counts as silent nor holds its wave.
    sim = Sim(spec(waves=("2", "100%"), wave_timeout=30, max_silent_rate=0.0), 4,
              results={"d01": "silent"}).tick(answer=False)
    assert sim.status(1) == {"d00": "sent", "d01": "sent"}
    sim.revoked |= {"d01", "d03"}
    sim.run()
    assert sim.state.status == "completed"
    assert sim.status() == {"d00": "committed", "d01": "cancelled", "d02": "committed",
                            "d03": "cancelled"}
    assert sim.state.devices["d03"].reason == "the device was revoked"
    assert sim.forward("d03") == set()


def test_an_operator_abort_cancels_pending_devices_and_withdraws_one_without_a_past() -> None:
    sim = Sim(spec(waves=("2", "100%")), 4)
    sim.members["d01"] = Member(True, None, None)  # never served anything
    sim.tick(answer=False).command("abort")
    st = sim.state
    assert st.status == "aborting" and st.reason == "aborted by alice"
    assert st.devices["d01"].rollback_status == "withdrawn" and sim.cleared == ["d01"]
    assert set(sim.status(2).values()) == {"cancelled"}
    sim.run()
    assert sim.state.status == "aborted"


def test_a_deployment_that_cannot_be_signed_fails_its_devices_and_aborts() -> None:
    sim = Sim(spec(), 4).tick(answer=False)
    sim.state.devices["d00"].status = "signing"  # as if the Sign were still out
    sim.feed(SignFailed(("d00",), "no deployment key", False, sim.now))
    assert sim.status(1) == {"d00": "failed"}
    sim.tick()
    assert sim.state.status == "aborting" and "1 of 1 finished" in (sim.state.reason or "")
    sim.tick()
    assert sim.state.status == "aborted"  # nothing took version 2: nothing to send back
    assert all(p.rollback_status is None for p in sim.state.devices.values())


# -- dynamic ------------------------------------------------------------------------

def test_a_device_that_joins_the_selector_mid_rollout_joins_the_current_wave() -> None:
    sim = Sim(spec(waves=("1", "100%")), 3).tick(answer=False)
    sim.members["late"] = Member(True, "adder", "1")
    sim.tick(answer=False)
    assert sim.state.devices["late"].wave == 1 and sim.status(1)["late"] == "sent"
    assert set(sim.status(2).values()) == {"pending"}  # wave 1 is not over until it answers
    sim.run()
    assert sim.state.status == "completed" and len(sim.forward("late")) == 1


def test_a_device_joining_while_the_rollout_waits_for_approval_goes_out_on_resume() -> None:
    sim = Sim(spec(waves=("1", "100%"), pause_after_wave=True), 3).tick().tick()
    assert sim.state.held
    sim.members["late"] = Member(True, "adder", "1")
    sim.tick().tick()
    assert sim.status()["late"] == "pending"
    sim.run()
    assert sim.state.status == "completed" and len(sim.forward("late")) == 1


# -- rate ---------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.5, 1.5, 6, 90])
def test_no_minute_ever_holds_more_first_deployments_than_the_rate(rate: float) -> None:
    sim = Sim(spec(waves=("100%",), rate=rate), 200)
    for _ in range(600):  # ten minutes, ticking every second
        sim.tick()
    times = [t for t, _ in sim.sends]
    per_minute = max(1, int(rate))
    for t in times:
        assert sum(1 for u in times if t <= u < t + 60) <= per_minute, (rate, t)
    # ...and it is a limit, not a slowdown: nearly the rate is reached over ten minutes.
    assert len(times) >= min(200, min(rate, per_minute) * 9), len(times)


def test_the_rate_limit_spreads_a_minute_out_rather_than_bursting_it() -> None:
    sim = Sim(spec(waves=("100%",), rate=60), 100)
    sim.tick()
    assert len(sim.sends) == 10  # ten seconds' worth at most in one burst
    sim.tick()
    assert len(sim.sends) == 11


def test_rollbacks_on_abort_are_not_held_back_by_the_rate() -> None:
    sim = Sim(spec(waves=("100%",), rate=6), 20)
    for _ in range(180):
        sim.tick()
    took = [d for d, p in sim.state.devices.items() if p.status == "committed"]
    assert len(took) > 6
    sim.command("abort")
    assert sim.signs[-1] == Sign(tuple(sorted(took)), "1", True)


# -- illegal events -------------------------------------------------------------------

def _signing_sim() -> Sim:
    sim = Sim(spec(waves=("2", "100%")), 4).tick(answer=False)
    sim.state.devices["d02"].status = "signing"
    return sim


@pytest.mark.parametrize("event, match", [
    (Signed(("ghost",), 7, "doc", False, 0), "ghost, which is not in the rollout"),
    (Signed(("d03",), 7, "doc", False, 0), "d03, which is pending, not waiting"),
    (Signed(("d00",), 7, "doc", False, 0), "d00, which is sent, not waiting"),
    (Signed(("d02", "d00"), 7, "doc", False, 0), "d00, which is sent"),
    (Signed(("d00",), 7, "doc", True, 0), "rollback signature for d00, which is None"),
    (SignFailed(("d01",), "x", False, 0), "d01, which is sent"),
    (SignFailed(("ghost",), "x", True, 0), "ghost, which is not in the rollout"),
    (Command("skip", 0, "alice"), "unknown command 'skip'"),
])
def test_an_event_that_cannot_follow_the_state_raises_and_changes_nothing(
        event: Event, match: str) -> None:
    sim = _signing_sim()
    before = copy.deepcopy(sim.state)
    with pytest.raises(IllegalEvent, match=match):
        step(sim.state, event)
    assert sim.state == before


def test_a_second_signature_for_a_sent_device_is_refused_not_recorded() -> None:
    sim = Sim(spec(), 3).tick(answer=False)
    p = sim.state.devices["d00"]
    with pytest.raises(IllegalEvent):
        step(sim.state, Signed(("d00",), p.counter + 5, "other", False, sim.now))  # type: ignore[operator]
    assert sim.state.devices["d00"].counter == p.counter


@pytest.mark.parametrize("status, command, why", [
    ("completed", "pause", "already completed"), ("aborted", "abort", "already aborted"),
    ("paused", "pause", "already paused"), ("running", "resume", "running, not paused"),
    ("aborting", "abort", "already aborting"), ("running", "skip", "unknown command"),
])
def test_commands_that_do_not_apply_are_refused_with_the_reason(status: str, command: str,
                                                                 why: str) -> None:
    with pytest.raises(CommandRefused, match=why):
        check_command(status, command)


def test_a_command_that_raced_with_the_end_of_the_rollout_is_a_no_op() -> None:
    sim = Sim(spec(), 2).run()
    before = sim.state
    assert step(before, Command("pause", sim.now, "alice")) == (before, [])


# -- restarts -------------------------------------------------------------------------

def _scenarios() -> dict[str, Callable[[int | None], Sim]]:
    def completes(crash_at: int | None) -> Sim:
        return Sim(spec(waves=("2", "4", "100%"), pause_after_wave=True, rate=30), 7,
                   crash_at=crash_at)

    def aborts(crash_at: int | None) -> Sim:
        return Sim(spec(waves=("3", "100%"), max_failure_rate=0.2, min_finished=3), 6,
                   results={"d01": "rolled_back"}, crash_at=crash_at)

    def withdraws(crash_at: int | None) -> Sim:
        """The operator aborts while wave 2 is out: d03 and d05 served no adder before,
        their documents are withdrawn (cleared); the others get a rollback."""
        sim = Sim(spec(waves=("2", "100%")), 6, crash_at=crash_at)
        for d in ("d03", "d05"):
            sim.members[d] = Member(True, "other", "7")
        sim.abort_in_wave_2 = True
        return sim

    return {"completes": completes, "aborts": aborts, "withdraws": withdraws}


def _run_with_restarts(sim: Sim) -> Sim:
    for _ in range(600):
        try:
            return sim.run()
        except Crash:
            sim.crash_at = None
            sim.restart()
    raise AssertionError("never finished")


@pytest.mark.parametrize("scenario", ["completes", "aborts", "withdraws"])
def test_a_restart_after_a_crash_at_any_point_sends_no_device_a_second_deployment(
        scenario: str) -> None:
    make = _scenarios()[scenario]
    clean = _run_with_restarts(make(None))
    assert clean.points > 8
    assert (scenario == "withdraws") == bool(clean.cleared)
    for n in range(1, clean.points + 1):
        sim = _run_with_restarts(make(n))
        assert sim.state.status == clean.state.status, n
        if scenario != "withdraws":  # there, when the operator aborts depends on the crash
            assert sim.status() == clean.status(), n
        # Every topic holds what the record says: a document, or nothing once withdrawn.
        assert sim.retained == sim.wanted(), (n, sim.retained, sim.wanted())
        assert {d: v is None for d, v in sim.retained.items()} \
            == {d: v is None for d, v in clean.retained.items()}, n
        for d in sim.members:
            assert len(sim.forward(d)) <= 1, (n, d, sim.inbox[d])
            assert len(sim.rollbacks(d)) <= 1, (n, d, sim.inbox[d])
            assert bool(sim.forward(d)) == bool(clean.forward(d)), (n, d)
            assert bool(sim.rollbacks(d)) == bool(clean.rollbacks(d)), (n, d)


def test_a_restart_republishes_the_saved_document_and_resigns_an_unsaved_one() -> None:
    sim = Sim(spec(waves=("2", "100%")), 4, crash_at=3)  # sign, signed, publish d00: crash
    with pytest.raises(Crash):
        sim.tick()
    assert sim.inbox == {} and sim.saved.devices["d00"].status == "sent"
    sim.crash_at = None
    sim.restart()
    assert sim.inbox["d00"] == sim.inbox["d01"] == ["#101 adder 2"]

    sim = Sim(spec(waves=("2", "100%")), 4, crash_at=2)  # signed #101, never saved
    with pytest.raises(Crash):
        sim.tick()
    assert sim.saved.devices["d00"].status == "signing"
    sim.crash_at = None
    sim.restart().tick(answer=False)
    assert sim.inbox["d00"] == ["#102 adder 2"]  # #101 was never published


def test_the_spec_round_trips_through_its_json() -> None:
    s = spec(rate=3.5, pause_after_wave=True, rollback=False)
    assert RolloutSpec.from_json(s.to_json()) == s
    assert RolloutSpec.from_json({**s.to_json(), "from_a_newer_version": 1}) == s


def test_clear_is_only_for_devices_with_nothing_to_go_back_to() -> None:
    sim = Sim(spec(waves=("100%",)), 3)
    sim.members["d02"] = Member(True, "other", "7")  # served another model before
    sim.tick(answer=False).tick(answer=False).command("abort")
    assert sim.cleared == ["d02"] and sim.state.devices["d02"].rollback_status == "withdrawn"
    assert sim.signs[-1] == Sign(("d00", "d01"), "1", True)


def test_a_device_times_out_only_once_the_registry_has_heard_up_to_its_deadline() -> None:
    """A registry that is behind (a flood, a slow database) must never make a device that
    answered in time "silent": the timeout counts against what the registry has heard."""
    members = {"d1": Member(True, "adder", "1")}
    st, _ = step(RolloutState(1, "adder", "2", spec(waves=("100%",), wave_timeout=60)),
                 Tick(1000.0, members))
    st, _ = step(st, Signed(("d1",), 7, "doc", False, 1000.0))
    behind, _ = step(st, Tick(1200.0, members, heard_until=1050.0))
    assert behind.devices["d1"].status == "sent"
    # Its answer, written once the registry caught up, counts.
    late, _ = step(behind, Tick(1201.0, members, [Report("d1", 7, "committed")],
                                heard_until=1201.0))
    assert late.devices["d1"].status == "committed"
    # Caught up and still nothing from it: now it is silent.
    silent, _ = step(behind, Tick(1201.0, members, heard_until=1201.0))
    assert silent.devices["d1"].status == "silent"
    # The same for a rollback sent on abort.
    aborting, _ = step(silent, Tick(1202.0, members, heard_until=1202.0))
    assert aborting.status == "aborting"
    p = aborting.devices["d1"]
    p.rollback_status, p.rollback_sent_at, p.rollback_counter = "sent", 1202.0, 8
    held, _ = step(aborting, Tick(1400.0, members, heard_until=1210.0))
    assert held.devices["d1"].rollback_status == "sent" and held.status == "aborting"
    gone, _ = step(held, Tick(1401.0, members, heard_until=1401.0))
    assert gone.devices["d1"].rollback_status == "silent" and gone.status == "aborted"


# -- sets of models ------------------------------------------------------------------

SET = (("det", "2"), ("rec", "5"))


def _set_sim(members: dict[str, Member], **kw: object) -> Sim:
    sim = Sim(spec(waves=("100%",), **kw), devices=tuple(members))
    sim.state = RolloutState(1, "det", "2", sim.state.spec, models=SET)
    sim.members = dict(members)
    return sim


def test_a_set_rollout_signs_every_model_of_it_as_one_document() -> None:
    sim = _set_sim({"d00": Member(True, "det", "1", {"det": "1", "rec": "4"})})
    sim.run()
    assert sim.state.status == "completed"
    assert sim.signs == [Sign(("d00",), "2", False, models=SET)]
    assert sim.state.devices["d00"].before_models == {"det": "1", "rec": "4"}


def test_an_aborted_set_rollout_sends_each_device_back_per_model() -> None:
    sim = _set_sim({
        "both": Member(True, "det", "1", {"det": "1", "rec": "4", "ocr": "9"}),
        "det-only": Member(True, "det", "1", {"det": "1"}),
        "rec-moved": Member(True, "det", "2", {"det": "2", "rec": "4"}),
        "none": Member(True, None, None, {}),
        "quiet-none": Member(True, None, None, {}),
        "fails": Member(True, "det", "1", {"det": "1", "rec": "4"}),
    }, max_failure_rate=0.2, min_finished=5)
    sim.results = {"fails": "failed", "quiet-none": "silent"}
    sim.run()
    assert sim.state.status == "aborted"
    back = {d: s for s in sim.signs[1:] for d in s.devices}
    # Each model back to the device's version of it; a model it did not have is removed;
    # a model the rollout did not change (and one outside it: ocr) is not named.
    assert back["both"] == Sign(("both",), "1", True, models=(("det", "1"), ("rec", "4")))
    assert back["det-only"] == Sign(("det-only",), "1", True, models=(("det", "1"),),
                                    remove=("rec",))
    assert back["rec-moved"] == Sign(("rec-moved",), "4", True, models=(("rec", "4"),))
    assert back["none"] == Sign(("none",), None, True, remove=("det", "rec"))
    assert "fails" not in back and "quiet-none" not in back  # its own rollback; withdrawn
    assert sim.state.devices["quiet-none"].rollback_status == "withdrawn"
    assert sim.cleared == ["quiet-none"]
    assert {d: p.rollback_status for d, p in sim.state.devices.items()
            if d in back} == dict.fromkeys(back, "committed")


def test_an_aborted_one_model_rollout_removes_it_where_a_device_did_not_have_it() -> None:
    sim = Sim(spec(waves=("100%",), max_failure_rate=0.2, min_finished=3), 3,
              results={"d02": "failed"})
    sim.members["d01"] = Member(True, "other", "7", {"other": "7"})  # no adder before
    sim.run()
    assert sim.signs[1:] == [Sign(("d00",), "1", True),
                             Sign(("d01",), None, True, remove=("adder",))]


def test_a_record_saved_before_sets_keeps_its_one_model_before() -> None:
    st = RolloutState(1, "adder", "2", spec())
    st.devices["d00"] = DeviceProgress(1, before_model="adder", before_version="1")
    st.devices["d01"] = DeviceProgress(1, before_model="other", before_version="7")
    assert st.before("d00") == {"adder": "1"} and st.before("d01") == {"adder": None}


def test_a_member_known_only_by_its_one_model_has_that_one() -> None:
    assert Member(True, "adder", "1").versions() == {"adder": "1"}
    assert Member(True, None, None).versions() == {}
    assert Member(True, "adder", "1", {"adder": "1", "b": "3"}).versions() \
        == {"adder": "1", "b": "3"}
