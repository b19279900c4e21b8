"""Device identity documents (edge_sdk.identity): every byte of an enrolment request, an
answer or a renewal request is hostile, and credentials open only for the key and the
device they were sealed to."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from edge_sdk.errors import EdgeError
from edge_sdk.identity import (
    MAX_ANSWER_BYTES,
    MAX_REQUEST_BYTES,
    Credentials,
    DeviceKey,
    EnrolAnswer,
    EnrolmentRefused,
    EnrolRequest,
    IdentityError,
    RenewRequest,
    check_batch,
    check_device_id,
    claim_session,
    claim_username,
    fingerprint_of,
    seal,
)
from edge_sdk.transport import Topics

DEV = "cam-0042"
BATCH = "line-7"


@pytest.fixture(scope="module")
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture(scope="module")
def other_key() -> DeviceKey:
    return DeviceKey.generate()


def creds(*, user: str = DEV, ca_pem: str | None = None, issued: int = 1) -> Credentials:
    return Credentials(username=user, password="s3cret-Pw_0123456789", issued=issued,
                       expires_at=time.time() + 3600, groups=("hall-a", "cams"), ca_pem=ca_pem)


def request_doc(key: DeviceKey, **change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(EnrolRequest.create(key, DEV, BATCH, {"model": "pi5"})
                                     .to_bytes())
    doc.update(change)
    return doc


def refused(payload: bytes, match: str, *, batch: str = BATCH, device: str = DEV) -> str:
    with pytest.raises(EnrolmentRefused, match=match) as info:
        EnrolRequest.from_bytes(payload, batch=batch, device_id=device)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) <= 300
    return msg


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def csr_with(private: Any, subject: x509.Name, algorithm: Any = None) -> str:
    algo = hashes.SHA256() if algorithm is None else algorithm
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(private, algo) \
        .public_bytes(Encoding.PEM).decode()


def cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def self_signed_ca() -> str:
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = cn("edge test CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM).decode()


# -- names ---------------------------------------------------------------------------


def test_identity_errors_are_edge_errors() -> None:
    assert issubclass(EnrolmentRefused, IdentityError)
    assert issubclass(IdentityError, EdgeError)


def test_claim_account_is_named_after_its_batch_and_no_device_can_take_that_name() -> None:
    assert claim_username("line-7") == "_claim-line-7"
    with pytest.raises(IdentityError, match="starts with '_'"):
        check_device_id("_claim-line-7")
    assert check_device_id("cam-0042") == "cam-0042"


def test_claim_sessions_are_named_so_that_no_two_batches_share_an_account_name() -> None:
    assert claim_username("line-7", 0) == "_claim-line-7"
    assert claim_username("line-7", 1) == "_claim1-line-7"
    assert claim_username("line-7", 255) == "_claim255-line-7"
    # Batch "1-x" session 0 and batch "x" session 1 differ; so does every pair here.
    names = [claim_username(b, k) for b in ("x", "1-x", "1", "x_1", "1-1", "12-x")
             for k in range(0, 256)]
    assert len(set(names)) == len(names)
    for bad in (-1, 256, True, 1.0):
        with pytest.raises(IdentityError, match="claim session"):
            claim_username("x", bad)  # type: ignore[arg-type]


def test_a_device_uses_the_same_claim_session_every_time_and_the_batch_spreads_over_all(
) -> None:
    assert claim_session("cam-1", 16) == claim_session("cam-1", 16)
    seen = {claim_session(f"cam-{i}", 16) for i in range(400)}
    assert seen == set(range(16))
    assert claim_session("cam-1", 1) == 0
    for bad in (0, 257):
        with pytest.raises(IdentityError, match="1 to 256"):
            claim_session("cam-1", bad)


@pytest.mark.parametrize("batch", ["", "a/b", "+", "#", "a.b", "x" * 33, "_x", "a b"])
def test_a_batch_that_is_not_one_short_topic_word_is_refused(batch: str) -> None:
    with pytest.raises(IdentityError):
        check_batch(batch)
    with pytest.raises(IdentityError):
        claim_username(batch)


def test_a_batch_of_32_characters_is_accepted() -> None:
    assert check_batch("b" * 32) == "b" * 32


def test_identity_topics_name_each_exchange_and_parse_back() -> None:
    t = Topics("lab")
    assert t.enrol_request(BATCH, DEV) == "edge/lab/enrol/line-7/cam-0042/req"
    assert t.enrol_answer(BATCH, DEV) == "edge/lab/enrol/line-7/cam-0042/res"
    assert t.every_enrol_request == "edge/lab/enrol/+/+/req"
    assert t.enrol_batch_requests(BATCH) == "edge/lab/enrol/line-7/+/req"
    assert t.cred_request(DEV) == "edge/lab/dev/cam-0042/cred/req"
    assert t.cred_answer(DEV) == "edge/lab/dev/cam-0042/cred/res"
    assert t.every_cred_request == "edge/lab/dev/+/cred/req"
    assert t.enrol_requester(t.enrol_request(BATCH, DEV)) == (BATCH, DEV)
    assert t.cred_requester(t.cred_request(DEV)) == DEV
    for bad in ("edge/lab/enrol/line-7/cam/res", "edge/lab/enrol/a/b/c/req",
                "edge/lab/enrol/line-7/cam\n/req", "edge/other/enrol/a/b/req"):
        assert t.enrol_requester(bad) is None
    for bad in ("edge/lab/dev/a/b/cred/req", "edge/lab/dev/cam\n/cred/req",
                "edge/lab/dev/cam/cred/res"):
        assert t.cred_requester(bad) is None


def test_identity_topics_refuse_wildcards_in_names() -> None:
    t = Topics("lab")
    with pytest.raises(EdgeError):
        t.enrol_request("+", DEV)
    with pytest.raises(EdgeError):
        t.enrol_answer(BATCH, "#")
    with pytest.raises(EdgeError):
        t.cred_request("a/b")


# -- the device key --------------------------------------------------------------------


def test_device_key_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity" / "device.key"
    first = DeviceKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = DeviceKey.load_or_create(path)
    assert again.fingerprint == first.fingerprint
    assert [p.name for p in path.parent.iterdir()] == ["device.key"]


def test_a_device_key_file_that_is_not_a_key_is_refused_and_never_replaced(
        tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match=r"device\.key: device key is not an unencrypted PEM"):
        DeviceKey.load_or_create(path)
    assert path.read_bytes() == b"not a key"


def test_a_device_key_of_another_type_is_refused(tmp_path: Path) -> None:
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(IdentityError, match="key type RSA-2048: expected an EC P-256 key"):
        DeviceKey.from_pem(rsa_pem)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(IdentityError, match="key type EC secp384r1"):
        DeviceKey.from_pem(p384)
    with pytest.raises(IdentityError, match="bytes"):
        DeviceKey.from_pem(b"x" * 5000)


def test_device_key_pem_round_trip_and_fingerprint_is_sha256_of_spki(key: DeviceKey) -> None:
    import hashlib

    again = DeviceKey.from_pem(key.private_pem())
    assert again.fingerprint == key.fingerprint == fingerprint_of(key.public_pem)
    der = again._private.public_key().public_bytes(  # noqa: SLF001 - checking the definition
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.fingerprint == hashlib.sha256(der).hexdigest()
    assert repr(key) == f"DeviceKey({key.fingerprint[:16]}…)"  # no key material


def test_a_device_key_signature_verifies_with_its_public_key(key: DeviceKey) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    public = load_pem_public_key(key.public_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(key.sign(b"data"), b"data", ec.ECDSA(hashes.SHA256()))


def test_fingerprint_of_refuses_what_is_not_a_p256_public_key() -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key() \
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(IdentityError, match="key type RSA-2048"):
        fingerprint_of(rsa_pub)
    with pytest.raises(IdentityError, match="not a PEM public key"):
        fingerprint_of("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(IdentityError, match="at most"):
        fingerprint_of("x" * 5000)


# -- enrolment requests ------------------------------------------------------------------


def test_an_enrolment_request_round_trips_and_names_the_device_key(key: DeviceKey) -> None:
    req = EnrolRequest.create(key, DEV, BATCH, {"model": "pi5", "serial": "0042"})
    back = EnrolRequest.from_bytes(req.to_bytes(), batch=BATCH, device_id=DEV)
    assert back == req
    assert back.fingerprint == key.fingerprint
    assert back.public_pem == key.public_pem
    assert json.loads(json.dumps(back.facts)) == {"model": "pi5", "serial": "0042"}
    assert len(back.nonce) == 32
    assert len(req.to_bytes()) < MAX_REQUEST_BYTES


def test_two_requests_of_one_device_carry_different_nonces(key: DeviceKey) -> None:
    assert EnrolRequest.create(key, DEV, BATCH, {}).nonce != \
        EnrolRequest.create(key, DEV, BATCH, {}).nonce


def test_an_oversize_request_is_refused_before_it_is_parsed() -> None:
    # Not JSON at all: only the size check can say so.
    msg = refused(b"[" * (MAX_REQUEST_BYTES + 1), "at most 8192")
    assert "JSON" not in msg


def test_a_deeply_nested_request_is_refused() -> None:
    refused(b'{"a":' * 5 + b"1" + b"}" * 5, "nested deeper than the limit of 4")
    refused(b"[" * 5000, "nested deeper")


@pytest.mark.parametrize(("payload", "match"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "not JSON"),
    (b'{"sent_at": NaN}', "not JSON"),
    (b"[]", "exactly the keys"),
    (b"null", "exactly the keys"),
])
def test_a_request_that_is_not_a_json_object_is_refused(payload: bytes, match: str) -> None:
    refused(payload, match)


def test_a_request_with_a_missing_or_extra_key_is_refused(key: DeviceKey) -> None:
    doc = request_doc(key)
    del doc["facts"]
    refused(dumps(doc), "exactly the keys")
    refused(dumps(request_doc(key, extra=1)), "exactly the keys")


def test_a_request_of_another_type_or_version_is_refused(key: DeviceKey) -> None:
    refused(dumps(request_doc(key, type="edge-enrol-answer")), "expected type 'edge-enrol-request'")
    refused(dumps(request_doc(key, v=2)), "version 1")


@pytest.mark.parametrize(("change", "match"), [
    ({"device_id": 7}, "'device_id' must be a string"),
    ({"batch": None}, "'batch' must be a string"),
    ({"csr_pem": ["x"]}, "'csr_pem' must be a string"),
    ({"nonce": 1}, "'nonce' must be a string"),
    ({"facts": ["a"]}, "'facts' must be an object"),
    ({"sent_at": "now"}, "'sent_at' must be a number"),
    ({"sent_at": True}, "'sent_at' must be a number"),
    ({"nonce": "0" * 31}, "'nonce' must be 32 lowercase hex"),
    ({"nonce": "A" * 32}, "'nonce' must be 32 lowercase hex"),
    ({"sent_at": 1e400}, "not JSON"),
])
def test_a_request_field_of_the_wrong_type_or_form_is_refused(
        key: DeviceKey, change: dict[str, Any], match: str) -> None:
    refused(dumps(request_doc(key, **change)), match)


def test_a_request_naming_another_device_or_batch_than_its_topic_is_refused(
        key: DeviceKey) -> None:
    payload = EnrolRequest.create(key, DEV, BATCH, {}).to_bytes()
    refused(payload, "it names device 'cam-0042', the request topic names 'cam-9'",
            device="cam-9")
    refused(payload, "it names batch 'line-7', the request topic names 'line-8'",
            batch="line-8")


@pytest.mark.parametrize(("batch", "device", "match"), [
    (BATCH, "_claim-line-7", "starts with '_'"),
    (BATCH, "a.b", "device id"),
    (BATCH, "", "device id"),
    ("x" * 33, DEV, "at most 32"),
    ("a+", DEV, "claim batch"),
])
def test_a_request_on_a_topic_with_a_bad_name_is_refused(
        key: DeviceKey, batch: str, device: str, match: str) -> None:
    refused(EnrolRequest.create(key, DEV, BATCH, {}).to_bytes(), match, batch=batch,
            device=device)


@pytest.mark.parametrize(("facts", "match"), [
    ({f"k{i}": "v" for i in range(33)}, "33 facts, at most 32"),
    ({"bad key": "v"}, "fact name 'bad key'"),
    ({"": "v"}, "fact name ''"),
    ({"k" * 65: "v"}, "fact name"),
    ({"k": "v" * 129}, "fact 'k' must be a string of at most 128"),
    ({"k": "a\nb"}, "printable"),
    ({"k": "a\x00b"}, "printable"),
    ({"k": "a\u2028b"}, "printable"),
    ({"k": 3}, "fact 'k' must be a string"),
])
def test_request_facts_are_bounded_and_printable(
        key: DeviceKey, facts: dict[str, Any], match: str) -> None:
    refused(dumps(request_doc(key, facts=facts)), match)
    with pytest.raises(EnrolmentRefused, match=match):
        EnrolRequest.create(key, DEV, BATCH, facts)


def test_the_largest_facts_a_request_allows_fit_in_a_request(key: DeviceKey) -> None:
    facts = {f"{i:02d}" + "k" * 62: "v" * 128 for i in range(32)}
    req = EnrolRequest.create(key, DEV, BATCH, facts)
    assert EnrolRequest.from_bytes(req.to_bytes(), batch=BATCH, device_id=DEV) == req


def test_a_request_too_large_to_send_is_refused_when_created(key: DeviceKey) -> None:
    facts = {f"{i:02d}" + "k" * 62: "€" * 128 for i in range(32)}  # 3 bytes a character
    with pytest.raises(EnrolmentRefused, match="at most 8192 are accepted"):
        EnrolRequest.create(key, DEV, BATCH, facts)


def test_an_rsa_csr_is_refused(key: DeviceKey) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(dumps(request_doc(key, csr_pem=csr_with(rsa_key, cn(DEV)))),
            "key type RSA-2048: expected an EC P-256 key")


def test_a_csr_on_another_curve_is_refused(key: DeviceKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    refused(dumps(request_doc(key, csr_pem=csr_with(p384, cn(DEV)))),
            "key type EC secp384r1: expected an EC P-256 key")


def test_a_csr_naming_another_device_is_refused(key: DeviceKey) -> None:
    refused(dumps(request_doc(key, csr_pem=key.csr("cam-9"))),
            "CSR names 'cam-9', the request topic names 'cam-0042'")


def test_a_csr_with_more_than_the_device_id_in_its_subject_is_refused() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEV),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
    doc = request_doc(DeviceKey(private), csr_pem=csr_with(private, subject))
    refused(dumps(doc), "exactly one CN")
    no_cn = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV)])
    refused(dumps(request_doc(DeviceKey(private), csr_pem=csr_with(private, no_cn))),
            "exactly one CN")


def test_a_csr_signed_with_another_hash_is_refused() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    doc = request_doc(DeviceKey(private), csr_pem=csr_with(private, cn(DEV), hashes.SHA384()))
    refused(dumps(doc), "ECDSA SHA-256")


def test_a_csr_whose_signature_does_not_match_its_key_is_refused(key: DeviceKey) -> None:
    """Possession of the key is what a CSR proves: one altered bit voids it."""
    csr = x509.load_pem_x509_csr(key.csr(DEV).encode())
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode() \
        + "-----END CERTIFICATE REQUEST-----\n"
    refused(dumps(request_doc(key, csr_pem=pem)), "signature is not valid")


@pytest.mark.parametrize(("csr_pem", "match"), [
    ("x" * 4097, "at most 4096"),
    ("hello", "must start with -----BEGIN CERTIFICATE REQUEST-----"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "does not parse"),
    ("-----BEGIN CERTIFICATE REQUEST-----\n€\n-----END CERTIFICATE REQUEST-----\n",
     "does not parse"),
])
def test_a_csr_that_is_not_a_pem_csr_is_refused(
        key: DeviceKey, csr_pem: str, match: str) -> None:
    refused(dumps(request_doc(key, csr_pem=csr_pem)), match)


# -- sealed credentials ----------------------------------------------------------------


def test_credentials_sealed_to_a_key_open_with_it(key: DeviceKey) -> None:
    ca = self_signed_ca()
    c = creds(ca_pem=ca)
    sealed = seal(c, key.public_pem, device_id=DEV)
    assert c.password not in sealed and c.password not in base64.b64decode(sealed).decode()
    assert key.open(sealed, device_id=DEV) == c


def test_two_sealings_of_the_same_credentials_differ(key: DeviceKey) -> None:
    c = creds()
    assert seal(c, key.public_pem, device_id=DEV) != seal(c, key.public_pem, device_id=DEV)


def test_credentials_sealed_to_another_key_do_not_open(
        key: DeviceKey, other_key: DeviceKey) -> None:
    sealed = seal(creds(), other_key.public_pem, device_id=DEV)
    with pytest.raises(IdentityError, match="sealed for another key"):
        key.open(sealed, device_id=DEV)


def test_credentials_sealed_for_another_device_id_do_not_open(key: DeviceKey) -> None:
    sealed = seal(creds(user="cam-9"), key.public_pem, device_id="cam-9")
    with pytest.raises(IdentityError, match="sealed for another key or device"):
        key.open(sealed, device_id=DEV)


def test_credentials_for_another_user_are_never_sealed(key: DeviceKey) -> None:
    with pytest.raises(IdentityError, match="cannot be sealed to device"):
        seal(creds(user="cam-9"), key.public_pem, device_id=DEV)


def test_credentials_are_sealed_only_to_a_p256_key() -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key() \
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(IdentityError, match="key type RSA-2048"):
        seal(creds(), rsa_pub, device_id=DEV)


def _sealed_doc(sealed: str) -> dict[str, str]:
    doc: dict[str, str] = json.loads(base64.b64decode(sealed))
    return doc


def _reseal(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("part", ["ct", "nonce", "epk"])
def test_altered_sealed_credentials_do_not_open(key: DeviceKey, part: str) -> None:
    doc = _sealed_doc(seal(creds(), key.public_pem, device_id=DEV))
    doc[part] = _flip(doc[part])
    with pytest.raises(IdentityError):
        key.open(_reseal(doc), device_id=DEV)


@pytest.mark.parametrize(("sealed", "match"), [
    ("x" * (16 * 1024 + 1), "at most 16384"),
    ("%%%", "not base64"),
    (base64.b64encode(b"[1]").decode(), "exactly the keys"),
    (base64.b64encode(b"{").decode(), "not JSON"),
    (_reseal({"epk": "AAAA", "nonce": base64.b64encode(b"n" * 12).decode(),
              "ct": base64.b64encode(b"c" * 16).decode()}), "'epk' is not a DER public key"),
    (_reseal({"epk": "", "nonce": 1, "ct": ""}), "'nonce' must be a base64 string"),
    (_reseal({"epk": "", "nonce": "AAAA", "ct": ""}), "'nonce' must be 12 bytes"),
    (_reseal({"epk": "", "nonce": "!", "ct": ""}), "'nonce' is not base64"),
])
def test_malformed_sealed_credentials_are_refused(
        key: DeviceKey, sealed: str, match: str) -> None:
    with pytest.raises(IdentityError, match=match):
        key.open(sealed, device_id=DEV)


def test_sealed_credentials_with_a_key_on_another_curve_are_refused(key: DeviceKey) -> None:
    doc = _sealed_doc(seal(creds(), key.public_pem, device_id=DEV))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    doc["epk"] = base64.b64encode(p384).decode()
    with pytest.raises(IdentityError, match="'epk' is not an EC P-256 key"):
        key.open(_reseal(doc), device_id=DEV)


def big_ca_bundle() -> str:
    """Certificates up to the 4 KiB a credentials' CA bundle may hold."""
    ca = self_signed_ca()
    return ca * (4096 // len(ca))


def test_a_ca_bundle_over_4_kib_is_refused() -> None:
    with pytest.raises(IdentityError, match="at most 4096 characters"):
        creds(ca_pem=big_ca_bundle() + self_signed_ca())


def test_credentials_too_large_for_an_answer_are_not_sealed(key: DeviceKey) -> None:
    c = Credentials(username=DEV, password="p" * 256, issued=1, expires_at=1.0,
                    groups=tuple(f"{i:02d}" + "g" * 62 for i in range(64)),
                    ca_pem=big_ca_bundle())
    with pytest.raises(IdentityError, match="over the limit of 8192"):
        seal(c, key.public_pem, device_id=DEV)


def test_the_largest_sealable_credentials_fit_in_an_answer(key: DeviceKey) -> None:
    c = Credentials(username="d" * 64, password="p" * 256, issued=2**40, expires_at=1e12,
                    groups=tuple(f"{i:02d}" + "g" * 62 for i in range(52)),
                    ca_pem=big_ca_bundle())
    assert len(c.to_json()) <= 8192
    sealed = seal(c, key.public_pem, device_id=c.username)
    answer = EnrolAnswer("accepted", c.username, key.fingerprint, "r" * 200, issued=2**40,
                         sealed=sealed)
    assert len(answer.to_bytes()) <= MAX_ANSWER_BYTES
    assert key.open(sealed, device_id=c.username) == c


# -- credentials -----------------------------------------------------------------------


def test_credentials_round_trip_through_json_text_bytes_and_dict() -> None:
    c = creds(ca_pem=self_signed_ca())
    assert Credentials.from_json(c.to_json()) == c
    assert Credentials.from_json(c.to_json().encode()) == c
    assert Credentials.from_json(json.loads(c.to_json())) == c
    assert c.password not in repr(c)


@pytest.mark.parametrize(("change", "match"), [
    ({"extra": 1}, "exactly the keys"),
    ({"username": "_claim-x"}, "starts with '_'"),
    ({"username": 5}, "'username' must be a string"),
    ({"password": ""}, "password must be"),
    ({"password": "has space"}, "password must be"),
    ({"password": "x" * 257}, "password must be"),
    ({"issued": -1}, "'issued' must be an integer >= 0"),
    ({"issued": True}, "'issued' must be an integer"),
    ({"issued": 1.5}, "'issued' must be an integer"),
    ({"expires_at": "soon"}, "'expires_at' must be a finite number"),
    ({"groups": "g"}, "'groups' must be a list"),
    ({"groups": ["a", "a"]}, "distinct"),
    ({"groups": ["a/b"]}, "one topic level"),
    ({"groups": [f"g{i}" for i in range(65)]}, "at most 64"),
    ({"ca_pem": 3}, "'ca_pem' must be a PEM text or null"),
    ({"ca_pem": "not a cert"}, "not a PEM bundle of certificates"),
])
def test_malformed_credentials_are_refused(change: dict[str, Any], match: str) -> None:
    doc = json.loads(creds().to_json())
    doc.update(change)
    with pytest.raises(IdentityError, match=match):
        Credentials.from_json(json.dumps(doc))


def test_oversize_or_deep_credentials_are_refused() -> None:
    with pytest.raises(IdentityError, match="over the limit"):
        Credentials.from_json(b" " * (8 * 1024 + 1))
    with pytest.raises(IdentityError, match="nested deeper"):
        Credentials.from_json(b'{"groups": [[["x"]]]}')


# -- enrolment answers -----------------------------------------------------------------


def answer_doc(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(EnrolAnswer("pending", DEV, "a" * 64, "wait").to_bytes())
    doc.update(change)
    return doc


def answer_refused(payload: bytes, match: str, *, device: str = DEV) -> None:
    with pytest.raises(EnrolmentRefused, match=match) as info:
        EnrolAnswer.from_bytes(payload, device_id=device)
    assert "\n" not in str(info.value)


def test_every_answer_state_round_trips(key: DeviceKey) -> None:
    sealed = seal(creds(issued=3), key.public_pem, device_id=DEV)
    answers = [EnrolAnswer("pending", DEV, key.fingerprint, "an operator decides"),
               EnrolAnswer("accepted", DEV, key.fingerprint, "", issued=3, sealed=sealed),
               EnrolAnswer("rejected", DEV, key.fingerprint, "unknown device"),
               EnrolAnswer("refused", DEV, "", "CSR names 'x', the request topic names 'y'")]
    for a in answers:
        assert EnrolAnswer.from_bytes(a.to_bytes(), device_id=DEV) == a
    accepted = EnrolAnswer.from_bytes(answers[1].to_bytes(), device_id=DEV)
    assert accepted.sealed is not None
    assert key.open(accepted.sealed, device_id=DEV).issued == 3


def test_an_accepted_answer_with_a_ca_bundle_fits_in_an_answer(key: DeviceKey) -> None:
    ca = self_signed_ca()
    c = creds(ca_pem=ca + ca + ca)
    a = EnrolAnswer("accepted", DEV, key.fingerprint, "", issued=1,
                    sealed=seal(c, key.public_pem, device_id=DEV))
    assert len(a.to_bytes()) <= MAX_ANSWER_BYTES
    assert key.open(EnrolAnswer.from_bytes(a.to_bytes(), device_id=DEV).sealed or "",
                    device_id=DEV) == c


def test_a_replayed_answer_is_useless_to_another_key(
        key: DeviceKey, other_key: DeviceKey) -> None:
    """An attacker with another key who enrols under the same id and is shown the
    legitimate device's retained answer learns nothing: it is for another fingerprint and
    does not open."""
    sealed = seal(creds(), key.public_pem, device_id=DEV)
    payload = EnrolAnswer("accepted", DEV, key.fingerprint, "", issued=1,
                          sealed=sealed).to_bytes()
    answer = EnrolAnswer.from_bytes(payload, device_id=DEV)
    assert answer.fingerprint != other_key.fingerprint
    with pytest.raises(IdentityError, match="sealed for another key"):
        other_key.open(answer.sealed or "", device_id=DEV)


def test_the_reason_of_a_built_answer_is_cut_to_one_line() -> None:
    a = EnrolAnswer("rejected", DEV, "a" * 64, "line one\nline two\t" + "x" * 500)
    assert "\n" not in a.reason and len(a.reason) == 200 and a.reason.endswith("…")
    assert a.reason.startswith("line one line two x")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"state": "maybe"}, "'state' must be one of"),
    ({"fingerprint": ""}, "'fingerprint' must be 64 lowercase hex"),
    ({"fingerprint": "A" * 64}, "'fingerprint' must be 64"),
    ({"issued": 1}, "'issued' must be an integer >= 1 in an accepted answer and 0"),
    ({"state": "accepted", "issued": 0, "sealed": "x"}, "'issued' must be an integer >= 1"),
    ({"state": "accepted", "issued": 1}, "must carry the sealed credentials"),
    ({"state": "accepted", "issued": 1, "sealed": "x" * (16 * 1024 + 1)},
     "must carry the sealed credentials"),
    ({"sealed": "x"}, "only an accepted answer carries credentials"),
    ({"at": float("nan")}, "'at' must be a finite number"),
    ({"device_id": "_claim-x"}, "starts with '_'"),
])
def test_an_answer_breaking_a_rule_cannot_be_built(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"state": "pending", "device_id": DEV, "fingerprint": "a" * 64}
    args.update(kwargs)
    with pytest.raises(EnrolmentRefused, match=match):
        EnrolAnswer(**args)


@pytest.mark.parametrize(("change", "match"), [
    ({"state": "maybe"}, "'state' must be one of"),
    ({"state": 1}, "'state' must be a string"),
    ({"reason": "a\nb"}, "'reason' must be one line of at most 200"),
    ({"reason": "r" * 201}, "'reason' must be one line"),
    ({"issued": "1"}, "'issued' must be an integer"),
    ({"issued": False}, "'issued' must be an integer"),
    ({"sealed": 5}, "'sealed' must be a string or null"),
    ({"at": "now"}, "'at' must be a number"),
    ({"fingerprint": "z" * 64}, "'fingerprint' must be 64"),
    ({"type": "edge-enrol-request"}, "expected type 'edge-enrol-answer'"),
    ({"device_id": "cam-9"}, "it names device 'cam-9', the answer topic names 'cam-0042'"),
])
def test_an_answer_breaking_a_rule_is_refused(change: dict[str, Any], match: str) -> None:
    answer_refused(dumps(answer_doc(**change)), match)


def test_an_answer_with_a_missing_or_extra_key_is_refused() -> None:
    doc = answer_doc()
    del doc["at"]
    answer_refused(dumps(doc), "exactly the keys")
    answer_refused(dumps(answer_doc(more=1)), "exactly the keys")


def test_an_oversize_or_deep_answer_is_refused_before_it_is_parsed() -> None:
    answer_refused(b"{" * (MAX_ANSWER_BYTES + 1), "at most 16384")
    answer_refused(b'{"a":[[1]]}', "nested deeper than the limit of 2")


def test_a_request_is_not_an_answer_nor_an_answer_a_request(key: DeviceKey) -> None:
    answer_refused(EnrolRequest.create(key, DEV, BATCH, {}).to_bytes(), "exactly the keys")
    refused(EnrolAnswer("pending", DEV, key.fingerprint).to_bytes(), "exactly the keys")


# -- renewal requests ------------------------------------------------------------------


def renew_refused(payload: bytes, public_pem: str, match: str, *, device: str = DEV,
                  now: float | None = None) -> None:
    with pytest.raises(EnrolmentRefused, match=match) as info:
        RenewRequest.verify(payload, public_pem, device_id=device,
                            now=time.time() if now is None else now)
    assert "\n" not in str(info.value)


def test_a_signed_renewal_request_verifies(key: DeviceKey) -> None:
    for ack in (0, 7):
        req = RenewRequest.verify(RenewRequest.signed(key, DEV, ack=ack), key.public_pem,
                                  device_id=DEV, now=time.time())
        assert (req.device_id, req.fingerprint, req.ack) == (DEV, key.fingerprint, ack)
        assert len(req.nonce) == 32


def test_a_renewal_signed_by_another_key_is_refused(
        key: DeviceKey, other_key: DeviceKey) -> None:
    renew_refused(RenewRequest.signed(other_key, DEV), key.public_pem,
                  "signed for key .* enrolled with key")


def test_a_renewal_claiming_the_enrolled_key_without_holding_it_is_refused(
        key: DeviceKey, other_key: DeviceKey) -> None:
    outer = json.loads(RenewRequest.signed(other_key, DEV))
    outer["doc"]["fingerprint"] = key.fingerprint
    renew_refused(dumps(outer), key.public_pem, "signature is not valid")


def test_an_altered_renewal_request_is_refused(key: DeviceKey) -> None:
    outer = json.loads(RenewRequest.signed(key, DEV, ack=0))
    outer["doc"]["ack"] = 5
    renew_refused(dumps(outer), key.public_pem, "signature is not valid")


def test_a_renewal_for_another_device_is_refused(key: DeviceKey) -> None:
    renew_refused(RenewRequest.signed(key, DEV), key.public_pem,
                  "it names device 'cam-0042', the request topic names 'cam-9'", device="cam-9")


@pytest.mark.parametrize("offset", [-301, 301])
def test_a_renewal_sent_too_far_from_the_controllers_clock_is_refused(
        key: DeviceKey, offset: float) -> None:
    now = 1_800_000_000.0
    payload = RenewRequest.signed(key, DEV, now=now + offset)
    renew_refused(payload, key.public_pem, "at most 300 s of skew", now=now)
    assert RenewRequest.verify(payload, key.public_pem, device_id=DEV, now=now,
                               max_skew_s=abs(offset)).ack == 0


@pytest.mark.parametrize(("mangle", "match"), [
    (lambda o: {**o, "x": 1}, "exactly the keys"),
    (lambda o: {"doc": o["doc"]}, "exactly the keys"),
    (lambda o: {**o, "sig": 5}, "'sig' must be a base64 signature"),
    (lambda o: {**o, "sig": "!!"}, "'sig' is not base64"),
    (lambda o: {**o, "sig": base64.b64encode(b"s" * 81).decode()}, "longer than an ECDSA"),
    (lambda o: {**o, "doc": []}, "'doc' must be an object"),
    (lambda o: {**o, "doc": {**o["doc"], "x": 1}}, "'doc' must be an object with exactly"),
    (lambda o: {**o, "doc": {**o["doc"], "type": "edge-enrol-request"}}, "expected type"),
    (lambda o: {**o, "doc": {**o["doc"], "ack": -1}}, "'ack' must be an integer >= 0"),
    (lambda o: {**o, "doc": {**o["doc"], "ack": "1"}}, "'ack' must be an integer"),
    (lambda o: {**o, "doc": {**o["doc"], "sent_at": None}}, "'sent_at' must be a number"),
    (lambda o: {**o, "doc": {**o["doc"], "nonce": "x"}}, "'nonce' must be 32"),
    (lambda o: {**o, "doc": {**o["doc"], "fingerprint": 1}}, "'fingerprint' must be a string"),
    (lambda o: {**o, "doc": {**o["doc"], "fingerprint": "f"}}, "'fingerprint' must be 64"),
])
def test_a_malformed_renewal_request_is_refused(key: DeviceKey, mangle: Any, match: str) -> None:
    outer = json.loads(RenewRequest.signed(key, DEV))
    renew_refused(dumps(mangle(outer)), key.public_pem, match)


def test_an_oversize_or_deep_renewal_request_is_refused_before_it_is_parsed(
        key: DeviceKey) -> None:
    renew_refused(b"[" * (MAX_REQUEST_BYTES + 1), key.public_pem, "at most 8192")
    renew_refused(b'{"doc": {"a": [[1]]}, "sig": ""}', key.public_pem,
                  "nested deeper than the limit of 3")


def test_a_renewal_checked_against_a_bad_enrolled_key_is_refused_in_one_line(
        key: DeviceKey) -> None:
    renew_refused(RenewRequest.signed(key, DEV), "garbage", "not a PEM public key")


def test_every_refusal_fits_the_cli_line(key: DeviceKey) -> None:
    """A hostile value is quoted cut, never whole: the message stays one short line."""
    long_id = "d" * 64
    msg = refused(EnrolRequest.create(key, long_id, BATCH, {}).to_bytes(),
                  "it names device", device=DEV)
    assert len(msg) < 300
    assert os.linesep not in msg


def test_hostile_names_and_keys_are_quoted_cut(key: DeviceKey) -> None:
    doc = request_doc(key)
    doc["k" * 7000] = 1
    msg = refused(dumps(doc), "exactly the keys")
    assert len(msg) < 300
    with pytest.raises(IdentityError, match="at most 64") as info:
        check_device_id("d" * 5000)
    assert len(str(info.value)) < 200
    with pytest.raises(IdentityError, match="at most 32") as info:
        check_batch("b" * 5000)
    assert len(str(info.value)) < 200
    with pytest.raises(IdentityError) as info:
        Credentials.from_json(json.dumps({**json.loads(creds().to_json()), "username": "u" * 7000}))
    assert len(str(info.value)) < 200


def _corruptions(payload: bytes, seed: int, count: int) -> list[bytes]:
    import random

    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        b = bytearray(payload)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            i = rnd.randrange(len(b))
            if op == 0:
                b[i] = rnd.randrange(256)
            elif op == 1:
                del b[i:i + rnd.randint(1, 20)]
            else:
                b[i:i] = rnd.choice([b"[", b"{", b'"', b"\\u0000", b"1e999", b"\xff", b"null"])
        out.append(bytes(b))
    return out


def test_corrupted_documents_are_refused_in_one_line_or_read_never_crash(
        key: DeviceKey) -> None:
    """Every byte from the network is hostile: whatever a corruption makes of a valid
    document, reading it either succeeds or raises EnrolmentRefused in one line."""
    sealed = seal(creds(), key.public_pem, device_id=DEV)
    cases: list[tuple[bytes, Any]] = [
        (EnrolRequest.create(key, DEV, BATCH, {"m": "x"}).to_bytes(),
         lambda p: EnrolRequest.from_bytes(p, batch=BATCH, device_id=DEV)),
        (EnrolAnswer("accepted", DEV, key.fingerprint, "", issued=1, sealed=sealed).to_bytes(),
         lambda p: key.open(EnrolAnswer.from_bytes(p, device_id=DEV).sealed or "",
                            device_id=DEV)),
        (RenewRequest.signed(key, DEV),
         lambda p: RenewRequest.verify(p, key.public_pem, device_id=DEV, now=time.time())),
    ]
    for seed, (payload, read) in enumerate(cases):
        for bad in _corruptions(payload, seed, 300):
            try:
                read(bad)
            except IdentityError as err:
                assert "\n" not in str(err) and len(str(err)) < 300, str(err)[:400]


def test_a_renewal_hint_round_trips_and_names_its_device() -> None:
    from edge_sdk.identity import MAX_HINT_BYTES, RenewHint

    hint = RenewHint("cam-1", 3, at=5.0)
    payload = hint.to_bytes()
    assert RenewHint.from_bytes(payload, device_id="cam-1") == hint
    # Shorter than any answer carrying credentials: the device tells them apart by size.
    assert len(RenewHint("d" * 64, 2**62).to_bytes()) <= MAX_HINT_BYTES
    with pytest.raises(EnrolmentRefused, match="names device 'cam-1'"):
        RenewHint.from_bytes(payload, device_id="cam-2")


@pytest.mark.parametrize(("payload", "match"), [
    (b"x" * 600, "at most 512"),
    (b'{"type":"edge-renew-hint","v":1,"device_id":"cam-1","issued":[[1]],"at":1}',
     "nested|issued"),
    (b'{"type":"edge-renew-hint","v":1,"device_id":"cam-1","issued":-1,"at":1}',
     "issued"),
    (b'{"type":"edge-renew-hint","v":1,"device_id":"cam-1","issued":true,"at":1}',
     "issued"),
    (b'{"type":"edge-enrol-answer","v":1,"device_id":"cam-1","issued":1,"at":1}',
     "expected type"),
    (b'{"type":"edge-renew-hint","v":1,"device_id":"cam-1","issued":1}', "exactly the keys"),
])
def test_a_malformed_renewal_hint_is_refused_in_one_line(payload: bytes, match: str) -> None:
    from edge_sdk.identity import RenewHint

    with pytest.raises(EnrolmentRefused, match=match) as err:
        RenewHint.from_bytes(payload, device_id="cam-1")
    assert "\n" not in str(err.value)
