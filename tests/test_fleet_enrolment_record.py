"""The enrolment record on SQLite and PostgreSQL: how requests are filed (pending,
conflicting keys, re-issue, rejected, revoked, the allow-list, the bound on pending
rows), the operator's decisions and their audit entries, what the controller records of
what it did at the broker, and rollouts leaving revoked devices out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from edge_sdk.fleet import SCHEMA_VERSION, FleetDB, FleetUsageError, RolloutSpec, start_rollout
from edge_sdk.fleet import _enrol as enrol
from edge_sdk.fleet import _store as store
from edge_sdk.fleet._members import members
from edge_sdk.fleet._registry import ingest_state
from edge_sdk.identity import EnrolRequest
from tests import _fleetdb
from tests._enrolreq import again, request

db_url = _fleetdb.db_url  # the fixture: one empty database per engine
FLEET = "lab"
NOW = 1_800_000_000.0


@pytest.fixture
def db(db_url: str) -> Iterator[FleetDB]:
    with FleetDB.open(db_url) as d:
        yield d


def _record(db: FleetDB, req: EnrolRequest, *, now: float = NOW,
            max_pending: int = 100) -> enrol.RecordOutcome:
    return enrol.record_request(db, FLEET, req, now=now, max_pending=max_pending)


def _row(db: FleetDB, device: str) -> dict[str, object]:
    row = enrol.enrolment(db, FLEET, device)
    assert row is not None
    return row


def _actions(db: FleetDB) -> list[tuple[str, str, dict[str, object]]]:
    return [(a["actor"], a["action"], a["params"]) for a in db.audit()]


def _register(db: FleetDB, device: str) -> None:
    with db.begin() as c:
        assert ingest_state(c, FLEET, device, json.dumps(
            {"online": True, "phase": "idle", "model": None}).encode())


# -- filing requests -------------------------------------------------------------------------

def test_an_unknown_device_waits_for_an_operator_with_its_key_and_batch(db: FleetDB) -> None:
    req = request("cam-1", batch="line-3")
    out = _record(db, req)
    assert (out.state, out.new, out.issue) == ("pending", True, False)
    assert out.reason == enrol.PENDING_REASON
    row = _row(db, "cam-1")
    assert (row["state"], row["batch"], row["fingerprint"], row["public_key"], row["facts"],
            row["requests"], row["want"]) == ("pending", "line-3", req.fingerprint,
                                              req.public_pem, {"arch": "aarch64"}, 1, "")
    assert [r["device_id"] for r in db.enrolments(FLEET, "pending")] == ["cam-1"]


def test_a_pending_device_asking_again_is_counted_not_duplicated(db: FleetDB) -> None:
    req = request("cam-1")
    _record(db, req)
    out = _record(db, again(req, "b2"), now=NOW + 5)
    assert (out.state, out.new) == ("pending", False)
    row = _row(db, "cam-1")
    assert (row["requests"], row["batch"], row["updated_at"]) == (2, "b2", NOW + 5)
    assert len(db.enrolments(FLEET)) == 1


def test_another_key_for_a_pending_id_is_refused_and_changes_nothing(db: FleetDB) -> None:
    first = request("cam-1")
    _record(db, first)
    out = _record(db, request("cam-1"), now=NOW + 1)
    assert (out.state, out.reason) == ("refused", enrol.CONFLICT_REASON)
    row = _row(db, "cam-1")
    assert (row["fingerprint"], row["conflicts"], row["requests"], row["updated_at"]) == (
        first.fingerprint, 1, 1, NOW)


def test_another_key_for_an_accepted_id_gets_no_credentials(db: FleetDB) -> None:
    first = request("cam-1")
    _record(db, first)
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.issued(db, FLEET, "cam-1", issued=1, expires_at=NOW + 100)
    out = _record(db, request("cam-1"))
    assert (out.state, out.reason, out.issue) == ("refused", enrol.CONFLICT_REASON, False)
    row = _row(db, "cam-1")
    assert (row["state"], row["fingerprint"], row["want"], row["conflicts"]) == (
        "accepted", first.fingerprint, "", 1)


def test_an_accepted_device_asking_again_with_its_key_is_issued_again(db: FleetDB) -> None:
    req = request("cam-1")
    _record(db, req)
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.issued(db, FLEET, "cam-1", issued=1, expires_at=NOW + 100)
    assert _row(db, "cam-1")["want"] == ""
    out = _record(db, again(req, "b9"))
    assert (out.state, out.issue, out.new) == ("accepted", True, False)
    row = _row(db, "cam-1")
    assert (row["want"], row["batch"], row["issued"]) == ("issue", "b9", 1)


def test_a_rejected_device_stays_rejected(db: FleetDB) -> None:
    req = request("cam-1")
    _record(db, req)
    enrol.reject_devices(db, FLEET, ["cam-1"], reason="not ours", actor="alice")
    for _ in range(2):
        out = _record(db, again(req))
        assert (out.state, out.reason, out.issue) == ("rejected", "not ours", False)
    # Another key, before the controller has answered the rejection: still rejected.
    out = _record(db, request("cam-1"))
    assert (out.state, out.reason, out.issue) == ("rejected", "not ours", False)
    assert _row(db, "cam-1")["state"] == "rejected"


def test_a_squatter_rejected_leaves_the_id_to_the_real_device(db: FleetDB) -> None:
    # Someone with a leaked claim asks first for the id of a device not yet enrolled.
    squat = request("cam-1", batch="leaked")
    _record(db, squat)
    real = request("cam-1")
    assert _record(db, real).state == "refused"  # the id waits with the squatter's key
    enrol.reject_devices(db, FLEET, ["cam-1"], reason="not ours", actor="alice")
    enrol.rejected_applied(db, FLEET, "cam-1")
    assert _record(db, again(squat)).state == "rejected"  # its key stays rejected
    out = _record(db, again(real))
    assert (out.state, out.new) == ("pending", True)
    row = _row(db, "cam-1")
    assert (row["fingerprint"], row["decided_by"], row["reason"]) == (real.fingerprint,
                                                                      None, None)
    assert row["conflicts"] == 2
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    assert _row(db, "cam-1")["fingerprint"] == real.fingerprint


def test_a_revoked_device_asking_again_waits_for_an_operator(db: FleetDB) -> None:
    _record(db, request("cam-1"))
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="alice")
    fresh = request("cam-1")  # any key: the old one may be the stolen one
    out = _record(db, fresh)
    assert (out.state, out.new, out.issue) == ("pending", True, False)
    row = _row(db, "cam-1")
    # The broker account is still to be deleted: the revocation is not forgotten.
    assert (row["state"], row["fingerprint"], row["want"]) == (
        "pending", fresh.fingerprint, "revoke")
    enrol.revoked_applied(db, FLEET, "cam-1")
    assert (_row(db, "cam-1")["want"], _row(db, "cam-1")["broker"]) == ("", "deleted")


def test_pending_requests_are_bounded_and_one_over_leaves_no_row(db: FleetDB) -> None:
    first = [request(f"d{i}") for i in range(3)]
    for r in first:
        assert _record(db, r, max_pending=3).state == "pending"
    out = _record(db, request("d3"), max_pending=3)
    assert (out.state, out.reason, out.new) == ("refused", enrol.TOO_MANY_REASON, False)
    assert enrol.enrolment(db, FLEET, "d3") is None
    assert len(db.enrolments(FLEET)) == 3
    # Known ones are still counted; another fleet has its own bound.
    assert _record(db, again(first[0]), max_pending=3).state == "pending"
    assert enrol.record_request(db, "other", request("d3"), now=NOW,
                                max_pending=3).state == "pending"


def test_a_flood_through_one_claim_leaves_room_for_the_other_batches(db: FleetDB) -> None:
    # A claim password ships on every device image: one leaked must not stop the
    # devices of every other batch from enrolling.
    for i in range(3):
        assert _record(db, request(f"junk-{i}", batch="leaked"), max_pending=3).state \
            == "pending"
    assert _record(db, request("junk-3", batch="leaked"), max_pending=3).state == "refused"
    assert _record(db, request("cam-1", batch="line-2"), max_pending=3).state == "pending"
    assert enrol.enrolment(db, FLEET, "junk-3") is None


def test_a_revoked_device_asking_again_counts_against_the_bound(db: FleetDB) -> None:
    _record(db, request("cam-1"))
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="alice")
    _record(db, request("d1"))
    assert _record(db, request("cam-1"), max_pending=1).state == "refused"
    assert _row(db, "cam-1")["state"] == "revoked"


def test_an_allow_listed_device_is_accepted_on_its_first_request(db: FleetDB) -> None:
    res = enrol.allow_devices(db, FLEET, ["cam-1"], groups=["lobby"], tags={"site": "a"},
                              actor="alice")
    assert res.listed == ("cam-1",) and res.accepted == ()
    req = request("cam-1", batch="b7")
    out = _record(db, req)
    assert (out.state, out.new, out.issue) == ("accepted", True, True)
    row = _row(db, "cam-1")
    assert (row["state"], row["want"], row["groups"], row["tags"], row["decided_by"]) == (
        "accepted", "issue", ["lobby"], {"site": "a"}, "alice")
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and (dev["groups"], dev["tags"]) == (["lobby"], {"site": "a"})
    auto = [a for a in _actions(db) if a[1] == "device.enrol.auto"]
    assert auto == [(enrol.CONTROLLER_ACTOR, "device.enrol.auto", {
        "fleet": FLEET, "device": "cam-1", "batch": "b7", "fingerprint": req.fingerprint,
        "allowed_by": "alice", "groups": ["lobby"], "tags": {"site": "a"}})]
    # Used once: another id is not allowed by it, and the next key is a conflict.
    assert _record(db, request("cam-1")).state == "refused"


def test_allowing_a_device_that_asked_accepts_it_and_a_revoked_one_is_refused(
        db: FleetDB) -> None:
    _record(db, request("cam-1"))
    res = enrol.allow_devices(db, FLEET, ["cam-1", "cam-2"], actor="alice")
    assert res.accepted == ("cam-1",) and res.listed == ("cam-2",)
    assert _row(db, "cam-1")["want"] == "issue"
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="alice")
    with pytest.raises(FleetUsageError, match="cam-1 revoked; nothing allowed"):
        enrol.allow_devices(db, FLEET, ["cam-1", "cam-3"], actor="alice")
    assert enrol.record_request(db, FLEET, request("cam-3"), now=NOW,
                                max_pending=9).state == "pending"


# -- the operator's decisions ----------------------------------------------------------------

def test_accepting_sets_the_assignment_and_asks_for_credentials(db: FleetDB) -> None:
    for d in ("cam-1", "cam-2"):
        _record(db, request(d))
    _register(db, "cam-1")
    done = enrol.accept_devices(db, FLEET, ["cam-1", "cam-2"], groups=["lobby"],
                                tags={"floor": "2"}, actor="alice")
    assert done == ["cam-1", "cam-2"]
    for d in done:
        row = _row(db, d)
        assert (row["state"], row["want"], row["decided_by"], row["groups"],
                row["tags"]) == ("accepted", "issue", "alice", ["lobby"], {"floor": "2"})
        dev = db.device(d, fleet=FLEET)
        assert dev is not None and dev["groups"] == ["lobby"]
    (entry,) = [a for a in _actions(db) if a[1] == "device.accept"]
    assert entry[0] == "alice" and entry[2]["devices"] == ["cam-1", "cam-2"]
    assert entry[2]["groups"] == ["lobby"] and entry[2]["tags"] == {"floor": "2"}
    # Accepting again changes nothing and writes no entry.
    assert enrol.accept_devices(db, FLEET, ["cam-1"], actor="bob") == []
    assert len([a for a in _actions(db) if a[1] == "device.accept"]) == 1


def test_accepting_an_unknown_or_revoked_id_changes_nothing(db: FleetDB) -> None:
    _record(db, request("cam-1"))
    with pytest.raises(FleetUsageError, match="no enrolment request from ghost"):
        enrol.accept_devices(db, FLEET, ["cam-1", "ghost"], actor="alice")
    assert _row(db, "cam-1")["state"] == "pending"
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="alice")
    with pytest.raises(FleetUsageError, match="cam-1 is revoked"):
        enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    with pytest.raises(FleetUsageError, match="tag name"):
        enrol.accept_devices(db, FLEET, ["cam-1"], tags={"bad key": "x"}, actor="alice")
    assert db.audit()[-1]["action"] == "device.revoke"


def test_rejecting_answers_the_device_and_an_accepted_one_must_be_revoked(
        db: FleetDB) -> None:
    _record(db, request("cam-1"))
    _record(db, request("cam-2"))
    enrol.accept_devices(db, FLEET, ["cam-2"], actor="alice")
    assert enrol.reject_devices(db, FLEET, ["cam-1"], actor="alice") == ["cam-1"]
    row = _row(db, "cam-1")
    assert (row["state"], row["want"], row["reason"]) == (
        "rejected", "reject", enrol.REJECTED_REASON)
    enrol.rejected_applied(db, FLEET, "cam-1")
    assert _row(db, "cam-1")["want"] == "" and _row(db, "cam-1")["applied_at"] is not None
    with pytest.raises(FleetUsageError, match=r"cam-2 is accepted.*revoke"):
        enrol.reject_devices(db, FLEET, ["cam-2"], actor="alice")
    with pytest.raises(FleetUsageError, match="one line"):
        enrol.reject_devices(db, FLEET, ["cam-1"], reason="a\nb", actor="alice")
    assert [a[2]["devices"] for a in _actions(db) if a[1] == "device.reject"] == [["cam-1"]]


def test_a_device_rejected_before_its_revocation_was_applied_is_answered_after_it(
        db: FleetDB) -> None:
    _record(db, request("cam-1"))
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="alice")
    enrol.reject_devices(db, FLEET, ["cam-1"], reason="never again", actor="alice")
    assert _row(db, "cam-1")["want"] == "revoke"
    enrol.revoked_applied(db, FLEET, "cam-1")
    assert (_row(db, "cam-1")["state"], _row(db, "cam-1")["want"]) == ("rejected", "reject")


def test_revoking_marks_the_device_and_asks_the_controller(db: FleetDB) -> None:
    _record(db, request("cam-1"))
    _register(db, "cam-1")
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    enrol.issued(db, FLEET, "cam-1", issued=1, expires_at=NOW + 100)
    assert _row(db, "cam-1")["applied_at"] is not None
    enrol.revoke_device(db, FLEET, "cam-1", reason="stolen", actor="bob")
    row = _row(db, "cam-1")
    assert (row["state"], row["want"], row["applied_at"], row["reason"]) == (
        "revoked", "revoke", None, "stolen")
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["revoked"] is not None
    assert (dev["revoked"]["by"], dev["revoked"]["reason"]) == ("bob", "stolen")
    assert _actions(db)[-1][:2] == ("bob", "device.revoke")
    with pytest.raises(FleetUsageError, match="--reason"):
        enrol.revoke_device(db, FLEET, "cam-1", reason=" ", actor="bob")
    with pytest.raises(FleetUsageError, match="cam-1 is revoked"):
        enrol.revoke_device(db, FLEET, "cam-1", reason="again", actor="bob")
    # Accepted again (after asking again): the mark goes.
    _record(db, request("cam-1"))
    enrol.accept_devices(db, FLEET, ["cam-1"], actor="alice")
    dev = db.device("cam-1", fleet=FLEET)
    assert dev is not None and dev["revoked"] is None


def test_rollouts_leave_revoked_devices_out(db: FleetDB) -> None:
    for d in ("cam-1", "cam-2"):
        _record(db, request(d))
        _register(db, d)
    enrol.accept_devices(db, FLEET, ["cam-1", "cam-2"], groups=["lobby"], actor="alice")
    assert sorted(members(db, FLEET, {"groups": ["lobby"]})) == ["cam-1", "cam-2"]
    enrol.revoke_device(db, FLEET, "cam-2", reason="stolen", actor="alice")
    assert sorted(members(db, FLEET, {"groups": ["lobby"]})) == ["cam-1"]
    _record(db, request("cam-2"))  # asking again: pending, still out until accepted
    assert sorted(members(db, FLEET, {"groups": ["lobby"]})) == ["cam-1"]
    assert sorted(members(db, FLEET, {"devices": ["cam-2"]})) == []
    with pytest.raises(FleetUsageError, match="matches no device"):
        start_rollout(db, fleet=FLEET, model="det", version="2", actor="alice",
                      selector={"devices": ["cam-2"]}, spec=RolloutSpec())
    # Revoked in the enrolment record alone (it never reported): still left out once it
    # registers.
    _record(db, request("cam-3"))
    enrol.accept_devices(db, FLEET, ["cam-3"], groups=["lobby"], actor="alice")
    enrol.revoke_device(db, FLEET, "cam-3", reason="stolen", actor="alice")
    _register(db, "cam-3")
    assert sorted(members(db, FLEET, {"groups": ["lobby"]})) == ["cam-1"]
    # What the controller hands a running rollout, which lets go of them.
    assert store.revoked_devices(db, FLEET) == {"cam-2", "cam-3"}


# -- claims ----------------------------------------------------------------------------------

def test_a_claims_password_is_kept_only_until_the_controller_applied_it(
        db: FleetDB) -> None:
    pw = enrol.create_claim(db, FLEET, "line-3", actor="alice")
    assert len(pw) >= 32
    (want,) = [w for w in enrol.wanted(db, FLEET) if w["kind"] == "claim"]
    assert (want["batch"], want["want"], want["secret"]) == ("line-3", "create", pw)
    (listed,) = db.claims(FLEET)
    assert "secret" not in listed and listed["secret_pending"] is True
    enrol.claim_applied(db, FLEET, "line-3", want="create")
    assert enrol.wanted(db, FLEET) == []
    assert db.claims(FLEET)[0]["secret_pending"] is False
    assert pw not in json.dumps(db.audit())
    assert _actions(db)[-1] == ("alice", "claim.create", {"fleet": FLEET, "batch": "line-3",
                                                          "sessions": 16})
    with pytest.raises(FleetUsageError, match="exists"):
        enrol.create_claim(db, FLEET, "line-3", actor="alice")
    for bad in ("a/b", "x" * 33, "_x."):
        with pytest.raises(FleetUsageError, match="claim batch"):
            enrol.create_claim(db, FLEET, bad, actor="alice")


def test_a_claim_records_its_number_of_sessions_and_a_new_one_replaces_it(
        db: FleetDB) -> None:
    enrol.create_claim(db, FLEET, "b1", actor="alice", sessions=3)
    assert [(w["batch"], w["sessions"]) for w in enrol.wanted(db, FLEET)] == [("b1", 3)]
    assert db.claims(FLEET)[0]["sessions"] == 3
    enrol.revoke_claim(db, FLEET, "b1", actor="alice")
    enrol.create_claim(db, FLEET, "b1", actor="alice", sessions=256)
    assert [(w["want"], w["sessions"]) for w in enrol.wanted(db, FLEET)] == [("create", 256)]
    for bad in (0, 257, -1):
        with pytest.raises(FleetUsageError, match=r"--sessions.*1 to 256"):
            enrol.create_claim(db, FLEET, "b2", actor="alice", sessions=bad)
    assert [c["batch"] for c in db.claims(FLEET)] == ["b1"]


def test_revoking_a_claim_drops_its_pending_requests_only(db: FleetDB) -> None:
    enrol.create_claim(db, FLEET, "b1", actor="alice")
    _record(db, request("p1", batch="b1"))
    _record(db, request("p2", batch="b2"))
    _record(db, request("a1", batch="b1"))
    enrol.accept_devices(db, FLEET, ["a1"], actor="alice")
    _record(db, request("r1", batch="b1"))
    enrol.accept_devices(db, FLEET, ["r1"], actor="alice")
    enrol.revoke_device(db, FLEET, "r1", reason="stolen", actor="alice")
    _record(db, request("r1", batch="b1"))  # pending again, its account not deleted yet
    assert enrol.revoke_claim(db, FLEET, "b1", actor="bob") == 1
    assert sorted(r["device_id"] for r in db.enrolments(FLEET)) == ["a1", "p2", "r1"]
    (claim,) = [w for w in enrol.wanted(db, FLEET) if w["kind"] == "claim"]
    assert (claim["want"], claim["secret"]) == ("delete", "")
    assert _actions(db)[-1] == ("bob", "claim.revoke", {"fleet": FLEET, "batch": "b1",
                                                        "pending_dropped": 1})
    with pytest.raises(FleetUsageError, match="revoked"):
        enrol.revoke_claim(db, FLEET, "b1", actor="bob")
    pw = enrol.create_claim(db, FLEET, "b1", actor="alice")  # again, a new password
    assert [w["secret"] for w in enrol.wanted(db, FLEET) if w["kind"] == "claim"] == [pw]
    enrol.claim_applied(db, FLEET, "b1", want="delete")  # the old delete: not this one
    assert [w["want"] for w in enrol.wanted(db, FLEET) if w["kind"] == "claim"] == ["create"]


def test_claim_counts_add_up(db: FleetDB) -> None:
    enrol.create_claim(db, FLEET, "b1", actor="alice")
    enrol.count_claim(db, FLEET, "b1", requests=5, dropped=2)
    enrol.count_claim(db, FLEET, "b1", requests=1, refused=3)
    enrol.count_claim(db, FLEET, "nope", requests=1)
    (c,) = db.claims(FLEET)
    assert (c["requests"], c["dropped"], c["refused"]) == (6, 2, 3)
    assert c["last_at"] is not None


# -- what the controller records -------------------------------------------------------------

def test_the_controller_sees_what_is_wanted_and_records_it_done(db: FleetDB) -> None:
    for d in ("a", "b", "c"):
        _record(db, request(d))
    enrol.accept_devices(db, FLEET, ["a", "b"], groups=["g1"], actor="alice")
    enrol.reject_devices(db, FLEET, ["c"], actor="alice")
    want = {w["device_id"]: w for w in enrol.wanted(db, FLEET)}
    assert {d: w["want"] for d, w in want.items()} == {"a": "issue", "b": "issue",
                                                       "c": "reject"}
    assert want["a"]["groups"] == ["g1"]
    assert want["a"]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    enrol.issued(db, FLEET, "a", issued=1, expires_at=NOW + 50)
    row = _row(db, "a")
    assert (row["want"], row["issued"], row["expires_at"], row["broker"]) == (
        "", 1, NOW + 50, "active")
    # A renewal: issued again, nothing wanted.
    enrol.issued(db, FLEET, "a", issued=2, expires_at=NOW + 90)
    assert (_row(db, "a")["issued"], _row(db, "a")["want"]) == (2, "")
    assert sorted(w["device_id"] for w in enrol.wanted(db, FLEET)) == ["b", "c"]


def test_expired_passwords_are_found_once_and_a_request_reissues(db: FleetDB) -> None:
    req = request("a")
    _record(db, req)
    _record(db, request("b"))
    enrol.accept_devices(db, FLEET, ["a", "b"], actor="alice")
    enrol.issued(db, FLEET, "a", issued=1, expires_at=NOW + 10)
    enrol.issued(db, FLEET, "b", issued=1, expires_at=NOW + 99)
    assert enrol.expired_due(db, FLEET, NOW + 9) == []
    assert enrol.expired_due(db, FLEET, NOW + 10) == ["a"]
    enrol.mark_expired(db, FLEET, "a")
    assert enrol.expired_due(db, FLEET, NOW + 50) == []
    assert _row(db, "a")["broker"] == "expired"
    out = _record(db, again(req), now=NOW + 60)
    assert (out.state, out.issue) == ("accepted", True)


def test_pending_requests_not_repeated_are_pruned(db: FleetDB) -> None:
    _record(db, request("old"), now=NOW)
    _record(db, request("new"), now=NOW + 100)
    _record(db, request("ok"), now=NOW)
    enrol.accept_devices(db, FLEET, ["ok"], actor="alice")
    assert enrol.prune(db, FLEET, now=NOW + 150, pending_ttl=100) == 1
    assert sorted(r["device_id"] for r in db.enrolments(FLEET)) == ["new", "ok"]


def test_a_database_of_schema_9_gets_the_enrolment_tables(db_url: str) -> None:
    with FleetDB.open(db_url) as db:
        _register(db, "cam-1")
        with db.begin() as c:  # back to schema 9
            for t in ("enrolments", "claims", "allowlist"):
                c.execute(sa.text(f"DROP TABLE {t}"))
            for col in ("revoked_at", "revoked_by", "revoked_reason"):
                c.execute(sa.text(f"ALTER TABLE devices DROP COLUMN {col}"))
            c.execute(sa.text("DELETE FROM schema_version WHERE version >= 10"))
    with FleetDB.open(db_url) as db:
        dev = db.device("cam-1", fleet=FLEET)
        assert dev is not None and dev["revoked"] is None
        assert _record(db, request("cam-1")).state == "pending"
        with db.read() as c:
            assert c.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() \
                == SCHEMA_VERSION


def test_a_changed_assignment_is_found_until_its_groups_are_granted(db: FleetDB) -> None:
    from edge_sdk.fleet import AssignmentChange, assign_devices

    for d in ("a", "b", "c"):
        _record(db, request(d))
    enrol.accept_devices(db, FLEET, ["a", "b", "c"], groups=["lobby"], actor="alice")
    # Only accounts the broker holds are compared: not before the first issue.
    assign_devices(db, fleet=FLEET, actor="bob", changes={
        "a": AssignmentChange.parse(groups=["door"], remove_groups=["lobby"])})
    assert enrol.group_changes(db, FLEET) == []
    for d in ("a", "b", "c"):
        enrol.issued(db, FLEET, d, issued=1, expires_at=NOW + 50)
    (found,) = enrol.group_changes(db, FLEET)
    assert (found["device_id"], found["issued"], found["granted"], found["assigned"]) == (
        "a", 1, ["lobby"], ["door"])
    enrol.groups_granted(db, FLEET, "a", found["assigned_text"])
    assert enrol.group_changes(db, FLEET) == []
    assert _row(db, "a")["groups"] == ["door"]
    # A device with no assignment left (``device remove``) keeps no group at the broker.
    from edge_sdk.fleet import remove_devices

    remove_devices(db, fleet=FLEET, device_ids=["b"], actor="bob")
    assert [(f["device_id"], f["assigned"]) for f in enrol.group_changes(db, FLEET)] == [
        ("b", [])]
    assert enrol.assigned_groups(db, FLEET, "b") == ([], "[]")
    # Revoked or expired accounts are not regrouped (re-issuing takes the assignment).
    assign_devices(db, fleet=FLEET, actor="bob", changes={
        "c": AssignmentChange.parse(groups=["door"])})
    enrol.mark_expired(db, FLEET, "c")
    assert [f["device_id"] for f in enrol.group_changes(db, FLEET)] == ["b"]
    assert enrol.assigned_groups(db, FLEET, "c")[0] == ["door", "lobby"]
    assert len(enrol.group_changes(db, FLEET, limit=0)) == 0
