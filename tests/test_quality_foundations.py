"""Quality gates and shadow documents: the gate's syntax and verdicts, the figures a
device reports (hostile input), the signed ``shadow`` section, and the request taps."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from edge_sdk.errors import UsageError
from edge_sdk.fleet import SCHEMA_VERSION, FleetDB
from edge_sdk.quality import FAILED, INSUFFICIENT, PASSED, Gate, ShadowFigures
from edge_sdk.release import create_deployment
from edge_sdk.trust import (
    Deployment,
    MalformedDeploymentError,
    ModelTarget,
    ReplayError,
    ShadowSpec,
    verify_deployment,
)
from edge_sdk.trust._deployment import DEPLOYMENT
from tests._trust_env import FLEET, SimEnv

NOW = datetime.now(UTC).replace(microsecond=0)
TARGET = ModelTarget("det", "1.1", "det/1.1/m.onnx", "0" * 64, 1)


# -- the gate ------------------------------------------------------------------------------

def test_a_gate_reads_its_documented_syntax_and_writes_it_back() -> None:
    g = Gate.parse("agreement>=0.99 over 500 requests within 30m sampling 0.25")
    assert (g.metric, g.op, g.threshold, g.min_requests) == ("agreement", ">=", 0.99, 500)
    assert (g.time_limit_s, g.sample_rate) == (1800.0, 0.25)
    assert Gate.parse(g.text) == g
    assert Gate.from_json(json.loads(json.dumps(g.to_json()))) == g
    assert Gate.parse("latency_ratio<1.5 over 1 request").time_limit_s == 3600.0


@pytest.mark.parametrize("text", [
    "", "agreement>=0.99", "agreement=>0.99 over 5 requests", "accuracy>=0.9 over 5 requests",
    "agreement>=0.99 over 0 requests", "agreement>=0.99 over 5 requests sampling 0",
    "agreement>=0.99 over 5 requests sampling 1.5", "agreement>=nan over 5 requests",
    "agreement>=0.99 over 5 requests within 0s", "agreement>=0.99 over 5 requests within 31d",
])
def test_a_gate_no_run_can_use_is_one_line_naming_the_syntax(text: str) -> None:
    with pytest.raises(UsageError) as got:
        Gate.parse(text)
    assert "\n" not in str(got.value) and "gate" in str(got.value)


def _figures(compared: int, agreed: int, **kw: float) -> ShadowFigures:
    return ShadowFigures(compared=compared, agreed=agreed, **kw)  # type: ignore[arg-type]


def test_a_gate_passes_fails_or_says_too_few_requests_were_compared() -> None:
    g = Gate.parse("agreement>=0.99 over 100 requests")
    assert g.judge(_figures(100, 99)).outcome == PASSED
    failed = g.judge(_figures(100, 98))
    assert failed.outcome == FAILED and "agreement 0.98 over 100" in failed.why
    few = g.judge(_figures(99, 99))
    assert few.outcome == INSUFFICIENT and "99 of 100" in few.why


def test_each_gate_metric_judges_its_own_figure() -> None:
    f = ShadowFigures(compared=10, agreed=10, errors=2, worst=0.4, serving_ms_p50=2.0,
                      shadow_ms_p50=3.0)
    assert Gate.parse("worst>=0.5 over 10 requests").judge(f).outcome == FAILED
    assert Gate.parse("worst>=0.4 over 10 requests").judge(f).outcome == PASSED
    assert Gate.parse("latency_ratio<=1.4 over 10 requests").judge(f).outcome == FAILED
    assert Gate.parse("latency_ratio<=1.5 over 10 requests").judge(f).outcome == PASSED
    assert Gate.parse("errors<2 over 10 requests").judge(f).outcome == FAILED
    assert Gate.parse("errors<3 over 10 requests").judge(f).outcome == PASSED
    # A figure not measured never passes.
    assert Gate.parse("latency_ratio<=9 over 10 requests").judge(
        ShadowFigures(compared=10, agreed=10)).outcome == FAILED


@pytest.mark.parametrize("hostile", [
    None, [], "x", {"compared": "many"}, {"compared": -5, "agreed": 9},
    {"compared": True, "agreed": True}, {"worst": float("nan")}, {"worst": 7},
    {"compared": 2**80, "agreed": 2**80, "worst_detail": "x" * 10_000},
    {"serving_ms_p50": float("inf"), "shadow_ms_p50": -1},
])
def test_figures_from_a_device_never_raise_and_stay_in_bounds(hostile: object) -> None:
    f = ShadowFigures.from_json(hostile)
    assert 0 <= f.agreed <= f.compared
    assert f.worst is None or 0.0 <= f.worst <= 1.0
    assert f.worst_detail is None or len(f.worst_detail) <= 200
    assert f.agreement is None or 0.0 <= f.agreement <= 1.0


def test_figures_survive_their_own_json() -> None:
    f = ShadowFigures(compared=500, agreed=496, errors=1, dropped=3, worst=0.25,
                      worst_detail="row 0: class 3 -> 5", serving_ms_p50=2.0,
                      serving_ms_p99=4.0, shadow_ms_p50=2.5, shadow_ms_p99=5.0)
    assert ShadowFigures.from_json(json.loads(json.dumps(f.to_json()))) == f
    assert f.latency_ratio == pytest.approx(1.25)


# -- the shadow section of a deployment ------------------------------------------------------

def _shadow_doc(**kw: object) -> Deployment:
    gate = Gate.parse("agreement>=0.99 over 50 requests within 5m sampling 0.5")
    fields: dict[str, object] = dict(fleet=FLEET, counter=4, issued=NOW,
                                     expires=NOW + timedelta(days=1), devices=("d1",),
                                     shadow=ShadowSpec.for_gate((TARGET,), gate))
    fields.update(kw)
    return Deployment(**fields)  # type: ignore[arg-type]


def test_a_shadow_document_is_spec_3_and_reads_back_the_same() -> None:
    dep = _shadow_doc()
    signed = dep.to_signed()
    assert signed["spec"] == 3 and signed["models"] == []
    assert Deployment.from_signed(json.loads(json.dumps(signed))) == dep
    assert dep.decides == ("det",) and "shadow det 1.1 over 50" in dep.title


def test_a_reader_of_spec_2_refuses_a_shadow_document() -> None:
    # What an agent from before shadow runs does: spec 3 is not one it reads, so it never
    # installs the candidate as if it were a plain deployment.
    from dataclasses import replace

    older = replace(DEPLOYMENT, spec=2, older=(1,))
    with pytest.raises(MalformedDeploymentError, match="spec 3 is not supported"):
        older.header(_shadow_doc().to_signed())


@pytest.mark.parametrize("edit", [
    {"shadow": None}, {"shadow": {}}, {"shadow": {"models": []}},
    {"spec": 2}, {"remove": ["det"]},
    {"shadow": {"models": [TARGET.to_signed()] * 2, "sample_rate": "1", "min_requests": 5,
                "time_limit_s": "60", "gate": None}},
    {"shadow": {"models": [TARGET.to_signed()], "sample_rate": "2", "min_requests": 5,
                "time_limit_s": "60", "gate": None}},
    {"shadow": {"models": [TARGET.to_signed()], "sample_rate": 0.5, "min_requests": 5,
                "time_limit_s": "60", "gate": None}},
    {"shadow": {"models": [TARGET.to_signed()], "sample_rate": "1", "min_requests": 0,
                "time_limit_s": "60", "gate": None}},
    {"shadow": {"models": [TARGET.to_signed()], "sample_rate": "1", "min_requests": 5,
                "time_limit_s": "60", "gate": {"metric": "vibes"}}},
])
def test_a_malformed_shadow_section_is_refused(edit: Mapping[str, object]) -> None:
    body = {**_shadow_doc().to_signed(), **edit}
    with pytest.raises(MalformedDeploymentError):
        Deployment.from_signed(body)


def test_a_replayed_shadow_document_is_refused_by_the_shadowed_models_counter(
        tmp_path: Path) -> None:
    e = SimEnv(tmp_path)
    e.release("det", "1.0")
    e.release("det", "1.1")
    gate = Gate.parse("agreement>=0.99 over 50 requests")
    sd = create_deployment(e.repo, fleet=FLEET, devices=["d1"], models=[("det", "1.0")],
                           shadow=[("det", "1.1")],
                           shadow_run=ShadowSpec.for_gate((), gate))
    dep = verify_deployment(sd.document, e.key, device_id="d1", fleet=FLEET)
    assert dep.shadow is not None and dep.shadow.gate == gate
    assert dep.shadow.models[0].version == "1.1" and dep.models[0].version == "1.0"
    with pytest.raises(ReplayError):
        verify_deployment(sd.document, e.key, device_id="d1", fleet=FLEET,
                          last_counter={"det": dep.counter})
    # Shadowing alone (nothing served changes): the served side may be empty.
    only = create_deployment(e.repo, fleet=FLEET, devices=["d1"], shadow=[("det", None)])
    got = verify_deployment(only.document, e.key, device_id="d1", fleet=FLEET)
    assert got.models == () and got.shadow is not None and got.shadow.gate is None
    assert got.shadow.models[0].version == "1.1"


def test_shadowing_and_removing_one_model_is_refused_before_signing(tmp_path: Path) -> None:
    e = SimEnv(tmp_path)
    e.release("det", "1.0")
    with pytest.raises(UsageError, match="shadowed and removed"):
        create_deployment(e.repo, fleet=FLEET, devices=["d1"], remove=["det"],
                          shadow=[("det", None)])


# -- the fleet database -----------------------------------------------------------------------

def test_a_database_of_schema_10_gets_the_quality_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with FleetDB.open(url) as db, db.begin() as c:
        c.execute(sa.text("DROP TABLE sample_policy"))
        for col in ("shadow", "drift", "drifting"):
            c.execute(sa.text(f"ALTER TABLE devices DROP COLUMN {col}"))
        c.execute(sa.text("DELETE FROM schema_version WHERE version >= 11"))
    with FleetDB.open(url) as db, db.read() as c:
        cols = {col["name"] for col in sa.inspect(c).get_columns("devices")}
        assert {"shadow", "drift", "drifting"} <= cols
        assert "sample_policy" in sa.inspect(c).get_table_names()
        assert c.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() \
            == SCHEMA_VERSION == 11


# -- taps ------------------------------------------------------------------------------------

def test_a_failing_tap_never_stops_the_others_or_the_answer() -> None:
    from device_agent._tap import Taps

    seen: list[str] = []

    class Boom:
        def served(self, model: object, feed: object, outputs: object, seconds: float) -> None:
            raise RuntimeError("tap bug")

    class Note:
        def served(self, model: object, feed: object, outputs: object, seconds: float) -> None:
            seen.append("noted")

    taps = Taps()
    taps.add(Boom())
    note = Note()
    taps.add(note)
    x = {"x": np.zeros(1)}
    taps.served(None, x, x, 0.0)  # type: ignore[arg-type]
    taps.served(None, x, x, 0.0)  # type: ignore[arg-type]
    assert seen == ["noted", "noted"] and taps.failures == 2
    taps.remove(note)
    assert len(taps) == 1
