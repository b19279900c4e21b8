"""The example Mosquitto credentials/ACL: a device reads only its own topics and cannot
publish releases, announcements or deployments; each service role (responder, fleet, both)
and each operator has its own account with exactly what it needs; ``serve`` says in one
line what the broker refuses its role; the real flow still works."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.errors import TransportError
from edge_sdk.release import Repository, create_deployment, publish_deployment
from edge_sdk.transport import LastWill, MqttConfig, MqttConnection, RepoResponder, Topics
from edge_sdk.trust import UpdateClient, load_public_key, verify_deployment
from tests._acl import (
    EXAMPLE,
    FLEET,
    MONITOR,
    Collector,
    connect_as,
    example_broker,
    example_module,
)
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

    operator = connect_as(broker, creds, "edge-operator-1")
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
    operator = connect_as(broker, creds, "edge-operator-1")
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


# -- roles ------------------------------------------------------------------------------

B = f"edge/{FLEET}"
SERVICE = ("edge-serve", "edge-repo", "edge-fleet")
OPERATORS = ("edge-operator-1", "edge-operator-2")
#: (topic, write) pairs each role needs; what it is not given here, it must not have.
#: (What a role publishes retained, it also reads back: serve checks its access so.)
RESPONDER_NEEDS = {(f"{B}/dev/d1/repo/req", False), (f"{B}/dev/d1/repo/res", True),
                   (f"{B}/repo/announce", True), (f"{B}/repo/announce", False)}
FLEET_NEEDS = {(f"{B}/dev/d1/state", False), (f"{B}/dev/d1/events", False),
               (f"{B}/dev/d1/desired", True), (f"{B}/dev/d1/desired", False)}
OPERATOR_NEEDS = {(f"{B}/dev/d1/desired", True), (f"{B}/dev/d1/desired", False),
                  (f"{B}/grp/lobby/desired", True), (f"{B}/grp/lobby/desired", False),
                  (f"{B}/dev/d1/state", False), (f"{B}/dev/d1/events", False),
                  (f"{B}/repo/announce", False), (f"{B}/dev/d1/profile/req", True),
                  (f"{B}/dev/d1/profile/res", False), (f"{B}/dev/d1/samples/req", True),
                  (f"{B}/dev/d1/samples/res", False), (f"{B}/dev/d1/samples/get", True),
                  (f"{B}/dev/d1/samples/put", False)}
#: What the device d2 needs of its own topics.
DEVICE_NEEDS = {(f"{B}/dev/d2/state", True), (f"{B}/dev/d2/events", True),
                (f"{B}/dev/d2/desired", False), (f"{B}/dev/d2/repo/req", True),
                (f"{B}/dev/d2/repo/res", False), (f"{B}/dev/d2/profile/req", False),
                (f"{B}/dev/d2/profile/res", True), (f"{B}/repo/announce", False),
                (f"{B}/dev/d2/samples/req", False), (f"{B}/dev/d2/samples/get", False),
                (f"{B}/dev/d2/samples/res", True), (f"{B}/dev/d2/samples/put", True)}
#: Everything the roles above could be asked to do, on d1's topics (d2 is the device
#: checked), a group's, the fleet's, and the topics of devices named like the accounts.
ALL = {(t, w) for t in [f"{B}/dev/d1/{leaf}" for leaf in (
    "desired", "state", "events", "repo/req", "repo/res", "profile/req", "profile/res",
    "samples/req", "samples/res", "samples/get", "samples/put")]
    + [f"{B}/grp/lobby/desired", f"{B}/repo/announce"] for w in (False, True)}


class Roles:
    """Checks what one account may do, against :data:`MONITOR`, which may do anything."""

    def __init__(self, broker: Mosquitto, creds: dict[str, str]) -> None:
        self.broker, self.creds = broker, creds
        self.monitor = connect_as(broker, creds, MONITOR)
        self.n = 0

    def _token(self) -> bytes:
        self.n += 1
        return f"check-{self.n}".encode()

    def writes(self, conn: MqttConnection, topic: str) -> bool:
        """Whether a message ``conn`` publishes on ``topic`` reaches a reader there."""
        seen = Collector(self.monitor, topic)
        mine, marker = self._token(), self._token()
        try:
            conn.publish_wait(topic, mine)
            # The broker handled ``mine`` before it acknowledged it: had it passed it on,
            # it would be queued before this marker.
            self.monitor.publish_wait(topic, marker)
            return mine in seen.wait_for(lambda p: p == marker)
        finally:
            seen.sub.cancel()

    def reads(self, conn: MqttConnection, topic: str, marker_topic: str) -> bool:
        """Whether ``conn`` receives what is published on ``topic`` (``marker_topic``:
        one it may read, published on after it, so that waiting for it is enough)."""
        seen = Collector(conn, topic)
        mark = Collector(conn, marker_topic)
        mine, marker = self._token(), self._token()
        try:
            self.monitor.publish_wait(topic, mine)
            self.monitor.publish_wait(marker_topic, marker)
            mark.wait_for(lambda p: p == marker)
            return mine in seen.got
        finally:
            seen.sub.cancel()
            mark.sub.cancel()

    def can(self, user: str, marker_topic: str,
            checks: set[tuple[str, bool]]) -> set[tuple[str, bool]]:
        """The (topic, write) pairs of ``checks`` that ``user`` may do."""
        conn = connect_as(self.broker, self.creds, user)
        try:
            return {(t, w) for t, w in checks if (self.writes(conn, t) if w else
                                                  self.reads(conn, t, marker_topic))}
        finally:
            conn.close()


def test_each_role_and_operator_can_do_exactly_what_it_needs(tmp_path: Path) -> None:
    with example_broker(tmp_path, {"d1": ["lobby"], "d2": []}, monitor=True) as (b, creds):
        assert set(SERVICE) | set(OPERATORS) <= set(creds)
        roles = Roles(b, creds)
        try:
            own = {(f"{B}/dev/{u}/{leaf}", True) for u in (*SERVICE, *OPERATORS)
                   for leaf in ("state", "events", "repo/req")}
            every = ALL | own
            state = f"{B}/dev/d1/state"
            # The responder cannot publish deployments; the fleet controller can, and reads
            # reports; none of them, nor an operator, can pose as a device (not even the
            # one named like its account).
            assert roles.can("edge-repo", f"{B}/dev/d1/repo/req", every) == RESPONDER_NEEDS
            assert roles.can("edge-fleet", state, every) == FLEET_NEEDS
            assert roles.can("edge-serve", state, every) == RESPONDER_NEEDS | FLEET_NEEDS
            for op in OPERATORS:
                assert roles.can(op, state, every) == OPERATOR_NEEDS
            # A device: its own topics only, and none of the above.
            assert roles.can("d2", f"{B}/dev/d2/desired",
                             ALL | DEVICE_NEEDS | {(f"{B}/dev/_probe/state", True)}) \
                == DEVICE_NEEDS
        finally:
            roles.monitor.close()


def test_make_credentials_refuses_a_device_named_like_an_account(tmp_path: Path) -> None:
    mod = example_module()
    for devices, operators in (({"edge-fleet": []}, None), ({"alice": []}, ["alice"]),
                               ({}, ["bob", "bob"])):
        with pytest.raises(SystemExit, match="each user name once"):
            mod.generate(tmp_path / "auth", FLEET, devices, operators=operators)
    creds = mod.generate(tmp_path / "auth", FLEET, {"d1": []}, operators=["alice", "bob"],
                         responders=["edge-repo-a", "edge-repo-b"])
    assert {"alice", "bob", "edge-repo-a", "edge-repo-b", "edge-serve", "edge-fleet",
            "d1"} == set(creds)


ROOT = Path(__file__).resolve().parents[1]


class Cli:
    """``edge-sdk ARGS`` in its own process as ``user`` of the example ACL (the password
    in the environment, as the README advises), output in ``tmp/NAME.log``."""

    def __init__(self, broker: Mosquitto, creds: dict[str, str], tmp: Path, name: str,
                 user: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_MQTT_PASSWORD": creds[user]}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_sdk", *args, "--broker", broker.url, "--fleet",
                 FLEET, "--username", user], cwd=ROOT, stdout=out, stderr=out, env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while what not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < end, f"no {what!r} in: {self.text()}"
            time.sleep(0.05)
        return self.text()

    def finish(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        return self.text()


def refusals(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "the broker refuses user" in ln]


@pytest.mark.slow
def test_serve_with_a_user_lacking_what_its_part_needs_says_so_in_one_line(
        tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    with example_broker(tmp_path, {"d1": []}) as (broker, creds):
        cases = [
            # What the example config documented: a registry that saw nothing, silently.
            ("edge-repo", (), ["fleet part: read edge/lab/dev/+/state, read edge/lab/dev/"
                               "+/events, write edge/lab/dev/+/desired ("]),
            ("edge-fleet", ("--only", "responder"),
             ["responder part: read edge/lab/dev/+/repo/req, write edge/lab/dev/+/repo/res,"
              " write edge/lab/repo/announce ("]),
            ("d1", ("--only", "fleet"), ["fleet part: read edge/lab/dev/+/state, read edge/"
                                         "lab/dev/+/events, write edge/lab/dev/+/desired"]),
            ("edge-serve", (), []),
        ]
        for i, (user, only, says) in enumerate(cases):
            serve = Cli(broker, creds, tmp_path, f"serve-{i}", user, "serve", "--repo",
                        str(repo.path), *only)
            try:
                serve.wait_for("serving")
            finally:
                text = serve.stop()
            lines = refusals(text)
            assert len(lines) == len(says), text
            for line, said in zip(lines, says, strict=True):
                assert line.startswith(f"edge-sdk serve: the broker refuses user {user} ")
                assert said in line, line


@pytest.mark.slow
def test_split_serve_and_two_operators_at_once_keep_their_sessions(tmp_path: Path) -> None:
    """The README's setup: `serve --only fleet` and `serve --only responder` under their
    own users, two operators' commands at the same time, a device that reports and pulls.
    Nobody takes another one's broker session (the broker's log says so)."""
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    art = make_artifact(tmp_path / "arts", "m", "1.0")
    repo.add_artifact(art.path)
    topics = Topics(FLEET)
    with example_broker(tmp_path, {"d1": []}, log_connections=True) as (broker, creds):
        fleet = Cli(broker, creds, tmp_path, "fleet", "edge-fleet", "serve", "--repo",
                    str(repo.path), "--only", "fleet")
        responder = Cli(broker, creds, tmp_path, "responder", "edge-repo", "serve", "--repo",
                        str(repo.path), "--only", "responder")
        d1 = connect_as(broker, creds, "d1")
        try:
            fleet.wait_for("serving")
            responder.wait_for("serving")
            d1.publish_wait(topics.state("d1"), b'{"device": "d1", "online": true}',
                            retain=True)
            # Operator 2 deploys and waits for the device (it will not answer: exit 3),
            # operator 1 asks for the fleet's status meanwhile.
            deploy = Cli(broker, creds, tmp_path, "deploy", "edge-operator-2", "deploy",
                         "--repo", str(repo.path), "--device", "d1", "--model", "m",
                         "--wait", "--timeout", "4")
            deploy.wait_for("deployed")
            status = Cli(broker, creds, tmp_path, "status", "edge-operator-1", "status")
            assert status.finish() == 0, status.text()
            assert "d1" in status.text()
            assert deploy.finish() == 3 and "d1" in deploy.text()
            # The device reads the deployment and pulls through the responder.
            assert Collector(d1, topics.desired("d1")).wait_for(lambda p: True)
            d1.close()  # one connection per user: the pull below is the device now
            pull = Cli(broker, creds, tmp_path, "pull", "d1", "pull", "m", "--root",
                       str(repo.root_path), "--device", "d1", "-o", str(tmp_path / "got"))
            assert pull.finish() == 0, pull.text()
            assert (tmp_path / "got" / art.manifest.model).read_bytes() == \
                art.model_path.read_bytes()
        finally:
            d1.close()
            fleet_text, responder_text = fleet.stop(), responder.stop()
        assert refusals(fleet_text) == refusals(responder_text) == []
        assert "registry: 1 states" in fleet_text, fleet_text
        log = broker.log.read_text()
        for user in ("edge-fleet", "edge-repo", "edge-operator-1", "edge-operator-2"):
            assert log.count(f" as {user} (") == 1, user  # one session, never retaken
        assert "already connected" not in log


def test_a_second_connection_under_one_user_takes_the_session_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Why every operator and serve needs its own user under use_username_as_clientid:
    two clients of one user take the session from each other in turn."""
    with example_broker(tmp_path, {}, log_connections=True) as (broker, creds):
        first = connect_as(broker, creds, "edge-operator-1")
        second = connect_as(broker, creds, "edge-operator-1")
        try:
            end = time.monotonic() + 30
            while "closed the link within" not in caplog.text:
                assert time.monotonic() < end, caplog.text
                time.sleep(0.05)
        finally:
            first.close()
            second.close()
        assert "already connected" in broker.log.read_text()
        assert "as user edge-operator-1" in caplog.text


def test_every_cli_connection_has_its_own_client_id() -> None:
    config = MqttConfig(url="mqtt://127.0.0.1:1", fleet=FLEET)
    ids = {MqttConnection(config, name="edge-status").config.client_id for _ in range(20)}
    assert len(ids) == 20 and all(i.startswith("edge-status-") for i in ids)
    fixed = MqttConfig(url="mqtt://127.0.0.1:1", fleet=FLEET, client_id="mine")
    assert MqttConnection(fixed, name="edge-status").config.client_id == "mine"
