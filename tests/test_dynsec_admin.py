"""DynsecAdmin against a real Mosquitto with the dynamic security plugin: what each kind of
account may do, and that disabling, deleting or re-keying an account closes its connection.

"Nothing arrived" is never waited for: after a refused publish the same client publishes
a sentinel it may publish, and the monitor's single subscription receives a client's
messages in order, so once the sentinel is in, anything before it would be too.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.fleet._dynsec import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    BrokerAdminError,
    DynsecAdmin,
    broker_user,
)
from edge_sdk.identity import claim_username
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from edge_sdk.transport._access import permissions, refused_permissions
from tests._broker import Mosquitto
from tests._dynsec import FLEET, MONITOR, connect_as, dynsec_admin, dynsec_broker

T = Topics(FLEET)
BASE = T.base


class Inbox:
    """Every message one connection receives, in order, on any of its subscriptions."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.got.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, topic: str, payload: bytes, timeout: float = 10) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: (topic, payload) in self.got, timeout), \
                f"{topic} {payload!r} never arrived; got {self.got}"

    def topics(self) -> set[str]:
        with self.cond:
            return {t for t, _ in self.got}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    with dynsec_broker(tmp_path_factory.mktemp("dynsec")) as b:
        yield b


@pytest.fixture
def admin(broker: tuple[Mosquitto, dict[str, str]]) -> Iterator[DynsecAdmin]:
    b, creds = broker
    with dynsec_admin(b, creds) as a:
        yield a


@pytest.fixture
def monitor(broker: tuple[Mosquitto, dict[str, str]]) -> Iterator[tuple[MqttConnection, Inbox]]:
    b, creds = broker
    conn = connect_as(b, creds, MONITOR)
    inbox = Inbox()
    conn.subscribe(f"{BASE}/#", inbox)
    yield conn, inbox
    conn.close()


def _gone(conn: MqttConnection, timeout: float = 10) -> float:
    """Seconds until ``conn`` lost its link (fails after ``timeout``)."""
    start = time.monotonic()
    while conn.connected:
        assert time.monotonic() - start < timeout, "the broker kept the connection open"
        time.sleep(0.02)
    return time.monotonic() - start


def _refused(broker: Mosquitto, user: str, password: str) -> str:
    with pytest.raises(TransportError, match="refused") as info:
        connect_as(broker, {user: password}, user, connect_timeout=5)
    return str(info.value)


def test_device_account_reaches_exactly_its_own_topics(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin,
        monitor: tuple[MqttConnection, Inbox]) -> None:
    b, _ = broker
    admin.ensure_device("cam-1", "pw-cam-1", ["lobby"])
    admin.ensure_device("cam-2", "pw-cam-2", ["door"])
    mon, seen = monitor
    dev = connect_as(b, {"cam-1": "pw-cam-1"}, "cam-1")
    try:
        inbox = Inbox()
        reads = [T.desired("cam-1"), T.repo_response("cam-1"), T.profile_request("cam-1"),
                 f"{BASE}/dev/cam-1/cred/res", T.announce, T.group_desired("lobby"),
                 T.samples_request("cam-1"), T.samples_get("cam-1")]
        for topic in reads:
            dev.subscribe(topic, inbox)
        for topic in reads:
            mon.publish_wait(topic, b"for cam-1")
            inbox.wait_for(topic, b"for cam-1")
        writes = [T.repo_request("cam-1"), T.state("cam-1"), T.events("cam-1"),
                  T.profile_result("cam-1"), f"{BASE}/dev/cam-1/cred/req",
                  T.samples_status("cam-1"), T.samples_put("cam-1")]
        for topic in writes:
            dev.publish_wait(topic, b"from cam-1")
            seen.wait_for(topic, b"from cam-1")

        others = [T.desired("cam-2"), T.state("cam-2"), T.repo_request("cam-2"),
                  T.repo_response("cam-2"), f"{BASE}/dev/cam-2/cred/req",
                  f"{BASE}/dev/cam-2/cred/res", T.group_desired("door"), T.announce,
                  T.desired("cam-1"), T.repo_response("cam-1"), f"{BASE}/enrol/b/cam-2/req",
                  T.samples_request("cam-2"), T.samples_get("cam-2"),
                  T.samples_put("cam-2"), T.samples_status("cam-2")]
        for topic in [*others, f"{BASE}/#", "#", T.group_desired("door"),
                      T.state("cam-2")]:
            if topic in reads:
                continue
            with pytest.raises(TransportError, match="refused the subscription"):
                dev.subscribe(topic, inbox)
        for topic in others:
            dev.publish_wait(topic, b"forged by cam-1")
        dev.publish_wait(T.events("cam-1"), b"sentinel")
        seen.wait_for(T.events("cam-1"), b"sentinel")
        assert not [t for t, p in seen.got if p == b"forged by cam-1"]
        # Only the group it is in: cam-2's group never reaches it.
        mon.publish_wait(T.group_desired("door"), b"for door")
        mon.publish_wait(T.desired("cam-1"), b"sentinel")
        inbox.wait_for(T.desired("cam-1"), b"sentinel")
        assert T.group_desired("door") not in inbox.topics()
    finally:
        dev.close()


def test_disabling_a_device_closes_its_connection_and_refuses_the_next(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    b, _ = broker
    admin.ensure_device("cam-dis", "pw-dis")
    dev = connect_as(b, {"cam-dis": "pw-dis"}, "cam-dis")
    try:
        admin.disable("cam-dis")
        assert _gone(dev) < 10
    finally:
        dev.close()
    _refused(b, "cam-dis", "pw-dis")
    admin.enable("cam-dis")
    connect_as(b, {"cam-dis": "pw-dis"}, "cam-dis").close()


def test_deleting_a_device_closes_its_connection_and_refuses_the_next(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    b, _ = broker
    admin.ensure_device("cam-del", "pw-del", ["lobby"])
    dev = connect_as(b, {"cam-del": "pw-del"}, "cam-del")
    try:
        admin.delete_device("cam-del")
        assert _gone(dev) < 10
    finally:
        dev.close()
    _refused(b, "cam-del", "pw-del")
    assert "cam-del" not in admin.clients()
    admin.delete_device("cam-del")  # already gone: fine
    # Its role went with it: a device re-enrolled under the id starts clean.
    assert admin.client("cam-del") is None


def test_new_password_closes_the_connection_and_only_it_works(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    b, _ = broker
    admin.ensure_device("cam-pw", "old-password")
    dev = connect_as(b, {"cam-pw": "old-password"}, "cam-pw")
    try:
        admin.set_password("cam-pw", "new-password")
        assert _gone(dev) < 10
    finally:
        dev.close()
    _refused(b, "cam-pw", "old-password")
    connect_as(b, {"cam-pw": "new-password"}, "cam-pw").close()


def test_ensure_device_again_reissues_the_password_and_replaces_the_groups(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin,
        monitor: tuple[MqttConnection, Inbox]) -> None:
    b, _ = broker
    mon, _ = monitor
    admin.ensure_device("cam-re", "first", ["lobby"])
    admin.disable("cam-re")
    admin.ensure_device("cam-re", "second", ["door"])  # re-issued: enabled again
    _refused(b, "cam-re", "first")
    dev = connect_as(b, {"cam-re": "second"}, "cam-re")
    try:
        inbox = Inbox()
        dev.subscribe(T.group_desired("door"), inbox)
        with pytest.raises(TransportError, match="refused the subscription"):
            dev.subscribe(T.group_desired("lobby"), inbox)
        # New roles close the connection too (dynsec does not revoke subscriptions).
        admin.set_groups("cam-re", ["lobby"])
        assert _gone(dev) < 10
    finally:
        dev.close()
    dev = connect_as(b, {"cam-re": "second"}, "cam-re")
    try:
        inbox = Inbox()
        dev.subscribe(T.group_desired("lobby"), inbox)
        with pytest.raises(TransportError, match="refused the subscription"):
            dev.subscribe(T.group_desired("door"), inbox)
        mon.publish_wait(T.group_desired("lobby"), b"lobby")
        inbox.wait_for(T.group_desired("lobby"), b"lobby")
    finally:
        dev.close()


@pytest.mark.parametrize("name", ["edge-serve", "edge-operator-1", MONITOR])
def test_a_device_id_naming_another_account_is_refused(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin, name: str) -> None:
    b, creds = broker
    with pytest.raises(BrokerAdminError, match="not a device"):
        admin.ensure_device(name, "taken-over")
    for act in (admin.disable, admin.delete_device, admin.enable):
        with pytest.raises(BrokerAdminError, match="not a device"):
            act(name)
    with pytest.raises(BrokerAdminError, match="not a device"):
        admin.set_password(name, "taken-over")
    with pytest.raises(BrokerAdminError, match="not a device"):
        admin.set_groups(name, ["lobby"])
    connect_as(b, creds, name).close()  # untouched
    _refused(b, name, "taken-over")


def test_a_claim_account_cannot_be_handled_as_a_device_nor_a_device_as_a_claim(
        admin: DynsecAdmin) -> None:
    admin.ensure_claim("b-kind", "claim-pw")
    admin.ensure_device("b-kind-dev", "dev-pw")
    with pytest.raises(ConfigError, match="device id"):
        admin.ensure_device("_claim-b-kind", "x")
    admin.delete_claim("b-kind")
    admin.delete_claim("b-kind")  # already gone: fine
    assert "_claim-b-kind" not in admin.clients()


def test_a_claim_is_n_accounts_with_one_password_and_each_keeps_its_own_session(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    b, _ = broker
    admin.ensure_claim("b-n", "pw-1", 4)
    names = [claim_username("b-n", k) for k in range(4)]
    assert [n for n in admin.clients() if n.endswith("-b-n")] == sorted(names)
    conns = [connect_as(b, {n: "pw-1"}, n) for n in names]
    try:
        drops: list[bool] = []
        for c in conns:
            c.add_connection_listener(drops.append)
        # Another device on session 2 takes only session 2's connection.
        connect_as(b, {names[2]: "pw-1"}, names[2]).close()
        _gone(conns[2])
        assert [c.connected for c in conns] == [True, True, False, True]
        # Re-created with fewer sessions and a new password: the extra accounts go (the
        # old password must not keep working on them); the rest take the new one.
        admin.ensure_claim("b-n", "pw-2", 2)
        assert [n for n in admin.clients() if n.endswith("-b-n")] == sorted(names[:2])
        _refused(b, names[3], "pw-1")
        _refused(b, names[1], "pw-1")
        connect_as(b, {names[1]: "pw-2"}, names[1]).close()
        admin.delete_claim("b-n")
        assert [n for n in admin.clients() if n.endswith("-b-n")] == []
        _refused(b, names[0], "pw-2")
    finally:
        for c in conns:
            c.close()


def test_a_claim_session_name_held_by_another_account_is_refused(
        admin: DynsecAdmin) -> None:
    admin.call([{"command": "createClient", "username": "_claim3-b-odd", "password": "x"}],
               tolerate=("Client already exists",))
    try:
        with pytest.raises(BrokerAdminError, match=r"_claim3-b-odd.*not a claim account"):
            admin.ensure_claim("b-odd", "pw", 4)
        with pytest.raises(BrokerAdminError, match="not a claim account"):
            admin.delete_claim("b-odd")
    finally:
        admin.call([{"command": "deleteClient", "username": "_claim3-b-odd"}])
    assert "_claim3-b-odd" in [claim_username("b-odd", 3)]


def test_concurrent_admins_on_one_connection_get_their_own_answers(
        broker: tuple[Mosquitto, dict[str, str]]) -> None:
    b, creds = broker
    conn = connect_as(b, creds, "edge-fleet")
    try:
        admins = [DynsecAdmin(conn, fleet=FLEET) for _ in range(4)]
        errors: list[BaseException] = []

        def work(i: int, a: DynsecAdmin) -> None:
            try:
                for j in range(10):
                    dev = f"cc-{i}-{j}"
                    a.ensure_device(dev, "pw", [f"g{i}"])
                    client = a.client(dev)
                    assert client is not None and client["username"] == dev
                    # All at once on one new id: whoever creates it second updates it.
                    a.ensure_device(f"cc-same-{j}", f"pw-{i}", ["g"])
            except BaseException as err:  # handed to the test thread
                errors.append(err)

        threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(admins)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    finally:
        conn.close()


def test_garbage_on_the_answer_topic_leaves_the_admin_working(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    b, creds = broker
    other = connect_as(b, creds, "edge-fleet")  # also a dynsec admin: may publish there
    try:
        for junk in [b"[" * 100_000, b"\xff\xfe", b"{}", b'{"responses": 5}',
                     b'{"responses": [1, {"correlationData": 7}, '
                     b'{"correlationData": "x.99999"}]}']:
            other.publish_wait(RESPONSE_TOPIC, junk)
        assert "edge-serve" in admin.clients()
    finally:
        other.close()


def test_a_broker_without_dynsec_is_named_in_one_line(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "plain") as b:
        conn = MqttConnection(MqttConfig(url=b.url, fleet=FLEET))
        conn.connect()
        try:
            admin = DynsecAdmin(conn, fleet=FLEET, timeout=0.5)
            with pytest.raises(BrokerAdminError, match="did not answer listClients"):
                admin.clients()
        finally:
            conn.close()


def test_an_account_without_dynsec_rights_cannot_administer(
        broker: tuple[Mosquitto, dict[str, str]]) -> None:
    b, creds = broker
    conn = connect_as(b, creds, "edge-operator-1")
    try:
        with pytest.raises(BrokerAdminError, match="cannot read dynsec's answers"):
            DynsecAdmin(conn, fleet=FLEET)
        conn.publish_wait(CONTROL_TOPIC, b'{"commands": [{"command": "createClient", '
                                         b'"username": "evil", "password": "evil"}]}')
    finally:
        conn.close()
    with dynsec_admin(b, creds) as admin:
        assert "evil" not in admin.clients()


def _every_topic(batch: str, other_batch: str) -> list[str]:
    """Every topic of the protocol for a device, a group, the repository, probes, another
    batch's enrolment and its own batch's answers (the controller's to write)."""
    dev = T.device("cam-1")
    return [
        T.desired("cam-1"), T.state("cam-1"), T.events("cam-1"), T.repo_request("cam-1"),
        T.repo_response("cam-1"), T.profile_request("cam-1"), T.profile_result("cam-1"),
        f"{dev}/cred/req", f"{dev}/cred/res", T.group_desired("lobby"), T.announce,
        T.share_probe("p1"), f"{BASE}/dev/_probe/state", f"{BASE}/dev/_probe/repo/req",
        f"{BASE}/enrol/{other_batch}/cam-9/req", f"{BASE}/enrol/{other_batch}/cam-9/res",
        f"{BASE}/enrol/{batch}/cam-9/res", f"{BASE}/enrol/{batch}/cam-9",
        f"{BASE}/enrol/{batch}/cam-9/req/x", f"{BASE}/enrol/{batch}", "edge/other/dev/x/state",
        "$SYS/broker/uptime",
    ]


@pytest.mark.parametrize("session", [0, 5])
def test_claim_account_tries_every_other_topic_and_reaches_none(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin,
        monitor: tuple[MqttConnection, Inbox], session: int) -> None:
    b, creds = broker
    mon, seen = monitor
    admin.ensure_device("cam-1", "pw-cam-1", ["lobby"])
    admin.ensure_claim("b1", "claim-b1", 8)
    admin.ensure_claim("b2", "claim-b2", 8)
    user = claim_username("b1", session)
    topics = _every_topic("b1", "b2")
    # Retained bait everywhere the monitor may write, before the claim subscribes.
    for topic in topics:
        if topic.startswith(BASE) and "/enrol/b1/" not in topic:
            mon.publish_wait(topic, b"retained bait", retain=True)
    dev = connect_as(b, {"cam-1": "pw-cam-1"}, "cam-1")
    drops: list[bool] = []
    dev.add_connection_listener(drops.append)
    # Its client id is the device's: with use_username_as_clientid it takes no session.
    claim = connect_as(b, {user: "claim-b1"}, user, client_id=dev.config.client_id)
    try:
        got = Inbox()
        claim.subscribe(f"{BASE}/enrol/b1/+/res", got)
        filters = ["#", "edge/#", f"{BASE}/#", "$SYS/#", "$CONTROL/#", "+/#", "+/+/#",
                   "$CONTROL/dynamic-security/v1/response", "$share/g/#",
                   f"$share/g/{BASE}/enrol/b1/+/res", f"{BASE}/enrol/+/+/res",
                   f"{BASE}/enrol/b1/+/req", f"{BASE}/enrol/b1/#", f"{BASE}/enrol/b2/+/res",
                   f"{BASE}/dev/+/desired", f"{BASE}/grp/+/desired",
                   *(t for t in topics if "/enrol/b1/cam-9/res" not in t)]
        for flt in filters:
            with pytest.raises(TransportError, match="refused the subscription"):
                claim.subscribe(flt, got)
        for topic in [*topics, CONTROL_TOPIC, RESPONSE_TOPIC]:
            claim.publish_wait(topic, b"forged by the claim")
        claim.publish_wait(CONTROL_TOPIC, b'{"commands": [{"command": "createClient", '
                                          b'"username": "evil", "password": "evil"}, '
                                          b'{"command": "deleteClient", '
                                          b'"username": "cam-1"}]}')
        claim.publish_wait(f"{BASE}/enrol/b1/cam-9/req", b"sentinel")
        seen.wait_for(f"{BASE}/enrol/b1/cam-9/req", b"sentinel")
        assert [t for t, p in seen.got if p == b"forged by the claim"] == []

        # The controller answers in both batches and a device is told its deployment.
        serve = connect_as(b, creds, "edge-fleet")
        try:
            serve.publish_wait(f"{BASE}/enrol/b2/cam-9/res", b"answer for b2")
            serve.publish_wait(T.desired("cam-1"), b"deployment")
            serve.publish_wait(f"{BASE}/enrol/b1/cam-9/res", b"answer for b1")
        finally:
            serve.close()
        got.wait_for(f"{BASE}/enrol/b1/cam-9/res", b"answer for b1")
        assert [p for _, p in got.got] == [b"answer for b1"]

        clients = admin.clients()
        assert "evil" not in clients and "cam-1" in clients
        dev.publish_wait(T.state("cam-1"), b"still here")
        seen.wait_for(T.state("cam-1"), b"still here")
        assert False not in drops, "the claim account took the device's session"
    finally:
        claim.close()
        dev.close()
        for topic in topics:
            if topic.startswith(BASE) and "/enrol/b1/" not in topic:
                mon.publish_wait(topic, b"", retain=True)


def test_broker_init_writes_a_config_mosquitto_starts_with(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           ) -> None:
    out = tmp_path / "broker-conf"
    rc = main(["broker", "init", str(out), "--fleet", "lab", "--operator", "alice",
               "--responder", "repo-a", "--responder", "repo-b"])
    assert rc == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}/dynamic-security.json")
    creds = json.loads((out / "credentials.json").read_text())
    assert set(creds) == {"edge-serve", "edge-fleet", "repo-a", "repo-b", "alice"}
    assert stat.S_IMODE((out / "credentials.json").stat().st_mode) == 0o600
    assert not any(pw in said for pw in creds.values())
    account = broker_user()
    if account is not None:  # run as root: the broker's user rewrites the plugin's file
        assert (out / "dynamic-security.json").stat().st_uid == account.pw_uid
        assert out.stat().st_uid == account.pw_uid
        assert (out / "credentials.json").stat().st_uid == 0
    # The written config's own lines (not its TLS listener: no certificates here).
    keep = ("plugin", "plugin_opt_config_file", "use_username_as_clientid", "max_packet_size",
            "max_qos", "set_tcp_nodelay")
    lines = (out / "mosquitto.conf").read_text().splitlines()
    conf = "".join(f"{ln}\n" for ln in lines if ln.split(" ")[0] in keep)
    with Mosquitto(tmp_path / "run", allow_anonymous=False, extra_conf=conf) as b:
        with dynsec_admin(b, creds, user="edge-fleet") as admin:
            assert set(admin.clients()) == set(creds)
            admin.ensure_device("cam-1", "pw")  # the broker writes its file back
        connect_as(b, creds, "alice").close()
        _refused(b, "alice", "not-the-password")
    assert "cam-1" in (out / "dynamic-security.json").read_text()


def test_broker_init_keeps_an_existing_config_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "conf"
    assert main(["broker", "init", str(out), "--fleet", "lab"]) == 0
    before = (out / "dynamic-security.json").read_bytes()
    capsys.readouterr()
    assert main(["broker", "init", str(out), "--fleet", "lab"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert (out / "dynamic-security.json").read_bytes() == before
    assert main(["broker", "init", str(out), "--fleet", "lab", "--force"]) == 0
    assert (out / "dynamic-security.json").read_bytes() != before


@pytest.mark.parametrize("args", [["--fleet", "a/b"], ["--fleet", "lab", "--operator", "x#"],
                                  ["--fleet", "lab", "--operator", "edge-serve"]])
def test_broker_init_refuses_bad_names_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert main(["broker", "init", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-sdk: error: ") and err.count("\n") == 1
    assert not (tmp_path / "c" / "dynamic-security.json").exists()


def test_broker_init_config_opens_only_the_listener_it_names(tmp_path: Path) -> None:
    out = tmp_path / "conf"
    assert main(["broker", "init", str(out), "--fleet", "lab"]) == 0
    creds = json.loads((out / "credentials.json").read_text())
    b = Mosquitto(tmp_path / "run", allow_anonymous=False)
    text = (out / "mosquitto.conf").read_text()
    assert "listener 8883\n" in text
    # As written, but on our port, without certificates, persisting in our directory.
    text = "".join(f"{ln}\n" for ln in text.replace("listener 8883", f"listener {b.port} "
                                                    "127.0.0.1").splitlines()
                   if ln.split(" ")[0] not in ("cafile", "certfile", "keyfile",
                                               "persistence_location"))
    me = pwd.getpwuid(os.geteuid()).pw_name
    b.conf.write_text(text + f"persistence_location {b.workdir}/\nuser {me}\n"
                      f"log_dest file {b.log}\nlog_type all\n")
    with b, dynsec_admin(b, creds) as admin:
        assert "edge-serve" in admin.clients()
    opened = [ln for ln in b.log.read_text().splitlines() if "listen socket on port" in ln]
    assert opened and all(ln.endswith(f"port {b.port}.") for ln in opened), opened


def test_a_device_role_left_with_other_acls_gets_todays(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin,
        monitor: tuple[MqttConnection, Inbox]) -> None:
    b, _ = broker
    _, seen = monitor
    admin.call([{"command": "createRole", "rolename": "dev:cam-stale", "acls": [
        {"acltype": "publishClientSend", "topic": f"{BASE}/dev/cam-other/state",
         "priority": 0, "allow": True}]}])
    admin.ensure_device("cam-stale", "pw")
    dev = connect_as(b, {"cam-stale": "pw"}, "cam-stale")
    try:
        dev.publish_wait(T.state("cam-other"), b"forged")
        dev.publish_wait(T.state("cam-stale"), b"sentinel")
        seen.wait_for(T.state("cam-stale"), b"sentinel")
        assert (T.state("cam-other"), b"forged") not in seen.got
    finally:
        dev.close()


def test_clients_lists_every_account_a_page_at_a_time(
        broker: tuple[Mosquitto, dict[str, str]]) -> None:
    b, creds = broker
    with dynsec_admin(b, creds) as whole:
        everyone = whole.clients()
        conn = connect_as(b, creds, "edge-fleet")
        try:
            for page in (1, 2, 3, len(everyone), len(everyone) + 1):
                assert DynsecAdmin(conn, fleet=FLEET, list_page=page).clients() == everyone
        finally:
            conn.close()
    assert {"edge-serve", "edge-fleet", MONITOR} <= set(everyone)


@pytest.mark.parametrize(("user", "parts"), [("edge-serve", ("responder", "fleet")),
                                             ("edge-fleet", ("fleet",)),
                                             ("edge-repo", ("responder",))])
def test_service_accounts_pass_serves_access_check(
        broker: tuple[Mosquitto, dict[str, str]], user: str, parts: tuple[str, ...]) -> None:
    b, creds = broker
    conn = connect_as(b, creds, user)
    try:
        needs = [p for part in parts for p in permissions(part, T, announcement=b"{}")]
        assert refused_permissions(conn, needs) == []
    finally:
        conn.close()


@pytest.mark.parametrize("user", ["edge-serve", "edge-fleet"])
def test_the_enrolling_accounts_read_requests_and_write_answers(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin, user: str) -> None:
    b, creds = broker
    admin.ensure_claim("b-svc", "claim-pw")
    admin.ensure_device("cam-svc", "dev-pw")
    svc = connect_as(b, creds, user)
    claim = connect_as(b, {"_claim-b-svc": "claim-pw"}, "_claim-b-svc")
    dev = connect_as(b, {"cam-svc": "dev-pw"}, "cam-svc")
    try:
        heard, told_claim, told_dev = Inbox(), Inbox(), Inbox()
        svc.subscribe(T.every_enrol_request, heard)
        svc.subscribe(T.every_cred_request, heard)
        claim.subscribe(f"{BASE}/enrol/b-svc/+/res", told_claim)
        dev.subscribe(T.cred_answer("cam-svc"), told_dev)
        claim.publish_wait(T.enrol_request("b-svc", "cam-new"), b"enrol me")
        dev.publish_wait(T.cred_request("cam-svc"), b"renew me")
        heard.wait_for(T.enrol_request("b-svc", "cam-new"), b"enrol me")
        heard.wait_for(T.cred_request("cam-svc"), b"renew me")
        svc.publish_wait(T.enrol_answer("b-svc", "cam-new"), b"pending")
        svc.publish_wait(T.cred_answer("cam-svc"), b"sealed")
        told_claim.wait_for(T.enrol_answer("b-svc", "cam-new"), b"pending")
        told_dev.wait_for(T.cred_answer("cam-svc"), b"sealed")
        assert "edge-serve" in DynsecAdmin(svc, fleet=FLEET).clients()
    finally:
        for c in (svc, claim, dev):
            c.close()


def test_the_responder_and_operators_cannot_administer_nor_enrol(
        broker: tuple[Mosquitto, dict[str, str]]) -> None:
    b, creds = broker
    for user in ("edge-repo", "edge-operator-1"):
        conn = connect_as(b, creds, user)
        try:
            with pytest.raises(BrokerAdminError, match="cannot read dynsec's answers"):
                DynsecAdmin(conn, fleet=FLEET)
            for flt in (T.every_enrol_request, T.every_cred_request):
                with pytest.raises(TransportError, match="refused the subscription"):
                    conn.subscribe(flt, lambda t, p: None)
        finally:
            conn.close()


def test_responders_split_chunk_requests_through_a_shared_subscription(
        broker: tuple[Mosquitto, dict[str, str]], admin: DynsecAdmin) -> None:
    """dynsec checks a $share filter with its prefix: without an ACL for it serve's
    responder could not subscribe at all."""
    b, creds = broker
    admin.ensure_device("cam-share", "pw")
    responders = [connect_as(b, creds, u) for u in ("edge-serve", "edge-repo")]
    dev = connect_as(b, {"cam-share": "pw"}, "cam-share")
    try:
        inboxes = [Inbox(), Inbox()]
        for conn, inbox in zip(responders, inboxes, strict=True):
            assert conn.shared_subscriptions_work(T.share_probe("p2"), "edge-repo") is True
            conn.subscribe(T.shared_repo_request(), inbox)
        for flt in (T.shared_repo_request(), f"$share/g/{T.desired('cam-1')}"):
            with pytest.raises(TransportError, match="refused the subscription"):
                dev.subscribe(flt, inboxes[0])
        sent = [f"req {i}".encode() for i in range(20)]
        for payload in sent:
            dev.publish_wait(T.repo_request("cam-share"), payload)
        deadline = time.monotonic() + 10
        while sum(len(i.got) for i in inboxes) < len(sent):
            assert time.monotonic() < deadline, [i.got for i in inboxes]
            time.sleep(0.02)
        received = sorted(p for i in inboxes for _, p in i.got)
        assert received == sorted(sent)  # each request to exactly one responder
    finally:
        for c in (*responders, dev):
            c.close()
