"""The device's identity on the agent (``[identity]``): enrolment through the claim
account, the stored broker credentials, their renewal, and the fallbacks when the broker
refuses them.

The device's key is its identity (made here, never sent); the broker password is a
short-lived credential the controller seals to that key. Three parts:

- :class:`Keyring` (pure, no I/O): the credentials held (``current``, and ``pending``
  between a renewal answer and the broker switching to it), which one the link uses, and
  what to do when the broker refuses it: the other one once, then enrol again.
- :class:`CredentialStore` and :class:`EnrolmentClient`: the files (``credentials.json``
  0600, ``ca.pem``) and one enrolment exchange over a short-lived claim connection.
- :class:`IdentityService`: the thread that drives them over the agent's broker link.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_sdk._internal import atomic_write_text, loads_bounded
from edge_sdk.errors import EdgeError

if TYPE_CHECKING:
    from edge_sdk.identity import Credentials, DeviceKey, EnrolAnswer
    from edge_sdk.transport import MqttConfig, MqttConnection, Topics

    from ._config import AgentConfig

log = logging.getLogger("device_agent.identity")

CREDENTIALS_FILE = "credentials.json"
CA_FILE = "ca.pem"
#: credentials.json holds two credentials and their CA bundles.
_MAX_STORE_BYTES = 64 * 1024
#: The largest ``ca.pem`` used (the controller sends at most 4 KiB).
_MAX_CA_BYTES = 64 * 1024
#: Renewal retries wait at least this long (and at most a tenth of the lifetime).
MIN_RENEW_BACKOFF_S = 10.0
#: After an enrolment exchange was taken over (another device connected as the same claim
#: session account, whose connections the broker names after it), the next one comes
#: after this, doubling with each takeover in a row up to ``poll_s`` (+-50 %): soon after
#: one, but devices that keep colliding spread out instead of taking turns closing each
#: other (an ALOHA collapse).
TAKEOVER_BACKOFF_S = 1.0


# -- pure part -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """Credentials as the device holds them: with the time they were received (the
    lifetime is counted from there: the device's clock need not agree with the
    controller's on absolute time, only on durations)."""

    creds: Credentials
    received_at: float

    @property
    def lifetime(self) -> float:
        return max(1.0, self.creds.expires_at - self.received_at)

    def seconds_left(self, now: float) -> float:
        return self.creds.expires_at - now

    def to_dict(self) -> dict[str, Any]:
        return {"credentials": self.creds.to_dict(), "received_at": self.received_at}


class Keyring:
    """Which credentials the device holds and uses. No I/O and no clock: the caller
    passes ``now``, saves :meth:`to_json` after a change and moves the link.

    ``using`` is ``"current"``, ``"pending"`` or None (nothing usable: enrol).
    """

    def __init__(self, current: Held | None = None, pending: Held | None = None, *,
                 renew_fraction: float = 0.33) -> None:
        self.current = current
        self.pending = pending
        self.renew_fraction = renew_fraction
        self.using: str | None = None
        self._tried_other = False
        #: The highest ``issued`` the broker refused: an enrolment answer not newer than
        #: this (a retained one) is no use.
        self.refused_issued = 0

    def held(self, which: str | None) -> Held | None:
        return self.current if which == "current" else self.pending if which else None

    def choose(self, now: float) -> Credentials | None:
        """The credentials to connect with now: the current ones unless expired, else the
        pending ones unless expired; None when neither (enrol)."""
        for which in ("current", "pending"):
            h = self.held(which)
            if h is not None and h.seconds_left(now) > 0:
                self.using = which
                self._tried_other = False
                return h.creds
        # Expired: the answer retained for them is no use either.
        self.refused_issued = max([self.refused_issued] + [
            x.creds.issued for x in (self.current, self.pending) if x is not None])
        self.using = None
        return None

    def refused(self) -> Credentials | None:
        """The broker refused the credentials in use. Returns the other ones to try
        (once), or None: both refused, the device holds nothing usable any more (revoked,
        expired, or its password was lost), and it enrols again with the same key."""
        if self.using is None:
            return None
        other = "pending" if self.using == "current" else "current"
        h = self.held(other)
        if not self._tried_other and h is not None:
            self._tried_other = True
            self.using = other
            return h.creds
        self.refused_issued = max([self.refused_issued] + [
            x.creds.issued for x in (self.current, self.pending) if x is not None])
        self.current = self.pending = None
        self.using = None
        self._tried_other = False
        return None

    def connected(self) -> bool:
        """The broker accepted the credentials in use. True when that promoted the pending
        ones to current (the controller switched the password: save)."""
        self._tried_other = False
        if self.using == "pending" and self.pending is not None:
            self.current, self.pending = self.pending, None
            self.using = "current"
            return True
        return False

    def issued(self, creds: Credentials, now: float) -> None:
        """Enrolment gave these credentials: the only ones held from now on."""
        self.current, self.pending = Held(creds, now), None
        self.using = "current"
        self._tried_other = False

    def renewed(self, creds: Credentials, now: float) -> None:
        """A renewal answer gave these; the link switches to them from its next connection
        (the controller sets them at the broker once it has the device's ack, which kicks
        the link)."""
        self.pending = Held(creds, now)
        self.using = "pending"
        self._tried_other = False

    def resume_pending(self) -> Credentials | None:
        """Pending credentials held while the link uses the current ones (renewed before a
        restart, the switch not seen): the link moves to them once they are acked again;
        returns them (None when there are none to resume)."""
        if self.pending is None or self.using != "current":
            return None
        self.using = "pending"
        self._tried_other = False
        return self.pending.creds

    def drop_pending(self) -> Credentials | None:
        """Forget pending credentials the broker never switched to; returns the current
        ones when the link must go back to them."""
        self.pending = None
        if self.using == "pending":
            self.using = "current" if self.current is not None else None
            return self.current.creds if self.current is not None else None
        return None

    def seconds_left(self, now: float) -> float:
        """Seconds until the credentials in use expire (0 when there are none)."""
        h = self.held(self.using) or self.current
        return max(0.0, h.seconds_left(now)) if h is not None else 0.0

    def renewal_due(self, now: float) -> bool:
        """Less than ``renew_fraction`` of the current credentials' lifetime is left, and
        no renewal waits for the broker."""
        h = self.current
        return (h is not None and self.pending is None and self.using == "current"
                and h.seconds_left(now) < self.renew_fraction * h.lifetime)

    def to_json(self) -> str:
        return json.dumps({"current": None if self.current is None else self.current.to_dict(),
                           "pending": None if self.pending is None else self.pending.to_dict()},
                          separators=(",", ":"))

    @staticmethod
    def parse(text: bytes) -> tuple[Held | None, Held | None]:
        """(current, pending) from :meth:`to_json`'s text; raises ValueError (or
        :class:`~edge_sdk.identity.IdentityError`) for anything else."""
        from edge_sdk.identity import Credentials

        doc = loads_bounded(text, max_bytes=_MAX_STORE_BYTES, max_depth=4)
        if not isinstance(doc, dict) or set(doc) != {"current", "pending"}:
            raise ValueError("expected the keys current and pending")
        out: list[Held | None] = []
        for k in ("current", "pending"):
            one = doc[k]
            if one is None:
                out.append(None)
                continue
            if not isinstance(one, dict) or set(one) != {"credentials", "received_at"} or \
                    not isinstance(one["received_at"], int | float) or \
                    isinstance(one["received_at"], bool):
                raise ValueError(f"{k}: expected credentials and received_at")
            out.append(Held(Credentials.from_json(one["credentials"]),
                            float(one["received_at"])))
        return out[0], out[1]


def enrol_delay(poll_s: float, rnd: float, *, takeovers: int = 0) -> float:
    """Seconds until the next enrolment exchange: ``poll_s`` +-50 % (``rnd`` in [0, 1)),
    so that a batch of devices switched on together spreads out. After ``takeovers``
    exchanges in a row were taken over: :data:`TAKEOVER_BACKOFF_S` doubling with each,
    at most ``poll_s``, +-50 %."""
    base = poll_s
    if takeovers > 0:
        base = min(poll_s, TAKEOVER_BACKOFF_S * 2.0 ** min(takeovers - 1, 30))
    return base * (0.5 + rnd)


def renew_backoff(failures: int, lifetime: float) -> float:
    """Seconds before renewal attempt ``failures + 1``: doubling from
    :data:`MIN_RENEW_BACKOFF_S`, at most a tenth of the lifetime (never below the minimum)."""
    cap = max(MIN_RENEW_BACKOFF_S, lifetime / 10)
    return min(cap, MIN_RENEW_BACKOFF_S * 2.0 ** max(0, failures - 1))


@dataclass(frozen=True)
class Outcome:
    """What one enrolment exchange came to. ``state``: ``accepted`` (``creds`` set),
    ``pending``, ``rejected``, ``refused`` (the controller refused the request, or the
    answer could not be used), ``silent`` (no answer in time) or ``unreachable`` (no
    claim connection). ``kicked``: the claim session was taken over meanwhile."""

    state: str
    reason: str = ""
    creds: Credentials | None = None
    kicked: bool = False


def judge(answer: EnrolAnswer, *, fingerprint: str, refused_issued: int) -> str | None:
    """What an answer on the device's enrolment topic means for this key: its state, or
    None when it is not for this key (another key's, or credentials the broker already
    refused)."""
    if answer.fingerprint != fingerprint:
        # Refusals too: anyone holding the claim can send garbage on this device's
        # request topic, and every claim holder reads the refusals it earns.
        return None
    if answer.state == "accepted" and answer.issued <= refused_issued:
        return None
    return answer.state


# -- I/O edge ------------------------------------------------------------------------------

#: Answers waiting to be read; more (only the controller may publish them) are dropped.
_MAX_WAITING = 16


def _offer(waiting: queue.Queue[bytes], payload: bytes) -> None:
    """Queue an answer from the network thread: never blocks, never holds more than
    :data:`_MAX_WAITING` answers of at most ``MAX_ANSWER_BYTES`` each."""
    from edge_sdk.identity import MAX_ANSWER_BYTES

    if len(payload) > MAX_ANSWER_BYTES:
        log.warning("dropped a %d-byte answer (at most %d)", len(payload), MAX_ANSWER_BYTES)
        return
    try:
        waiting.put_nowait(payload)
    except queue.Full:
        log.warning("dropped an answer: %d are waiting already", _MAX_WAITING)


class CredentialStore:
    """``credentials.json`` (0600, written atomically) and ``ca.pem`` in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / CREDENTIALS_FILE
        self.ca_path = directory / CA_FILE
        self._ca_said: str | None = None

    def _mkdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    def load(self) -> tuple[Held | None, Held | None]:
        """What was stored; nothing when there is no file or it cannot be used (then the
        device enrols again: its key is what counts)."""
        try:
            with open(self.path, "rb") as f:  # bounded: parse refuses what is longer
                raw = f.read(_MAX_STORE_BYTES + 1)
        except FileNotFoundError:
            return None, None
        except OSError as err:
            log.warning("%s: cannot read (%s); enrolling again", self.path, err.strerror)
            return None, None
        try:
            return Keyring.parse(raw)
        except (ValueError, EdgeError) as err:
            log.warning("%s: unusable (%s); enrolling again", self.path, err)
            return None, None

    def save(self, keyring: Keyring) -> bool:
        """Write the keyring; False (logged) when the state directory cannot be written:
        the credentials still serve from memory, and after a restart the device enrols
        again (its key is what counts)."""
        try:
            self._mkdir()
            # mkstemp makes the temporary file 0600: no one else can read the passwords.
            atomic_write_text(self.path, keyring.to_json())
        except OSError as err:
            log.error("cannot save the broker credentials in %s: %s", self.path,
                      err.strerror or err)
            return False
        return True

    def usable_ca(self) -> bool:
        """Whether ``ca.pem`` is there and holds PEM certificates (read bounded); a corrupt
        one is logged once."""
        from cryptography import x509

        try:
            with open(self.ca_path, "rb") as f:
                raw = f.read(_MAX_CA_BYTES + 1)
        except FileNotFoundError:
            return False
        except OSError as err:
            why = f"cannot read ({err.strerror})"
        else:
            try:
                if len(raw) > _MAX_CA_BYTES:
                    raise ValueError(f"over {_MAX_CA_BYTES} bytes")
                x509.load_pem_x509_certificates(raw)
                self._ca_said = None
                return True
            except ValueError as err:
                why = f"not PEM certificates ({str(err)[:80]})"
        if why != self._ca_said:
            self._ca_said = why
            log.warning("%s: %s; ignored (the broker's CA from the config is used)",
                        self.ca_path, why)
        return False

    def save_ca(self, ca_pem: str) -> Path | None:
        """Write the broker's CA bundle; None (logged) when it cannot be written."""
        try:
            self._mkdir()
            atomic_write_text(self.ca_path, ca_pem)
        except OSError as err:
            log.error("cannot save the broker's CA bundle in %s: %s", self.ca_path,
                      err.strerror or err)
            return None
        return self.ca_path


def _set_when_down(event: threading.Event) -> Callable[[bool], None]:
    """A connection listener that sets ``event`` when the link goes down."""
    def listener(up: bool) -> None:
        if not up:
            event.set()
    return listener


class EnrolmentClient:
    """One enrolment exchange per :meth:`attempt`, over its own short-lived connection
    as one of the claim's session accounts: session ``sha256(device id) % sessions``
    (``_claim<k>-<batch>``), or session 0 (``_claim-<batch>``) once the broker refused
    that one for good while it accepted session 0 (the claim has fewer sessions)."""

    def __init__(self, *, key: DeviceKey, device_id: str, batch: str, facts: dict[str, str],
                 topics: Topics, mqtt: MqttConfig, answer_wait_s: float,
                 sessions: int = 1) -> None:
        from edge_sdk.identity import claim_session

        self.key = key
        self.device_id = device_id
        self.batch = batch
        self.facts = facts
        self.topics = topics
        #: The claim connection's settings (user and client id: replaced per session).
        self.mqtt = mqtt
        self.answer_wait_s = answer_wait_s
        #: This device's session of the claim.
        self.session = claim_session(device_id, sessions)
        #: True once the broker refused :attr:`session` and took session 0.
        self.fell_back = False

    def _mqtt_for(self, session: int) -> MqttConfig:
        from edge_sdk.identity import claim_username

        user = claim_username(self.batch, session)
        return dataclasses.replace(self.mqtt, username=user, client_id=user)

    def _connect(self) -> tuple[MqttConnection, threading.Event] | Outcome:
        """A claim connection (its session's account, else session 0's), with the event
        set when it drops; or the outcome when there is none."""
        from edge_sdk.transport import MqttConnection

        sessions = [0] if self.fell_back or self.session == 0 else [self.session, 0]
        refusals: list[str] = []
        for session in sessions:
            mqtt = self._mqtt_for(session)
            dropped = threading.Event()
            conn: MqttConnection | None = None
            try:
                conn = MqttConnection(mqtt, name=f"enrol-{self.device_id}")
                conn.add_connection_listener(_set_when_down(dropped))
                # A refused claim ends the attempt at once (no reconnect to wait out).
                conn.on_refused(lambda reason: None)
                conn.connect()
            except EdgeError as err:
                if conn is not None:
                    conn.close()
                if conn is None or conn.refused is None:
                    return Outcome("unreachable", str(err))
                refusals.append(f"{mqtt.username} ({conn.refused})")
                if session != 0:
                    log.info("the broker refused claim session account %s (%s): asking "
                             "through session 0", mqtt.username, conn.refused)
                continue
            if session == 0 and self.session != 0 and refusals:
                self.fell_back = True
            return conn, dropped
        return Outcome("refused", f"the broker refused the claim account "
                       f"{' and '.join(refusals)}: the claim was revoked, or "
                       "identity.claim_password is wrong")

    def attempt(self, *, refused_issued: int = 0) -> Outcome:
        answers: queue.Queue[bytes] = queue.Queue(_MAX_WAITING)
        got_conn = self._connect()
        if isinstance(got_conn, Outcome):
            return got_conn
        conn, dropped = got_conn
        try:
            topic = self.topics.enrol_answer(self.batch, self.device_id)
            conn.subscribe(topic, lambda t, p: _offer(answers, p))
            # A second SUBACK on the same stream comes after the retained answer the
            # first subscription brought: what is retained is in the queue now.
            conn.subscribe(topic, lambda t, p: None).cancel()
            retained = self._read(answers, refused_issued)
            if retained is not None and retained.state in ("accepted", "rejected"):
                # Asking again would make the controller issue new credentials.
                return retained
            request = self._request()
            conn.publish_wait(self.topics.enrol_request(self.batch, self.device_id), request)
            deadline = time.monotonic() + self.answer_wait_s
            while not dropped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    payload = answers.get(timeout=min(left, 0.2))
                except queue.Empty:
                    continue
                got = self._read_one(payload, refused_issued)
                if got is not None:
                    # The exchange ends here: the session is free for the next device.
                    return got
            if dropped.is_set():
                return Outcome("silent", "the claim session was taken over", kicked=True)
            return Outcome("silent", f"no answer within {self.answer_wait_s:g} s")
        except EdgeError as err:
            return Outcome("unreachable", str(err), kicked=dropped.is_set())
        finally:
            conn.close()

    def _request(self) -> bytes:
        from edge_sdk.identity import EnrolRequest

        return EnrolRequest.create(self.key, self.device_id, self.batch, self.facts).to_bytes()

    def _read(self, answers: queue.Queue[bytes], refused_issued: int) -> Outcome | None:
        """The last usable answer waiting in ``answers`` (emptied)."""
        last = None
        while True:
            try:
                payload = answers.get_nowait()
            except queue.Empty:
                return last
            last = self._read_one(payload, refused_issued) or last

    def _read_one(self, payload: bytes, refused_issued: int) -> Outcome | None:
        from edge_sdk.identity import EnrolAnswer

        if not payload:
            return None  # a cleared retained answer (revoked)
        try:
            answer = EnrolAnswer.from_bytes(payload, device_id=self.device_id)
        except EdgeError as err:
            log.warning("ignoring an enrolment answer: %s", err)
            return None
        state = judge(answer, fingerprint=self.key.fingerprint, refused_issued=refused_issued)
        if state is None:
            return None
        if state != "accepted":
            return Outcome(state, answer.reason)
        assert answer.sealed is not None
        try:
            creds = self.key.open(answer.sealed, device_id=self.device_id)
        except EdgeError as err:
            return Outcome("refused", f"the accepted answer could not be opened: {err}")
        if creds.username != self.device_id:
            return Outcome("refused", f"the credentials name user {creds.username!r}, not "
                                      f"this device")
        return Outcome("accepted", creds=creds)


class IdentityLink(Protocol):
    """What the identity service needs from the agent's broker link (an
    ``edge_sdk.transport.MqttConnection``)."""

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float | None = None, *, wait: bool = True) -> None: ...

    def set_credentials(self, username: str, password: str) -> None: ...

    def set_ca_file(self, ca_file: str) -> None: ...

    def on_refused(self, listener: Callable[[str], None] | None) -> None: ...

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None: ...

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> object: ...

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None], *,
                  qos: int = 1, wait: bool = True, timeout: float = 10.0) -> object: ...


class IdentityService:
    """Enrols the device, keeps its credentials and renews them, on one thread.

    :meth:`boot` (before the link is built) says which stored credentials to connect
    with; :meth:`start` takes the link: it reconnects it with new credentials, falls back
    to the other stored password when the broker refuses one, and enrols again (same key)
    when both are refused. ``event(kind, **fields)`` reports: ``enrolment_pending``,
    ``enrolment_rejected``, ``enrolment_refused``, ``credentials_issued``,
    ``credential_renewal_failed``.
    """

    def __init__(self, config: AgentConfig, *, event: Callable[..., None],
                 rnd: Callable[[], float] = random.random) -> None:
        from edge_sdk.identity import DeviceKey
        from edge_sdk.transport import Topics

        ident = config.identity
        assert ident is not None
        self.config = config
        self.ident = ident
        self.device_id = config.device_id
        self.topics = Topics(config.fleet, config.broker.topic_prefix)
        self.key = DeviceKey.load_or_create(config.key_path)
        self.store = CredentialStore(config.identity_dir)
        current, pending = (self._ours(h) for h in self.store.load())
        self.keyring = Keyring(current, pending, renew_fraction=ident.renew_fraction)
        self._event = event
        self._rnd = rnd
        self._events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._answers: queue.Queue[bytes] = queue.Queue(_MAX_WAITING)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._link: IdentityLink | None = None
        self._on_credentials: Callable[[Credentials], None] = lambda c: None
        self._renew_failures = 0
        self._next_renew = 0.0
        #: The newest renewal hint: credentials up to this issue must be renewed now
        #: (the operator changed the device's groups).
        self._hint = 0
        #: When a renewal's pending credentials must have been switched to by the broker.
        self._promote_by: float | None = None
        self._enrol_at = 0.0
        #: Enrolment exchanges taken over in a row (another device took the session).
        self._takeovers = 0
        self._last_enrol: tuple[str, str] = ("", "")
        #: Enrolment exchanges tried so far, and how many of them were taken over (another
        #: device connected as the same claim session account).
        self.attempts = 0
        self.takeovers = 0
        self.enrolment = EnrolmentClient(
            key=self.key, device_id=config.device_id, batch=ident.batch,
            facts=dict(ident.facts), topics=self.topics, mqtt=self._claim_mqtt(),
            answer_wait_s=ident.answer_wait_s, sessions=ident.claim_sessions)

    def _ours(self, held: Held | None) -> Held | None:
        """``held`` if it is this device's: a state directory copied from another device
        (a cloned image) must not make this one connect as that one."""
        if held is not None and held.creds.username != self.device_id:
            log.warning("%s holds credentials of %r, not of this device %r: ignored; "
                        "enrolling as %r", self.store.path, held.creds.username,
                        self.device_id, self.device_id)
            return None
        return held

    # -- what the agent calls ----------------------------------------------------------

    def boot(self) -> Credentials | None:
        """The stored credentials to connect with (None: enrol first)."""
        with self._lock:
            return self.keyring.choose(time.time())

    @property
    def ca_file(self) -> Path | None:
        """The broker's CA bundle from the controller, if one came and holds PEM
        certificates (a corrupt one is ignored, not trusted: else no connection, not
        even the one to enrol again, could ever be made)."""
        return self.store.ca_path if self.store.usable_ca() else None

    def seconds_left(self) -> float:
        with self._lock:
            return self.keyring.seconds_left(time.time())

    def start(self, link: IdentityLink, *,
              on_credentials: Callable[[Credentials], None]) -> None:
        """Drive ``link``: ``on_credentials(creds)`` runs (on this service's thread) before
        the link first uses new credentials (the agent follows their groups)."""
        self._link = link
        self._on_credentials = on_credentials
        link.on_refused(lambda reason: self._events.put(("refused", reason)))
        link.add_connection_listener(lambda up: self._events.put(("up", "")) if up else None)
        link.subscribe(self.topics.cred_answer(self.device_id),
                       lambda t, p: self._on_cred_message(p), wait=False)
        self._thread = threading.Thread(target=self._run, name="agent-identity", daemon=True)
        self._thread.start()

    def _on_cred_message(self, payload: bytes) -> None:
        """A message on the device's ``cred/res`` topic (network thread): a renewal hint
        (retained: it is there again after every reconnect until a renewal made it out
        of date) goes to this service's thread; anything else is a renewal answer."""
        from edge_sdk.identity import MAX_HINT_BYTES, EnrolmentRefused, RenewHint

        if not payload:
            return  # a hint cleared
        if len(payload) <= MAX_HINT_BYTES:
            try:
                hint = RenewHint.from_bytes(payload, device_id=self.device_id)
            except EnrolmentRefused:
                pass
            else:
                self._events.put(("hint", str(hint.issued)))
                return
        _offer(self._answers, payload)

    def stop(self) -> None:
        self._stop.set()
        self._events.put(("stop", ""))
        if self._thread is not None:
            self._thread.join(10)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except Exception:
                # Nothing a message or the broker does may end this thread.
                log.exception("the identity service failed; going on")
                wait = MIN_RENEW_BACKOFF_S
            try:
                kind, reason = self._events.get(timeout=max(0.05, wait))
            except queue.Empty:
                continue
            try:
                self._handle(kind, reason)
            except Exception:
                log.exception("the identity service failed on %s; going on", kind)

    def _step(self) -> float:
        """Do what is due; returns the seconds until something may be due again."""
        now = time.time()
        if self.keyring.using is None:
            if time.monotonic() >= self._enrol_at:
                self._enrol()
            return max(0.0, self._enrol_at - time.monotonic())
        if self._promote_by is not None and time.monotonic() > self._promote_by:
            self._renewal_failed("the broker did not switch to the renewed password "
                                 f"within {self._promote_wait():g} s")
        if (self.keyring.renewal_due(now) or self._hinted()) \
                and time.monotonic() >= self._next_renew:
            self._renew()
        return 1.0

    def _hinted(self) -> bool:
        """A hint asks to renew the current credentials, and no renewal waits for the
        broker."""
        k = self.keyring
        return (k.current is not None and k.pending is None and k.using == "current"
                and k.current.creds.issued <= self._hint)

    def _handle(self, kind: str, reason: str) -> None:
        link = self._link
        assert link is not None
        if kind == "hint":
            issued = int(reason)
            with self._lock:
                cur = self.keyring.current
            if issued > self._hint and cur is not None and cur.creds.issued <= issued:
                log.info("the controller asks to renew credentials #%d now (the device's "
                         "groups changed)", cur.creds.issued)
                self._next_renew = 0.0  # not after a backoff of an earlier failure
            self._hint = max(self._hint, issued)
        elif kind == "up":
            with self._lock:
                promoted = self.keyring.connected()
            if promoted:
                self._promote_by = None
                self._renew_failures = 0
                self.store.save(self.keyring)
                log.info("the broker switched to the renewed credentials")
            elif self._promote_by is None:
                self._resume_renewal()
        elif kind == "refused":
            with self._lock:
                other = self.keyring.refused()
            if other is not None:
                log.warning("the broker refused the device's password (%s); trying the "
                            "other stored one", reason)
                link.set_credentials(other.username, other.password)
                return
            self._promote_by = None
            self.store.save(self.keyring)
            log.warning("the broker refused the device's credentials (%s): revoked, expired "
                        "or lost; enrolling again with the same key", reason)
            self._enrol_at = 0.0

    def _enrol(self) -> None:
        with self._lock:
            refused_issued = self.keyring.refused_issued
        try:
            # Each time: a CA bundle that came with earlier credentials, a claim password
            # file changed meanwhile.
            self.enrolment.mqtt = self._claim_mqtt()
        except EdgeError as err:
            log.error("enrolment: %s", err)
            self._enrol_at = time.monotonic() + enrol_delay(self.ident.poll_s, self._rnd())
            return
        out = self.enrolment.attempt(refused_issued=refused_issued)
        self.attempts += 1
        self._takeovers = self._takeovers + 1 if out.kicked else 0
        self.takeovers += out.kicked
        self._enrol_at = time.monotonic() + enrol_delay(self.ident.poll_s, self._rnd(),
                                                        takeovers=self._takeovers)
        if out.state == "accepted":
            assert out.creds is not None
            self._issued(out.creds)
            return
        # Said once per change: a device waiting for days must not fill its report queue.
        said = (out.state, out.reason)
        if out.state in ("pending", "rejected", "refused") and said != self._last_enrol:
            fields = {"reason": out.reason} if out.reason else {}
            self._event(f"enrolment_{out.state}", batch=self.ident.batch, **fields)
        if said != self._last_enrol:
            (log.warning if out.state in ("rejected", "refused") else log.info)(
                "enrolment: %s%s", out.state, f" ({out.reason})" if out.reason else "")
        self._last_enrol = said

    def _issued(self, creds: Credentials) -> None:
        link = self._link
        assert link is not None
        with self._lock:
            self.keyring.issued(creds, time.time())
        self.store.save(self.keyring)
        self._last_enrol = ("accepted", "")
        self._use(creds)
        log.info("enrolled: credentials #%d, groups %s", creds.issued,
                 ", ".join(creds.groups) or "none")
        self._event("credentials_issued", issued=creds.issued, expires_at=creds.expires_at,
                    groups=list(creds.groups), how="enrolment")
        link.connect(wait=False)

    def _use(self, creds: Credentials) -> None:
        """Point the link at ``creds`` (and their CA bundle) from its next connection."""
        link = self._link
        assert link is not None
        ca = self.store.save_ca(creds.ca_pem) if creds.ca_pem is not None else None
        if ca is not None:
            link.set_ca_file(str(ca))
        self._on_credentials(creds)
        link.set_credentials(creds.username, creds.password)

    def _promote_wait(self) -> float:
        # The controller sets the password once it has the ack; the broker kicks the link,
        # which reconnects within a second or so.
        return 6 * self.ident.answer_wait_s

    def _renew(self) -> None:
        from edge_sdk.identity import EnrolAnswer, RenewRequest

        link = self._link
        assert link is not None
        if not link.connected:
            return  # the renewal goes over the link; it is tried again once it is up
        with self._lock:
            cur = self.keyring.current
        assert cur is not None
        while True:  # answers left over from an earlier attempt are not this one's
            try:
                self._answers.get_nowait()
            except queue.Empty:
                break
        topic = self.topics.cred_request(self.device_id)
        link.publish(topic, RenewRequest.signed(self.key, self.device_id, ack=0), qos=1)
        deadline = time.monotonic() + self.ident.answer_wait_s
        creds = None
        why = f"no answer within {self.ident.answer_wait_s:g} s"
        while creds is None and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                payload = self._answers.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            try:
                answer = EnrolAnswer.from_bytes(payload, device_id=self.device_id)
                if answer.fingerprint != self.key.fingerprint or answer.state != "accepted":
                    why = f"the controller answered {answer.state}" + (
                        f": {answer.reason}" if answer.reason else "")
                    continue
                assert answer.sealed is not None
                got = self.key.open(answer.sealed, device_id=self.device_id)
            except EdgeError as err:
                why = str(err)
                continue
            if got.issued <= cur.creds.issued or got.username != self.device_id:
                why = f"the answer carries credentials #{got.issued}, not newer ones"
                continue
            creds = got
        if creds is None:
            self._renewal_failed(why)
            return
        with self._lock:
            self.keyring.renewed(creds, time.time())
        self.store.save(self.keyring)
        # Stored before the ack: once the controller has it, the old password goes.
        link.publish(topic, RenewRequest.signed(self.key, self.device_id, ack=creds.issued),
                     qos=1)
        self._use(creds)
        self._promote_by = time.monotonic() + self._promote_wait()
        log.info("renewed credentials #%d stored and acknowledged; the broker switches "
                 "to them next", creds.issued)
        self._event("credentials_issued", issued=creds.issued, expires_at=creds.expires_at,
                    groups=list(creds.groups), how="renewal")

    def _resume_renewal(self) -> None:
        """Renewed credentials stored before a restart (or a crash between storing and
        acking them) are acked again: the controller switches the broker to them, or the
        switch times out and a new renewal starts. Without this they would block renewal
        until the current credentials expire."""
        from edge_sdk.identity import RenewRequest

        link = self._link
        assert link is not None
        with self._lock:
            pending = self.keyring.resume_pending()
        if pending is None:
            return
        link.publish(self.topics.cred_request(self.device_id),
                     RenewRequest.signed(self.key, self.device_id, ack=pending.issued), qos=1)
        link.set_credentials(pending.username, pending.password)
        self._promote_by = time.monotonic() + self._promote_wait()
        log.info("renewed credentials #%d from before a restart acknowledged again",
                 pending.issued)

    def _renewal_failed(self, why: str) -> None:
        link = self._link
        assert link is not None
        self._promote_by = None
        with self._lock:
            back = self.keyring.drop_pending()
            lifetime = self.keyring.current.lifetime if self.keyring.current else 0.0
        if back is not None:
            link.set_credentials(back.username, back.password)
        self.store.save(self.keyring)
        self._renew_failures += 1
        delay = renew_backoff(self._renew_failures, lifetime)
        self._next_renew = time.monotonic() + delay
        log.warning("credential renewal failed: %s; trying again in %.0f s", why, delay)
        self._event("credential_renewal_failed", reason=why)

    def _claim_mqtt(self) -> MqttConfig:
        from edge_sdk.identity import claim_username
        from edge_sdk.transport import MqttConfig

        b = self.config.broker
        ca = self.ca_file or b.tls.ca_file
        # Session 0's name; EnrolmentClient puts in the device's session.
        user = claim_username(self.ident.batch)
        return MqttConfig(
            url=",".join(b.all_urls), username=user,
            password=self.ident.resolved_claim_password(),
            ca_file=str(ca) if ca else None,
            cert_file=str(b.tls.cert_file) if b.tls.cert_file else None,
            key_file=str(b.tls.key_file) if b.tls.key_file else None,
            tls_insecure=b.tls.insecure, client_id=user, keepalive=b.keepalive_s,
            fleet=self.config.fleet, topic_prefix=b.topic_prefix,
            connect_timeout=self.ident.answer_wait_s,
            # Devices of the batch share each session account: a connection that is taken
            # over must not come back at once and take it back; the next attempt makes a
            # new one (after enrol_delay's backoff).
            reconnect_min_delay=2 * self.ident.answer_wait_s,
            reconnect_max_delay=2 * self.ident.answer_wait_s,
        )
