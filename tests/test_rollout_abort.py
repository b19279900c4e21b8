"""One abort rule for both rollout engines: ``rollout run`` (waves followed over MQTT,
:func:`edge_sdk.release.rollout`) and ``rollout start`` (the fleet controller's state
machine) ask the same :class:`~edge_sdk.release._abort.AbortRule` about the same results
and stop on the same ones. No broker, no agent."""

from __future__ import annotations

import pytest

from edge_sdk.fleet._machine import (
    DeviceProgress,
    Member,
    RolloutSpec,
    RolloutState,
    Tick,
    step,
)
from edge_sdk.release import Outcome, RolloutConfig
from edge_sdk.release._rollout import Wave, abort_reason
from edge_sdk.release._watch import NO_ANSWER

C, F, RB, RF, S, UNDER_WAY = "committed", "failed", "rolled_back", "refused", "silent", "sent"

#: (max failures, max silent, min finished, the devices' results wave by wave, verdict).
#: A verdict names the limit passed (None: the rollout goes on).
CASES = [
    ("all committed", 0, 0, 1, [[C], [C, C]], None),
    ("the first failure stops a rollout with no failure allowed", 0, 0, 1, [[F]], "failed"),
    ("a device rolled back by itself is a failure", 0, 0, 1, [[C], [C, RB]], "failed"),
    ("a refusal is a failure", 0, 0, 1, [[RF, C]], "failed"),
    ("an offline or silent device stops it on its own limit", 0, 0, 1, [[C], [C, S]],
     "silent"),
    ("a share at its limit goes on", 0.25, 0, 4, [[F, C, C, C]], None),
    ("a share over its limit stops", 0.25, 0, 4, [[F, RB, C, C]], "failed"),
    ("silence at its limit goes on", 0, 0.5, 2, [[C, S], [C, C]], None),
    ("failures and silence are counted apart", 0.4, 0.4, 1, [[RF, S, C, C]], None),
    ("failures are checked before silence", 0, 0, 1, [[S, F]], "failed"),
    ("below the minimum finished nothing stops it", 0, 0, 3, [[F, C]], None),
    ("devices under way do not count", 0.5, 0, 2, [[F, UNDER_WAY, UNDER_WAY]], None),
    ("every wave so far counts, not the last alone", 0.3, 0, 1, [[C, C, C], [F, C]], None),
    ("the earlier waves' failures add up", 0.3, 0, 1, [[F, C], [F, C, C]], "failed"),
    ("a share of 0.57 allows 57 of 100", 0.57, 0, 1, [[F] * 57 + [C] * 43], None),
    ("and not 58", 0.57, 0, 1, [[F] * 58 + [C] * 42], "failed"),
]


def _fleet_verdict(rate: float, silent: float, min_finished: int,
                   waves: list[list[str]]) -> str | None:
    """What ``rollout start``'s state machine does with these results on its next tick."""
    spec = RolloutSpec(waves=tuple(str(sum(map(len, waves[:i + 1])))
                                   for i in range(len(waves))),
                       max_failure_rate=rate, max_silent_rate=silent,
                       min_finished=min_finished)
    st = RolloutState(1, "adder", "2", spec, status="running", wave=len(waves),
                      waves=len(waves), tokens_at=1000.0)
    members = {}
    for w, results in enumerate(waves, 1):
        for i, r in enumerate(results):
            d = f"w{w}-{i:03d}"
            members[d] = Member(True, "adder", "1")
            st.devices[d] = DeviceProgress(wave=w, status=r, counter=7, sent_at=999.0,
                                           reason=None if r == C else f"{d} {r}")
    new, _ = step(st, Tick(1000.0, members))
    if new.status != "aborting":
        return None
    assert new.reason is not None
    return "silent" if "did not answer" in new.reason else "failed"


def _run_verdict(limit: float, silent: float, min_finished: int,
                 waves: list[list[str]]) -> str | None:
    """What ``rollout run`` decides once these waves have come back."""
    as_outcome = {C: C, F: F, RB: RB, RF: RF, S: NO_ANSWER}
    cfg = RolloutConfig(max_failures=limit, max_silent=silent, min_finished=min_finished)
    done = [Wave(w, tuple(f"w{w}-{i:03d}" for i in range(len(rs))), 7, tuple(
        Outcome(f"w{w}-{i:03d}", as_outcome[r]) for i, r in enumerate(rs) if r != UNDER_WAY))
        for w, rs in enumerate(waves, 1)]
    why = abort_reason(cfg, done, len(waves))
    if why is None:
        return None
    return "silent" if "did not answer" in why else "failed"


@pytest.mark.parametrize(("case", "rate", "silent", "min_finished", "waves", "verdict"),
                         CASES, ids=[c[0] for c in CASES])
def test_rollout_run_and_rollout_start_stop_on_the_same_results(
        case: str, rate: float, silent: float, min_finished: int, waves: list[list[str]],
        verdict: str | None) -> None:
    assert _fleet_verdict(rate, silent, min_finished, waves) == verdict, "rollout start"
    assert _run_verdict(rate, silent, min_finished, waves) == verdict, "rollout run"


def test_rollout_run_says_how_many_did_not_commit_and_which_limit_passed() -> None:
    cfg = RolloutConfig(max_failures=1)
    waves = [Wave(1, ("a",), 7, (Outcome("a", C),)),
             Wave(2, ("b", "c", "d"), 8, (Outcome("b", F, "smoke test"),
                                          Outcome("c", NO_ANSWER, "the device is offline"),
                                          Outcome("d", RB, "health window")))]
    assert abort_reason(cfg, waves, 3) == (
        "wave 2 of 3: 3 of 4 device(s) did not commit (2 failed, allowed 1): b failed "
        "(smoke test); c no answer (the device is offline); d rolled_back (health window)")
    # A count is for the whole rollout: one failure per wave is not one each.
    assert abort_reason(cfg, waves[:1], 3) is None


def test_rollout_run_max_silent_defaults_to_max_failures() -> None:
    silent_one = [Wave(1, ("a", "b"), 7, (Outcome("a", C), Outcome("b", NO_ANSWER)))]
    assert abort_reason(RolloutConfig(max_failures=1), silent_one, 1) is None
    assert abort_reason(RolloutConfig(max_failures=1, max_silent=0), silent_one, 1) \
        is not None
