"""The example Mosquitto credentials/ACL: a device reads only its own topics and cannot
publish releases, announcements or deployments, while the real flow still works."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.errors import TransportError
from edge_sdk.release import Repository, create_deployment, publish_deployment
from edge_sdk.transport import LastWill, MqttConfig, MqttConnection, RepoResponder, Topics
from edge_sdk.trust import UpdateClient, load_public_key, verify_deployment
from tests._acl import EXAMPLE, FLEET, Collector, connect_as, example_broker, example_module
from tests._broker import Mosquitto
from tests._trust_env import make_artifact


@pytest.fixture()
def acl_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    with example_broker(tmp_path, {"d1": ["lobby"], "d2": []}) as b:
        yield b


def test_device_credentials_cannot_read_or_forge_other_devices_topics(
        tmp_path: Path, acl_broker: tuple[Mosquitto, dict[str, str]]) -> None:
    broker, creds = acl_broker
    topics = Topics(FLEET)
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    repo.add_artifact(art.path)

    with pytest.raises(TransportError, match="refused the connection"):
        MqttConnection(MqttConfig(url=broker.url, fleet=FLEET, username="d1",
                                  password="wrong"), name="bad").connect(timeout=5)

    operator = connect_as(broker, creds, "edge-operator")
    serve = connect_as(broker, creds, "edge-repo")
    d1, d2 = connect_as(broker, creds, "d1"), connect_as(broker, creds, "d2")
    responder = RepoResponder(serve, repo.path)
    try:
        responder.start()
        signed = create_deployment(repo, model="m", fleet=FLEET, devices=["d1"])
        publish_deployment(operator, signed)

        # d2 may not read d1's deployment (retained) nor d1's chunk responses (live).
        # Mosquitto grants the SUBSCRIBE and filters on delivery, so each check uses a
        # marker on d2's own topic, sent after the forbidden message: once the marker
        # arrives, the forbidden one would have arrived before it.
        publish_deployment(operator, create_deployment(repo, model="m", fleet=FLEET,
                                                       devices=["d2"]))
        spy = Collector(d2, topics.desired("d1"))
        own = Collector(d2, topics.desired("d2"))
        own.wait_for(lambda p: b'"d2"' in p)
        assert spy.got == []
        spy_res = Collector(d2, topics.repo_response("d1"))
        own_res = Collector(d2, topics.repo_response("d2"))
        serve.publish_wait(topics.repo_response("d1"), b"secret chunk")
        serve.publish_wait(topics.repo_response("d2"), b"marker")
        own_res.wait_for(lambda p: p == b"marker")
        assert spy_res.got == []

        # d2 may not publish deployments, announcements or chunk responses: the broker
        # acknowledges and drops them.
        d2.publish_wait(topics.desired("d1"), b"forged", retain=True)
        d2.publish_wait(topics.announce, b"forged", retain=True)
        d2.publish_wait(topics.repo_response("d1"), b"forged")
        res = Collector(d1, topics.repo_response("d1"))
        serve.publish_wait(topics.repo_response("d1"), b"marker")
        assert res.wait_for(lambda p: p == b"marker") == [b"marker"]
        desired = Collector(d1, topics.desired("d1"))
        assert desired.wait_for(lambda p: True) == [signed.document]
        announce = Collector(operator, topics.announce)
        assert b"forged" not in announce.wait_for(lambda p: True)

        # The legitimate flow works under the same ACL (shared subscription included).
        dep = verify_deployment(signed.document, load_public_key(repo.deployment_key_path),
                                device_id="d1", fleet=FLEET)
        client = UpdateClient(trusted_root=repo.root_path.read_bytes(),
                              metadata_dir=tmp_path / "d1" / "tuf",
                              partial_dir=tmp_path / "d1" / "part", connection=d1,
                              device_id="d1")
        path = client.fetch(dep, tmp_path / "d1" / "model")
        assert edge_sdk.Artifact.from_dir(path).manifest.sha256 == art.manifest.sha256
        # d1 reads its group's deployments; d2 is not in that group.
        group = create_deployment(repo, model="m", fleet=FLEET, groups=["lobby"])
        publish_deployment(operator, group)
        assert Collector(d1, topics.group_desired("lobby")).wait_for(
            lambda p: True) == [group.document]
        spy_group = Collector(d2, topics.group_desired("lobby"))
        Collector(d2, topics.desired("d2")).wait_for(lambda p: True)
        assert spy_group.got == []
    finally:
        responder.stop()
        for c in (operator, serve, d1, d2):
            c.close()


def test_device_claiming_another_devices_client_id_cannot_disconnect_it(
        acl_broker: tuple[Mosquitto, dict[str, str]]) -> None:
    broker, creds = acl_broker
    topics = Topics(FLEET)
    operator = connect_as(broker, creds, "edge-operator")
    states = Collector(operator, topics.state("d2"))
    # d2 as the agent connects: an "offline" last will on its retained state topic.
    will = LastWill(topics.state("d2"), b'{"device": "d2", "online": false}')
    d2 = connect_as(broker, creds, "d2", client_id="agent-d2", last_will=will)
    links: list[bool] = []
    d2.add_connection_listener(links.append)
    try:
        d2.publish_wait(topics.state("d2"), b"online", retain=True)
        states.wait_for(lambda p: p == b"online")
        # Both ids an attacker would guess: the agents' old default and the user name.
        for i, claimed in enumerate(["agent-d2", "d2"] * 5):
            intruder = connect_as(broker, creds, "d1", client_id=claimed)
            try:
                assert intruder.connected
            finally:
                intruder.close()
            # A marker from d2 after the intruder came and went: had the broker
            # dropped d2, its will would have reached the operator before it.
            marker = f"still here {i}".encode()
            d2.publish_wait(topics.state("d2"), marker, retain=True)
            states.wait_for(lambda p: p == marker)  # noqa: B023 (called right here)
        assert links == [] and d2.connected
        assert not any(b'"online": false' in p for p in states.got)
    finally:
        d2.close()
        operator.close()


def test_agent_client_id_defaults_to_its_user_name() -> None:
    from device_agent._config import BrokerConfig

    assert BrokerConfig(username="cam-1").client_id_for("cam-1") == "cam-1"
    assert BrokerConfig(url="mqtt://cam-2:pw@broker:1883").client_id_for("x") == "cam-2"
    assert BrokerConfig().client_id_for("cam-3") == "agent-cam-3"
    assert BrokerConfig(username="u", client_id="fixed").client_id_for("d") == "fixed"


def test_credentials_made_as_root_can_be_read_by_the_broker_it_drops_to(
        tmp_path: Path) -> None:
    mod = example_module()
    helptext = subprocess.run([sys.executable, str(EXAMPLE / "make_credentials.py"), "--help"],
                              capture_output=True, text=True, check=True).stdout
    assert "use_username_as_clientid" in helptext and "mosquitto" in helptext
    account = mod.broker_user()
    if account is None:  # not root, or no mosquitto account: the files stay ours
        mod.generate(tmp_path / "auth", FLEET, {"d1": []})
        for name in ("passwd", "acl"):
            st = (tmp_path / "auth" / name).stat()
            assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
        return
    # Outside pytest's temporary directories (mode 0700, which the broker's user
    # cannot enter), as /etc/mosquitto would be.
    base = Path(tempfile.mkdtemp(prefix="edge-acl-"))
    try:
        os.chmod(base, 0o755)
        auth = base / "auth"
        creds = mod.generate(auth, FLEET, {"d1": []})
        for name in ("passwd", "acl"):
            st = (auth / name).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, 0o600)
        assert (auth / "credentials.json").stat().st_uid == 0
        os.chmod(auth, 0o755)
        conf = f"password_file {auth / 'passwd'}\nacl_file {auth / 'acl'}\n"
        with Mosquitto(base / "broker", allow_anonymous=False, extra_conf=conf,
                       run_as=account.pw_name) as broker:
            connect_as(broker, creds, "d1").close()
            with pytest.raises(TransportError, match="refused the connection"):
                MqttConnection(MqttConfig(url=broker.url, username="d1", password="wrong"),
                               name="bad").connect(timeout=5)
        # What happened before: a root-owned 0600 password file stops the broker.
        os.chown(auth / "passwd", 0, 0)
        stopped = Mosquitto(base / "broker2", allow_anonymous=False, extra_conf=conf,
                            run_as=account.pw_name)
        try:
            with pytest.raises(RuntimeError, match="exited at start"):
                stopped.start()
        finally:
            stopped.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
