"""CA rotation for the broker's TLS certificate, with an overlap: ``serve --ca-bundle``
gives devices the old and the new CA with their credentials; the broker then switches to a
certificate of the new CA and the enrolled agent, which was set up with the old CA only,
reconnects and keeps updating. A client that knows only the old CA is refused, so the
overlap is what carried the agent across."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import TransportError
from edge_sdk.transport import MqttConfig, MqttConnection
from tests._broker import free_port
from tests._dynsec import dynsec_broker
from tests._e2e import FLEET
from tests._identity_host import Host
from tests._process import wait_for
from tests._tls import TestCA

pytestmark = pytest.mark.slow


def test_agent_follows_a_ca_rotation_through_the_bundle_it_was_given(tmp_path: Path) -> None:
    old, new = TestCA("edge old CA"), TestCA("edge new CA")
    tls = tmp_path / "tls"
    cert, key = old.server(tls / "server.crt", tls / "server.key")
    old_ca = old.write(tls / "old.crt")
    bundle = tls / "bundle.crt"
    bundle.write_bytes(old.pem + new.pem)
    port = free_port()
    # A second listener on TLS for the devices; serve and the host stay on the first one.
    conf = (f"listener {port} 127.0.0.1\ncafile {bundle}\ncertfile {cert}\n"
            f"keyfile {key}\n")
    url = f"mqtts://127.0.0.1:{port}"
    with dynsec_broker(tmp_path, extra_conf=conf) as (broker, creds):
        host = Host(tmp_path, broker, creds, lifetime_s=3600, ca_bundle=bundle)
        agent = None
        try:
            agent = host.agent("cam-tls", broker_url=url, tls_ca=old_ca)
            host.wait_state("cam-tls", "pending")
            assert host.op("device", "accept", "cam-tls") == 0
            wait_for(lambda: host.fleet.states.get("cam-tls", {}).get("online") is True, 60,
                     lambda: agent.log.read_text()[-3000:] if agent else "")
            held = (agent.state / "identity" / "ca.pem").read_bytes()
            assert old.pem in held and new.pem in held
            host.fleet.release("1")
            host.fleet.deploy("cam-tls", "1")
            agent.wait_version("1")

            # The switch: the broker now presents a certificate of the new CA.
            new.server(cert, key)
            host.fleet.states.pop("cam-tls", None)
            broker.restart()
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                MqttConnection(MqttConfig(url=url, fleet=FLEET, ca_file=str(old_ca),
                                          username="cam-tls", password="x")).connect(timeout=3)
            wait_for(lambda: host.fleet.states.get("cam-tls", {}).get("online") is True
                     and agent is not None and agent.version() == "1", 60,
                     lambda: agent.log.read_text()[-3000:] if agent else "")
            host.fleet.release("2")
            host.fleet.deploy("cam-tls", "2")
            agent.wait_version("2")
        finally:
            if agent is not None:
                agent.stop()
            host.close()
