"""Device identity attacked as a hostile party would: a holder of a claim password (it
ships on every device image), a device turned hostile, and broker restarts under the
enroller. Real Mosquitto with the dynamic security plugin, a real database, the real
Enroller, devices made of the identity core over real MQTT connections."""

from __future__ import annotations

import json
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from device_agent import AgentConfig
from device_agent._identity import (
    CredentialStore,
    EnrolmentClient,
    Held,
    IdentityService,
    Keyring,
)
from edge_sdk.cli import main
from edge_sdk.errors import ConfigError
from edge_sdk.fleet import FleetDB
from edge_sdk.fleet import _enrol as rec
from edge_sdk.fleet import _operators as ops
from edge_sdk.fleet._web import FleetApi
from edge_sdk.identity import (
    Credentials,
    DeviceKey,
    EnrolAnswer,
    EnrolmentRefused,
    EnrolRequest,
    IdentityError,
    RenewRequest,
    claim_username,
)
from edge_sdk.transport import MqttConfig
from tests._dynsec import FLEET, MONITOR
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
from tests._signin import PASSWORD, post, sign_in


def _csr(private: object, name: str) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    algo = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return csr.sign(private, algo).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


def _hostile_payloads(key: DeviceKey, device: str) -> list[bytes]:
    """What a claim holder can send on ``device``'s request topic."""
    good = json.loads(EnrolRequest.create(key, device, BATCH, {"hw": "x"}).to_bytes())
    out = [b"", b"\x00", b"\xff\xfe" * 100, os.urandom(9000), b"[" * 10_000,
           b'{"a":' * 1000 + b"1" + b"}" * 1000, b"null", b"[]", b'"str"', b"1e999999",
           json.dumps(good).encode() * 2, json.dumps({**good, "x": 1}).encode()]
    for private in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1()),
                    ed25519.Ed25519PrivateKey.generate()):
        out.append(json.dumps({**good, "csr_pem": _csr(private, device)}).encode())
    out.append(json.dumps({**good, "csr_pem": good["csr_pem"].replace("A", "B", 3)}).encode())
    out.append(json.dumps({**good, "csr_pem": DeviceKey.generate().csr("someone-else")}).encode())
    out.append(json.dumps({**good, "facts": {"k": "v\n" * 50}}).encode())
    out.append(json.dumps({**good, "facts": {f"k{i}": "v" for i in range(100)}}).encode())
    out.append(json.dumps({**good, "nonce": 12}).encode())
    out.append(json.dumps({**good, "sent_at": "nan"}).encode())
    out.append(json.dumps({**good, "sent_at": 1e308 * 10}).encode())
    out.append(json.dumps(good).encode().replace(b'"', b"'"))
    return out


def test_a_claim_holder_cannot_disturb_an_accepted_device_nor_stop_the_enroller(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    rig.claim("line-2")
    with rig.connect(claim_username(BATCH)) as claim:
        _, creds = accepted_device(rig, claim, "cam-1")
    me = rig.connect("cam-1", creds.password)
    down = disconnected(me)
    try:
        before = rig.row("cam-1")
        thief = DeviceKey.generate()
        for batch in (BATCH, "line-2"):
            with rig.connect(claim_username(batch)) as claim:
                for payload in _hostile_payloads(thief, "cam-1"):
                    claim.publish(TOPICS.enrol_request(batch, "cam-1"), payload, qos=1)
                # the same id with another key, through either batch
                req = EnrolRequest.create(thief, "cam-1", batch, {"hw": "x"})
                claim.publish_wait(TOPICS.enrol_request(batch, "cam-1"), req.to_bytes(),
                                   qos=1)
        # Once a later request is answered, every one before it was taken.
        with rig.connect(claim_username(BATCH)) as claim:
            probe = Device(rig, "probe-1")
            probe.enrol(claim)
            probe.answer("pending")
        assert rig.enroller.running and rig.enroller.stats.errors == 0, rig.enroller.stats
        after = rig.row("cam-1")
        for k in ("state", "fingerprint", "issued", "batch", "want", "broker"):
            assert after[k] == before[k], k
        assert not down.is_set(), "the device was kicked"
    finally:
        me.close()
    with rig.connect("cam-1", creds.password):
        pass


def test_a_device_cannot_renew_or_ack_for_another_device(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        a, ca = accepted_device(rig, claim, "cam-a")
        _, cb = accepted_device(rig, claim, "cam-b")
    victim = rig.connect("cam-b", cb.password)
    down = disconnected(victim)
    try:
        with rig.connect("cam-a", ca.password) as hostile:
            answers: queue.Queue[bytes] = queue.Queue()
            hostile.subscribe(TOPICS.cred_answer("cam-a"), lambda t, p: answers.put(p),
                              qos=1)
            # on another's topic (the broker drops it), signed by itself for the other id
            for ack in (0, 1, 2, 99):
                hostile.publish(TOPICS.cred_request("cam-b"),
                                RenewRequest.signed(a.key, "cam-b", ack=ack), qos=1)
                hostile.publish(TOPICS.cred_request("cam-a"),
                                RenewRequest.signed(a.key, "cam-b", ack=ack), qos=1)
            # acks of issues it never got, garbage, a flood
            for ack in (5, 2**31, -1):
                hostile.publish(TOPICS.cred_request("cam-a"), json.dumps(
                    {"doc": {"ack": ack}, "sig": "x"}).encode(), qos=1)
            for p in (b"\xff" * 20000, b"[" * 5000, b""):
                hostile.publish(TOPICS.cred_request("cam-a"), p, qos=1)
            for _ in range(50):
                hostile.publish(TOPICS.cred_request("cam-a"),
                                RenewRequest.signed(a.key, "cam-a", ack=0), qos=0)
            hostile.publish_wait(TOPICS.cred_request("cam-a"),
                                 RenewRequest.signed(a.key, "cam-a", ack=0), qos=1)
            wait_for(lambda: rig.enroller.intake.backlog() == 0, 20, "the requests taken")
            answers.get(timeout=10)
        assert rig.enroller.running and rig.enroller.stats.errors == 0, rig.enroller.stats
        assert rig.row("cam-b")["issued"] == cb.issued
        assert not down.is_set(), "the other device was kicked"
    finally:
        victim.close()


def test_the_enroller_keeps_enrolling_across_a_broker_restart(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    rig.broker.restart(downtime=1.0)
    with rig.connect(claim_username(BATCH)) as claim:
        dev = Device(rig, "after-1")
        wait_for(lambda: dev.enrol(claim) or _got(dev, "pending"), 60, "a pending answer")
    rec.accept_devices(rig.db, FLEET, ["after-1"], groups=[], tags={}, actor="op")
    with rig.connect(claim_username(BATCH)) as claim:
        claim.subscribe(TOPICS.enrol_answer(BATCH, "after-1"), dev.on_answer, qos=1)
        creds = dev.credentials(dev.answer("accepted", timeout=30))
    with rig.connect("after-1", creds.password):
        pass
    rec.revoke_device(rig.db, FLEET, "after-1", reason="test", actor="op")
    wait_for(lambda: rig.row("after-1")["want"] == "", 30, "revoke applied")
    assert rig.enroller.running


def _got(dev: Device, state: str) -> bool:
    try:
        dev.answer(state, timeout=2)
    except AssertionError:
        return False
    return True


# -- the agent's side: its state directory and claim password file -------------------------


def _agent_config(tmp: Path, **identity: object) -> AgentConfig:
    ident = {"batch": BATCH, "poll_s": 0.2, "answer_wait_s": 1.0, **identity}
    if "claim_password_file" not in ident:
        ident["claim_password"] = "claim-pw"
    return AgentConfig.from_dict({
        "device_id": "dev-1", "fleet": FLEET, "state_dir": str(tmp / "state"),
        "http": {"port": 0}, "broker": {"url": "mqtts://127.0.0.1:1"}, "identity": ident})


def _service(cfg: AgentConfig) -> IdentityService:
    return IdentityService(cfg, event=lambda *a, **k: None)


def test_a_corrupt_ca_bundle_in_the_state_dir_is_ignored_not_trusted(tmp_path: Path) -> None:
    cfg = _agent_config(tmp_path)
    cfg.identity_dir.mkdir(parents=True)
    ca = cfg.identity_dir / "ca.pem"
    for bad in (b"garbage\xff", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                b"x" * 200_000):
        ca.write_bytes(bad)
        svc = _service(cfg)
        # Else every connection, the one to enrol again too, fails its TLS setup.
        assert svc.ca_file is None
        assert svc.enrolment.mqtt.ca_file is None
    ca.write_text(self_signed(tmp_path / "ca-key.pem"))
    assert _service(cfg).ca_file == ca


def test_state_files_that_never_end_are_read_bounded(tmp_path: Path) -> None:
    cfg = _agent_config(tmp_path)
    cfg.identity_dir.mkdir(parents=True)
    (cfg.identity_dir / "credentials.json").symlink_to("/dev/zero")
    (cfg.identity_dir / "ca.pem").symlink_to("/dev/zero")
    assert CredentialStore(cfg.identity_dir).load() == (None, None)
    assert not CredentialStore(cfg.identity_dir).usable_ca()
    cfg.key_path.symlink_to("/dev/zero")
    with pytest.raises(IdentityError, match="device key") as err:
        _service(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("content", "says"), [
    (b"\xff\xfe\x00pw", "not UTF-8"), (b"\n", "expected one line"),
    (b"pw\x00x", "expected one line"), (b"p" * 5000, "over 1024 bytes"),
])
def test_a_claim_password_file_that_is_not_one_password_is_a_one_line_error(
        tmp_path: Path, content: bytes, says: str) -> None:
    pw = tmp_path / "claim.txt"
    pw.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as err:
        _service(_agent_config(tmp_path, claim_password_file=str(pw)))
    assert "\n" not in str(err.value)


# -- the operator's side: the command line ---------------------------------------------------


def _op(db_url: str, *args: str) -> int:
    return main([*args, "--db", db_url, "--fleet", FLEET, "--operator", "alice"])


def _one_line_error(capsys: pytest.CaptureFixture[str], says: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("edge-sdk: error:") and says in err, err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err


def test_a_device_file_that_cannot_be_read_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    for cmd in (("device", "allow"), ("device", "set")):
        assert _op(url, *cmd, "--file", str(tmp_path / "missing.txt")) == 2
        _one_line_error(capsys, "cannot read it")


def test_claim_create_never_overwrites_a_file_nor_keeps_a_claim_it_could_not_save(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    other = tmp_path / "line-1.txt"
    assert _op(url, "claim", "create", "line-1", "--out", str(other)) == 0
    kept = other.read_text()
    capsys.readouterr()
    assert _op(url, "claim", "create", "line-2", "--out", str(other)) == 2
    _one_line_error(capsys, "exists")
    assert other.read_text() == kept
    # A directory that cannot take the file: refused before anything is recorded.
    assert _op(url, "claim", "create", "line-3", "--out", "/proc/self/claim.txt") == 2
    _one_line_error(capsys, "not writable")
    # A write that fails anyway (its temporary file's name is too long, even for root):
    # the claim is undone, since its password exists nowhere else.
    assert _op(url, "claim", "create", "line-3", "--out", str(tmp_path / ("p" * 250))) == 2
    _one_line_error(capsys, "--out")  # the long name fills the line
    with FleetDB.open(url) as db:
        live = {c["batch"] for c in db.claims(FLEET) if not c["revoked_at"]}
    assert live == {"line-1"}
    # ... and can be made again once there is somewhere to put it.
    assert _op(url, "claim", "create", "line-3", "--out", str(tmp_path / "l3.txt")) == 0


def test_broker_init_into_a_place_it_cannot_write_is_a_one_line_error_and_can_be_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "init", "/proc/self/broker", "--fleet", FLEET]) == 2
    _one_line_error(capsys, "cannot write")
    # Failing before the accounts' file, it leaves nothing that blocks a second run.
    out = tmp_path / "broker"
    out.mkdir()
    (out / "mosquitto.conf").mkdir()  # the second file cannot be written
    assert main(["broker", "init", str(out), "--fleet", FLEET]) == 2
    _one_line_error(capsys, "cannot write")
    assert not (out / "dynamic-security.json").exists()
    (out / "mosquitto.conf").rmdir()
    assert main(["broker", "init", str(out), "--fleet", FLEET]) == 0
    creds = json.loads((out / "credentials.json").read_text())
    doc = json.loads((out / "dynamic-security.json").read_text())
    assert {c["username"] for c in doc["clients"]} == set(creds)


# -- replay of a captured enrolment request -------------------------------------------------


def test_a_captured_request_with_a_new_nonce_is_refused() -> None:
    key = DeviceKey.generate()
    doc = json.loads(EnrolRequest.create(key, "cam-1", BATCH, {}).to_bytes())
    doc["nonce"] = "0" * 32
    with pytest.raises(EnrolmentRefused, match="not made for this request") as err:
        EnrolRequest.from_bytes(json.dumps(doc).encode(), batch=BATCH, device_id="cam-1")
    assert "\n" not in str(err.value)
    # A CSR without any nonce (as a bare key.csr makes) proves nothing fresh either.
    doc["csr_pem"] = key.csr("cam-1")
    with pytest.raises(EnrolmentRefused, match="not made for this request"):
        EnrolRequest.from_bytes(json.dumps(doc).encode(), batch=BATCH, device_id="cam-1")


def test_a_replayed_request_does_not_reissue_an_accepted_devices_credentials(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    # Same-key requests of an accepted id re-issue at once (the device lost its password).
    rig = make_rig(reissue_grace_s=0.0)
    rig.claim()
    dev = Device(rig, "cam-1")
    captured = EnrolRequest.create(dev.key, "cam-1", BATCH, {"hw": "x"}).to_bytes()
    with rig.connect(claim_username(BATCH)) as claim:
        claim.subscribe(TOPICS.enrol_answer(BATCH, "cam-1"), dev.on_answer, qos=1)
        claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-1"), captured, qos=1)
        dev.answer("pending")
        rec.accept_devices(rig.db, FLEET, ["cam-1"], groups=[], tags={}, actor="op")
        creds = dev.credentials(dev.answer("accepted"))
    me = rig.connect("cam-1", creds.password)
    down = disconnected(me)
    try:
        renonced = json.loads(captured)
        renonced["nonce"] = "f" * 32
        with rig.connect(claim_username(BATCH)) as claim:
            for payload in (captured, json.dumps(renonced).encode(), captured):
                claim.publish_wait(TOPICS.enrol_request(BATCH, "cam-1"), payload, qos=1)
            probe = Device(rig, "probe-1")
            probe.enrol(claim)
            probe.answer("pending")  # one worker, in order: the replays were taken
        assert rig.row("cam-1")["issued"] == creds.issued and rig.row("cam-1")["want"] == ""
        assert not down.is_set(), "the replay kicked the device"
        # The device itself asking again (a new request) is still re-issued.
        with rig.connect(claim_username(BATCH)) as claim:
            dev.enrol(claim)
            again = dev.credentials(dev.answer("accepted", after=creds.issued))
        assert again.issued == creds.issued + 1
    finally:
        me.close()


def test_allow_refuses_ids_no_enrolment_request_can_carry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    for bad in ("a b", "_claim-line-1", "x" * 65):
        assert _op(url, "device", "allow", bad) == 2
        _one_line_error(capsys, "nothing allowed")
    with FleetDB.open(url) as db:
        assert rec.enrolment(db, FLEET, "a b") is None
    assert _op(url, "device", "allow", "cam-1") == 0


def test_a_device_cycling_renewals_gets_a_few_then_is_refused_in_one_line(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    rig = make_rig()
    rig.claim()
    with rig.connect(claim_username(BATCH)) as claim:
        dev, creds = accepted_device(rig, claim, "cam-r")
    answers: queue.Queue[bytes] = queue.Queue()

    def on_answer(topic: str, payload: bytes) -> None:
        # The same topic carries the retained renewal hint, and its clearing after each
        # renewal (an empty message): answers only here.
        if b'"edge-enrol-answer"' in payload:
            answers.put(payload)

    # The monitor writes the device's topic for it (the device itself is kicked at
    # every switch): the enroller goes by the signature, not by who published.
    with rig.connect(MONITOR) as mon:
        mon.subscribe(TOPICS.cred_answer("cam-r"), on_answer, qos=1)
        issued = creds.issued
        for _ in range(5):  # the enroller's burst of renewals
            mon.publish_wait(TOPICS.cred_request("cam-r"),
                             RenewRequest.signed(dev.key, "cam-r", ack=0), qos=1)
            got = EnrolAnswer.from_bytes(answers.get(timeout=20), device_id="cam-r")
            assert got.state == "accepted" and got.issued == issued + 1
            mon.publish_wait(TOPICS.cred_request("cam-r"),
                             RenewRequest.signed(dev.key, "cam-r", ack=got.issued), qos=1)
            issued = got.issued
            wait_for(lambda n=issued: rig.row("cam-r")["issued"] == n, 20, "the switch")
        mon.publish_wait(TOPICS.cred_request("cam-r"),
                         RenewRequest.signed(dev.key, "cam-r", ack=0), qos=1)
        got = EnrolAnswer.from_bytes(answers.get(timeout=20), device_id="cam-r")
    assert got.state == "refused" and "too often" in got.reason and "\n" not in got.reason
    assert rig.row("cam-r")["issued"] == issued
    assert rig.enroller.running and rig.enroller.stats.errors == 0


def test_garbage_on_a_devices_request_topic_does_not_end_its_exchange(
        make_rig: Callable[..., Rig]) -> None:  # noqa: F811
    # Every refusal the garbage earns reaches the device first (one worker, in order).
    rig = make_rig(rate_per_batch=1000.0, burst_per_batch=1000, queue=1000)
    rig.claim()
    key = DeviceKey.generate()
    client = EnrolmentClient(
        key=key, device_id="cam-g", batch=BATCH, facts={}, topics=TOPICS,
        mqtt=MqttConfig(url=rig.broker.url, fleet=FLEET, username=claim_username(BATCH),
                        password=rig.creds[claim_username(BATCH)], client_id="dev-side"),
        answer_wait_s=15.0)
    stop = threading.Event()
    # The monitor stands in for the claim holder: all connections of one claim share one
    # session (use_username_as_clientid), so a thief on the claim would kick the device.
    thief = rig.connect(MONITOR)

    def spam() -> None:
        while not stop.is_set():
            thief.publish(TOPICS.enrol_request(BATCH, "cam-g"), b"\x00garbage", qos=0)
            time.sleep(0.002)

    spammer = threading.Thread(target=spam, daemon=True)
    spammer.start()
    try:
        wait_for(lambda: rig.enroller.stats.refused >= 20, 20, "the garbage refused")
        out = client.attempt()
    finally:
        stop.set()
        spammer.join(5)
        thief.close()
    assert out.state == "pending", out
    assert rig.row("cam-g")["fingerprint"] == key.fingerprint


def test_credentials_of_another_device_in_the_state_dir_are_not_used(tmp_path: Path) -> None:
    cfg = _agent_config(tmp_path)
    theirs = Credentials(username="cam-other", password="their-password-123", issued=3,
                         expires_at=time.time() + 3600)
    store = CredentialStore(cfg.identity_dir)
    store.save(Keyring(Held(theirs, time.time()), Held(theirs, time.time())))
    svc = _service(cfg)
    # A cloned image: this device enrols as itself, never connects as the other one.
    assert svc.boot() is None
    assert svc.seconds_left() == 0


def test_a_device_key_others_can_read_is_made_private_again(tmp_path: Path) -> None:
    path = tmp_path / "identity" / "device.key"
    key = DeviceKey.load_or_create(path)
    os.chmod(path, 0o644)  # restored from a backup with a loose umask, say
    assert DeviceKey.load_or_create(path).fingerprint == key.fingerprint
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_the_pages_enrolment_actions_refuse_other_sites_and_hostile_ids(
        tmp_path: Path) -> None:
    with FleetDB.open(f"sqlite:///{tmp_path / 'f.db'}") as db:
        rec.record_request(db, FLEET, EnrolRequest.create(
            DeviceKey.generate(), "cam-1", BATCH, {}), now=time.time(), max_pending=10)
        ops.add_operator(db, "carol", PASSWORD, "root")
        api = FleetApi(db, fleet=FLEET)
        cookie, csrf = sign_in(api, "carol")
        for extra in ({"origin": "http://evil.example"}, {"sec_fetch_site": "cross-site"}):
            status, doc, _ = post(api, "/api/enrolments/cam-1/accept", cookie=cookie,
                                  csrf=csrf, **extra)
            assert status == 403 and "\n" not in doc["error"]
        status, _, _ = post(api, "/api/enrolments/cam-1/accept", cookie=cookie)
        assert status == 403  # no CSRF token
        for raw in ("%2e%2e", "..", "x" * 5000, "%00", "cam-1%2Faccept", "caf%C3%A9",
                    "%ff%fe"):
            status, doc, _ = post(api, f"/api/enrolments/{raw}/accept", cookie=cookie,
                                  csrf=csrf)
            assert 400 <= status < 500 and "\n" not in doc["error"], (raw, status)
        assert rec.enrolment(db, FLEET, "cam-1")["state"] == "pending"  # type: ignore[index]
