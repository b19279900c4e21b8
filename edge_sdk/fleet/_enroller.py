"""The controller's side of device identity: enrolment by claim, credentials at the broker.

A device holds its own EC key and the password of its batch's claim (one password, N
broker accounts ``_claim-<batch>``, ``_claim1-<batch>``...; it ships on every device
image). With it, it publishes an
:class:`~edge_sdk.identity.EnrolRequest` on ``{base}/enrol/<batch>/<device>/req``; the
:class:`Enroller` records the request (:mod:`._enrol`) and answers on the retained
``.../res`` topic: ``pending`` until an operator accepts or rejects the id, then
``accepted`` with broker credentials sealed to the device's key, made at the broker by
the dynamic security plugin (:class:`~._dynsec.DynsecAdmin`).

Everything on the enrolment topics is hostile: anyone holding a claim password can write
there. What reaches the database is bounded before anything is parsed: a token bucket per
batch (over it: dropped and counted, no answer) and a queue of at most ``queue``
requests between the network thread and the one worker thread that parses and writes
(full: dropped and counted); requests of a batch no claim names (or a revoked one) are
ignored. The record itself holds at most ``max_pending`` pending ids per claim batch. No
request can end the worker, and none is parsed on the network thread.

The poll loop makes the broker equal to the record (``want``): issue (a new password,
``ensure_device``, the sealed answer), revoke (delete the account: the broker closes
its connection at once), claims created and revoked. The sweep disables accounts whose
credentials expired and prunes stale pending rows. Groups: an operator who changes an
accepted device's groups (``edge-sdk device set``, the page, an assignment file) changes
its assignment; the poll loop finds the devices whose assigned groups differ from those
their account was granted, sets the account's roles to them (which kicks the device)
and leaves a retained :class:`~edge_sdk.identity.RenewHint` on the device's
``cred/res`` topic: the device renews at once and its new credentials name the new
groups. Renewal: a device signs a
:class:`~edge_sdk.identity.RenewRequest` on its ``cred/req`` topic; the enroller answers
with new credentials (sealed, not retained) and sets the new password at the broker only
once the device acknowledged having stored it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._oneline import one_line
from .._settings import numeric_settings
from ..errors import EdgeError
from ..identity import (
    MAX_ANSWER_BYTES,
    MAX_CREDENTIALS_BYTES,
    MAX_REQUEST_BYTES,
    Credentials,
    DeviceKey,
    EnrolAnswer,
    EnrolmentRefused,
    EnrolRequest,
    RenewHint,
    RenewRequest,
)
from ..identity import seal as seal_credentials
from ..transport import MqttConnection, Topics
from ..transport._responder import _TokenBucket
from . import _enrol as rec
from ._dynsec import DynsecAdmin
from ._store import DatabaseError, FleetDB, FleetError, FleetUsageError

log = logging.getLogger("edge_sdk.fleet.enroller")

DAY = 86400.0
#: The largest CA bundle sent with credentials: the sealed answer must stay under
#: :data:`~edge_sdk.identity.MAX_ANSWER_BYTES` (base64 twice, JSON around it).
MAX_CA_BYTES = MAX_CREDENTIALS_BYTES // 2
#: Renewal requests a device may send: per second, and saved up.
_RENEW_RATE, _RENEW_BURST = 1.0, 10
NO_ADMIN = ("the broker's dynamic security plugin did not answer: is mosquitto started "
            "with broker init's config and is this account its admin?")
#: How often the broker's account names are listed again (a large answer in a big fleet).
_LIST_CLIENTS_S = 60.0
#: Bounds of the in-memory tables keyed by what the network names.
_MAX_DEVICES = 100_000
#: Renewals a device may make in a row; then one per tenth of the credentials' lifetime.
_RENEWAL_BURST = 5
#: Nonces remembered per id (its last requests): a replay of one of them is ignored.
_NONCES_PER_DEVICE = 64
#: An id whose broker change failed is tried again after this long, doubling to the max.
_RETRY_MIN_S, _RETRY_MAX_S = 2.0, 300.0
#: Devices whose groups are brought up to date per poll (the rest on the next ones).
_REGROUP_PER_POLL = 500


@dataclass(frozen=True)
class IdentityConfig:
    """Limits and tunables of enrolment (``edge-sdk serve --enrol``).

    ``lifetime_s``: how long issued credentials are valid (the device renews them
    before). ``max_pending``: pending ids the record holds per claim batch (beyond: refused);
    ``pending_ttl_s``: a pending id nobody decided on is forgotten after that long.
    ``rate_per_batch`` / ``burst_per_batch``: the token bucket of enrolment requests per
    claim batch (over it: dropped, no answer). ``queue``: requests waiting for the worker
    (full: dropped). ``poll_s``: how often the record's wanted broker changes are read;
    ``sweep_s``: expiry and pruning. ``ca_bundle``: a PEM file sent with credentials (the
    broker's CA, for devices on ``mqtts``). ``answer_wait_s``: how long a published
    answer or a broker change may wait for the broker. ``reissue_grace_s``: an accepted
    id asking again with its key this soon after it was issued credentials is answered by
    the retained answer already there, not issued new ones (the request it sent while its
    answer was on the way must not change the password it just got); 0: never held."""

    lifetime_s: float = 30 * DAY
    max_pending: int = 10_000
    pending_ttl_s: float = 7 * DAY
    rate_per_batch: float = 20.0
    burst_per_batch: int = 200
    queue: int = 1000
    poll_s: float = 0.5
    sweep_s: float = 5.0
    ca_bundle: Path | None = None
    answer_wait_s: float = 10.0
    reissue_grace_s: float = 60.0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> FleetUsageError:
            return FleetUsageError(f"identity {key}: {getattr(self, key)!r} {why}")

        for key in ("max_pending", "burst_per_batch", "queue"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be a whole number >= 1")
        for key in ("lifetime_s", "pending_ttl_s", "rate_per_batch", "poll_s", "sweep_s",
                    "answer_wait_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or v != v or v == float("inf"):
                raise bad(key, "must be a finite number > 0")
        g = self.reissue_grace_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < float("inf"):
            raise bad("reissue_grace_s", "must be a finite number >= 0")
        if self.ca_bundle is not None and not isinstance(self.ca_bundle, Path):
            object.__setattr__(self, "ca_bundle", Path(self.ca_bundle))

    @classmethod
    def parse(cls, settings: list[str] | tuple[str, ...]) -> IdentityConfig:
        """From ``KEY=N`` strings (raises :class:`FleetUsageError` naming the key)."""
        if any(s.partition("=")[0].strip() == "ca_bundle" for s in settings):
            raise FleetUsageError("ca_bundle is a file: give it with --ca-bundle")
        try:
            changes = numeric_settings(cls, settings, "--enrol-limit")
        except ValueError as err:
            raise FleetUsageError(str(err)) from None
        return cls(**changes)  # type: ignore[arg-type]

    def read_ca(self) -> str | None:
        """The CA bundle's PEM text, or None. Raises :class:`FleetUsageError` for a file
        that cannot be read, is not PEM certificates, or is too big to send."""
        if self.ca_bundle is None:
            return None
        p = self.ca_bundle
        try:
            data = p.read_bytes()[:MAX_CA_BYTES + 1]
        except OSError as err:
            raise FleetUsageError(f"--ca-bundle {p}: cannot read it: {err.strerror}") \
                from None
        if len(data) > MAX_CA_BYTES:
            raise FleetUsageError(f"--ca-bundle {p}: over {MAX_CA_BYTES} bytes (it travels "
                                  "sealed in one answer): keep only the CAs devices need")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise FleetUsageError(f"--ca-bundle {p}: not a PEM file") from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise FleetUsageError(f"--ca-bundle {p}: holds no PEM certificate")
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(data)
        except ValueError as err:
            raise FleetUsageError(f"--ca-bundle {p}: not PEM certificates: {err}") from None
        return text


@dataclass
class EnrollerStats:
    """What the enroller did since it started (the record keeps the counts per claim)."""

    requests: int = 0
    dropped: int = 0
    refused: int = 0
    ignored: int = 0
    recorded: int = 0
    issued: int = 0
    revoked: int = 0
    expired: int = 0
    renewed: int = 0
    #: Devices whose broker roles were changed to their newly assigned groups.
    regrouped: int = 0
    errors: int = 0
    #: Why the newest request was refused (one line).
    last_refused: str | None = None


@dataclass
class _BatchCounts:
    requests: int = 0
    dropped: int = 0
    refused: int = 0


#: A queued message: (kind "enrol"/"cred", batch ("" for cred), device, payload, received).
_Item = tuple[str, str, str, bytes, float]


@dataclass
class _Renewal:
    password: str
    issued: int
    expires_at: float
    answer: bytes
    #: The groups the sealed credentials name.
    groups: tuple[str, ...]
    at: float = field(default_factory=time.monotonic)


def _shown(text: str, limit: int = 80) -> str:
    t = text[:limit]
    return t if t.isprintable() else "".join(
        ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in t)


def _groups(row: Mapping[str, Any]) -> tuple[str, ...]:
    g = row.get("groups")
    if isinstance(g, str):
        try:
            g = json.loads(g) if g else []
        except ValueError:
            g = []
    return tuple(x for x in g if isinstance(x, str)) if isinstance(g, list) else ()


class _DeviceBuckets:
    """A token bucket per device, for at most ``_MAX_DEVICES`` devices (the least recently
    seen forgotten first: the network names the keys). Not locked: its owner's lock
    guards it."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, _TokenBucket] = OrderedDict()

    def take(self, device: str, now: float) -> bool:
        bucket = self._buckets.get(device)
        if bucket is None:
            bucket = self._buckets[device] = _TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > _MAX_DEVICES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device)
        return bucket.take(1, now)


class _Intake:
    """The budgets and the bounded queue, decided on the network thread before any
    parsing (as the registry's :class:`~._ingest.Intake`): a token bucket per claim batch
    and per renewing device, at most ``queue`` items waiting, every drop counted on its
    batch."""

    def __init__(self, config: IdentityConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self._queue: deque[_Item] = deque()
        self._batches: dict[str, _TokenBucket] = {}
        self._devices = _DeviceBuckets(_RENEW_RATE, _RENEW_BURST)
        self._counts: dict[str, _BatchCounts] = {}
        self.dropped = 0

    def known(self, batches: set[str], now: float) -> None:
        """The batches whose claims exist (their buckets are kept; others forgotten)."""
        cfg = self.config
        with self._lock:
            self._batches = {b: self._batches.get(b) or _TokenBucket(
                cfg.rate_per_batch, cfg.burst_per_batch, now) for b in batches}

    def has(self, batch: str) -> bool:
        return batch in self._batches

    def offer(self, kind: str, batch: str, device: str, payload: bytes, now: float) -> bool:
        """Queue one message, or drop and count it; True when queued. An enrolment
        request of a batch no claim names is neither (the caller counts it ignored)."""
        # Longer than any valid request: the worker refuses it by its size alone.
        payload = payload[:MAX_REQUEST_BYTES + 1]
        with self._lock:
            # A full queue drops the message without spending a token.
            room = len(self._queue) < self.config.queue
            counts: _BatchCounts | None = None
            if kind == "enrol":
                bucket = self._batches.get(batch)
                if bucket is None:
                    return False
                counts = self._counts.get(batch)
                if counts is None:
                    counts = self._counts[batch] = _BatchCounts()
                counts.requests += 1
                allowed = room and bucket.take(1, now)
            else:
                allowed = room and self._devices.take(device, now)
            if not allowed:
                self.dropped += 1
                if counts is not None:
                    counts.dropped += 1
                return False
            self._queue.append((kind, batch, device, payload, now))
        self.ready.set()
        return True

    def take(self) -> _Item | None:
        with self._lock:
            if not self._queue:
                self.ready.clear()
                return None
            return self._queue.popleft()

    def refused(self, batch: str) -> None:
        with self._lock:
            counts = self._counts.get(batch)
            if counts is None:
                counts = self._counts[batch] = _BatchCounts()
            counts.refused += 1

    def counts(self) -> dict[str, _BatchCounts]:
        """The counts per batch since the last call (reset)."""
        with self._lock:
            out, self._counts = self._counts, {}
        return out

    def backlog(self) -> int:
        with self._lock:
            return len(self._queue)


def broker_admin(connection: MqttConnection, *, fleet: str,
                 timeout: float = 10.0) -> DynsecAdmin:
    """The dynsec admin on ``connection``; :class:`FleetError` in one line when it cannot
    listen to the plugin's answers."""
    try:
        return DynsecAdmin(connection, fleet=fleet, prefix=connection.config.topic_prefix,
                           timeout=timeout)
    except EdgeError as err:
        raise FleetError(f"{NO_ADMIN} ({one_line(err)})") from None


class Enroller:
    """Enrolment and credentials of one fleet: :meth:`start` subscribes and starts the
    worker (requests) and the poll loop (broker changes, expiry); :meth:`stop` stops
    both. Needs the broker's dynamic security plugin to answer ``admin`` (see
    :meth:`check_broker`)."""

    def __init__(self, db: FleetDB, connection: MqttConnection, admin: DynsecAdmin, *,
                 fleet: str, config: IdentityConfig | None = None,
                 topics: Topics | None = None) -> None:
        self.db = db
        self.conn = connection
        self.admin = admin
        self.fleet = fleet
        self.config = config or IdentityConfig()
        self.topics = topics or Topics(fleet, connection.config.topic_prefix)
        self._ca_pem = self.config.read_ca()
        self._check_answer_size()
        self.stats = EnrollerStats()
        self.intake = _Intake(self.config)
        self._lock = threading.Lock()
        #: Held while a device's groups change and while a renewal's hint is updated: a
        #: renewal finishing meanwhile must not clear the hint the group change left.
        self._groups_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._subs: list[Any] = []
        #: The nonces of each id's last requests (a replay is ignored): id -> nonces.
        self._nonces: OrderedDict[str, deque[str]] = OrderedDict()
        #: New credentials each device may still be offered by renewal (a token bucket).
        self._renewal_budget = _DeviceBuckets(10.0 / self.config.lifetime_s,
                                              _RENEWAL_BURST)
        #: Renewals answered and not yet acknowledged: device -> what was sent.
        self._renewals: OrderedDict[str, _Renewal] = OrderedDict()
        #: Ids (or ``claim:<batch>``) whose broker change failed: monotonic time of the
        #: next try and the delay after that.
        self._retry: dict[str, tuple[float, float]] = {}
        self._logged: dict[str, float] = {}
        #: The broker's account names (listed again every minute): ids naming a service
        #: are refused before they are recorded.
        self._clients: set[str] = set()
        self._listed = -_LIST_CLIENTS_S
        self._pruned = -_LIST_CLIENTS_S
        self._worker = threading.Thread(target=self._work, name="fleet-enroller", daemon=True)
        self._poller = threading.Thread(target=self._poll_loop, name="fleet-enroller-poll",
                                        daemon=True)

    def _check_answer_size(self) -> None:
        """Refuse a CA bundle whose sealed answer would not fit one answer."""
        key, longest = DeviceKey.generate(), "x" * 64
        creds = Credentials(username=longest, password=secrets.token_urlsafe(24),
                            issued=2**31 - 1, expires_at=time.time() + self.config.lifetime_s,
                            groups=tuple(f"{i}{longest[1:]}" for i in range(8)),
                            ca_pem=self._ca_pem)
        sealed = seal_credentials(creds, key.public_pem, device_id=longest)
        size = len(EnrolAnswer(state="accepted", device_id=longest,
                               fingerprint=key.fingerprint, reason="accepted",
                               issued=2**31 - 1, sealed=sealed, at=time.time()).to_bytes())
        if size > MAX_ANSWER_BYTES:
            raise FleetUsageError(f"--ca-bundle {self.config.ca_bundle}: answers with it "
                                  f"take {size} bytes, over the {MAX_ANSWER_BYTES} a device "
                                  "reads: keep only the CAs devices need")

    # -- lifecycle -----------------------------------------------------------------------

    def check_broker(self) -> None:
        """One ``listClients`` round trip; :class:`FleetError` in one line when the dynamic
        security plugin does not answer."""
        try:
            self.admin.clients()
        except EdgeError as err:
            raise FleetError(f"{NO_ADMIN} ({one_line(err)})") from None

    def start(self) -> Enroller:
        self._refresh_claims()
        self._worker.start()
        self._poller.start()
        self._subs = [
            # QoS 0: a flood costs the network thread no acknowledgements (as the
            # registry's); a device asks again at its next poll.
            self.conn.subscribe(self.topics.every_enrol_request, self._on_enrol, qos=0),
            self.conn.subscribe(self.topics.every_cred_request, self._on_cred, qos=1),
        ]
        return self

    def stop(self) -> None:
        for s in self._subs:
            s.cancel()
        self._subs = []
        self._stop.set()
        self._wake.set()
        self.intake.ready.set()
        for t in (self._worker, self._poller):
            if t.is_alive():
                t.join(30)
        self._flush()

    def __enter__(self) -> Enroller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._worker.is_alive() and self._poller.is_alive()

    def _count(self, what: str, n: int = 1, why: str | None = None) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + n)
            if why is not None:
                self.stats.last_refused = why

    def _warn(self, key: str, msg: str, *args: object) -> None:
        """Log at most once a minute per ``key``: a flood is in the counts, not the log."""
        now = time.monotonic()
        if now - self._logged.get(key, -60.0) >= 60.0:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[key] = now
            log.warning(msg, *args)

    # -- the network thread: budgets only ------------------------------------------------

    def _on_enrol(self, topic: str, payload: bytes) -> None:
        self._count("requests")
        named = self.topics.enrol_requester(topic)
        if named is None or not self.intake.has(named[0]):
            # Not a topic an answer can go to, or a batch no claim names (revoked, or not
            # applied yet).
            self._count("ignored")
            return
        batch, device = named
        if not self.intake.offer("enrol", batch, device, payload, time.monotonic()):
            self._count("dropped")

    def _on_cred(self, topic: str, payload: bytes) -> None:
        device = self.topics.cred_requester(topic)
        if device is None:
            self._count("ignored")
            return
        if not self.intake.offer("cred", "", device, payload, time.monotonic()):
            self._count("dropped")

    # -- the worker: parse, record, answer -----------------------------------------------

    def _work(self) -> None:
        flushed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - flushed >= 1.0:
                self._flush()
                flushed = time.monotonic()
            item = self.intake.take()
            if item is None:
                self.intake.ready.wait(1.0)
                continue
            kind, batch, device, payload, _ = item
            try:
                if kind == "enrol":
                    self._enrol(batch, device, payload)
                else:
                    self._renew(device, payload)
            except Exception as err:  # the worker must outlive any request
                self._count("errors")
                self._warn(f"work:{type(err).__name__}", "enroller: a %s request of %s "
                           "failed: %s", kind, _shown(device), one_line(err))

    def _answer(self, batch: str, device: str, answer: EnrolAnswer, *,
                retain: bool) -> None:
        topic = self.topics.enrol_answer(batch, device)
        if retain:
            self.conn.publish_wait(topic, answer.to_bytes(), qos=1, retain=True,
                                   timeout=self.config.answer_wait_s)
        else:
            self.conn.publish(topic, answer.to_bytes(), qos=1)

    def _refused(self, batch: str, device: str, why: str, *, topic: str | None = None,
                 fingerprint: str = "") -> None:
        """A non-retained ``refused`` answer (a retained answer, the device's own, stays),
        for the key of ``fingerprint`` ("": the request named none)."""
        try:
            answer = EnrolAnswer(state="refused", device_id=device, fingerprint=fingerprint,
                                 reason=why[:200], issued=0, sealed=None, at=time.time())
            if topic is None:
                self._answer(batch, device, answer, retain=False)
            else:
                self.conn.publish(topic, answer.to_bytes(), qos=1)
        except EdgeError as err:
            self._warn("refused-answer", "enroller: refusal to %s not sent: %s",
                       _shown(device), one_line(err))

    def _enrol(self, batch: str, device: str, payload: bytes) -> None:
        if not self.intake.has(batch):  # revoked while the request waited
            self._count("ignored")
            return
        try:
            req = EnrolRequest.from_bytes(payload, batch=batch, device_id=device)
        except EnrolmentRefused as err:
            why = one_line(err)
            self.intake.refused(batch)
            self._count("refused", why=f"{_shown(device)}: {why}")
            # No key to name: a device ignores a refusal that is not for its own key, so
            # garbage anyone sends on its topic cannot end its exchange.
            self._refused(batch, device, why)
            return
        try:
            self._not_a_service(device)
        except EnrolmentRefused as err:
            why = one_line(err)
            self.intake.refused(batch)
            self._count("refused", why=f"{_shown(device)}: {why}")
            self._refused(batch, device, why, fingerprint=req.fingerprint)
            return
        if self._replayed(device, req.nonce):
            self._count("ignored")
            self._warn(f"replay:{device}", "enroller: a request of %s came again (same "
                       "nonce): ignored as a replay", _shown(device))
            return
        if self._just_issued(device, req.fingerprint):
            return
        out = rec.record_request(self.db, self.fleet, req, now=time.time(),
                                 max_pending=self.config.max_pending)
        self._count("recorded")
        if out.state == "refused":  # another key, or too many pending: no row touched
            self.intake.refused(batch)
            self._count("refused", why=f"{_shown(device)}: {out.reason}")
            self._refused(batch, device, out.reason, fingerprint=req.fingerprint)
            return
        if out.issue or out.state == "accepted":
            self._wake.set()  # the poll loop issues (and answers) at once
            return
        self._answer(batch, device, EnrolAnswer(
            state=out.state, device_id=device, fingerprint=req.fingerprint,
            reason=out.reason, issued=0, sealed=None, at=time.time()), retain=True)

    def _replayed(self, device: str, nonce: str) -> bool:
        """Whether ``device`` sent a request with this nonce before (each request a device
        makes has a new one); else remember it. A captured request sent again would
        otherwise make the controller re-issue an accepted device's credentials (and kick
        it off the broker) at every replay. Memory only, bounded: after a restart one
        replay per captured request gets through, and that re-issue does no more than
        the device asking again would."""
        with self._lock:
            seen = self._nonces.get(device)
            if seen is None:
                seen = self._nonces[device] = deque(maxlen=_NONCES_PER_DEVICE)
                while len(self._nonces) > _MAX_DEVICES:
                    self._nonces.popitem(last=False)
            else:
                self._nonces.move_to_end(device)
            if nonce in seen:
                return True
            seen.append(nonce)
        return False

    def _just_issued(self, device: str, fingerprint: str) -> bool:
        """Whether ``device`` got credentials for this key within the grace period (its
        retained answer holds them)."""
        row = rec.enrolment(self.db, self.fleet, device)
        if row is None or row.get("state") != "accepted" or row.get("want") \
                or row.get("fingerprint") != fingerprint or row.get("broker") != "active":
            return False
        return time.time() - float(row.get("applied_at") or 0.0) < self.config.reissue_grace_s

    def _not_a_service(self, device: str) -> None:
        """Refuse an id that names a broker account the enroller did not make (a service,
        an operator): such an id is never recorded, so no operator can accept it."""
        if device in self._clients and rec.enrolment(self.db, self.fleet, device) is None:
            raise EnrolmentRefused(f"device id {device!r} names a broker account that is "
                                   "not a device: expected another id")

    # -- renewal -------------------------------------------------------------------------

    def _renew(self, device: str, payload: bytes) -> None:
        row = rec.enrolment(self.db, self.fleet, device)
        if row is None or row.get("state") != "accepted":
            self._count("ignored")
            return
        topic = self.topics.cred_answer(device)
        try:
            req = RenewRequest.verify(payload, str(row["public_key"]), device_id=device,
                                      now=time.time())
        except EnrolmentRefused as err:
            self._count("refused", why=f"{_shown(device)}: {one_line(err)}")
            self._refused("", device, one_line(err), topic=topic)
            return
        if req.ack == 0:
            with self._lock:
                pending = self._renewals.get(device)
            if pending is None or pending.issued != int(row["issued"]) + 1 \
                    or pending.groups != _groups(row):
                if not self._may_renew(device):
                    why = ("renewed too often: new credentials are issued at most once per "
                           f"{self.config.lifetime_s / 10:g} s after the first "
                           f"{_RENEWAL_BURST}; ask again later")
                    self._count("refused", why=f"{_shown(device)}: {why}")
                    self._refused("", device, why, topic=topic)
                    return
                password = secrets.token_urlsafe(24)
                issued = int(row["issued"]) + 1
                expires = time.time() + self.config.lifetime_s
                answer = self._accepted(row, password, issued, expires)
                pending = _Renewal(password, issued, expires, answer.to_bytes(), _groups(row))
                with self._lock:
                    self._renewals[device] = pending
                    self._renewals.move_to_end(device)
                    while len(self._renewals) > _MAX_DEVICES:
                        self._renewals.popitem(last=False)
            # A repeated request gets the same answer: the device may have missed it.
            self.conn.publish(topic, pending.answer, qos=1)
            return
        with self._lock:
            pending = self._renewals.get(device)
            if row.get("broker") != "active":
                # Expired (disabled) or being deleted meanwhile: setting a password would
                # not let it in, and the record would call the account active.
                self._renewals.pop(device, None)
                pending = None
        if pending is None or pending.issued != req.ack:
            if req.ack != int(row["issued"]):  # an ack of what is in force already: fine
                self._warn(f"ack:{device}", "enroller: %s acknowledged credentials %d, "
                           "which were not offered to it", _shown(device), req.ack)
            return
        self.admin.set_password(device, pending.password)  # kicks the device's link
        rec.issued(self.db, self.fleet, device, issued=pending.issued,
                   expires_at=pending.expires_at)
        batch = str(row.get("batch") or "")
        if batch:  # the retained answer holds the credentials in force, for a re-enrolment
            self.conn.publish(self.topics.enrol_answer(batch, device), pending.answer,
                              qos=1, retain=True)
        with self._lock:
            self._renewals.pop(device, None)
        self._after_renewal(device, pending)
        self._count("renewed")
        log.info("enroller: %s renewed its credentials (%d, valid until %s)", device,
                 pending.issued, time.strftime("%Y-%m-%d %H:%M:%S",
                                               time.gmtime(pending.expires_at)))

    def _after_renewal(self, device: str, done: _Renewal) -> None:
        """The renewal ``done`` is in force: the device's hint is out of date (cleared),
        unless its groups changed again while the renewal was on the way (then a hint
        past this renewal, so that the device renews once more)."""
        try:
            with self._groups_lock:
                row = rec.enrolment(self.db, self.fleet, device)
                granted = _groups(row) if row is not None else done.groups
                hint = b"" if granted == done.groups \
                    else RenewHint(device, done.issued).to_bytes()
                self.conn.publish(self.topics.cred_answer(device), hint, qos=1, retain=True)
        except (EdgeError, DatabaseError) as err:
            self._warn(f"hint:{device}", "enroller: the renewal hint of %s not updated: %s",
                       _shown(device), one_line(err))

    def _may_renew(self, device: str) -> bool:
        """Whether ``device`` may be offered new credentials now: a device renews once
        per lifetime (less a third), so a few renewals in a row, then one per tenth of
        the lifetime, are plenty. A hostile device cycling ack=0/ack=N would otherwise
        make the broker and the record change its password every two seconds."""
        with self._lock:
            return self._renewal_budget.take(device, time.monotonic())

    def _accepted(self, row: Mapping[str, Any], password: str, issued: int,
                  expires: float, groups: tuple[str, ...] | None = None) -> EnrolAnswer:
        device = str(row["device_id"])
        creds = Credentials(username=device, password=password, issued=issued,
                            expires_at=expires,
                            groups=_groups(row) if groups is None else groups,
                            ca_pem=self._ca_pem)
        sealed = seal_credentials(creds, str(row["public_key"]), device_id=device)
        return EnrolAnswer(state="accepted", device_id=device,
                           fingerprint=str(row["fingerprint"]), reason="accepted",
                           issued=issued, sealed=sealed, at=time.time())

    # -- the poll loop: make the broker equal to the record ------------------------------

    def _poll_loop(self) -> None:
        swept = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - swept >= self.config.sweep_s:
                    swept = time.monotonic()
                    self.sweep()
                self.poll()
            except (EdgeError, DatabaseError) as err:
                self._count("errors")
                self._warn(f"poll:{type(err).__name__}", "enroller: %s", one_line(err))
            except Exception as err:
                self._count("errors")
                log.exception("enroller poll failed: %s", one_line(err))
            self._wake.wait(self.config.poll_s)
            self._wake.clear()

    def poll(self) -> None:
        """Carry out every broker change the record wants (each id on its own: one that
        fails is tried again later, after a growing delay, without holding up others)."""
        claims = False
        for row in rec.wanted(self.db, self.fleet):
            if self._stop.is_set():
                return
            want = str(row.get("want"))
            if row.get("kind") == "claim":
                name = str(row["batch"])
                key = f"claim:{name}"
            else:
                name = key = str(row["device_id"])
            if not self._due(key):
                continue
            try:
                if row.get("kind") == "claim":
                    if want == "create":
                        self.admin.ensure_claim(name, str(row["secret"]),
                                                int(row.get("sessions") or 1))
                    elif want == "delete":
                        self.admin.delete_claim(name)
                    rec.claim_applied(self.db, self.fleet, name, want=want)
                    claims = True
                    log.info("enroller: claim %s %sd at the broker (%s session account(s))",
                             name, want, row.get("sessions") if want == "create" else "all")
                elif want == "issue":
                    self._issue(row)
                elif want == "revoke":
                    self._revoke(row)
                elif want == "reject":
                    self._reject(row)
            except (EdgeError, DatabaseError) as err:
                self._failed(key, f"{want} {_shown(name)}", err)
            else:
                self._retry.pop(key, None)
        if claims:
            self._refresh_claims()
        self._regroup()

    def _regroup(self) -> None:
        """Give each accepted device whose assigned groups changed exactly those at the
        broker (its roles; dynsec kicks it), then leave it the retained hint to renew now
        (its credentials name the groups it follows). The record calls the groups granted
        only once both are done: a failure is tried again later."""
        for row in rec.group_changes(self.db, self.fleet, limit=_REGROUP_PER_POLL):
            if self._stop.is_set():
                return
            device = str(row["device_id"])
            if not self._due(device):
                continue
            try:
                with self._groups_lock:
                    self.admin.set_groups(device, row["assigned"])
                    with self._lock:
                        # A renewal answered with the old groups is not acked into force.
                        self._renewals.pop(device, None)
                    # The credentials in force now (a renewal may have finished since).
                    now_row = rec.enrolment(self.db, self.fleet, device)
                    issued = int((now_row or row).get("issued") or 0)
                    self.conn.publish_wait(
                        self.topics.cred_answer(device),
                        RenewHint(device, issued).to_bytes(), qos=1,
                        retain=True, timeout=self.config.answer_wait_s)
                    rec.groups_granted(self.db, self.fleet, device,
                                       str(row["assigned_text"]))
            except (EdgeError, DatabaseError) as err:
                self._failed(device, f"groups of {_shown(device)}", err)
                continue
            self._retry.pop(device, None)
            self._count("regrouped")
            log.info("enroller: %s now in group(s) %s (was %s); told it to renew", device,
                     ", ".join(row["assigned"]) or "none", ", ".join(row["granted"]) or "none")

    def _due(self, key: str) -> bool:
        at = self._retry.get(key)
        return at is None or at[0] <= time.monotonic()

    def _failed(self, key: str, what: str, err: BaseException) -> None:
        _, delay = self._retry.get(key, (0.0, _RETRY_MIN_S / 2))
        delay = min(_RETRY_MAX_S, delay * 2)
        self._retry[key] = (time.monotonic() + delay, delay)
        self._count("errors")
        self._warn(f"fail:{key}", "enroller: %s at the broker failed (again in %.0f s): %s",
                   what, delay, one_line(err))

    def _issue(self, row: Mapping[str, Any]) -> None:
        """New credentials for an accepted id: the account at the broker first, then the
        record, then the retained answer (a crash between leaves ``want`` or an answer
        the device re-asks for: its next request re-issues)."""
        device, batch = str(row["device_id"]), str(row["batch"])
        password = secrets.token_urlsafe(24)
        issued = int(row.get("issued") or 0) + 1
        expires = time.time() + self.config.lifetime_s
        # The groups assigned now (an operator may have changed them since acceptance).
        groups, groups_text = rec.assigned_groups(self.db, self.fleet, device)
        self.admin.ensure_device(device, password, groups)
        rec.groups_granted(self.db, self.fleet, device, groups_text)
        rec.issued(self.db, self.fleet, device, issued=issued, expires_at=expires)
        with self._lock:
            self._renewals.pop(device, None)
        self._count("issued")
        log.info("enroller: issued credentials %d to %s", issued, device)
        if batch:
            self._answer(batch, device, self._accepted(row, password, issued, expires,
                                                       tuple(groups)), retain=True)

    def _revoke(self, row: Mapping[str, Any]) -> None:
        device, batch = str(row["device_id"]), str(row["batch"])
        self.admin.delete_device(device)  # closes its connection at once
        with self._lock:
            self._renewals.pop(device, None)
        if batch:  # nothing retained keeps a sealed password for a revoked id
            self.conn.publish_wait(self.topics.enrol_answer(batch, device), b"", qos=1,
                                   retain=True, timeout=self.config.answer_wait_s)
        rec.revoked_applied(self.db, self.fleet, device)
        self._count("revoked")
        log.info("enroller: revoked %s at the broker", device)

    def _reject(self, row: Mapping[str, Any]) -> None:
        """Answer a rejected id so (retained: it stops asking), after deleting any account
        it had."""
        device, batch = str(row["device_id"]), str(row["batch"])
        if row.get("broker") in ("active", "expired"):
            self.admin.delete_device(device)
        if batch:
            self._answer(batch, device, EnrolAnswer(
                state="rejected", device_id=device, fingerprint=str(row["fingerprint"]),
                reason=str(row.get("reason") or "rejected"), at=time.time()), retain=True)
        rec.rejected_applied(self.db, self.fleet, device)
        log.info("enroller: answered %s rejected", device)

    def sweep(self) -> None:
        """Disable the accounts whose credentials expired; forget stale pending ids."""
        now = time.time()
        for device in rec.expired_due(self.db, self.fleet, now):
            if not self._due(device):
                continue
            try:
                self.admin.disable(device)
                rec.mark_expired(self.db, self.fleet, device)
                # Its retained answer holds the expired password: a device that enrols
                # again must find none and ask (which re-issues), not retry that one.
                row = rec.enrolment(self.db, self.fleet, device)
                if row is not None and row.get("batch"):
                    self.conn.publish(self.topics.enrol_answer(str(row["batch"]), device),
                                      b"", qos=1, retain=True)
            except (EdgeError, DatabaseError) as err:
                self._failed(device, f"disable (expired) {_shown(device)}", err)
                continue
            self._count("expired")
            log.info("enroller: the credentials of %s expired: its account is disabled "
                     "until it enrols again", device)
        if time.monotonic() - self._pruned >= min(self.config.pending_ttl_s / 10, 300.0):
            self._pruned = time.monotonic()
            self._prune(now)
        self._refresh_claims()

    def _prune(self, now: float) -> None:
        """Forget pending ids not heard from for ``pending_ttl_s``, and clear their
        retained answers (else every id a flood made leaves one at the broker)."""
        cutoff = now - self.config.pending_ttl_s
        stale = [(str(r["batch"]), str(r["device_id"]))
                 for r in rec.enrolments(self.db, self.fleet, "pending")
                 if not r.get("want") and float(r.get("updated_at") or 0.0) < cutoff]
        if not stale:
            return
        n = rec.prune(self.db, self.fleet, now=now, pending_ttl=self.config.pending_ttl_s)
        log.info("enroller: forgot %d pending ids not heard from for %g s", n,
                 self.config.pending_ttl_s)
        for batch, device in stale:
            try:
                self.conn.publish(self.topics.enrol_answer(batch, device), b"", qos=1,
                                  retain=True)
            except EdgeError:
                return  # the link is down: the rest stays retained, and harmless

    def _refresh_claims(self) -> None:
        batches = {str(c["batch"]) for c in rec.claims(self.db, self.fleet)
                   if not c.get("revoked_at") and c.get("want") != "delete"}
        self.intake.known(batches, time.monotonic())
        if time.monotonic() - self._listed < _LIST_CLIENTS_S:
            return
        try:
            self._clients = set(self.admin.clients())
            self._listed = time.monotonic()
        except EdgeError as err:
            self._warn("clients", "enroller: cannot list the broker's accounts: %s",
                       one_line(err))

    def _flush(self) -> None:
        """Add the counts per claim to the record (at most once a second)."""
        counts = self.intake.counts()
        for batch, c in counts.items():
            try:
                rec.count_claim(self.db, self.fleet, batch, requests=c.requests,
                                dropped=c.dropped, refused=c.refused)
            except (EdgeError, DatabaseError) as err:
                self._warn("counts", "enroller: counts not saved: %s", one_line(err))
                return


__all__ = ["Enroller", "EnrollerStats", "IdentityConfig", "broker_admin"]
