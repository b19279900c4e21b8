"""The agent's identity: enrolment through the claim account, credentials kept and renewed,
the fallbacks when the broker refuses them.

The pure part (:class:`Keyring` and friends) is driven directly. The rest runs against a
real Mosquitto with the dynamic security plugin (tests/_dynsec.py) and a minimal
controller made of DynsecAdmin and the identity core over a real MqttConnection: it speaks
the real protocol (sealed answers, signed renewals, broker accounts), deciding by a rule
instead of an operator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent, AgentConfig, TlsConfig
from device_agent._identity import (
    CredentialStore,
    EnrolmentClient,
    Held,
    IdentityService,
    Keyring,
    Outcome,
    enrol_delay,
    judge,
    renew_backoff,
)
from edge_sdk import Artifact, build_artifact
from edge_sdk.errors import ConfigError, TransportError
from edge_sdk.fleet._dynsec import SERVE, DynsecAdmin, broker_config, mosquitto_settings
from edge_sdk.identity import (
    Credentials,
    DeviceKey,
    EnrolAnswer,
    EnrolRequest,
    RenewRequest,
    claim_session,
    claim_username,
    fingerprint_of,
    seal,
)
from edge_sdk.transport import MqttConfig, MqttConnection, Topics
from tests import _models
from tests._agent_local import SAMPLE, LocalSource, deployment
from tests._broker import Mosquitto
from tests._dynsec import FLEET, MONITOR, connect_as, dynsec_admin, dynsec_broker
from tests._process import wait_until
from tests._tls import tls_files

DEV = "dev-1"
BATCH = "b1"
TOPICS = Topics(FLEET)


def creds(issued: int, expires_at: float, *, password: str = "", groups: tuple[str, ...] = ()
          ) -> Credentials:
    return Credentials(username=DEV, password=password or f"pw-{issued}", issued=issued,
                       expires_at=expires_at, groups=groups)


# -- the pure part ---------------------------------------------------------------------------


def test_a_refused_password_falls_back_to_the_other_once_then_enrols_again() -> None:
    ring = Keyring(Held(creds(1, 1000), 0), Held(creds(2, 1000), 10))
    assert ring.choose(now=5) is not None and ring.using == "current"
    other = ring.refused()
    assert other is not None and other.issued == 2 and ring.using == "pending"
    # Refused again: neither works (revoked, expired or lost): nothing held, enrol.
    assert ring.refused() is None
    assert ring.using is None and ring.current is None and ring.pending is None
    # A retained enrolment answer carrying either of them is no use any more.
    assert ring.refused_issued == 2


def test_the_fallback_is_tried_once_per_connection_not_forever() -> None:
    ring = Keyring(Held(creds(1, 1000), 0), Held(creds(2, 1000), 10))
    ring.choose(now=5)
    assert ring.refused() is not None          # current refused -> pending
    assert not ring.connected() or True        # pending accepted: promoted
    assert ring.current is not None and ring.current.creds.issued == 2
    assert ring.pending is None and ring.using == "current"
    # Later refused: nothing else to try.
    assert ring.refused() is None and ring.using is None


def test_a_renewed_password_becomes_current_only_once_the_broker_accepts_it() -> None:
    ring = Keyring(Held(creds(1, 1000), 0))
    ring.choose(now=1)
    ring.renewed(creds(2, 2000), now=500)
    assert ring.current is not None and ring.current.creds.issued == 1
    assert ring.using == "pending"
    # The controller has not switched yet: the new one is refused, the old one works.
    back = ring.refused()
    assert back is not None and back.issued == 1
    assert not ring.connected()
    assert ring.pending is not None  # still waiting for the switch
    # The switch kicks the link; the old one is refused, the new one accepted.
    nxt = ring.refused()
    assert nxt is not None and nxt.issued == 2
    assert ring.connected()
    assert ring.current is not None and ring.current.creds.issued == 2
    assert ring.pending is None


def test_renewal_is_due_when_less_than_the_fraction_of_the_lifetime_is_left() -> None:
    # Received at 100 with expiry 1100: a lifetime of 1000 s by the device's own clock.
    ring = Keyring(Held(creds(1, 1100), 100), renew_fraction=0.25)
    ring.choose(now=100)
    assert not ring.renewal_due(now=800) and not ring.renewal_due(now=830)
    assert ring.renewal_due(now=851)
    assert ring.seconds_left(now=851) == pytest.approx(249)
    ring.renewed(creds(2, 5000), now=851)
    assert not ring.renewal_due(now=900)  # one renewal at a time


def test_expired_credentials_are_not_used_at_boot() -> None:
    ring = Keyring(Held(creds(1, 100), 0), Held(creds(2, 300), 50))
    assert ring.choose(now=200) == creds(2, 300)
    assert ring.choose(now=400) is None and ring.using is None
    assert ring.refused_issued == 2  # an answer still retained for them is no use


def test_dropped_pending_credentials_send_the_link_back_to_the_current_ones() -> None:
    ring = Keyring(Held(creds(1, 1000), 0))
    ring.choose(now=1)
    ring.renewed(creds(2, 2000), now=2)
    back = ring.drop_pending()
    assert back is not None and back.issued == 1 and ring.using == "current"


def test_renewal_backoff_doubles_from_ten_seconds_up_to_a_tenth_of_the_lifetime() -> None:
    assert [renew_backoff(n, 3600) for n in (1, 2, 3, 4, 5, 6)] == [10, 20, 40, 80, 160, 320]
    assert renew_backoff(9, 3600) == 360
    assert renew_backoff(3, 20) == 10  # never below the minimum


def test_enrolment_polls_spread_by_half_and_come_sooner_after_a_kick() -> None:
    assert enrol_delay(30, 0.0) == 15 and enrol_delay(30, 0.999) == pytest.approx(44.97)
    assert enrol_delay(30, 0.5, takeovers=1) < 30


def test_takeovers_in_a_row_back_off_doubling_up_to_the_poll_with_jitter() -> None:
    assert [enrol_delay(30, 0.5, takeovers=n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert enrol_delay(30, 0.0, takeovers=3) == 2 and enrol_delay(30, 0.999, takeovers=3) \
        == pytest.approx(5.996)
    assert enrol_delay(30, 0.5, takeovers=10_000) == 30


def test_an_answer_for_another_key_or_for_refused_credentials_is_not_ours() -> None:
    key, other = DeviceKey.generate(), DeviceKey.generate()

    def answer(k: DeviceKey, issued: int) -> EnrolAnswer:
        return EnrolAnswer(state="accepted", device_id=DEV, fingerprint=k.fingerprint,
                           issued=issued, sealed=seal(creds(issued, 1e10), k.public_pem,
                                                      device_id=DEV))

    fp = key.fingerprint
    assert judge(answer(other, 3), fingerprint=fp, refused_issued=0) is None
    assert judge(answer(key, 3), fingerprint=fp, refused_issued=3) is None
    assert judge(answer(key, 4), fingerprint=fp, refused_issued=3) == "accepted"
    refused = EnrolAnswer(state="refused", device_id=DEV, fingerprint=fp, reason="x")
    assert judge(refused, fingerprint=fp, refused_issued=0) == "refused"
    # A refusal of someone else's request on our topic (garbage names no key) is not ours.
    for fingerprint in ("", other.fingerprint):
        theirs = EnrolAnswer(state="refused", device_id=DEV, fingerprint=fingerprint,
                             reason="x")
        assert judge(theirs, fingerprint=fp, refused_issued=0) is None


def test_the_credentials_file_is_private_and_a_corrupt_one_means_enrolling_again(
        tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "identity")
    ring = Keyring(Held(creds(1, 1000), 5), Held(creds(2, 2000), 6))
    store.save(ring)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    cur, pend = store.load()
    assert cur == Held(creds(1, 1000), 5) and pend == Held(creds(2, 2000), 6)
    for bad in (b"{", b"[]", b'{"current": 1, "pending": null}', b"x" * 100_000,
                b'{"current": {"credentials": {}, "received_at": 1}, "pending": null}'):
        store.path.write_bytes(bad)
        assert store.load() == (None, None)


def test_answers_from_the_network_are_bounded_in_size_and_number() -> None:
    from device_agent._identity import _MAX_WAITING, _offer
    from edge_sdk.identity import MAX_ANSWER_BYTES

    waiting: queue.Queue[bytes] = queue.Queue(_MAX_WAITING)
    _offer(waiting, b"x" * (MAX_ANSWER_BYTES + 1))
    assert waiting.empty()
    for _ in range(_MAX_WAITING * 3):
        _offer(waiting, b"{}")  # never blocks the network thread
    assert waiting.qsize() == _MAX_WAITING


# -- config --------------------------------------------------------------------------------


def _config(tmp: Path, url: str = "mqtt://127.0.0.1:1", **identity: Any) -> AgentConfig:
    ident = {"batch": BATCH, "claim_password": "claim-pw", "poll_s": 0.2,
             "answer_wait_s": 5.0, **identity}
    return AgentConfig.from_dict({
        "device_id": DEV, "fleet": FLEET, "state_dir": str(tmp / "state"),
        "http": {"port": 0}, "health": {"window_s": 0.5, "probe_interval_s": 0.05},
        "broker": {"url": url}, "identity": ident})


@pytest.mark.parametrize(("change", "says"), [
    ({"broker": {"url": "mqtt://127.0.0.1:1", "username": "dev-1"},
      "identity": {"batch": "b1", "claim_password": "x"}}, "remove broker.username"),
    ({"broker": {"url": "mqtt://dev-1:pw@127.0.0.1:1"},
      "identity": {"batch": "b1", "claim_password": "x"}}, "remove broker.username"),
    ({"identity": {"batch": "a/b", "claim_password": "x"}}, "identity.batch"),
    ({"identity": {"batch": "b1"}}, "claim_password_file"),
    ({"identity": {"batch": "b1", "claim_password": "x", "renew_fraction": 1.5}},
     "identity.renew_fraction"),
    ({"identity": {"batch": "b1", "claim_password": "x", "facts": {"a b": "c"}}},
     "identity.facts.a b"),
    ({"identity": {"batch": "b1", "claim_password": "x", "claim_sessions": 0}},
     "identity.claim_sessions"),
    ({"identity": {"batch": "b1", "claim_password": "x", "claim_sessions": 257}},
     "identity.claim_sessions"),
])
def test_identity_config_errors_name_the_key_in_one_line(
        tmp_path: Path, change: dict[str, Any], says: str) -> None:
    data: dict[str, Any] = {"device_id": DEV, "fleet": FLEET, "state_dir": str(tmp_path)}
    data.update(change)
    with pytest.raises(ConfigError, match=says) as err:
        AgentConfig.from_dict(data)
    assert "\n" not in str(err.value)


class _Exchanges:
    """An enrolment client whose exchanges come to the given outcomes, in order."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.mqtt: object = None

    def attempt(self, *, refused_issued: int = 0) -> Outcome:
        return self.outcomes.pop(0)


def test_takeovers_in_a_row_push_the_next_exchange_further_until_one_is_not(
        tmp_path: Path) -> None:
    svc = IdentityService(_config(tmp_path, poll_s=30.0), event=lambda kind, **f: None,
                          rnd=lambda: 0.5)
    kicked, pending = Outcome("silent", kicked=True), Outcome("pending")
    svc.enrolment = _Exchanges(kicked, kicked, kicked, pending, kicked)  # type: ignore[assignment]
    waits = []
    for _ in range(5):  # the service thread's enrolment step, driven by hand
        svc._enrol()  # noqa: SLF001
        waits.append(round(svc._enrol_at - time.monotonic()))  # noqa: SLF001
    assert waits == [1, 2, 4, 30, 1]
    assert (svc.attempts, svc.takeovers) == (5, 4)


def test_identity_config_defaults_keep_the_key_under_the_state_dir(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert cfg.identity is not None and cfg.identity.renew_fraction == 0.33
    assert cfg.identity.claim_sessions == 16
    assert cfg.key_path == tmp_path / "state" / "identity" / "device.key"


# -- a minimal controller over the real protocol -----------------------------------------


class MiniController:
    """The controller's side (helper D's Enroller does this for real), reduced to a rule:
    ``decide(device_id)`` says accept, reject or pending. Real dynsec accounts, real
    sealed answers, real signed renewals; broker calls on its own thread (a handler on the
    network thread must not wait on its own connection)."""

    def __init__(self, conn: MqttConnection, admin: DynsecAdmin, *,
                 decide: Callable[[str], str] = lambda d: "accept",
                 lifetimes: Callable[[int], float] = lambda n: 3600.0,
                 groups: tuple[str, ...] = (), ca_pem: str | None = None) -> None:
        self.conn = conn
        self.ca_pem = ca_pem
        #: False: renewal acks are ignored (the broker never switches).
        self.switch = True
        self.admin = admin
        self.decide = decide
        self.lifetimes = lifetimes
        self.groups = groups
        self.keys: dict[str, str] = {}          # device -> public key PEM
        self.fingerprints: list[str] = []       # of every request, in order
        self.issued: dict[str, int] = {}
        self.passwords: dict[str, str] = {}
        self._renewing: dict[str, tuple[str, int]] = {}
        self.requests: Counter[str] = Counter()
        self.switched = threading.Event()
        self._calls: list[Callable[[], None]] = []
        self._q: queue.SimpleQueue[tuple[str, str, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        conn.subscribe(TOPICS.every_enrol_request, lambda t, p: self._q.put(("enrol", t, p)))
        conn.subscribe(TOPICS.every_cred_request, lambda t, p: self._q.put(("cred", t, p)))

    def close(self) -> None:
        self._stop.set()
        self._q.put(("stop", "", b""))
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            kind, topic, payload = self._q.get()
            if kind == "enrol":
                self._enrol(topic, payload)
            elif kind == "cred":
                self._cred(topic, payload)
            elif kind == "call":
                self._calls.pop(0)()

    def do(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the controller's thread (after what it received so far)."""
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self._calls.append(call)
        self._q.put(("call", "", b""))
        assert done.wait(15)

    def _answer(self, batch: str, dev: str, answer: EnrolAnswer, *, retain: bool = True
                ) -> None:
        self.conn.publish_wait(TOPICS.enrol_answer(batch, dev), answer.to_bytes(),
                               retain=retain)

    def _enrol(self, topic: str, payload: bytes) -> None:
        got = TOPICS.enrol_requester(topic)
        assert got is not None
        batch, dev = got
        req = EnrolRequest.from_bytes(payload, batch=batch, device_id=dev)
        self.requests[dev] += 1
        self.fingerprints.append(req.fingerprint)
        known = self.keys.get(dev)
        if known is not None and known != req.public_pem:
            self._answer(batch, dev, EnrolAnswer(state="refused", device_id=dev,
                                                 fingerprint=req.fingerprint,
                                                 reason="other key"),
                         retain=False)
            return
        verdict = self.decide(dev)
        if verdict == "accept":
            self.keys[dev] = req.public_pem
            self.issue(batch, dev, req.public_pem)
        else:
            state = "pending" if verdict == "pending" else "rejected"
            self._answer(batch, dev, EnrolAnswer(state=state, device_id=dev,
                                                 fingerprint=req.fingerprint,
                                                 reason="not on the list" if
                                                 state == "rejected" else ""))

    def _sealed(self, dev: str, pem: str, n: int, password: str) -> EnrolAnswer:
        c = Credentials(username=dev, password=password, issued=n,
                        expires_at=time.time() + self.lifetimes(n), groups=self.groups,
                        ca_pem=self.ca_pem)
        return EnrolAnswer(state="accepted", device_id=dev, fingerprint=fingerprint_of(pem),
                           issued=n, sealed=seal(c, pem, device_id=dev))

    def issue(self, batch: str, dev: str, pem: str) -> None:
        n = self.issued.get(dev, 0) + 1
        pw = secrets.token_urlsafe(24)
        self.admin.ensure_device(dev, pw, self.groups)
        self.issued[dev], self.passwords[dev] = n, pw
        self._answer(batch, dev, self._sealed(dev, pem, n, pw))

    def revoke(self, batch: str, dev: str) -> None:
        self.admin.delete_device(dev)
        self.conn.publish_wait(TOPICS.enrol_answer(batch, dev), b"", retain=True)
        self.keys.pop(dev, None)

    def _cred(self, topic: str, payload: bytes) -> None:
        dev = TOPICS.cred_requester(topic)
        assert dev is not None
        pem = self.keys[dev]
        req = RenewRequest.verify(payload, pem, device_id=dev, now=time.time())
        if req.ack == 0:
            n, pw = self.issued[dev] + 1, secrets.token_urlsafe(24)
            self._renewing[dev] = (pw, n)
            self.conn.publish_wait(TOPICS.cred_answer(dev),
                                   self._sealed(dev, pem, n, pw).to_bytes())
        elif self.switch and dev in self._renewing and self._renewing[dev][1] == req.ack:
            pw, n = self._renewing.pop(dev)
            self.admin.set_password(dev, pw)  # kicks the device's link
            self.issued[dev], self.passwords[dev] = n, pw
            self.switched.set()


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[Mosquitto, dict[str, str], DynsecAdmin]]:
    with dynsec_broker(tmp_path) as (broker, accounts), \
            dynsec_admin(broker, accounts) as admin:
        accounts["_claim-" + BATCH] = "claim-pw"
        admin.ensure_claim(BATCH, "claim-pw")
        yield broker, accounts, admin


def _controller(admin: DynsecAdmin, **kw: Any) -> MiniController:
    return MiniController(admin.connection, admin, **kw)



def _outbox(agent: Agent) -> list[dict[str, Any]]:
    out = []
    for p in sorted(agent.store.outbox.glob("[0-9]*.json")):
        with contextlib.suppress(OSError, ValueError):  # sent and removed meanwhile
            out.append(json.loads(p.read_text()))
    return out


def _stored(agent: Agent) -> dict[str, Any]:
    return json.loads((agent.config.identity_dir / "credentials.json").read_text())


class _Watch:
    """What the MONITOR account sees on one device topic."""

    def __init__(self, conn: MqttConnection, topic: str) -> None:
        self.got: list[dict[str, Any]] = []
        conn.subscribe(topic, lambda t, p: self.got.append(json.loads(p)) if p else None)


@pytest.fixture()
def started() -> Iterator[Callable[[Agent], Agent]]:
    agents: list[Agent] = []

    def start(agent: Agent) -> Agent:
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for a in agents:
        a.stop()


def test_an_unenrolled_agent_serves_locally_then_connects_as_itself_once_accepted(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, accounts, admin = fleet
    verdict = {DEV: "pending"}
    ca = tls_files(tmp_path / "tls")[0].read_text()
    ctl = _controller(admin, decide=lambda d: verdict[d], ca_pem=ca)
    monitor = connect_as(broker, accounts, MONITOR)
    try:
        state = _Watch(monitor, TOPICS.state(DEV))
        agent = started(Agent(_config(tmp_path, broker.url), source=LocalSource()))
        assert agent.http is not None and agent.url  # serving before any credentials
        wait_until(lambda: any(e["event"] == "enrolment_pending" for e in _outbox(agent)),
              "the pending event")
        assert agent.connection is not None and not agent.connection.connected
        assert ctl.requests[DEV] >= 1
        assert "credential_seconds_left 0.0" in agent.metrics.render().decode()

        verdict[DEV] = "accept"
        wait_until(lambda: state.got and state.got[-1].get("online"), "the device online", 30)
        assert _stored(agent)["current"]["credentials"]["issued"] == 1
        mode = stat.S_IMODE(os.stat(agent.config.identity_dir / "credentials.json").st_mode)
        assert mode == 0o600
        key_mode = stat.S_IMODE(os.stat(agent.config.key_path).st_mode)
        assert key_mode == 0o600
        # The broker's CA bundle came with the credentials (used on mqtts:// links).
        assert (agent.config.identity_dir / "ca.pem").read_text() == ca
        left = [ln for ln in agent.metrics.render().decode().splitlines()
                if ln.startswith("edge_agent_credential_seconds_left ")]
        assert 3000 < float(left[0].split()[1]) <= 3600
    finally:
        monitor.close()
        ctl.close()


def test_a_rejected_device_gets_no_credentials_and_says_why(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, _, admin = fleet
    ctl = _controller(admin, decide=lambda d: "reject")
    try:
        agent = started(Agent(_config(tmp_path, broker.url), source=LocalSource()))
        wait_until(lambda: any(e["event"] == "enrolment_rejected" for e in _outbox(agent)),
              "the rejected event")
        ev = next(e for e in _outbox(agent) if e["event"] == "enrolment_rejected")
        assert ev["reason"] == "not on the list"
        assert not (agent.config.identity_dir / "credentials.json").exists()
        assert agent.connection is not None and not agent.connection.connected
    finally:
        ctl.close()


def test_a_retained_acceptance_is_taken_without_asking_again(
        tmp_path: Path, fleet: Any) -> None:
    """Asking again would make the controller issue new credentials (and drop the ones
    the device is about to use)."""
    broker, _, admin = fleet
    ctl = _controller(admin)
    try:
        key = DeviceKey.load_or_create(tmp_path / "device.key")
        cfg = _config(tmp_path, broker.url)
        client = EnrolmentClient(
            key=key, device_id=DEV, batch=BATCH, facts={"site": "lab"}, topics=TOPICS,
            mqtt=MqttConfig(url=broker.url, fleet=FLEET, username="_claim-" + BATCH,
                            password="claim-pw"), answer_wait_s=10)
        assert cfg.identity is not None
        # Whatever is retained on the answer topic is read as hostile: junk is skipped.
        ctl.conn.publish_wait(TOPICS.enrol_answer(BATCH, DEV), b'{"state": [[[[[', retain=True)
        first = client.attempt()
        assert first.state == "accepted" and first.creds is not None
        assert first.creds.issued == 1 and ctl.requests[DEV] == 1
        again = client.attempt()
        ctl.do(lambda: None)  # whatever it received is handled
        assert again.state == "accepted" and again.creds == first.creds
        assert ctl.requests[DEV] == 1
        # Credentials the broker refused are no use: the device asks, and gets new ones.
        renewed = client.attempt(refused_issued=1)
        assert renewed.creds is not None and renewed.creds.issued == 2
        assert ctl.requests[DEV] == 2
        # And with them it is the device itself at the broker.
        connect_as(broker, {DEV: renewed.creds.password}, DEV).close()
    finally:
        ctl.close()


def test_groups_from_the_credentials_join_the_desired_topics(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent],
        ) -> None:
    broker, accounts, admin = fleet
    ctl = _controller(admin, groups=("lobby",))
    monitor = connect_as(broker, accounts, MONITOR)
    try:
        model = _models.offset_model(tmp_path / "m.onnx", 1.0)
        art: Artifact = build_artifact(model, tmp_path / "v1", name="adder", version="v1",
                                       sample=SAMPLE)
        monitor.publish_wait(TOPICS.group_desired("lobby"), deployment(art, 1), retain=True)
        agent = started(Agent(_config(tmp_path, broker.url), source=LocalSource()))
        wait_until(lambda: agent.slots.current is not None
              and agent.slots.current.version == "v1", "the group's deployment", 60)
        assert "lobby" in agent.config.groups
        assert agent.snapshot()["groups"] == ["lobby"]
    finally:
        monitor.close()
        ctl.close()


def test_renewal_switches_the_password_and_the_old_one_stops_working(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, _, admin = fleet
    # The first credentials are due for renewal at once; the renewed ones are not.
    ctl = _controller(admin, lifetimes=lambda n: 4.0 if n == 1 else 3600.0)
    try:
        agent = started(Agent(_config(tmp_path, broker.url, renew_fraction=0.9),
                              source=LocalSource()))
        wait_until(lambda: DEV in ctl.passwords, "the first credentials")
        first = ctl.passwords[DEV]
        assert ctl.switched.wait(30)
        conn = agent.connection
        assert conn is not None
        wait_until(lambda: _stored(agent)["current"]["credentials"]["issued"] == 2
              and _stored(agent)["pending"] is None and conn.connected,
              "the renewed password in use")
        assert ctl.passwords[DEV] != first
        with pytest.raises(TransportError, match="refused"):
            connect_as(broker, {DEV: first}, DEV).close()
        assert not any(e["event"] == "credential_renewal_failed" for e in _outbox(agent))
    finally:
        ctl.close()


def test_a_revoked_device_is_refused_and_enrols_again_with_the_same_key(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, _, admin = fleet
    verdict = {DEV: "accept"}
    ctl = _controller(admin, decide=lambda d: verdict[d])
    try:
        agent = started(Agent(_config(tmp_path, broker.url), source=LocalSource()))
        conn = agent.connection
        assert conn is not None
        wait_until(lambda: conn.connected, "the first connection")
        verdict[DEV] = "pending"
        ctl.do(lambda: ctl.revoke(BATCH, DEV))
        wait_until(lambda: any(e["event"] == "enrolment_pending" for e in _outbox(agent)),
              "a new enrolment request")
        assert not conn.connected
        assert not (_stored(agent)["current"] or _stored(agent)["pending"])
        verdict[DEV] = "accept"
        wait_until(lambda: conn.connected, "the connection with the re-issued credentials")
        assert _stored(agent)["current"]["credentials"]["issued"] == 2
        assert len(set(ctl.fingerprints)) == 1  # the same key throughout
    finally:
        ctl.close()


def test_a_renewal_the_broker_never_switches_to_is_dropped_and_the_link_kept(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, accounts, admin = fleet
    ctl = _controller(admin, lifetimes=lambda n: 4.0 if n == 1 else 3600.0)
    ctl.switch = False
    monitor = connect_as(broker, accounts, MONITOR)
    try:
        events = _Watch(monitor, TOPICS.events(DEV))
        agent = started(Agent(_config(tmp_path, broker.url, renew_fraction=0.9,
                                      answer_wait_s=0.5), source=LocalSource()))
        conn = agent.connection
        assert conn is not None
        wait_until(lambda: conn.connected, "the first connection")
        wait_until(lambda: any(e["event"] == "credential_renewal_failed"
                          for e in _outbox(agent)) or any(
              e.get("event") == "credential_renewal_failed" for e in events.got),
              "the renewal failure")
        stored = _stored(agent)
        assert stored["pending"] is None
        assert stored["current"]["credentials"]["issued"] == 1
        assert conn.connected  # serving on with the password the broker still has
        failed = next(e for e in [*_outbox(agent), *events.got]
                      if e.get("event") == "credential_renewal_failed")
        assert "did not switch" in failed["reason"]
    finally:
        monitor.close()
        ctl.close()


def test_a_restart_between_ack_and_switch_finds_the_password_that_works(
        tmp_path: Path, fleet: Any) -> None:
    """The agent stored renewed credentials and acked them, then stopped; the broker
    switched while it was away. On restart the current password is refused, the pending
    one works and becomes current: no enrolment needed."""
    broker, _, admin = fleet
    # Renewal due after a second; the first password stays unexpired (and is refused only
    # because the broker switched).
    ctl = _controller(admin, lifetimes=lambda n: 100.0 if n == 1 else 3600.0)
    ctl.switch = False
    cfg = _config(tmp_path, broker.url, renew_fraction=0.99, answer_wait_s=5.0)
    try:
        agent = Agent(cfg, source=LocalSource())
        agent.start()
        try:
            wait_until(lambda: (agent.config.identity_dir / "credentials.json").exists()
                  and _stored(agent)["pending"] is not None, "renewed credentials stored")
        finally:
            agent.stop()
        pending = _stored(agent)["pending"]["credentials"]
        ctl.do(lambda: admin.set_password(DEV, pending["password"]))
        requests = ctl.requests[DEV]

        again = Agent(cfg, source=LocalSource())
        again.start()
        try:
            conn = again.connection
            assert conn is not None
            wait_until(lambda: conn.connected and _stored(again)["pending"] is None,
                  "the connection with the switched password")
            assert _stored(again)["current"]["credentials"]["issued"] == pending["issued"]
            assert ctl.requests[DEV] == requests  # no enrolment
        finally:
            again.stop()
    finally:
        ctl.close()


def test_devices_of_one_batch_enrol_together_through_the_shared_claim_session(
        tmp_path: Path, fleet: Any) -> None:
    """The claim account is one session at the broker (use_username_as_clientid): devices
    enrolling at once take it from each other, retry soon, and all get through."""
    broker, _, admin = fleet
    ctl = _controller(admin)
    agents: list[Agent] = []
    try:
        for i in range(4):
            cfg = _config(tmp_path / f"d{i}", broker.url, answer_wait_s=1.0)
            agents.append(Agent(dataclasses.replace(cfg, device_id=f"dev-{i}"),
                                source=LocalSource()))
        for a in agents:
            a.start()
        for a in agents:
            conn = a.connection
            assert conn is not None
            wait_until(lambda c=conn: c.connected, f"{a.config.device_id} connected", 60)
        assert sorted(ctl.issued) == [f"dev-{i}" for i in range(4)]
    finally:
        for a in agents:
            a.stop()
        ctl.close()


class _Gathering(MiniController):
    """Holds every enrolment request until ``until`` devices have asked: each device's
    exchange stays open on its claim session meanwhile, so devices sharing a session
    account would surely take it from each other."""

    def __init__(self, *args: Any, until: int, **kw: Any) -> None:
        self.until = until
        self.held: list[tuple[str, bytes]] = []
        self.gathered = False
        super().__init__(*args, **kw)

    def _enrol(self, topic: str, payload: bytes) -> None:
        if not self.gathered:
            self.held.append((topic, payload))
            asked = {TOPICS.enrol_requester(t) for t, _ in self.held}
            if len(asked) < self.until:
                return
            self.gathered = True
        held, self.held = self.held or [(topic, payload)], []
        for t, p in held:
            super()._enrol(t, p)


def test_devices_on_different_claim_sessions_enrol_together_without_taking_over(
        tmp_path: Path, fleet: Any) -> None:
    broker, _, admin = fleet
    ids: dict[int, str] = {}
    for i in range(200):  # four devices whose sessions of the 16 differ
        ids.setdefault(claim_session(f"dev-{i}", 16), f"dev-{i}")
    chosen = list(ids.values())[:4]
    ctl = _Gathering(admin.connection, admin, until=len(chosen))
    agents: list[Agent] = []
    try:
        for dev in chosen:
            cfg = _config(tmp_path / dev, broker.url, answer_wait_s=20.0, claim_sessions=16)
            agents.append(Agent(dataclasses.replace(cfg, device_id=dev),
                                source=LocalSource()))
        for a in agents:
            a.start()
        for a in agents:
            conn = a.connection
            assert conn is not None
            wait_until(lambda c=conn: c.connected, f"{a.config.device_id} connected", 60)
        assert sorted(ctl.issued) == sorted(chosen)
        idents = [a.identity for a in agents]
        assert [(i.attempts, i.takeovers) for i in idents if i is not None] == [(1, 0)] * 4
    finally:
        for a in agents:
            a.stop()
        ctl.close()


def test_a_device_whose_claim_session_the_broker_refuses_asks_through_session_0(
        tmp_path: Path, fleet: Any) -> None:
    broker, _, admin = fleet
    admin.ensure_claim(BATCH, "claim-pw", 1)  # only _claim-b1 is left
    dev = next(f"dev-{i}" for i in range(100) if claim_session(f"dev-{i}", 16) != 0)
    ctl = _controller(admin)
    try:
        def client(password: str) -> EnrolmentClient:
            return EnrolmentClient(
                key=DeviceKey.load_or_create(tmp_path / "device.key"), device_id=dev,
                batch=BATCH, facts={}, topics=TOPICS,
                mqtt=MqttConfig(url=broker.url, fleet=FLEET, username="_claim-" + BATCH,
                                password=password, connect_timeout=5), answer_wait_s=10,
                sessions=16)

        wrong = client("wrong").attempt()
        own = claim_username(BATCH, claim_session(dev, 16))
        assert wrong.state == "refused" and own in wrong.reason and \
            "_claim-b1 (" in wrong.reason and "identity.claim_password" in wrong.reason
        c = client("claim-pw")
        assert c.session != 0 and not c.fell_back
        out = c.attempt()
        assert out.state == "accepted" and out.creds is not None and c.fell_back
        assert ctl.requests[dev] == 1
        connect_as(broker, {dev: out.creds.password}, dev).close()
    finally:
        ctl.close()


def test_agent_check_says_whether_the_device_is_enrolled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sdk.cli import main

    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "{DEV}"\nfleet = "{FLEET}"\nstate_dir = "{state}"\n'
                   f'[identity]\nbatch = "{BATCH}"\nclaim_password = "claim-secret"\n')
    assert main(["agent", "--config", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"identity: not enrolled yet (claim batch {BATCH}" in out
    CredentialStore(state / "identity").save(Keyring(Held(
        creds(3, time.time() + 100, groups=("lobby",)), time.time())))
    assert main(["agent", "--config", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"enrolled as {DEV}, credentials #3" in out and "groups lobby" in out
    assert "claim-secret" not in out and "pw-3" not in out
    cfg.write_text(cfg.read_text() + 'renew_fraction = 2\n')
    assert main(["agent", "--config", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "identity.renew_fraction" in err and "Traceback" not in err


def test_a_wrong_claim_password_is_reported_once_naming_the_key(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, _, _ = fleet
    agent = started(Agent(_config(tmp_path, broker.url, claim_password="wrong",
                                  poll_s=0.05), source=LocalSource()))

    def refused() -> list[dict[str, Any]]:
        return [e for e in _outbox(agent) if e["event"] == "enrolment_refused"]

    wait_until(refused, "the refusal")
    assert "identity.claim_password" in refused()[0]["reason"]
    assert "\n" not in refused()[0]["reason"]
    # Tried again and again, said once.
    ident = agent.identity
    assert ident is not None
    wait_until(lambda: ident.attempts >= 4, "more attempts")
    assert len(refused()) == 1


def test_the_ca_bundle_from_the_controller_carries_the_link_across_a_broker_ca_change(
        tmp_path: Path) -> None:
    """The device is provisioned trusting the old CA only; its credentials bring a bundle
    of the old and the new one; the broker moves to a certificate of the new CA and the
    device's link follows (mqtts)."""
    ca_a, cert_a, key_a = tls_files(tmp_path / "a")
    ca_b, cert_b, key_b = tls_files(tmp_path / "b")
    bundle = ca_a.read_text() + ca_b.read_text()
    (tmp_path / "bundle.pem").write_text(bundle)
    auth = tmp_path / "dynsec"
    accounts = broker_config(auth, fleet=FLEET)
    base = mosquitto_settings((auth / "dynamic-security.json").resolve()).replace(
        "allow_anonymous false\n", "")

    def tls(ca: Path, cert: Path, key: Path) -> str:
        return base + f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"

    with Mosquitto(tmp_path / "broker", allow_anonymous=False,
                   extra_conf=tls(ca_a, cert_a, key_a)) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        serve = MqttConnection(MqttConfig(url=url, fleet=FLEET, username=SERVE,
                                          password=accounts[SERVE],
                                          ca_file=str(tmp_path / "bundle.pem")))
        serve.connect()
        ctl = None
        try:
            admin = DynsecAdmin(serve, fleet=FLEET)
            admin.ensure_claim(BATCH, "claim-pw")
            ctl = MiniController(serve, admin, ca_pem=bundle)
            cfg = _config(tmp_path, url)
            cfg = dataclasses.replace(cfg, broker=dataclasses.replace(
                cfg.broker, tls=TlsConfig(ca_file=ca_a)))
            agent = Agent(cfg, source=LocalSource())
            agent.start()
            try:
                conn = agent.connection
                assert conn is not None
                wait_until(lambda: conn.connected, "the device's connection on the old CA")
                assert (cfg.identity_dir / "ca.pem").read_text() == bundle
                # The broker changes certificates: only the bundle trusts the new one.
                broker.stop()
                broker.conf.write_text(broker.conf.read_text().replace(
                    tls(ca_a, cert_a, key_a), tls(ca_b, cert_b, key_b)))
                broker.start()
                wait_until(lambda: conn.connected, "the device's connection on the new CA")
                # Enrolling again (revoked) goes through the claim account on the new CA
                # too: the bundle serves every connection, not only the device's.
                ctl.do(lambda: ctl.revoke(BATCH, DEV))
                wait_until(lambda: ctl.issued.get(DEV) == 2 and conn.connected,
                      "the device back on re-issued credentials")
            finally:
                agent.stop()
        finally:
            if ctl is not None:
                ctl.close()
            serve.close()


def test_renewed_credentials_stored_before_a_restart_are_acked_again(
        tmp_path: Path, fleet: Any) -> None:
    """The agent stopped after storing renewed credentials whose ack the controller did
    not act on. After the restart it connects with the current ones, acks the pending
    ones again, and the broker switches: renewal is not blocked until expiry."""
    broker, _, admin = fleet
    ctl = _controller(admin, lifetimes=lambda n: 100.0 if n == 1 else 3600.0)
    ctl.switch = False
    cfg = _config(tmp_path, broker.url, renew_fraction=0.99, answer_wait_s=5.0)
    try:
        agent = Agent(cfg, source=LocalSource())
        agent.start()
        try:
            wait_until(lambda: (agent.config.identity_dir / "credentials.json").exists()
                  and _stored(agent)["pending"] is not None, "renewed credentials stored")
        finally:
            agent.stop()
        ctl.switch = True

        again = Agent(cfg, source=LocalSource())
        again.start()
        try:
            conn = again.connection
            assert conn is not None
            assert ctl.switched.wait(30)
            wait_until(lambda: conn.connected and _stored(again)["pending"] is None,
                  "the switched password in use")
            assert _stored(again)["current"]["credentials"]["issued"] == 2
        finally:
            again.stop()
    finally:
        ctl.close()


def test_enrolment_and_the_device_link_survive_broker_restarts(
        tmp_path: Path, fleet: Any, started: Callable[[Agent], Agent]) -> None:
    broker, _, admin = fleet
    verdict = {DEV: "pending"}
    ctl = _controller(admin, decide=lambda d: verdict[d])
    try:
        agent = started(Agent(_config(tmp_path, broker.url), source=LocalSource()))
        wait_until(lambda: any(e["event"] == "enrolment_pending" for e in _outbox(agent)),
              "the pending event")
        broker.restart(downtime=1.0)  # while enrolling
        verdict[DEV] = "accept"
        assert agent.connection is not None
        wait_until(lambda: agent.connection is not None and agent.connection.connected,
              "the device link up after the restart", 60)
        broker.restart(downtime=1.0)  # while linked: the same credentials work again
        wait_until(lambda: agent.connection is not None and not agent.connection.connected,
              "the link down", 30)
        wait_until(lambda: agent.connection is not None and agent.connection.connected,
              "the device link back", 60)
        assert agent.identity is not None and agent.identity.alive
        assert _stored(agent)["current"]["credentials"]["issued"] == 1
    finally:
        ctl.close()
