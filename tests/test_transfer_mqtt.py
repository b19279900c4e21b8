"""The MQTT layer on a real Mosquitto: reconnects, topic limits, chunk protocol limits,
responders side by side, announcements."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.release import DeploymentWatch
from edge_sdk.transport import (
    MAX_CHUNK,
    MESSAGE_LIMIT,
    ChunkClient,
    FetchConfig,
    MqttConfig,
    MqttConnection,
    RemoteNotFoundError,
    RepoResponder,
    Topics,
)
from edge_sdk.transport import _chunks as proto
from tests._broker import Mosquitto
from tests._tls import tls_files
from tests._trust_env import env


class _Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.items.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, payload: bytes) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: any(p == payload for _, p in self.items), 10)


def test_connection_resubscribes_and_resends_after_broker_restart(broker: Mosquitto) -> None:
    cfg = MqttConfig(url=broker.url, fleet="lab")
    states: list[bool] = []
    with MqttConnection(cfg, name="a") as a, MqttConnection(cfg, name="b") as b:
        a.add_connection_listener(states.append)
        inbox = _Inbox()
        a.subscribe("edge/lab/dev/a/desired", inbox)
        b.publish_wait("edge/lab/dev/a/desired", b"before")
        inbox.wait_for(b"before")
        broker.restart()
        assert a.wait_connected(15) and b.wait_connected(15)
        b.publish_wait("edge/lab/dev/a/desired", b"after")
        inbox.wait_for(b"after")
        assert states[:2] == [False, True]
        assert a.connected


def test_publish_while_the_link_is_down_is_acknowledged_after_reconnect(
        broker: Mosquitto) -> None:
    cfg = MqttConfig(url=broker.url, fleet="lab")
    with MqttConnection(cfg, name="a") as a, MqttConnection(cfg, name="b") as b:
        inbox = _Inbox()
        a.subscribe("edge/lab/dev/a/desired", inbox)
        first = b.publish("edge/lab/dev/a/desired", b"up")
        assert first.wait(10) and first.published
        broker.stop()
        deadline = time.monotonic() + 10
        while b.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not b.connected
        # Retained: a's resubscription may come after b's resend (clean sessions).
        queued = b.publish("edge/lab/dev/a/desired", b"queued while down", retain=True)
        assert not queued.published
        assert not queued.wait(0.05)
        broker.start()
        assert queued.wait(15) and queued.published
        inbox.wait_for(b"queued while down")


def test_subscription_whose_suback_died_with_the_broker_waits_for_the_resubscription(
        broker: Mosquitto) -> None:
    cfg = MqttConfig(url=broker.url, fleet="lab")
    with MqttConnection(cfg, name="a") as a, MqttConnection(cfg, name="b") as b:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # SUBSCRIBEs go out; no SUBACK comes back
        inbox = _Inbox()
        a.subscribe("edge/lab/dev/a/desired", inbox, wait=False)
        waited: list[object] = []

        def subscribe_and_wait() -> None:
            try:
                a.subscribe("edge/lab/dev/a/events", inbox, timeout=30)
                waited.append("acknowledged")
            except TransportError as err:
                waited.append(err)

        waiter = threading.Thread(target=subscribe_and_wait)
        waiter.start()
        time.sleep(0.5)  # let the waiter's SUBSCRIBE reach the frozen broker
        broker.proc.kill()  # the link dies with both SUBACKs still pending
        broker.proc.wait(5)
        broker.start()
        waiter.join(30)
        # Woken by the lost link and answered by the re-subscription, not by the timeout.
        assert waited == ["acknowledged"]
        assert b.wait_connected(15)
        b.publish_wait("edge/lab/dev/a/desired", b"after")
        b.publish_wait("edge/lab/dev/a/events", b"events after")
        inbox.wait_for(b"after")
        inbox.wait_for(b"events after")


def test_persistent_session_gets_what_was_published_while_it_was_away(
        tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", persistent=True) as broker:
        watcher = MqttConfig(url=broker.url, fleet="lab", client_id="ops-watch",
                             persistent_session=True)
        inbox = _Inbox()
        w = MqttConnection(watcher)
        w.connect()
        w.subscribe("edge/lab/dev/+/events", inbox)
        w.close()  # clean disconnect: the broker keeps the session and queues for it
        broker.restart()
        with MqttConnection(MqttConfig(url=broker.url, fleet="lab"), name="dev") as dev:
            dev.publish_wait("edge/lab/dev/d1/events", b"while away")
        # Handlers are registered before connecting, so the queued message meets one.
        again = _Inbox()
        w2 = MqttConnection(watcher)
        w2.subscribe("edge/lab/dev/+/events", again)
        w2.connect()
        try:
            again.wait_for(b"while away")
        finally:
            w2.close()
    with pytest.raises(ConfigError, match="fixed client id"):
        MqttConfig(url=broker.url, persistent_session=True)


def test_topics_real_brokers_refuse_are_rejected_before_sending(
        shared_broker: Mosquitto) -> None:
    with MqttConnection(MqttConfig(url=shared_broker.url, fleet="lab")) as c:
        with pytest.raises(TransportError, match="at most 7"):
            c.publish("a/b/c/d/e/f/g/h/i", b"x")
        with pytest.raises(TransportError, match="wildcard"):
            c.publish("edge/lab/+/x", b"x")
        with pytest.raises(TransportError, match="QoS 2"):
            c.publish("edge/lab/x", b"x", qos=2)
    topics = Topics("lab")
    for name in (topics.repo_request("dev-1"), topics.repo_response("dev-1"),
                 topics.desired("dev-1"), topics.announce,
                 topics.group_desired("g"), topics.events("dev-1")):
        assert name.count("/") <= 7
    with pytest.raises(ConfigError, match="one MQTT topic level"):
        topics.desired("a/b")
    with pytest.raises(ConfigError, match="mqtt://"):
        MqttConfig(url="http://broker:1883")


def test_unreachable_broker_is_a_clear_transport_error() -> None:
    from tests._broker import free_port

    with pytest.raises(TransportError, match=r"could not connect.*Connection refused"):
        MqttConnection(MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}")).connect(timeout=1)


def test_every_chunk_message_fits_the_128k_broker_limit(tmp_path: Path) -> None:
    # A broker configured like AWS IoT Core (and examples/mosquitto) drops bigger packets.
    conf = f"max_packet_size {MESSAGE_LIMIT}\n"
    with Mosquitto(tmp_path / "b", extra_conf=conf) as b, env(tmp_path, b) as e:
        art = e.release(n=200_000)
        rel = e.repo.find("m")
        client = ChunkClient(e.device, "d1", config=FetchConfig(chunk_size=MAX_CHUNK))
        data = bytearray()
        d, _, base = rel.path.rpartition("/")
        client.download(f"targets/{d}/{rel.sha256}.{base}", data.extend, length=rel.length)
        assert bytes(data) == art.model_path.read_bytes()
        assert proto.HEADER.size + MAX_CHUNK + len(e.topics.repo_response("d1")) < MESSAGE_LIMIT
        with pytest.raises(ConfigError, match="128 KiB"):
            FetchConfig(chunk_size=MAX_CHUNK + 1)


def test_missing_file_and_path_escape_are_not_found(tmp_path: Path, broker: Mosquitto) -> None:
    (tmp_path / "secret.txt").write_text("not served")
    with env(tmp_path, broker) as e:
        client = ChunkClient(e.device, "d1")
        with pytest.raises(RemoteNotFoundError, match="not in the repository"):
            client.download("metadata/99.root.json", lambda b: None)
        with pytest.raises(TransportError, match="not a repository path"):
            client.download("targets/../../secret.txt", lambda b: None)
        assert e.responders[0].answer(proto.ChunkRequest(
            b"\0" * 16, "metadata/../repo.json", 0, 10)).status == proto.NOT_FOUND


def test_responders_side_by_side_share_the_requests(tmp_path: Path, broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        second_conn = MqttConnection(e.config, name="host2")
        second_conn.connect()
        second = e.add_responder(RepoResponder(second_conn, e.repo.path))
        try:
            art = e.release(n=300_000)
            dep = e.deploy()
            path = e.client(FetchConfig(chunk_size=16 * 1024, batch=1)).fetch(
                dep, tmp_path / "model")
            assert (path / "model.onnx").read_bytes() == art.model_path.read_bytes()
            # Shared subscription: each request answered once, by one of the two.
            first = e.responders[0]
            assert first.stats.requests > 0 and second.stats.requests > 0
        finally:
            second.stop()
            second_conn.close()


def test_responder_announces_each_new_timestamp_retained(tmp_path: Path,
                                                         broker: Mosquitto) -> None:
    with env(tmp_path, broker) as e:
        inbox = _Inbox()
        e.device.subscribe(e.topics.announce, inbox)
        v = e.repo.versions()["timestamp"]
        inbox.wait_for(json.dumps(e.responders[0].announcement()).encode())
        e.release()
        assert e.repo.versions()["timestamp"] == v + 1
        # The responder's watcher notices the new timestamp on its own.
        with inbox.cond:
            assert inbox.cond.wait_for(lambda: any(
                json.loads(p)["timestamp_version"] == v + 1 for _, p in inbox.items), 10)


def test_mqtts_with_a_private_ca_and_a_wrong_ca_refused(tmp_path: Path) -> None:
    ca, cert, key = tls_files(tmp_path / "tls")
    other_ca, _, _ = tls_files(tmp_path / "other")
    conf = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "b", extra_conf=conf) as b:
        url = f"mqtts://127.0.0.1:{b.port}"
        with MqttConnection(MqttConfig(url=url, fleet="lab", ca_file=str(ca))) as c:
            inbox = _Inbox()
            c.subscribe("edge/lab/dev/x/events", inbox)
            c.publish_wait("edge/lab/dev/x/events", b"over tls")
            inbox.wait_for(b"over tls")
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            MqttConnection(MqttConfig(url=url, ca_file=str(other_ca))).connect(timeout=2)


@pytest.mark.parametrize("field", ["counter", "version"])
def test_operators_watch_reads_the_counter_of_new_and_older_agents_events(
    shared_broker: Mosquitto, field: str
) -> None:
    # ``version`` is what agents before the rename called the counter in their events.
    cfg = MqttConfig(url=shared_broker.url, fleet=f"watch-{field}")
    with MqttConnection(cfg, name="op") as op, MqttConnection(cfg, name="dev") as dev:
        topics = Topics.for_config(cfg)
        with DeploymentWatch(op, 7, devices=["d"]) as watch:
            for counter in (6, 7):
                event = {"event": "failed", "stage": "fetch", "reason": f"#{counter} broke",
                         "deployment": {field: counter, "name": "m", "artifact_version": "2"}}
                dev.publish_wait(topics.events("d"), json.dumps(event).encode())
            [outcome] = watch.wait(10)
    assert (outcome.device, outcome.result, outcome.reason) == ("d", "failed", "#7 broke")


def test_topic_matching_agrees_with_paho_on_wildcards_shares_and_dollar_topics() -> None:
    import random

    import paho.mqtt.client as paho

    from edge_sdk.transport._connection import _matches

    rng = random.Random(23)
    words = ["a", "b", "", "c"]
    for _ in range(20_000):
        topic = "/".join(rng.choice([*words, "$SYS"] if i == 0 else words)
                         for i in range(rng.randint(1, 4)))
        levels = [rng.choice([*words, "+", "#", "$SYS"]) for _ in range(rng.randint(1, 4))]
        if "#" in levels:
            levels = levels[:levels.index("#") + 1]
        f = "/".join(levels)
        expected = bool(paho.topic_matches_sub(f, topic))
        assert _matches(f, topic) == expected, (f, topic)
        assert _matches(f"$share/g/{f}", topic) == expected, (f, topic)


def test_waiting_on_a_group_says_at_once_which_members_do_not_follow_it(
    shared_broker: Mosquitto,
) -> None:
    # A member assigned to the group whose agent config lacks it never reads the group's
    # desired topic: the operator hears so at once and as its reason, not a bare timeout.
    cfg = MqttConfig(url=shared_broker.url, fleet="watch-follow")
    topics = Topics.for_config(cfg)
    with MqttConnection(cfg, name="op") as op, MqttConnection(cfg, name="dev") as dev:
        for device, groups in (("deaf", []), ("follower", ["lobby"])):
            state = {"online": True, "phase": "committed", "groups": groups}
            dev.publish_wait(topics.state(device), json.dumps(state).encode(), retain=True)
        told: list[str] = []
        with DeploymentWatch(op, 5, members=["deaf", "follower"], groups=["lobby"]) as watch:
            outcomes = {o.device: o for o in watch.wait(1.0, notice=told.append)}
    assert [line.split(":")[0] for line in told] == ["deaf"]
    assert "does not follow group lobby" in (outcomes["deaf"].reason or "")
    assert outcomes["follower"].reason == "the device is in phase committed"
