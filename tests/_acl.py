"""The example Mosquitto setup of examples/mosquitto/ for tests: its credentials generator,
the limits of its config, and a broker started with both."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from edge_sdk.transport import MqttConfig, MqttConnection
from tests._broker import Mosquitto

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mosquitto"
FLEET = "lab"


def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_credentials",
                                                  EXAMPLE / "make_credentials.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def example_settings(*, queues: bool = False) -> str:
    """The lines of the example mosquitto.conf that do not name hosts, ports or files;
    with ``queues`` also its per-client queue limits (else the test broker's: none in
    flight, 100000 queued)."""
    keep = ("max_packet_size", "max_qos", "set_tcp_nodelay", "use_username_as_clientid")
    if queues:
        keep += ("max_inflight_messages", "max_queued_messages")
    lines = (EXAMPLE / "mosquitto.conf").read_text().splitlines()
    return "".join(f"{ln}\n" for ln in lines if ln.split(" ")[0] in keep)


#: A test-only account that reads and writes every topic of the fleet: it sees what reaches
#: (or could reach) a topic, for the checks of what the others may do.
MONITOR = "test-monitor"


@contextlib.contextmanager
def example_broker(tmp: Path, devices: dict[str, list[str]], *, monitor: bool = False,
                   log_connections: bool = False, queues: bool = False,
                   ) -> Iterator[tuple[Mosquitto, dict[str, str]]]:
    """A Mosquitto with the example's settings, password file and ACL for ``devices``;
    with ``monitor`` also the :data:`MONITOR` account, with ``log_connections`` every
    connection and session takeover in ``broker.log`` (``queues``: see
    :func:`example_settings`)."""
    mod = example_module()
    auth = tmp / "auth"
    creds: dict[str, str] = mod.generate(auth, FLEET, devices)
    if monitor:
        creds[MONITOR] = "monitor-password"
        with open(auth / "passwd", "a") as f:
            f.write(f"{MONITOR}:{mod.password_hash(creds[MONITOR])}\n")
        with open(auth / "acl", "a") as f:
            f.write(f"\nuser {MONITOR}\ntopic readwrite edge/{FLEET}/#\n")
    conf = (f"password_file {auth / 'passwd'}\n"
            f"acl_file {auth / 'acl'}\n" + example_settings(queues=queues))
    if log_connections:
        conf += "connection_messages true\nlog_type all\n"
    with Mosquitto(tmp / "broker", allow_anonymous=False, extra_conf=conf) as b:
        yield b, creds


def connect_as(broker: Mosquitto, creds: dict[str, str], user: str, **kw: object
               ) -> MqttConnection:
    c = MqttConnection(MqttConfig(url=broker.url, fleet=FLEET, username=user,
                                  password=creds[user], **kw), name=user)  # type: ignore[arg-type]
    c.connect()
    return c


class Collector:
    """Collects messages on one topic and waits for one matching a predicate."""

    def __init__(self, conn: MqttConnection, topic: str) -> None:
        self.got: list[bytes] = []
        self.cond = threading.Condition()
        self.sub = conn.subscribe(topic, self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.got.append(payload)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float = 10) -> list[bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(p) for p in self.got), timeout=timeout)
            return list(self.got)
