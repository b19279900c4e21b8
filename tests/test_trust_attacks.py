"""Each test is named after the attack it stops: refused with a clear VerificationError
subclass, and nothing installed. Real Mosquitto, real python-tuf metadata, misbehaving
responders that are real MQTT clients."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization.json import JSONSerializer

from edge_sdk.errors import TransportError, VerificationError
from edge_sdk.release import Repository
from edge_sdk.transport import EndlessDataError, FetchConfig, SlowRetrievalError
from edge_sdk.trust import (
    DeploymentExpiredError,
    DeploymentSignatureError,
    DowngradeError,
    ExpiredError,
    MixAndMatchError,
    NotForThisDeviceError,
    ReplayError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
    sign_deployment,
    verify_deployment,
)
from tests._broker import Mosquitto
from tests._trust_env import FLEET, EvilResponder, env

FAST = FetchConfig(chunk_size=4096, window=4, chunk_timeout=0.5, stall_timeout=1.5)


def _write(repo: Repository, md: Metadata, signers: list) -> None:  # type: ignore[type-arg]
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    data = md.to_bytes(JSONSerializer(compact=False))
    role = md.signed.type
    if role != "timestamp":
        (repo.meta / f"{md.signed.version}.{role}.json").write_bytes(data)
    (repo.meta / f"{role}.json").write_bytes(data)


def _assert_refused(err: pytest.ExceptionInfo[BaseException], dest: Path) -> None:
    assert isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value)
    assert not dest.exists()


def _assert_transient(err: pytest.ExceptionInfo[BaseException], dest: Path) -> None:
    """Weather, not an attack: retried later, never refused for good; nothing installed."""
    assert isinstance(err.value, TransportError)
    assert not isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value)
    assert not dest.exists()


def test_tampered_chunk_is_refused_and_nothing_installed(tmp_path: Path,
                                                         broker: Mosquitto) -> None:
    with env(tmp_path, broker, responder=False) as e:
        e.add_responder(EvilResponder(e.host, e.repo.path, "tamper"))
        e.release(n=4000)
        dep = e.deploy()
        client = e.client(FAST)
        dest = tmp_path / "installed"
        with pytest.raises(TargetHashError) as err:
            client.fetch(dep, dest)
        _assert_refused(err, dest)
        assert list(client.partial_dir.iterdir()) == []  # the bad partial is not resumed


def test_endless_data_is_refused(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker, responder=False) as e:
        e.add_responder(EvilResponder(e.host, e.repo.path, "endless"))
        e.release(n=4000)
        dep = e.deploy()
        dest = tmp_path / "installed"
        with pytest.raises(EndlessDataError) as err:
            e.client(FAST).fetch(dep, dest)
        _assert_refused(err, dest)


def test_endless_metadata_is_refused_before_it_is_downloaded(tmp_path: Path,
                                                             broker: Mosquitto) -> None:
    with env(tmp_path, broker, responder=False) as e:
        e.add_responder(EvilResponder(e.host, e.repo.path, "endless-metadata"))
        e.release()
        dep = e.deploy()
        client = e.client(FAST)
        dest = tmp_path / "installed"
        with pytest.raises(EndlessDataError, match=r"timestamp\.json") as err:
            client.fetch(dep, dest)
        _assert_refused(err, dest)
        assert client.stats.bytes_received < 64 * 1024


def test_slow_retrieval_fails_once_nothing_arrives_for_the_stall_timeout(
        tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker, responder=False) as e:
        e.add_responder(EvilResponder(e.host, e.repo.path, "silent"))
        e.release(n=4000)
        dep = e.deploy()
        dest = tmp_path / "installed"
        client = e.client(FAST)
        with pytest.raises(SlowRetrievalError) as err:
            client.fetch(dep, dest)
        _assert_transient(err, dest)
        assert "stall_timeout" in str(err.value)
        assert client.stats.timeouts >= 1 and client.stats.chunks_resent >= 1


def test_targets_signed_by_wrong_key_are_refused(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        dep = e.deploy()
        md = e.repo.load("targets")
        evil = tmp_path / "evil.bin"
        evil.write_bytes(b"malware")
        md.signed.targets["m/1.0/model.onnx"] = TargetFile.from_file("m/1.0/model.onnx",
                                                                     str(evil))
        md.signed.version += 1
        _write(e.repo, md, [CryptoSigner.generate_ed25519()])
        e.repo.refresh()  # online keys compromised too: snapshot, timestamp re-signed
        dest = tmp_path / "installed"
        with pytest.raises(SignatureError) as err:
            e.client().fetch(dep, dest)
        _assert_refused(err, dest)


def test_targets_below_signature_threshold_are_refused(tmp_path: Path,
                                                       broker: Mosquitto) -> None:
    with env(tmp_path, broker, thresholds={"targets": 2}) as e:
        e.release()
        dep = e.deploy()
        assert e.client().fetch(dep, tmp_path / "ok").is_dir()  # 2 of 2 keys: accepted
        md = e.repo.load("targets")
        md.signed.version += 1
        _write(e.repo, md, e.repo.keys.signers("targets")[:1])
        e.repo.refresh()
        dest = tmp_path / "installed"
        with pytest.raises(SignatureError, match="1/2") as err:
            e.client().fetch(dep, dest)
        _assert_refused(err, dest)


def test_rollback_to_older_metadata_is_refused(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release(version="1.0")
        old_timestamp = (e.repo.meta / "timestamp.json").read_bytes()
        e.release(version="2.0", seed=1)
        dep = e.deploy(version="2.0")
        client = e.client()
        client.fetch(dep, tmp_path / "v2")
        (e.repo.meta / "timestamp.json").write_bytes(old_timestamp)
        dest = tmp_path / "installed"
        with pytest.raises(RollbackError) as err:
            e.client().fetch(dep, dest)
        _assert_refused(err, dest)


def test_expired_metadata_freeze_is_refused(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        dep = e.deploy()
        ts = e.repo.load("timestamp")
        ts.signed.version += 1
        ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        _write(e.repo, ts, e.repo.keys.signers("timestamp"))
        dest = tmp_path / "installed"
        with pytest.raises(ExpiredError, match="expired") as err:
            e.client().fetch(dep, dest)
        _assert_refused(err, dest)


def test_mix_and_match_of_snapshot_and_targets_is_refused(tmp_path: Path,
                                                          broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release(version="1.0")
        e.release(version="2.0", seed=1)
        dep = e.deploy(version="2.0")
        v = e.repo.load("targets").signed.version
        # Serve the older, validly signed targets under the name the snapshot names.
        (e.repo.meta / f"{v}.targets.json").write_bytes(
            (e.repo.meta / f"{v - 1}.targets.json").read_bytes())
        dest = tmp_path / "installed"
        with pytest.raises(MixAndMatchError) as err:
            e.client().fetch(dep, dest)
        _assert_refused(err, dest)


def test_deployment_naming_a_hash_the_repository_did_not_sign_is_refused(
        tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        dep = e.deploy()
        signer = e.repo.keys.signers("deployment")[0]
        forged = json.loads(sign_deployment(dep, [signer]))["signed"]
        forged["sha256"] = "0" * 64
        from edge_sdk.trust import Deployment

        doc = sign_deployment(Deployment.from_signed(forged), [signer])
        bad = verify_deployment(doc, e.key, device_id="d1")
        dest = tmp_path / "installed"
        with pytest.raises(TargetMismatchError) as err:
            e.client().fetch(bad, dest)
        _assert_refused(err, dest)


def test_replayed_deployment_with_old_counter_is_refused(tmp_path: Path,
                                                         broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release(version="1.0")
        e.release(version="2.0", seed=1)
        first = e.desired_payload_after(e.deploy, version="1.0")
        second = e.deploy(version="2.0")
        with pytest.raises(ReplayError, match="not newer"):
            verify_deployment(first, e.key, device_id="d1", last_counter=second.counter)
        with pytest.raises(ReplayError):
            e.receive_desired(last_counter=second.counter)


def test_unsigned_downgrade_is_refused_and_signed_rollback_accepted(
        tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release(version="1.0")
        e.release(version="2.0", seed=1)
        v2 = e.deploy(version="2.0")
        signer = e.repo.keys.signers("deployment")[0]
        rel1 = e.repo.find("m", "1.0")
        from dataclasses import replace

        down = replace(v2, version="1.0", target=rel1.path, sha256=rel1.sha256,
                       length=rel1.length, counter=v2.counter + 1)
        doc = sign_deployment(down, [signer])
        with pytest.raises(DowngradeError, match="--rollback"):
            verify_deployment(doc, e.key, device_id="d1", installed=("m", "2.0"),
                              last_counter=v2.counter)
        # Flipping the rollback flag without the key breaks the signature.
        tampered = json.loads(doc)
        tampered["signed"]["rollback"] = True
        with pytest.raises(DeploymentSignatureError):
            verify_deployment(json.dumps(tampered).encode(), e.key, device_id="d1",
                              installed=("m", "2.0"))
        signed_rb = sign_deployment(replace(down, rollback=True), [signer])
        ok = verify_deployment(signed_rb, e.key, device_id="d1", installed=("m", "2.0"),
                               last_counter=v2.counter)
        assert ok.rollback and ok.version == "1.0"
        assert e.client().fetch(ok, tmp_path / "rolled-back").is_dir()


def test_deployment_for_another_device_or_expired_is_refused(tmp_path: Path,
                                                             broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        e.release()
        dep = e.deploy()
        signer = e.repo.keys.signers("deployment")[0]
        doc = sign_deployment(dep, [signer])
        with pytest.raises(NotForThisDeviceError):
            verify_deployment(doc, e.key, device_id="d2", groups=["other"])
        with pytest.raises(NotForThisDeviceError):
            verify_deployment(doc, e.key, device_id="d1", fleet="prod")
        with pytest.raises(DeploymentExpiredError):
            verify_deployment(doc, e.key, device_id="d1",
                              now=dep.expires + timedelta(seconds=1))
        assert dep.fleet == FLEET
