"""Each attack is named after what it does and is stopped: refused with a clear
VerificationError subclass, and nothing installed. One table of attacks, each run over
both transports (tests/_trust_env.py): a real Mosquitto with misbehaving responders that
are real MQTT clients, and the in-memory repository simulator behind the real fetcher
interface. Real python-tuf metadata on both.

Tests on the simulator alone (a cut transfer resumed, a snapshot rolled back behind a
fresh timestamp, ...) are in test_trust_attacks_simulated.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from edge_sdk.errors import TransportError, VerificationError
from edge_sdk.transport import EndlessDataError, SlowRetrievalError
from edge_sdk.trust import (
    Deployment,
    DeploymentExpiredError,
    DeploymentSignatureError,
    DowngradeError,
    ExpiredError,
    MixAndMatchError,
    ModelTarget,
    NotForThisDeviceError,
    ReplayError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
    sign_deployment,
    verify_deployment,
)
from tests._trust_env import FAST, FLEET, TRANSPORTS, Env, SimEnv, attack_env

AttackEnv = Env | SimEnv


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


# -- the repository misbehaves on the wire ------------------------------------------------

def tampered_chunk(e: AttackEnv, tmp: Path) -> None:
    e.release(n=4000)
    dep = e.deploy()
    client = e.client(FAST)
    dest = tmp / "installed"
    with pytest.raises(TargetHashError) as err:
        client.fetch(dep, dest)
    _assert_refused(err, dest)
    assert list(client.partial_dir.iterdir()) == []  # the bad partial is not resumed


def endless_data(e: AttackEnv, tmp: Path) -> None:
    e.release(n=4000)
    dep = e.deploy()
    dest = tmp / "installed"
    with pytest.raises(EndlessDataError) as err:
        e.client(FAST).fetch(dep, dest)
    _assert_refused(err, dest)


def endless_metadata(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    client = e.client(FAST)
    dest = tmp / "installed"
    with pytest.raises(EndlessDataError, match=r"timestamp\.json") as err:
        client.fetch(dep, dest)
    _assert_refused(err, dest)
    assert client.stats.bytes_received < 64 * 1024


def slow_retrieval(e: AttackEnv, tmp: Path) -> None:
    e.release(n=4000)
    dep = e.deploy()
    dest = tmp / "installed"
    client = e.client(FAST)
    with pytest.raises(SlowRetrievalError) as err:
        client.fetch(dep, dest)
    _assert_transient(err, dest)
    assert "stall_timeout" in str(err.value)
    assert client.stats.timeouts >= 1 and client.stats.chunks_resent >= 1
    if isinstance(e, SimEnv):
        # The stall timeout on the virtual clock (plus one look at the timers), no more.
        assert FAST.stall_timeout <= e.sim.now < FAST.stall_timeout + 0.6


# -- the repository's metadata is forged, replayed or frozen --------------------------------

def targets_signed_by_wrong_key(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    md = e.repo.load("targets")
    evil = tmp / "evil.bin"
    evil.write_bytes(b"malware")
    md.signed.targets["m/1.0/model.onnx"] = TargetFile.from_file("m/1.0/model.onnx", str(evil))
    md.signed.version += 1
    e.put(md, [CryptoSigner.generate_ed25519()])
    e.resign_online(md)  # online keys compromised too: snapshot, timestamp re-signed
    dest = tmp / "installed"
    with pytest.raises(SignatureError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def targets_below_signature_threshold(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    assert e.client().fetch(dep, tmp / "ok").is_dir()  # 2 of 2 keys: accepted
    md = e.repo.load("targets")
    md.signed.version += 1
    e.put(md, e.repo.keys.signers("targets")[:1])
    e.resign_online(md)
    dest = tmp / "installed"
    with pytest.raises(SignatureError, match="1/2") as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def rollback_to_older_metadata(e: AttackEnv, tmp: Path) -> None:
    e.release(version="1.0")
    old_timestamp = e.served("metadata/timestamp.json")
    e.release(version="2.0", seed=1)
    dep = e.deploy(version="2.0")
    e.client().fetch(dep, tmp / "v2")
    e.serve_file("metadata/timestamp.json", old_timestamp)
    dest = tmp / "installed"
    with pytest.raises(RollbackError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def expired_metadata_freeze(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    ts = e.repo.load("timestamp")
    ts.signed.version += 1
    ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    e.put(ts, e.repo.keys.signers("timestamp"))
    dest = tmp / "installed"
    with pytest.raises(ExpiredError, match="expired") as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


def mix_and_match_of_snapshot_and_targets(e: AttackEnv, tmp: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    dep = e.deploy(version="2.0")
    v = e.repo.load("targets").signed.version
    # Serve the older, validly signed targets under the name the snapshot names.
    e.serve_file(f"metadata/{v}.targets.json", e.served(f"metadata/{v - 1}.targets.json"))
    dest = tmp / "installed"
    with pytest.raises(MixAndMatchError) as err:
        e.client().fetch(dep, dest)
    _assert_refused(err, dest)


# -- the deployment is forged, replayed or meant for someone else ---------------------------

def deployment_naming_a_hash_the_repository_did_not_sign(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    signer = e.repo.keys.signers("deployment")[0]
    forged = json.loads(sign_deployment(dep, [signer]))["signed"]
    forged["sha256"] = "0" * 64
    doc = sign_deployment(Deployment.from_signed(forged), [signer])
    bad = verify_deployment(doc, e.key, device_id="d1")
    dest = tmp / "installed"
    with pytest.raises(TargetMismatchError) as err:
        e.client().fetch(bad, dest)
    _assert_refused(err, dest)
    assert not any(p.startswith("targets/") for p in e.requested())  # no byte of it asked for


def replayed_deployment_with_old_counter(e: AttackEnv, tmp: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    first = e.desired_payload_after(e.deploy, version="1.0")
    second = e.deploy(version="2.0")
    with pytest.raises(ReplayError, match="not newer"):
        verify_deployment(first, e.key, device_id="d1", last_counter=second.counter)
    with pytest.raises(ReplayError):
        e.receive_desired(last_counter=second.counter)


def unsigned_downgrade_then_signed_rollback(e: AttackEnv, tmp: Path) -> None:
    e.release(version="1.0")
    e.release(version="2.0", seed=1)
    v2 = e.deploy(version="2.0")
    signer = e.repo.keys.signers("deployment")[0]
    rel1 = e.repo.find("m", "1.0")
    down = replace(v2, models=(ModelTarget("m", "1.0", rel1.path, rel1.sha256, rel1.length),),
                   counter=v2.counter + 1)
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
    assert e.client().fetch(ok, tmp / "rolled-back").is_dir()


def deployment_for_another_device_or_expired(e: AttackEnv, tmp: Path) -> None:
    e.release()
    dep = e.deploy()
    signer = e.repo.keys.signers("deployment")[0]
    doc = sign_deployment(dep, [signer])
    with pytest.raises(NotForThisDeviceError):
        verify_deployment(doc, e.key, device_id="d2", groups=["other"])
    with pytest.raises(NotForThisDeviceError):
        verify_deployment(doc, e.key, device_id="d1", fleet="prod")
    with pytest.raises(DeploymentExpiredError):
        verify_deployment(doc, e.key, device_id="d1", now=dep.expires + timedelta(seconds=1))
    assert dep.fleet == FLEET


@dataclass(frozen=True)
class Attack:
    run: Callable[[AttackEnv, Path], None]
    #: How the repository misbehaves on the wire (tests/_repository_simulator.misbehave);
    #: None: it serves honestly what the attack put in it.
    misbehave: str | None = None
    #: Signature thresholds of the repository's roles.
    thresholds: dict[str, int] | None = None


#: Every attack, by the behaviour that stops it; each runs over every transport.
ATTACKS = {
    "tampered_chunk_is_refused_and_nothing_installed":
        Attack(tampered_chunk, misbehave="tamper"),
    "endless_data_is_refused": Attack(endless_data, misbehave="endless"),
    "endless_metadata_is_refused_before_it_is_downloaded":
        Attack(endless_metadata, misbehave="endless-metadata"),
    "slow_retrieval_fails_once_nothing_arrives_for_the_stall_timeout":
        Attack(slow_retrieval, misbehave="silent"),
    "targets_signed_by_wrong_key_are_refused": Attack(targets_signed_by_wrong_key),
    "targets_below_signature_threshold_are_refused":
        Attack(targets_below_signature_threshold, thresholds={"targets": 2}),
    "rollback_to_older_metadata_is_refused": Attack(rollback_to_older_metadata),
    "expired_metadata_freeze_is_refused": Attack(expired_metadata_freeze),
    "mix_and_match_of_snapshot_and_targets_is_refused":
        Attack(mix_and_match_of_snapshot_and_targets),
    "deployment_naming_a_hash_the_repository_did_not_sign_is_refused":
        Attack(deployment_naming_a_hash_the_repository_did_not_sign),
    "replayed_deployment_with_old_counter_is_refused":
        Attack(replayed_deployment_with_old_counter),
    "unsigned_downgrade_is_refused_and_signed_rollback_accepted":
        Attack(unsigned_downgrade_then_signed_rollback),
    "deployment_for_another_device_or_expired_is_refused":
        Attack(deployment_for_another_device_or_expired),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", ATTACKS)
def test_attack(name: str, transport: str, tmp_path: Path,
                request: pytest.FixtureRequest) -> None:
    attack = ATTACKS[name]
    with attack_env(transport, tmp_path, lambda: request.getfixturevalue("broker"),
                    misbehave=attack.misbehave, thresholds=attack.thresholds) as e:
        attack.run(e, tmp_path)
