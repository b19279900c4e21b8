"""The enroller's test rig: a dynsec broker, a database, an Enroller running on them, and
"devices" made of the identity core over real MQTT connections (tests/test_enroller.py,
tests/test_identity_attacks.py)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_sdk.fleet import Enroller, FleetDB, IdentityConfig
from edge_sdk.fleet import _enrol as rec
from edge_sdk.fleet._dynsec import SERVE, DynsecAdmin
from edge_sdk.identity import (
    Credentials,
    DeviceKey,
    EnrolAnswer,
    EnrolRequest,
    claim_username,
)
from edge_sdk.transport import MqttConnection, Topics
from tests import _fleetdb
from tests._broker import Mosquitto
from tests._dynsec import FLEET, connect_as, dynsec_broker
from tests._fleetrig import wait_for

TOPICS = Topics(FLEET)
BATCH = "line-1"


class Rig:
    """A dynsec broker, a database and a running Enroller (as ``edge-serve``)."""

    def __init__(self, broker: Mosquitto, creds: dict[str, str], db: FleetDB,
                 enroller: Enroller) -> None:
        self.broker, self.creds, self.db, self.enroller = broker, creds, db, enroller

    def claim(self, batch: str = BATCH, sessions: int = 16) -> str:
        """Create a claim as an operator does; wait until the broker has its accounts."""
        password = rec.create_claim(self.db, FLEET, batch, actor="test", sessions=sessions)
        for k in range(sessions):
            self.creds[claim_username(batch, k)] = password
        wait_for(lambda: all(c["want"] == "" for c in rec.claims(self.db, FLEET)
                             if c["batch"] == batch), 20, f"claim {batch} applied")
        return password

    def connect(self, user: str, password: str | None = None) -> MqttConnection:
        creds = dict(self.creds)
        if password is not None:
            creds[user] = password
        return connect_as(self.broker, creds, user, reconnect_max_delay=0.5)

    def row(self, device: str) -> dict[str, object]:
        r = rec.enrolment(self.db, FLEET, device)
        assert r is not None, f"no enrolment row for {device}"
        return dict(r)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    started: list[tuple[Enroller, MqttConnection, FleetDB]] = []
    stack: list[object] = []

    def make(*, engine: str = "sqlite", **config: object) -> Rig:
        cm = dynsec_broker(tmp_path)
        broker, creds = cm.__enter__()
        stack.append(cm)
        urls = _fleetdb.make_db(engine, tmp_path)
        url = next(urls)
        stack.append(contextlib.closing(urls))  # drops a PostgreSQL database afterwards
        db = FleetDB.open(url)
        conn = connect_as(broker, creds, SERVE)
        admin = DynsecAdmin(conn, fleet=FLEET)
        cfg = IdentityConfig(**{"poll_s": 0.1, "sweep_s": 0.2, **config})  # type: ignore[arg-type]
        enroller = Enroller(db, conn, admin, fleet=FLEET, config=cfg).start()
        started.append((enroller, conn, db))
        return Rig(broker, creds, db, enroller)

    yield make
    for enroller, conn, db in started:
        enroller.stop()
        conn.close()
        db.close()
    for cm in reversed(stack):
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]


class Device:
    """A device as the agent will be: its own key, the claim account, the identity core."""

    def __init__(self, rig: Rig, device_id: str, *, batch: str = BATCH,
                 key: DeviceKey | None = None) -> None:
        self.rig, self.id, self.batch = rig, device_id, batch
        self.key = key or DeviceKey.generate()
        self.answers: queue.Queue[EnrolAnswer] = queue.Queue()

    def enrol(self, claim: MqttConnection, *, facts: dict[str, str] | None = None) -> None:
        """Subscribe to the answer topic, then publish a request."""
        claim.subscribe(TOPICS.enrol_answer(self.batch, self.id), self.on_answer, qos=1)
        req = EnrolRequest.create(self.key, self.id, self.batch, facts or {"hw": "test"})
        claim.publish_wait(TOPICS.enrol_request(self.batch, self.id), req.to_bytes(), qos=1)

    def on_answer(self, topic: str, payload: bytes) -> None:
        if payload:
            self.answers.put(EnrolAnswer.from_bytes(payload, device_id=self.id))

    def answer(self, state: str, timeout: float = 20.0, *, after: int = 0) -> EnrolAnswer:
        """The next answer in ``state`` (others before it are skipped), issued after
        ``after``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            try:
                a = self.answers.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.id}: no {state!r} answer within {timeout:g} s "
                                     f"(saw {seen})") from None
            if a.state == state and (state != "accepted" or a.issued > after):
                return a
            seen.append(a.state)

    def credentials(self, answer: EnrolAnswer) -> Credentials:
        assert answer.sealed is not None and answer.fingerprint == self.key.fingerprint
        return self.key.open(answer.sealed, device_id=self.id)


def disconnected(conn: MqttConnection) -> threading.Event:
    """Set when ``conn``'s link goes down."""
    down = threading.Event()
    conn.add_connection_listener(lambda up: None if up else down.set())
    return down


def accepted_device(rig: Rig, claim: MqttConnection, device_id: str,
                    groups: tuple[str, ...] = ()) -> tuple[Device, Credentials]:
    dev = Device(rig, device_id)
    dev.enrol(claim)
    dev.answer("pending")
    rec.accept_devices(rig.db, FLEET, [device_id], groups=list(groups), tags={},
                       actor="operator")
    return dev, dev.credentials(dev.answer("accepted"))


def self_signed(path: Path) -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    path.write_text(pem)
    return pem
