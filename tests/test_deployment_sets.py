"""Deployments that name a set of models, or remove one: what is signed, what a device
refuses, and how each member is cross-checked with the release repository (simulator)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.errors import UsageError
from edge_sdk.release import create_deployment
from edge_sdk.trust import (
    Deployment,
    DowngradeError,
    MalformedDeploymentError,
    ModelTarget,
    ReplayError,
    TargetMismatchError,
    sign_deployment,
    verify_deployment,
)
from edge_sdk.trust._deployment import MAX_SET_MODELS
from tests._trust_env import FLEET, SimEnv

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def e(tmp_path: Path) -> SimEnv:
    return SimEnv(tmp_path)


def _signed(e: SimEnv, body: dict[str, object]) -> bytes:
    """``body`` (a deployment's ``signed`` part, edited at will) signed with the real key."""
    dep = Deployment(fleet=FLEET, counter=1, issued=NOW, expires=NOW + timedelta(days=1),
                     models=(ModelTarget("a", "1", "a/1/m.onnx", "0" * 64, 1),),
                     devices=("d1",))
    doc = json.loads(sign_deployment(dep, e.repo.keys.signers("deployment")))
    signers = e.repo.keys.signers("deployment")
    from edge_sdk.trust._envelope import canonical

    doc["signed"] = {**doc["signed"], **body}
    sig = signers[0].sign(canonical(doc["signed"]))
    doc["signatures"] = [{"keyid": sig.keyid, "sig": sig.signature}]
    return json.dumps(doc).encode()


def _member(name: str, version: str = "1") -> dict[str, object]:
    return {"model": name, "version": version, "target": f"{name}/{version}/m.onnx",
            "sha256": "0" * 64, "length": 1}


def _set(*names: str, remove: tuple[str, ...] = ()) -> dict[str, object]:
    return {"spec": 2, "models": [_member(n) for n in names], "remove": list(remove)}


def test_one_model_is_signed_in_the_format_older_agents_read(e: SimEnv) -> None:
    e.release("a", "1.0")
    sd = create_deployment(e.repo, model="a", fleet=FLEET, devices=["d1"])
    signed = json.loads(sd.document)["signed"]
    assert signed["spec"] == 1 and signed["model"] == "a" and "models" not in signed
    dep = verify_deployment(sd.document, e.key, device_id="d1", fleet=FLEET)
    assert dep.only.model == "a" and dep.names == ("a",) and not dep.is_set


def test_a_set_and_a_removal_are_signed_as_one_document(e: SimEnv) -> None:
    e.release("a", "1.0")
    e.release("b", "2.0")
    sd = create_deployment(e.repo, models=[("a", None), ("b", "2.0")], remove=["old"],
                           fleet=FLEET, devices=["d1"])
    signed = json.loads(sd.document)["signed"]
    assert signed["spec"] == 2 and [m["model"] for m in signed["models"]] == ["a", "b"]
    dep = verify_deployment(sd.document, e.key, device_id="d1", fleet=FLEET)
    assert dep.names == ("a", "b", "old") and dep.is_set and dep.remove == ("old",)
    assert dep.target_for("b").version == "2.0"
    assert "remove old" in dep.describe()
    only_removal = create_deployment(e.repo, remove=["a"], fleet=FLEET, devices=["d1"])
    assert verify_deployment(only_removal.document, e.key, device_id="d1",
                             fleet=FLEET).models == ()


@pytest.mark.parametrize(("body", "why"), [
    (_set("a", "a"), "'a' more than once"),
    (_set("a", remove=("a",)), "'a' more than once"),
    (_set(*(f"m{i}" for i in range(MAX_SET_MODELS + 1))), "at most 16"),
    (_set(), "no model"),
    (_set("bad\nname"), "printable"),
    (_set("x" * 129), "printable"),
    ({"spec": 2, "models": [{"model": "a"}], "remove": []}, "missing"),
    ({"spec": 2, "models": "a", "remove": []}, "'models' is missing or not list"),
    ({"spec": 2, "models": [_member("a")], "remove": [3]}, "list of model names"),
    ({"spec": True}, "spec True is not supported"),
    ({"spec": 4}, "spec 4 is not supported"),
    ({"spec": 3, "models": [], "remove": []}, "'shadow' is missing"),
])
def test_a_malformed_set_is_refused_in_one_line(e: SimEnv, body: dict[str, object],
                                                why: str) -> None:
    with pytest.raises(MalformedDeploymentError, match=why) as err:
        verify_deployment(_signed(e, body), e.key, device_id="d1", fleet=FLEET)
    assert "\n" not in str(err.value)


def test_per_model_counters_refuse_only_a_document_every_model_of_which_is_newer(
        e: SimEnv) -> None:
    payload = _signed(e, {**_set("a", "b"), "counter": 5})
    verify_deployment(payload, e.key, device_id="d1", last_counter={"a": 7})
    with pytest.raises(ReplayError, match=r"a \(#7\), b \(#5\)"):
        verify_deployment(payload, e.key, device_id="d1", last_counter={"a": 7, "b": 5})
    with pytest.raises(ReplayError, match="not newer than the last accepted 5"):
        verify_deployment(payload, e.key, device_id="d1", last_counter=5)


def test_a_set_downgrading_one_member_needs_a_signed_rollback(e: SimEnv) -> None:
    payload = _signed(e, {"spec": 2, "models": [_member("a", "2"), _member("b", "1")],
                          "remove": []})
    with pytest.raises(DowngradeError, match="downgrade b from 3 to 1"):
        verify_deployment(payload, e.key, device_id="d1", installed={"a": "1", "b": "3"})
    verify_deployment(payload, e.key, device_id="d1", installed={"a": "1", "c": "9"})
    rollback = _signed(e, {"spec": 2, "models": [_member("b", "1")], "remove": [],
                           "rollback": True})
    verify_deployment(rollback, e.key, device_id="d1", installed={"b": "3"})


def _set_of_a_and_b(e: SimEnv) -> Deployment:
    """Models a and b released and deployed to d1 as one set, as the device verified it."""
    e.release("a", "1.0")
    e.release("b", "1.0", seed=1)
    sd = create_deployment(e.repo, models=[("a", None), ("b", None)], fleet=FLEET,
                           devices=["d1"])
    return verify_deployment(sd.document, e.key, device_id="d1", fleet=FLEET)


def test_each_member_is_fetched_and_cross_checked_on_its_own(e: SimEnv,
                                                              tmp_path: Path) -> None:
    dep = _set_of_a_and_b(e)
    client = e.client()
    got = client.fetch(dep, tmp_path / "b", model="b")
    assert edge_sdk.Artifact.from_dir(got).manifest.name == "b"
    with pytest.raises(TargetMismatchError, match="one model expected"):
        client.fetch(dep, tmp_path / "x")
    with pytest.raises(TargetMismatchError, match="installs no model c"):
        client.fetch(dep, tmp_path / "x", model="c")
    # A member whose signed hash is not the release repository's: no member of the set is
    # fetched, not even the honest one.
    forged = Deployment(fleet=FLEET, counter=99, issued=NOW, expires=NOW + timedelta(days=1),
                        models=(dep.target_for("a"),
                                ModelTarget("b", "1.0", dep.target_for("b").target, "1" * 64,
                                            dep.target_for("b").length)),
                        devices=("d1",))
    e.sim.fetched.clear()
    with pytest.raises(TargetMismatchError, match="the release repository signed"):
        client.fetch(forged, tmp_path / "a2", model="a")
    assert not any(p.startswith("targets/") for p in e.sim.fetched)
    assert not (tmp_path / "a2").exists()


def test_the_members_of_a_set_share_one_metadata_refresh(e: SimEnv, tmp_path: Path) -> None:
    dep = _set_of_a_and_b(e)
    client = e.client()
    e.sim.fetched.clear()
    client.fetch(dep, tmp_path / "a", model="a")
    client.fetch(dep, tmp_path / "b", model="b")
    assert e.sim.fetched.count("metadata/timestamp.json") == 1
    # Another deployment refreshes again.
    again = verify_deployment(create_deployment(
        e.repo, models=[("a", None), ("b", None)], fleet=FLEET, devices=["d1"]).document,
        e.key, device_id="d1", fleet=FLEET)
    client.fetch(again, tmp_path / "a3", model="a")
    assert e.sim.fetched.count("metadata/timestamp.json") == 2


def test_creating_a_set_checks_names_and_downgrades_per_model(e: SimEnv) -> None:
    for v in ("1.0", "2.0"):
        e.release("a", v)
        e.release("b", v, seed=1)
    with pytest.raises(UsageError, match="a is named more than once"):
        create_deployment(e.repo, models=[("a", None)], remove=["a"], fleet=FLEET,
                          devices=["d1"])
    with pytest.raises(UsageError, match="at least one model"):
        create_deployment(e.repo, fleet=FLEET, devices=["d1"])
    create_deployment(e.repo, models=[("a", "2.0"), ("b", "1.0")], fleet=FLEET,
                      devices=["d1"])
    # b alone later: the versions deployed to d1 are remembered per model.
    create_deployment(e.repo, model="b", version="2.0", fleet=FLEET, devices=["d1"])
    with pytest.raises(UsageError, match=r"last deployed a 2\.0; deploying 1\.0 is a downgrade"):
        create_deployment(e.repo, model="a", version="1.0", fleet=FLEET, devices=["d1"])
    create_deployment(e.repo, model="a", version="1.0", fleet=FLEET, devices=["d1"],
                      rollback=True)
    # Removed, then deployed again at an older version: not a downgrade of anything.
    create_deployment(e.repo, remove=["b"], fleet=FLEET, devices=["d1"])
    create_deployment(e.repo, model="b", version="1.0", fleet=FLEET, devices=["d1"])
