"""The Enroller (``serve --enrol``): enrolment by claim, credentials at the broker, renewal,
revocation and expiry, against a real Mosquitto with the dynamic security plugin, a real
database and "devices" made of the identity core over real MQTT connections.

Everything a claim holder sends is hostile: the flood tests check that the record stays
bounded and the enroller keeps answering."""

from __future__ import annotations

import json
import os
import queue
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.errors import TransportError
from edge_sdk.fleet import FleetDB, IdentityConfig
from edge_sdk.fleet import _enrol as rec
from edge_sdk.fleet._dynsec import SERVE
from edge_sdk.identity import (
    DeviceKey,
    EnrolAnswer,
    EnrolRequest,
    IdentityError,
    RenewRequest,
    claim_username,
)
from tests import _fleetdb
from tests._broker import Mosquitto
from tests._dynsec import FLEET, MONITOR, connect_as, dynsec_broker
from tests._enrolrig import (  # noqa: F401  (make_rig: the fixture)
    BATCH,
    TOPICS,
    Device,
    Rig,
    accepted_device,
    disconnected,
    make_rig,
    self_signed,
)
from tests._fleetrig import wait_for


@pytest.mark.parametrize("engine", _fleetdb.ENGINES)
def test_an_accepted_device_gets_sealed_credentials_and_connects_as_itself(
        make_rig: Callable[..., Rig], engine: str) -> None:  # noqa: F811
    rig = make_rig(engine=engine)
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, "cam-1")
        dev.enrol(claim, facts={"serial": "SN-1"})
        pending = dev.answer("pending")
        assert pending.fingerprint == dev.key.fingerprint and pending.sealed is None
        row = rig.row("cam-1")
        assert row["state"] == "pending" and row["fingerprint"] == dev.key.fingerprint
        # Nothing at the broker before an operator decides.
        assert "cam-1" not in rig.enroller.admin.clients()

        rec.accept_devices(rig.db, FLEET, ["cam-1"], groups=["lobby"], tags={},
                           actor="operator")
        creds = dev.credentials(dev.answer("accepted"))
    assert creds.username == "cam-1" and creds.groups == ("lobby",) and creds.issued == 1
    assert creds.expires_at > time.time() + 29 * 86400
    row = rig.row("cam-1")
    assert row["issued"] == 1 and row["want"] == "" and row["broker"] == "active"

    with rig.connect("cam-1", creds.password) as me:
        got: queue.Queue[bytes] = queue.Queue()
        me.subscribe(TOPICS.desired("cam-1"), lambda t, p: got.put(p))
        me.subscribe(TOPICS.group_desired("lobby"), lambda t, p: got.put(p))
        with rig.connect(MONITOR) as mon:
            mon.publish_wait(TOPICS.group_desired("lobby"), b"{}", qos=1)
        assert got.get(timeout=10) == b"{}"
    # The answer stays retained: a device that restarts before storing it reads it again.
    with rig.connect(claim_username(BATCH)) as claim:
        again = Device(rig, "cam-1", key=dev.key)
        claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-1"), again.on_answer, qos=1)
        a = again.answer("accepted")
        assert again.credentials(a).password == creds.password
        # ... which only the key it was sealed to opens.
        with pytest.raises(IdentityError):
            DeviceKey.generate().open(a.sealed or "", device_id="cam-1")


def test_accepted_credentials_carry_the_ca_bundle(make_rig: Callable[..., Rig],  # noqa: F811
                                                  tmp_path: Path) -> None:
    pem = self_signed(tmp_path / "ca.pem")
    rig = make_rig(ca_bundle=tmp_path / "ca.pem")
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        _, creds = accepted_device(rig, claim, "cam-ca")
    assert creds.ca_pem == pem


def test_a_rejected_device_is_answered_rejected_and_gets_no_account(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, "cam-2")
        dev.enrol(claim)
        dev.answer("pending")
        rec.reject_devices(rig.db, FLEET, ["cam-2"], reason="not ours", actor="operator")
        dev.enrol(claim)  # its next poll
        answer = dev.answer("rejected")
    assert "not ours" in answer.reason and answer.sealed is None
    assert "cam-2" not in rig.enroller.admin.clients()
    assert rig.row("cam-2")["state"] == "rejected"


def test_a_revoked_device_is_kicked_within_seconds_and_cannot_reconnect(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        _, creds = accepted_device(rig, claim, "cam-3")
    me = rig.connect("cam-3", creds.password)
    try:
        down = disconnected(me)
        t0 = time.monotonic()
        rec.revoke_device(rig.db, FLEET, "cam-3", reason="stolen", actor="operator")
        assert down.wait(10), "the revoked device is still connected after 10 s"
        took = time.monotonic() - t0
    finally:
        me.close()
    with pytest.raises(TransportError):
        rig.connect("cam-3", creds.password)
    wait_for(lambda: rig.row("cam-3")["want"] == "", 10, "the revocation applied")
    assert rig.row("cam-3")["state"] == "revoked" and took < 10
    # No sealed password stays retained for a revoked id.
    with rig.connect(MONITOR) as mon:
        seen: queue.Queue[bytes] = queue.Queue()
        mon.subscribe(TOPICS.enrol_answer(BATCH, "cam-3"), lambda t, p: seen.put(p))
        with pytest.raises(queue.Empty):
            seen.get(timeout=1)


@pytest.mark.parametrize("engine", _fleetdb.ENGINES)
def test_a_flood_of_random_ids_from_one_claim_keeps_the_record_bounded(
        make_rig: Callable[..., Rig], engine: str) -> None:  # noqa: F811
    rig = make_rig(engine=engine, max_pending=40, rate_per_batch=20.0, burst_per_batch=100,
                   queue=50)
    rig.claim()
    key = DeviceKey.generate()
    junk = [b"", b"\xff" * 10, b"{" * 5000, b"[" * 100 + b"]" * 100, os.urandom(100_000),
            json.dumps({"device_id": "x"}).encode()]
    flood: list[tuple[str, bytes]] = []
    for i in range(2000):
        dev = f"r-{secrets.token_hex(6)}"
        payload = junk[i % len(junk)] if i % 10 == 0 else \
            EnrolRequest.create(key, dev, BATCH, {"i": str(i)}).to_bytes()
        flood.append((dev, payload))
    with rig.connect(claim_username(BATCH)) as claim:
        for dev, payload in flood:
            claim.publish(TOPICS.enrol_request(BATCH, dev), payload, qos=0)
        claim.publish_wait(TOPICS.enrol_request(BATCH, "last"), b"x", qos=1)
    wait_for(lambda: rig.enroller.intake.backlog() == 0, 30, "the enroller took the flood")
    stats = rig.enroller.stats
    assert rig.enroller.running
    assert stats.dropped > 0
    assert len(rec.enrolments(rig.db, FLEET)) <= 40
    counts = wait_for(lambda: [c for c in rec.claims(rig.db, FLEET)
                               if c["batch"] == BATCH and c["dropped"] > 0], 10,
                      "the drops counted on the claim")
    assert counts[0]["dropped"] + counts[0]["refused"] <= counts[0]["requests"]

    # Still answering: a device asking now is told why it cannot be recorded.
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, "late-1")
        wait_for(lambda: dev.enrol(claim) or _answered(dev, "refused"), 30,
                 "a refused answer after the flood")


def _answered(dev: Device, state: str) -> bool:
    try:
        dev.answer(state, timeout=2)
    except AssertionError:
        return False
    return True


def test_another_key_for_an_enrolled_id_is_refused_and_leaves_its_answer(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, creds = accepted_device(rig, claim, "cam-9")
        thief = Device(rig, "cam-9")  # same id, its own key
        thief.enrol(claim)
        refused = thief.answer("refused")
        assert "another key" in refused.reason
    assert rig.row("cam-9")["conflicts"] == 1
    assert rig.row("cam-9")["fingerprint"] == dev.key.fingerprint
    # The retained answer is still the device's own, and its password still works.
    with rig.connect(claim_username(BATCH)) as claim:
        again = Device(rig, "cam-9", key=dev.key)
        claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-9"), again.on_answer, qos=1)
        assert again.credentials(again.answer("accepted")).password == creds.password
    with rig.connect("cam-9", creds.password):
        pass


def test_a_request_sent_while_the_answer_was_on_the_way_keeps_the_password(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, creds = accepted_device(rig, claim, "cam-10")
        before = rig.enroller.stats.recorded
        dev.enrol(claim)  # its poll crossed the answer
        # One worker takes requests in order: once a later one is answered, that one
        # was filed (a re-issue would be wanted in the record by then).
        probe = Device(rig, "probe-1")
        probe.enrol(claim)
        probe.answer("pending")
    assert rig.row("cam-10")["issued"] == creds.issued and rig.row("cam-10")["want"] == ""
    assert rig.enroller.stats.recorded == before + 1  # the probe only
    with rig.connect("cam-10", creds.password):
        pass


def test_an_id_naming_a_service_account_is_refused_before_it_is_recorded(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, SERVE)
        dev.enrol(claim)
        assert "not a device" in dev.answer("refused").reason
    assert rec.enrolment(rig.db, FLEET, SERVE) is None


def test_a_pending_id_nobody_decided_on_is_forgotten_with_its_answer(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig(pending_ttl_s=1.0)
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, "idle-1")
        dev.enrol(claim)
        dev.answer("pending")
        wait_for(lambda: rec.enrolment(rig.db, FLEET, "idle-1") is None, 20,
                 "the stale pending row pruned")
    with rig.connect(MONITOR) as mon:  # and no retained answer is left behind
        seen: queue.Queue[bytes] = queue.Queue()
        mon.subscribe(TOPICS.enrol_answer(BATCH, "idle-1"), lambda t, p: seen.put(p))
        with pytest.raises(queue.Empty):
            seen.get(timeout=1)


def test_bad_requests_are_answered_refused_in_one_line(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        # A CSR for another id than the topic's.
        dev = Device(rig, "cam-4")
        claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-4"), dev.on_answer, qos=1)
        other = EnrolRequest.create(dev.key, "cam-5", BATCH, {})
        claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-4"), other.to_bytes(), qos=1)
        a = dev.answer("refused")
        assert "\n" not in a.reason and "cam-5" in a.reason, a.reason
        # Not JSON at all.
        claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-4"), b"\x00garbage", qos=1)
        b = dev.answer("refused")
        assert "\n" not in b.reason and b.reason
    assert rec.enrolment(rig.db, FLEET, "cam-4") is None
    assert rig.enroller.stats.refused == 2


def test_a_request_for_a_batch_no_claim_names_writes_nothing(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    key = DeviceKey.generate()
    # The monitor may write anywhere: as a claim whose record was removed could.
    with rig.connect(MONITOR) as mon:
        req = EnrolRequest.create(key, "cam-6", "ghost", {})
        mon.publish_wait(TOPICS.enrol_request("ghost", "cam-6"), req.to_bytes(), qos=1)
        wait_for(lambda: rig.enroller.stats.ignored >= 1, 10, "the request ignored")
    assert rec.enrolment(rig.db, FLEET, "cam-6") is None


def test_a_revoked_claim_is_deleted_at_the_broker(make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim("line-2", sessions=3)
    names = [claim_username("line-2", k) for k in range(3)]
    assert [n for n in rig.enroller.admin.clients() if n.endswith("-line-2")] == names
    claims = [rig.connect(names[0]), rig.connect(names[2])]
    try:
        downs = [disconnected(c) for c in claims]
        rec.revoke_claim(rig.db, FLEET, "line-2", actor="operator")
        assert all(d.wait(10) for d in downs), "a revoked claim session is still connected"
    finally:
        for c in claims:
            c.close()
    for name in names:
        with pytest.raises(TransportError):
            rig.connect(name)
    row = next(c for c in rec.claims(rig.db, FLEET) if c["batch"] == "line-2")
    assert not row["secret_pending"] and row["want"] == ""


def test_renewal_while_connected_switches_the_password_after_the_ack(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, old = accepted_device(rig, claim, "cam-7")
    me = rig.connect("cam-7", old.password)
    try:
        answers: queue.Queue[bytes] = queue.Queue()
        me.subscribe(TOPICS.cred_answer("cam-7"), lambda t, p: answers.put(p), qos=1)
        me.publish_wait(TOPICS.cred_request("cam-7"),
                        RenewRequest.signed(dev.key, "cam-7", ack=0), qos=1)
        first = answers.get(timeout=20)
        new = dev.credentials(EnrolAnswer.from_bytes(first, device_id="cam-7"))
        assert new.issued == old.issued + 1 and new.password != old.password
        # Asked again (the answer got lost): the same credentials, not a third password.
        me.publish_wait(TOPICS.cred_request("cam-7"),
                        RenewRequest.signed(dev.key, "cam-7", ack=0), qos=1)
        assert answers.get(timeout=20) == first
        # Not in force before the device says it stored them.
        assert rig.row("cam-7")["issued"] == old.issued
        down = disconnected(me)
        me.publish_wait(TOPICS.cred_request("cam-7"),
                        RenewRequest.signed(dev.key, "cam-7", ack=new.issued), qos=1)
        assert down.wait(10), "the old password's link was not closed"
    finally:
        me.close()
    with rig.connect("cam-7", new.password):
        pass
    with pytest.raises(TransportError):
        rig.connect("cam-7", old.password)
    assert rig.row("cam-7")["issued"] == new.issued
    # The retained enrolment answer now holds the new password (for a re-enrolment).
    with rig.connect(claim_username(BATCH)) as claim:
        again = Device(rig, "cam-7", key=dev.key)
        claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-7"), again.on_answer, qos=1)
        assert again.credentials(again.answer("accepted")).password == new.password


def test_a_renewal_acknowledged_after_expiry_does_not_revive_the_account(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, old = accepted_device(rig, claim, "cam-11")
    with rig.connect("cam-11", old.password) as me:
        answers: queue.Queue[bytes] = queue.Queue()
        me.subscribe(TOPICS.cred_answer("cam-11"), lambda t, p: answers.put(p), qos=1)
        me.publish_wait(TOPICS.cred_request("cam-11"),
                        RenewRequest.signed(dev.key, "cam-11", ack=0), qos=1)
        new = dev.credentials(EnrolAnswer.from_bytes(answers.get(timeout=20),
                                                     device_id="cam-11"))
        rec.issued(rig.db, FLEET, "cam-11", issued=old.issued, expires_at=time.time() - 1)
        wait_for(lambda: rig.row("cam-11")["broker"] == "expired", 10, "expired")
    # The ack arrives late (the monitor relays it: the device's account is disabled).
    before = rig.enroller.stats.requests
    with rig.connect(MONITOR) as mon:
        mon.publish_wait(TOPICS.cred_request("cam-11"),
                         RenewRequest.signed(dev.key, "cam-11", ack=new.issued), qos=1)
        # A later request of another id is answered: the ack was handled before it.
        probe = Device(rig, "probe-2")
        mon.subscribe(TOPICS.enrol_answer(BATCH, "probe-2"), probe.on_answer, qos=1)
        mon.publish_wait(TOPICS.enrol_request(BATCH, "probe-2"),
                         EnrolRequest.create(probe.key, "probe-2", BATCH, {}).to_bytes())
        probe.answer("pending")
    assert rig.enroller.stats.requests > before
    assert rig.row("cam-11")["broker"] == "expired"
    assert rig.row("cam-11")["issued"] == old.issued
    with pytest.raises(TransportError):
        rig.connect("cam-11", new.password)


def test_a_fleet_server_with_identity_runs_the_enroller_while_it_holds_the_lease(
        tmp_path: Path) -> None:
    from edge_sdk.fleet import FleetServer
    from edge_sdk.release import Repository

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    with dynsec_broker(tmp_path) as (broker, creds), \
            FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as db, \
            connect_as(broker, creds, SERVE) as conn:
        server = FleetServer(db, repo, conn, poll_s=0.2,
                             identity=IdentityConfig(poll_s=0.1))
        assert server.enroller is not None
        server.enroller.check_broker()
        with server:
            assert server.enroller.running
            rec.create_claim(db, FLEET, BATCH, actor="test")
            wait_for(lambda: claim_username(BATCH) in server.enroller.admin.clients(), 20,
                     "the claim account made by the server's enroller")
        assert not server.enroller.running


def test_expired_credentials_disable_the_account_until_the_device_enrols_again(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, creds = accepted_device(rig, claim, "cam-8")
    me = rig.connect("cam-8", creds.password)
    try:
        down = disconnected(me)
        # Time passes: the record says these credentials ran out a second ago.
        rec.issued(rig.db, FLEET, "cam-8", issued=creds.issued, expires_at=time.time() - 1)
        assert down.wait(10), "the expired account is still connected"
    finally:
        me.close()
    with pytest.raises(TransportError):
        rig.connect("cam-8", creds.password)
    assert rig.row("cam-8")["broker"] == "expired"
    # The same key enrols again and is re-issued without an operator.
    with rig.connect(claim_username(BATCH)) as claim:
        # No stale answer with the expired password waits for it.
        dev.enrol(claim)
        again = dev.credentials(dev.answer("accepted", after=0))
    assert again.issued == creds.issued + 1
    with rig.connect("cam-8", again.password):
        pass


def test_identity_config_refuses_what_cannot_work(tmp_path: Path) -> None:
    from edge_sdk.fleet import FleetUsageError

    with pytest.raises(FleetUsageError, match="max_pending"):
        IdentityConfig(max_pending=0)
    with pytest.raises(FleetUsageError, match="rate_per_batch"):
        IdentityConfig(rate_per_batch=float("nan"))
    with pytest.raises(FleetUsageError, match="--enrol-limit"):
        IdentityConfig.parse(["nope=1"])
    for grace in (-1.0, float("inf"), float("nan")):
        with pytest.raises(FleetUsageError, match="reissue_grace_s"):
            IdentityConfig(reissue_grace_s=grace)
    assert IdentityConfig.parse(["reissue_grace_s=0"]).reissue_grace_s == 0
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(FleetUsageError, match="no PEM certificate"):
        IdentityConfig(ca_bundle=tmp_path / "ca.pem").read_ca()


def test_serve_refuses_enrolment_options_without_enrol(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    from edge_sdk.release import Repository

    Repository.init(tmp_path / "repo", tmp_path / "keys")
    code = main(["serve", "--repo", str(tmp_path / "repo"), "--credential-lifetime", "1d",
                 "--broker", "mqtt://127.0.0.1:1", "--fleet", FLEET])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --enrol" in err[0], err


def test_serve_enrol_without_the_dynsec_plugin_says_so_in_one_line(
        shared_broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sdk.release import Repository

    Repository.init(tmp_path / "repo", tmp_path / "keys")
    code = main(["serve", "--repo", str(tmp_path / "repo"), "--enrol", "--only", "fleet",
                 "--enrol-limit", "answer_wait_s=1", "--broker", shared_broker.url,
                 "--fleet", FLEET, "--keys", str(tmp_path / "keys")])
    assert code != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "dynamic security plugin did not answer" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_the_intake_drops_over_a_batchs_budget_and_when_full_and_counts_it() -> None:
    from edge_sdk.fleet._enroller import _Intake

    intake = _Intake(IdentityConfig(rate_per_batch=1.0, burst_per_batch=3, queue=4))
    intake.known({"a", "b"}, now=0.0)
    assert not intake.offer("enrol", "ghost", "d", b"x", 0.0)  # no claim: not queued
    took = [intake.offer("enrol", "a", f"d{i}", b"x", 0.0) for i in range(5)]
    assert took == [True, True, True, False, False]  # the bucket of 3
    assert intake.offer("enrol", "b", "d", b"x", 0.0)  # another batch has its own
    assert not intake.offer("enrol", "b", "e", b"x", 0.0)  # the queue of 4 is full
    assert intake.offer("enrol", "a", "d9", b"x" * 100_000, 1.5) is False  # still full
    counts = intake.counts()
    assert (counts["a"].requests, counts["a"].dropped) == (6, 3)
    assert (counts["b"].requests, counts["b"].dropped) == (2, 1)
    assert "ghost" not in counts and intake.counts() == {}
    items = [intake.take() for _ in range(5)]
    assert [i[2] for i in items if i] == ["d0", "d1", "d2", "d"] and items[4] is None
    # A big payload is cut just past the largest valid request: refused by size alone.
    from edge_sdk.identity import MAX_REQUEST_BYTES

    assert intake.offer("enrol", "a", "big", b"x" * 100_000, 10.0)
    item = intake.take()
    assert item is not None and len(item[3]) == MAX_REQUEST_BYTES + 1
    # A revoked claim's batch is forgotten.
    intake.known({"b"}, now=11.0)
    assert not intake.offer("enrol", "a", "d", b"x", 11.0)


def test_the_intake_holds_each_device_to_its_renewal_budget() -> None:
    from edge_sdk.fleet._enroller import _RENEW_BURST, _Intake

    intake = _Intake(IdentityConfig(queue=1000))
    took = [intake.offer("cred", "", "d1", b"x", 0.0) for _ in range(_RENEW_BURST + 2)]
    assert took == [True] * _RENEW_BURST + [False, False]
    assert intake.offer("cred", "", "d2", b"x", 0.0)  # another device has its own
    assert intake.offer("cred", "", "d1", b"x", 1.5)  # one a second comes back
    assert intake.dropped == 2


def test_serve_enrol_enrols_a_device_and_sums_up_when_stopped(tmp_path: Path) -> None:
    import subprocess

    from edge_sdk.release import Repository
    from tests._process import edge_sdk_cli

    Repository.init(tmp_path / "repo", tmp_path / "keys")
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with dynsec_broker(tmp_path) as (broker, creds):
        log = (tmp_path / "serve.log").open("wb")
        serve = subprocess.Popen(
            [*edge_sdk_cli(), "serve", "--repo", str(tmp_path / "repo"), "--keys",
             str(tmp_path / "keys"), "--db", db_url, "--only", "fleet", "--enrol",
             "--credential-lifetime", "2h", "--enrol-rate", "50/s", "--broker", broker.url,
             "--fleet", FLEET, "--username", SERVE, "--password", creds[SERVE]],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            with FleetDB.open(db_url) as db:
                creds[claim_username(BATCH)] = rec.create_claim(db, FLEET, BATCH,
                                                                actor="test")
                wait_for(lambda: all(c["want"] == "" for c in rec.claims(db, FLEET)), 30,
                         "serve made the claim account")
                with connect_as(broker, creds, claim_username(BATCH)) as claim:
                    key = DeviceKey.generate()
                    answers: queue.Queue[EnrolAnswer] = queue.Queue()
                    claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-s"), lambda t, p:
                                    answers.put(EnrolAnswer.from_bytes(p, device_id="cam-s")))
                    req = EnrolRequest.create(key, "cam-s", BATCH, {})
                    claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-s"), req.to_bytes())
                    assert answers.get(timeout=20).state == "pending"
                    rec.accept_devices(db, FLEET, ["cam-s"], groups=[], tags={}, actor="op")
                    got = answers.get(timeout=20)
                assert got.state == "accepted"
                new = key.open(got.sealed or "", device_id="cam-s")
                assert 7100 < new.expires_at - time.time() <= 7200
                with connect_as(broker, {"cam-s": new.password}, "cam-s"):
                    pass
        finally:
            serve.send_signal(15)
            code = serve.wait(30)
            log.close()
    out = (tmp_path / "serve.log").read_text()
    assert code == 0, out
    assert "enrolling devices by claim" in out and "Traceback" not in out, out
    assert "1 credentials issued" in out, out
