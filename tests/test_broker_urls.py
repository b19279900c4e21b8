"""Several broker URLs (the nodes of a cluster) with failover, on real Mosquittos; ids
that would put a '.' in a topic (NATS closes the connection on one) refused up front."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from device_agent import AgentConfig
from edge_sdk.cli import main
from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests._broker import Mosquitto, free_port
from tests._process import wait_for

BASE = {"device_id": "cam-1", "fleet": "lab", "state_dir": "state"}


def test_device_id_with_a_dot_is_refused_by_the_agent_config_naming_nats() -> None:
    with pytest.raises(ConfigError, match=r"device_id: 'cam\.1' .*NATS closes the connection"):
        AgentConfig.from_dict({**BASE, "device_id": "cam.1"})
    with pytest.raises(ConfigError, match=r"groups\[0\]: 'site\.a'"):
        AgentConfig.from_dict({**BASE, "groups": ["site.a"]})
    with pytest.raises(ConfigError, match=r"fleet 'lab\.2' .*NATS"):
        MqttConfig(fleet="lab.2")


def test_deploy_refuses_a_device_id_with_a_dot_before_it_connects(tmp_path, capsys) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: a connect would time out
    code = main(["deploy", "--repo", str(tmp_path), "--device", "cam.1", "--model", "m",
                 "--broker", dead])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "device id 'cam.1'" in err and "NATS" in err, err


def test_rollout_start_refuses_a_group_with_a_dot(tmp_path, capsys) -> None:
    code = main(["rollout", "start", "--db", f"sqlite:///{tmp_path / 'f.db'}", "--model", "m",
                 "--version", "1", "--group", "site.a"])
    assert code == 2
    assert "group 'site.a'" in capsys.readouterr().err
    assert not (tmp_path / "f.db").exists()  # refused before anything was written


def test_agent_config_takes_the_cluster_nodes_as_a_list_or_comma_separated() -> None:
    listed = AgentConfig.from_dict({**BASE, "broker": {"urls": ["mqtt://a:1883",
                                                                "mqtt://b:1884"]}})
    joined = AgentConfig.from_dict({**BASE, "broker": {"url": "mqtt://a:1883, mqtt://b:1884"}})
    assert listed.broker.all_urls == joined.broker.all_urls == ("mqtt://a:1883",
                                                                "mqtt://b:1884")
    assert AgentConfig.from_dict(BASE).broker.all_urls == ("mqtt://127.0.0.1:1883",)
    for broker, msg in (({"url": "mqtt://a", "urls": ["mqtt://b"]}, "either url or urls"),
                        ({"urls": ["mqtt://a", "mqtts://b"]}, "mixes mqtt:// and mqtts://"),
                        ({"urls": ["mqtt://a", "http://b"]}, "must look like mqtt://"),
                        ({"urls": ["mqtt://a:99999"]}, "invalid port"),
                        ({"urls": []}, None)):
        if msg is None:  # an empty list falls back to url
            assert AgentConfig.from_dict({**BASE, "broker": broker}).broker.all_urls
            continue
        with pytest.raises(ConfigError, match=msg):
            AgentConfig.from_dict({**BASE, "broker": broker})


def test_mqtt_config_splits_the_url_list_and_refuses_mixed_schemes() -> None:
    cfg = MqttConfig(url="mqtt://u:p@a:1883,mqtt://b")
    assert cfg.urls == ("mqtt://u:p@a:1883", "mqtt://b")
    assert cfg.endpoints() == (("a", 1883, False), ("b", 1883, False))
    assert cfg.credentials() == ("u", "p")
    with pytest.raises(ConfigError, match="mix mqtt:// and mqtts://"):
        MqttConfig(url="mqtt://a,mqtts://b")
    with pytest.raises(ConfigError, match="no broker URL"):
        MqttConfig(url=" , ")


@pytest.fixture()
def two(tmp_path: Path):
    with Mosquitto(tmp_path / "a") as a, Mosquitto(tmp_path / "b") as b:
        yield a, b


def test_link_moves_to_the_next_node_keeping_subscriptions_retained_state_and_queue(
        two) -> None:
    a, b = two
    topics = Topics("lab")
    with MqttConnection(MqttConfig(url=b.url, fleet="lab"), name="b-side") as on_b:
        on_b.publish_wait(topics.desired("d1"), b"on b", retain=True)
        seen_on_b: list[bytes] = []
        arrived = threading.Event()

        def on_state(t: str, p: bytes) -> None:
            seen_on_b.append(p)
            arrived.set()

        on_b.subscribe(topics.state("d1"), on_state)
        got: list[bytes] = []
        desired = threading.Event()
        with MqttConnection(MqttConfig(url=f"{a.url},{b.url}", fleet="lab",
                                       reconnect_max_delay=0.5), name="dev") as dev:
            assert dev.url == a.url
            dev.subscribe(topics.desired("d1"), lambda t, p: (got.append(p), desired.set()))
            assert not desired.wait(0.3)  # nothing retained on a
            a.stop()
            # Right after the stop the link may not have noticed yet: wait for b itself.
            wait_for(lambda: dev.connected and dev.url == b.url, 20,
                     lambda: f"still on {dev.url} (connected: {dev.connected})")
            # Re-subscribed on b: its retained message arrives.
            assert desired.wait(10) and got == [b"on b"]
            dev.publish(topics.state("d1"), b"hello b", qos=1)
            assert arrived.wait(10) and seen_on_b == [b"hello b"]


def test_first_connect_skips_a_node_that_is_down(two) -> None:
    a, b = two
    a.stop()
    with MqttConnection(MqttConfig(url=f"{a.url},{b.url}", fleet="lab"), name="dev") as dev:
        assert dev.url == b.url and dev.connected
    dead = MqttConnection(MqttConfig(url=a.url, connect_timeout=1), name="one")
    with pytest.raises(TransportError, match=f"could not connect to broker {a.url}"):
        dead.connect()


def test_shared_subscriptions_are_detected_on_mosquitto(broker) -> None:
    with MqttConnection(MqttConfig(url=broker.url, fleet="lab"), name="probe") as conn:
        assert conn.shared_subscriptions_work(Topics("lab").share_probe("t1"), "edge-repo")


def test_status_reads_the_fleet_through_the_next_node_when_the_first_is_down(
        broker, capsys) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with MqttConnection(MqttConfig(url=broker.url, fleet="lab"), name="dev") as dev:
        dev.publish_wait(Topics("lab").state("cam-1"), b'{"device": "cam-1", "online": true}',
                         retain=True)
    assert main(["status", "--broker", f"{dead},{broker.url}", "--fleet", "lab"]) == 0
    out = capsys.readouterr().out
    assert "cam-1" in out and "yes" in out, out
