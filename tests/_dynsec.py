"""A Mosquitto with the dynamic security plugin, set up by ``broker_config`` (what
``edge-sdk broker init`` writes), plus a test-only :data:`MONITOR` account.

    with dynsec_broker(tmp_path) as (broker, creds):
        admin_conn, admin = dynsec_admin(broker, creds)
        admin.ensure_device("cam-1", "pw", ["lobby"])
        dev = connect_as(broker, {"cam-1": "pw"}, "cam-1")
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_sdk.fleet._dynsec import (
    SERVE,
    DynsecAdmin,
    broker_config,
    mosquitto_settings,
    password_record,
)
from edge_sdk.transport import MqttConfig, MqttConnection
from tests._broker import Mosquitto

FLEET = "lab"
#: A test-only account that reads and writes every topic of the fleet: it sees what reaches
#: (or could reach) a topic, for the checks of what the others may do.
MONITOR = "test-monitor"


@contextlib.contextmanager
def dynsec_broker(tmp: Path, fleet: str = FLEET, *, operators: Sequence[str] = (),
                  responders: Sequence[str] = (), log_connections: bool = False,
                  extra_conf: str = "") -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    """A running dynsec broker with ``broker_config``'s accounts and :data:`MONITOR`;
    yields it and {user: password}; ``extra_conf``: more lines (another listener).
    Mosquitto runs as the test's user (it rewrites the
    plugin's file on every change)."""
    auth = tmp / "dynsec"
    creds = broker_config(auth, fleet=fleet, operators=operators, responders=responders)
    path = auth / "dynamic-security.json"
    doc = json.loads(path.read_text())
    creds[MONITOR] = "monitor-password"
    doc["clients"].append({"username": MONITOR, **password_record(creds[MONITOR]),
                           "roles": [{"rolename": "test:monitor", "priority": 0}]})
    doc["roles"].append({"rolename": "test:monitor", "acls": [
        {"acltype": kind, "topic": f"edge/{fleet}/#", "priority": 0, "allow": True}
        for kind in ("subscribePattern", "publishClientReceive", "publishClientSend")] + [
        # dynsec checks a shared subscription with its prefix (a test host's responder).
        {"acltype": "subscribePattern", "topic": f"$share/+/edge/{fleet}/#", "priority": 0,
         "allow": True}]})
    path.write_text(json.dumps(doc))
    conf = mosquitto_settings(path.resolve()).replace("allow_anonymous false\n", "")
    if log_connections:
        conf += "connection_messages true\nlog_type all\n"
    conf += extra_conf
    with Mosquitto(tmp / "broker", allow_anonymous=False, extra_conf=conf) as b:
        yield b, creds


def connect_as(broker: Mosquitto, creds: dict[str, str], user: str, *, fleet: str = FLEET,
               **kw: object) -> MqttConnection:
    """A connected MqttConnection as ``user`` (raises TransportError when refused)."""
    c = MqttConnection(MqttConfig(url=broker.url, fleet=fleet, username=user,  # type: ignore[arg-type]
                                  password=creds[user], **kw), name=user)
    c.connect()
    return c


@contextlib.contextmanager
def dynsec_admin(broker: Mosquitto, creds: dict[str, str], *, user: str = SERVE,
                 fleet: str = FLEET) -> Iterator[DynsecAdmin]:
    """A DynsecAdmin on its own connection as ``user`` (an admin service account)."""
    conn = connect_as(broker, creds, user, fleet=fleet)
    try:
        yield DynsecAdmin(conn, fleet=fleet)
    finally:
        conn.close()
