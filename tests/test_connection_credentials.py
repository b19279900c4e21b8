"""MqttConnection's credentials: a refusal reported instead of retried forever, new
credentials taking over on the next connection (real Mosquitto with passwords)."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from edge_sdk.transport import MqttConfig, MqttConnection
from tests._acl import FLEET, example_broker
from tests._broker import Mosquitto
from tests._tls import tls_files


def _network_thread(conn: MqttConnection) -> threading.Thread | None:
    name = f"paho-mqtt-client-{conn.config.client_id}"
    return next((t for t in threading.enumerate() if t.name == name), None)


def test_a_refused_connection_stops_and_reports_until_new_credentials(
        tmp_path: Path) -> None:
    with example_broker(tmp_path, {"d1": []}) as (broker, creds):
        conn = MqttConnection(MqttConfig(url=broker.url, fleet=FLEET, username="d1",
                                         password="wrong", client_id="d1"))
        reasons: list[str] = []
        told = threading.Event()

        def on_refused(reason: str) -> None:
            reasons.append(reason)
            told.set()

        conn.on_refused(on_refused)
        try:
            conn.connect(wait=False)
            assert told.wait(10)
            assert conn.refused is not None and "authori" in conn.refused.lower()
            # No retry with the same refused password: the network thread ends.
            thread = _network_thread(conn)
            if thread is not None:
                thread.join(10)
                assert not thread.is_alive()
            assert not conn.connected

            conn.set_credentials("d1", creds["d1"])
            assert conn.wait_connected(10)
            assert conn.refused is None
            assert reasons == [reasons[0]]
            conn.publish_wait(f"edge/{FLEET}/dev/d1/state", b"{}")
        finally:
            conn.close()


def test_without_a_refusal_listener_a_refused_connection_keeps_trying(
        tmp_path: Path) -> None:
    with example_broker(tmp_path, {"d1": []}) as (broker, creds):
        conn = MqttConnection(MqttConfig(url=broker.url, fleet=FLEET, username="d1",
                                         password="wrong", client_id="d1",
                                         reconnect_max_delay=0.5))
        try:
            conn.connect(wait=False)
            thread = _network_thread(conn)
            assert thread is not None
            # Still trying: a password fixed meanwhile is taken on the next attempt.
            conn.set_credentials("d1", creds["d1"])
            assert conn.wait_connected(10)
            assert thread.is_alive()
        finally:
            conn.close()


def test_a_new_ca_file_is_trusted_from_the_next_connection_attempt(tmp_path: Path) -> None:
    ca, cert, key = tls_files(tmp_path / "tls")
    other_ca, _, _ = tls_files(tmp_path / "other")
    conf = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "b", extra_conf=conf) as b:
        conn = MqttConnection(MqttConfig(url=f"mqtts://127.0.0.1:{b.port}", fleet=FLEET,
                                         ca_file=str(other_ca), reconnect_max_delay=0.5))
        try:
            conn.connect(wait=False)
            assert not conn.wait_connected(1)  # the broker's certificate is not trusted
            conn.set_ca_file(str(ca))
            assert conn.wait_connected(10)
            assert conn.config.ca_file == str(ca)
        finally:
            conn.close()


def test_closing_a_connection_gives_back_every_descriptor(tmp_path: Path) -> None:
    # An enrolling device opens and closes a connection per exchange, for days: each one
    # must give its descriptors back when closed, not when the collector gets to it.
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Mosquitto(tmp_path / "b") as broker:
        cfg = MqttConfig(url=broker.url, fleet=FLEET)
        warm = MqttConnection(cfg, name="warm-up")  # paho's first-use allocations
        warm.connect()
        warm.close()
        gc.collect()
        gc.disable()
        try:
            before = open_fds()
            for i in range(30):
                conn = MqttConnection(cfg, name=f"exchange-{i}")
                conn.connect()
                conn.close()
            after = open_fds()
        finally:
            gc.enable()
    assert after - before <= 4, f"{after - before} descriptors left by 30 closed connections"
