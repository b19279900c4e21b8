"""Attacks on gated rollouts: a shadow model that cannot answer is never promoted."""

from __future__ import annotations

import pytest

from edge_sdk.errors import UsageError
from edge_sdk.quality import Gate, ShadowFigures
from tests._gate_sim import GateSim, figures, gated


@pytest.mark.parametrize("policy", ["promote", "skip", "fail"])
def test_a_shadow_that_raises_on_every_request_fails_the_gate_whatever_the_policy(
        policy: str) -> None:
    sim = GateSim(gated(gate_no_traffic=policy), 4)
    sim.shadows["d00"] = ("shadow_insufficient", figures(0, errors=100))
    sim.run()
    p = sim.state.devices["d00"]
    assert p.status == "gate_failed" and p.shadow_verdict == "failed"
    assert sim.forward("d00") == set()


def test_shadow_errors_beside_perfect_agreement_fail_an_agreement_gate() -> None:
    gate = Gate.parse("agreement>=0.99 over 100 requests")
    got = gate.judge(ShadowFigures(compared=100, agreed=100, errors=400))
    assert got.outcome == "failed" and "400 shadow error(s)" in got.why


def test_an_errors_gate_counts_failed_requests_as_handled() -> None:
    gate = Gate.parse("errors<=5 over 100 requests")
    assert gate.judge(ShadowFigures(compared=0, errors=100)).outcome == "failed"
    assert gate.judge(ShadowFigures(compared=98, agreed=98, errors=2)).outcome == "passed"
    assert gate.judge(ShadowFigures(compared=10, errors=2)).outcome == "insufficient"


@pytest.mark.parametrize("text", [
    "agreement>=0.99 over " + "9" * 5000 + " requests",
    "agreement>=0.99 over 99999999999999999999 requests",
])
def test_a_gate_with_a_huge_request_count_is_a_one_line_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="over N requests"):
        Gate.parse(text)
