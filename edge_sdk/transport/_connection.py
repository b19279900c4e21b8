"""One MQTT connection with automatic reconnect; paho stays inside this module.

Usage::

    conn = MqttConnection(MqttConfig(url="mqtt://broker:1883", fleet="lab"))
    conn.connect()                       # waits for the first CONNACK, raises TransportError
    conn.subscribe("edge/lab/dev/d1/desired", lambda topic, payload: ...)
    conn.publish("edge/lab/dev/d1/state", b"{...}", qos=1, retain=True)  # -> PublishHandle
    conn.close()

Handlers run on the connection's network thread: they must be quick and must
not block on the connection (hand work to a queue or another thread). An
exception in a handler is logged and swallowed so the link stays up.
Subscriptions are remembered and re-sent after every reconnect (clean
sessions by default: nothing is assumed to survive on the broker but retained
messages; ``MqttConfig.persistent_session`` lets the broker queue for us).
QoS 1 publishes made while the link is down are queued and sent on reconnect.

With several broker URLs (the nodes of a cluster, ``MqttConfig.url`` comma-separated)
every failed attempt and every dropped link moves on to the next node, round robin;
the subscriptions are re-sent there (so retained state arrives again) and queued QoS 1
publishes go out there. A subscription the broker refuses on a reconnect (a NATS
cluster does while JetStream elects a leader) is sent again with backoff, capped at
``reconnect_max_delay``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, ConnackCode, MQTTErrorCode

from .._redact import redact_url
from ..errors import ConfigError, TransportError
from ._config import LastWill, MqttConfig

try:
    import fcntl
    import termios

    # SIOCOUTQ: on a TCP socket, bytes written and not yet acknowledged by the peer.
    _OUTQ: int | None = termios.TIOCOUTQ if sys.platform == "linux" else None
except ImportError:  # Windows
    _OUTQ = None

log = logging.getLogger("edge_sdk.transport")


def unacknowledged(sock: Any) -> int:
    """Bytes ``sock`` holds that the peer has not acknowledged (Linux ``SIOCOUTQ``; 0
    for None or where that cannot be asked)."""
    if _OUTQ is None or sock is None:
        return 0
    try:
        out = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return max(0, int.from_bytes(out, sys.byteorder, signed=True))

Handler = Callable[[str, bytes], None]
ConnectionListener = Callable[[bool], None]
RefusalListener = Callable[[str], None]

MAX_TOPIC_SLASHES = 7

# MQTT 5 CONNACK reason codes (paho's ReasonCode has names but no constants for them).
_MQTT5_BAD_USERNAME_OR_PASSWORD = 0x86
_MQTT5_NOT_AUTHORIZED = 0x87
#: CONNACK refusals that a retry cannot fix. paho hands them on as MQTT 3.1.1 return codes
#: or as the MQTT 5 reason codes they correspond to, so both spellings count.
_REFUSED_FOR_GOOD = frozenset({
    ConnackCode.CONNACK_REFUSED_BAD_USERNAME_PASSWORD,
    ConnackCode.CONNACK_REFUSED_NOT_AUTHORIZED,
    _MQTT5_BAD_USERNAME_OR_PASSWORD,
    _MQTT5_NOT_AUTHORIZED,
})
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: A link the broker closes within this many seconds of accepting it, this many times in a
#: row, is most likely taken over by another client with the same client id.
_SHORT_LINK_S = 5.0
_SHORT_LINKS_TO_WARN = 3


@dataclass
class Subscription:
    """Handle returned by :meth:`MqttConnection.subscribe`; call :meth:`cancel` to stop it."""

    topic_filter: str
    handler: Handler
    qos: int
    _cancel: Callable[[Subscription], None] | None = None

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel(self)
            self._cancel = None


#: paho marks a message "published" with these codes when it will never reach the broker.
_LOST = (MQTTErrorCode.MQTT_ERR_CONN_LOST, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE)


class PublishHandle:
    """What became of one :meth:`MqttConnection.publish`.

    ``published`` turns true when the broker acknowledged the message (QoS 1)
    or it was written to the socket (QoS 0). A QoS 1 message published while
    the link is down is sent on reconnect and turns true then; a QoS 0 message
    lost with the link never does. ``pending`` is true until either happened:
    the message is still queued in this process (or, QoS 1, unacknowledged).
    """

    __slots__ = ("_info", "_lost")

    def __init__(self, info: paho.MQTTMessageInfo, *, lost: bool = False) -> None:
        self._info = info
        self._lost = lost

    @property
    def published(self) -> bool:
        info = self._info
        # Not info.is_published(): it raises for a message queued while the link was
        # down, which paho does send after the reconnect.
        with info._condition:
            return info._published and info.rc not in _LOST

    @property
    def pending(self) -> bool:
        """Neither published nor lost for good (a QoS 0 message dropped with the link)."""
        if self._lost:
            return False
        info = self._info
        with info._condition:
            return not info._published

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``published`` or ``timeout`` seconds; return ``published``."""
        info = self._info
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return False
        with info._condition:
            # paho notifies this condition when the PUBACK (or the write) comes in.
            done = info._condition.wait_for(lambda: info._published, timeout)
            return done and info.rc not in _LOST


class _SubAck:
    """One SUBSCRIBE waiting for its SUBACK (``event``), keyed by paho's message id."""

    def __init__(self, topic_filter: str, mid: int) -> None:
        self.topic_filter = topic_filter
        self.mid = mid
        self.event = threading.Event()
        self.refused = False
        #: The link dropped first: this SUBACK will never come (the subscription is re-sent
        #: on reconnect under a new message id).
        self.lost = False


@functools.lru_cache(maxsize=4096)
def _levels(topic_filter: str) -> tuple[str, ...]:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return tuple(topic_filter.split("/"))


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (``+`` one level, ``#`` the rest; wildcards never match a
    first level starting with ``$``). Not ``paho.topic_matches_sub``: it builds a trie
    per call, which took half the network thread's time per message under a flood."""
    flt = _levels(topic_filter)
    parts = topic.split("/")
    if parts[0].startswith("$") and flt[0] in ("+", "#"):
        return False
    n = len(parts)
    for i, f in enumerate(flt):
        if f == "#":
            return True
        if i >= n or (f != "+" and f != parts[i]):
            return False
    return len(flt) == n


def check_publish_topic(topic: str) -> None:
    """Raise :class:`TransportError` for topics real brokers refuse (wildcards, > 7 slashes)."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise TransportError(f"cannot publish on {topic!r}: empty or contains a wildcard")
    if topic.count("/") > MAX_TOPIC_SLASHES:
        raise TransportError(
            f"topic {topic!r} has {topic.count('/')} slashes; brokers such as AWS IoT Core "
            f"allow at most {MAX_TOPIC_SLASHES}"
        )


class MqttConnection:
    """Owns one paho client and its network thread. Also a context manager."""

    def __init__(self, config: MqttConfig, *, name: str = "edge-sdk") -> None:
        self.config = config.with_client_id(name)
        self._endpoints = self.config.endpoints()
        self._urls = self.config.urls
        self._at = 0  # index of the node being tried or used
        host, port, tls = self._endpoints[0]
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._listeners: list[ConnectionListener] = []
        #: Set once the broker accepted us AND acknowledged every remembered
        #: subscription: only then can a request published now meet its answer.
        self._connected = threading.Event()
        self._link_up = False  # CONNACK received, subscriptions possibly still pending
        self._resub: set[_SubAck] = set()
        self._suback: dict[int, _SubAck] = {}
        self._early_acks: dict[int, bool] = {}
        #: Refused (re)subscriptions being retried: filter -> attempts so far.
        self._retrying: dict[str, int] = {}
        self._retry_pending: set[str] = set()
        self._last_error: str | None = None
        self._refused: str | None = None
        self._started = False
        self._closed = False
        self._sock: Any = None
        self._up_since = 0.0
        self._short_links = 0
        self._will_source: Callable[[], LastWill | None] | None = None
        self._on_refused: RefusalListener | None = None
        #: The network thread ended on a refusal (see :meth:`on_refused`).
        self._halted = False

        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            clean_session=not self.config.persistent_session,
            protocol=paho.MQTTv311,
        )
        user, pw = self.config.credentials()
        if user is not None:
            c.username_pw_set(user, pw)
        if tls:
            try:
                c.tls_set(
                    ca_certs=self.config.ca_file,
                    certfile=self.config.cert_file,
                    keyfile=self.config.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as err:
                raise ConfigError(f"TLS setup for {self.url} failed: {err}") from err
            if self.config.tls_insecure:
                c.tls_insecure_set(True)
        will = self.config.last_will
        if will is not None:
            check_publish_topic(will.topic)
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # paho annotates the delays as int but handles floats; sub-second first
        # retries make a broker restart cost well under a second.
        c.reconnect_delay_set(
            self.config.reconnect_min_delay,  # type: ignore[arg-type]
            self.config.reconnect_max_delay,  # type: ignore[arg-type]
        )
        c.max_inflight_messages_set(self.config.max_inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._client = c

    # -- lifecycle -----------------------------------------------------------------

    def connect(self, timeout: float | None = None, *, wait: bool = True) -> None:
        """Start the network thread and (with ``wait``) block until connected.

        Raises :class:`TransportError` if the broker refuses us (bad credentials,
        not authorised) or cannot be reached within ``timeout`` (default
        ``config.connect_timeout``). With ``wait=False`` it returns at once and
        keeps trying in the background, which is what a daemon that must work
        offline wants.
        """
        if self._closed:
            raise TransportError("connection is closed")
        if not self._started:
            self._started = True
            host, port, _ = self._endpoints[self._at]
            try:
                self._client.connect_async(host, port, self.config.keepalive)
            except (OSError, ValueError) as err:
                raise TransportError(f"cannot connect to {self.url}: {err}") from err
            self._client.loop_start()
        if not wait:
            return
        limit = self.config.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._connected.wait(0.05):
            if self._refused is not None:
                reason = self._refused
                self.close()
                raise TransportError(f"broker {self.url} refused the connection: {reason}")
            if time.monotonic() > deadline:
                why = f" ({self._last_error})" if self._last_error else ""
                self.close()
                raise TransportError(
                    f"could not connect to broker {redact_url(self.config.url)} within "
                    f"{limit:.0f} s{why}"
                )

    @property
    def url(self) -> str:
        """The broker URL in use (or being tried), one of ``config.urls``, as messages show
        it: its password masked."""
        return redact_url(self._urls[self._at])

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread. Safe from any
        thread, and more than once: only the first call does anything."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._started:
            thread = self._client._thread
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
            if thread is not threading.current_thread():
                # paho keeps its wake-up socket pair (two descriptors) until the client is
                # garbage-collected: a device opening a connection per enrolment exchange
                # piled them up, and paho's select() fails on descriptors past 1023.
                self._client._reset_sockets()
        self._connected.clear()

    def unacknowledged_bytes(self) -> int:
        """Bytes written to the broker's socket that the broker's end has not yet
        acknowledged (Linux ``SIOCOUTQ``; 0 with no link or where that cannot be asked).
        On a fast uplink the kernel holds megabytes of what was published before this
        process queues anything (:class:`~edge_sdk.transport.RepoResponder` shares them
        between devices)."""
        return unacknowledged(self._client.socket())

    def reset(self) -> bool:
        """Drop the link now and let the automatic reconnect make a new one: unacknowledged
        QoS 1 messages are sent again, queued QoS 0 ones are lost and, with a clean
        session (the default), the broker discards what it had queued for the old one.
        For a link that still looks up but no longer moves (see
        :class:`~edge_sdk.transport.RepoResponder`'s watchdog). Returns False when there
        was no link to drop. Safe from any thread.
        """
        sock: Any = self._client.socket()  # a socket.socket or ssl.SSLSocket
        if self._closed or sock is None:
            return False
        try:
            # The network thread sees end-of-stream at once (even while the peer does not
            # read), closes the socket and reconnects with the usual backoff.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True

    def __enter__(self) -> MqttConnection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while the broker link is up and every subscription is acknowledged."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected or ``timeout``; return the connected state."""
        return self._connected.wait(timeout)

    def arm_last_will(self, source: Callable[[], LastWill | None]) -> None:
        """Give each new connection the last will ``source()`` returns (None: no will),
        instead of ``config.last_will``: called now and after every lost link, before the
        reconnect, on the network thread (it must not block). So that a will can say which
        connection it belongs to, and a will the broker publishes late for a dead link can
        be told from the news of the link that replaced it."""
        self._will_source = source
        self._arm_will()

    def _arm_will(self) -> None:
        source = self._will_source
        if source is None:
            return
        try:
            will = source()
            if will is None:
                self._client.will_clear()
                return
            check_publish_topic(will.topic)
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        except Exception:  # the network thread must outlive the caller's function
            log.exception("the last will was not renewed")

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True)`` after every (re)connect, ``listener(False)`` on each loss."""
        with self._lock:
            self._listeners.append(listener)

    def remove_connection_listener(self, listener: ConnectionListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def on_refused(self, listener: RefusalListener | None) -> None:
        """Stop trying when the broker refuses the connection for good (bad user name or
        password, not authorised) and call ``listener(reason)`` on the network thread (it
        must not block); :meth:`set_credentials` starts the connection again. Without a
        listener (the default) a refused connection keeps retrying with backoff, which
        suits credentials an operator fixes at the broker."""
        self._on_refused = listener

    @property
    def refused(self) -> str | None:
        """Why the broker last refused the connection for good; None once it accepted it
        (or never refused)."""
        return self._refused

    def set_credentials(self, username: str, password: str) -> None:
        """Use these credentials from the next connection attempt on: a live link keeps
        its session until it drops (or the broker drops it); a connection stopped by a
        refusal (see :meth:`on_refused`) starts again at once. Safe from any thread but
        the network thread."""
        if self._closed:
            raise TransportError("connection is closed")
        self.config = replace(self.config, username=username, password=password)
        self._client.username_pw_set(username, password)
        with self._lock:
            halted, self._halted = self._halted, False
            self._refused = None
        if halted:
            # The network thread ends after the refusal (see _on_connect): a new one.
            thread = self._client._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            host, port, _ = self._endpoints[self._at]
            try:
                self._client.connect_async(host, port, self.config.keepalive)
            except (OSError, ValueError) as err:
                raise TransportError(f"cannot connect to {self.url}: {err}") from err
            self._client.loop_start()

    def set_ca_file(self, ca_file: str) -> None:
        """Verify the broker against the CA certificates in ``ca_file`` from the next TLS
        connection on (the link up now stays up); no-op on a plain ``mqtt://`` link."""
        if not self.config.tls:
            return
        try:
            ctx = ssl.create_default_context(cafile=ca_file)
            if self.config.cert_file is not None:
                ctx.load_cert_chain(self.config.cert_file, self.config.key_file)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise ConfigError(f"TLS setup for {self.url} with CA file {ca_file} failed: "
                              f"{err}") from err
        if self.config.tls_insecure:
            ctx.check_hostname = False
        self.config = replace(self.config, ca_file=ca_file)
        # paho's tls_set refuses a second call; the context is read at each connect.
        self._client._ssl_context = ctx

    # -- messages ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> PublishHandle:
        """Queue a message; QoS 1 messages survive a reconnect. Never blocks on the network.

        Raises :class:`TransportError` for a topic brokers refuse, QoS 2, or a
        closed connection.
        """
        if qos not in (0, 1):
            raise TransportError(f"QoS {qos} is not supported (0 or 1 only, as on AWS IoT Core)")
        check_publish_topic(topic)
        if self._closed:
            raise TransportError(f"cannot publish on {topic}: the connection is closed")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish on {topic}: {paho.error_string(info.rc)}")
        # paho keeps no QoS 0 message for a link that is down: it is gone already.
        return PublishHandle(info, lost=qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN)

    def publish_wait(self, topic: str, payload: bytes | str, *, qos: int = 1,
                     retain: bool = False, timeout: float = 10.0) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1) or it was written (QoS 0)."""
        if not self.publish(topic, payload, qos=qos, retain=retain).wait(timeout):
            raise TransportError(
                f"broker {self.url} did not acknowledge the message on {topic} "
                f"within {timeout:.0f} s"
            )

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1,
                  wait: bool = True, timeout: float = 10.0) -> Subscription:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter``.

        The subscription is re-established after every reconnect. With ``wait``
        (and a live link) it returns only after the broker acknowledged it, so
        requests published afterwards cannot race their answers; if the link drops
        first, after the reconnect that re-sends it (all within ``timeout``).
        """
        if qos not in (0, 1):
            raise TransportError(f"QoS {qos} is not supported (0 or 1 only)")
        sub = Subscription(topic_filter, handler, qos, self._unsubscribe)
        with self._lock:
            self._subs.append(sub)
        if self._link_up:
            ack = self._send_subscribe(topic_filter, qos)
            if wait and ack is not None:
                if not self._await_suback(ack, timeout):
                    raise TransportError(
                        f"broker {self.url} did not acknowledge the subscription to "
                        f"{topic_filter} within {timeout:.0f} s"
                    )
                if ack.refused:
                    sub.cancel()
                    raise TransportError(
                        f"broker {self.url} refused the subscription to {topic_filter} "
                        f"for user {self.config.credentials()[0] or '(anonymous)'} (not "
                        "allowed by its ACL, or a clustered broker could not set it up yet)"
                    )
        return sub

    def shared_subscriptions_work(self, probe_topic: str, group: str, *,
                                  timeout: float = 1.0) -> bool | None:
        """Whether the broker delivers to ``$share/{group}/...`` subscriptions.

        True when a message published on ``probe_topic`` reached a shared subscription;
        False when it did not but did reach a plain one (NATS 2.9: it grants
        ``$share/...`` as a literal topic that nothing is published on); None when
        neither tells (the broker's ACL refused the probe). Costs one round trip where
        they work, ``timeout`` seconds more where they do not.
        """
        def probe(topic_filter: str) -> bool | None:
            got = threading.Event()
            try:
                sub = self.subscribe(topic_filter, lambda t, p: got.set(), qos=0)
            except TransportError:
                return None
            try:
                self.publish_wait(probe_topic, b"probe", qos=1)
                return got.wait(timeout)
            except TransportError:
                return None
            finally:
                sub.cancel()

        shared = probe(f"$share/{group}/{probe_topic}")
        if shared is not False:
            return shared
        return False if probe(probe_topic) else None

    def _await_suback(self, ack: _SubAck, timeout: float) -> bool:
        """Wait for ``ack``; if the link dropped first, for the reconnect that re-sends it."""
        deadline = time.monotonic() + timeout
        try:
            done = ack.event.wait(timeout)
            if done and ack.lost:
                # Connected again means every remembered subscription, this one included,
                # was acknowledged anew.
                done = self._connected.wait(max(0.0, deadline - time.monotonic()))
            return done
        finally:
            with self._lock:
                if self._suback.get(ack.mid) is ack:
                    del self._suback[ack.mid]

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            still = any(s.topic_filter == sub.topic_filter for s in self._subs)
        if not still and self._link_up:
            self._client.unsubscribe(sub.topic_filter)

    def _send_subscribe(self, topic_filter: str, qos: int) -> _SubAck | None:
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        ack = _SubAck(topic_filter, mid)
        early = False
        with self._lock:
            # The SUBACK can beat us here: the network thread may already have seen it.
            if mid in self._early_acks:
                ack.refused = self._early_acks.pop(mid)
                early = True
            elif not self._link_up:
                # The link dropped since the SUBSCRIBE went out (see _on_disconnect).
                ack.lost = True
                ack.event.set()
            else:
                self._suback[mid] = ack
        if early:
            self._after_suback(topic_filter, ack.refused)
            ack.event.set()
        return ack

    # -- paho callbacks (network thread) -----------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    reason: object, properties: object) -> None:
        if getattr(reason, "is_failure", False):
            self._last_error = str(reason)
            # Bad credentials or ACL refusal will not fix themselves: report, don't spin.
            if getattr(reason, "value", 0) in _REFUSED_FOR_GOOD:
                self._refused = str(reason)
                listener = self._on_refused
                if listener is not None and not self._closed:
                    with self._lock:
                        self._halted = True
                    # Ends paho's loop (and its thread) instead of a reconnect.
                    client.disconnect()
                    try:
                        listener(str(reason))
                    except Exception:
                        log.exception("refusal listener failed")
            return
        self._refused = None
        sock: Any = client.socket()
        if sock is not None:
            # Chunk requests and PUBACKs are tiny; without TCP_NODELAY, Nagle and
            # delayed ACKs stall every round trip by ~40 ms.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._link_up = True
        with self._lock:
            filters = {s.topic_filter: s.qos for s in self._subs}
        acks = [self._send_subscribe(f, q) for f, q in filters.items()]
        with self._lock:
            self._resub = {a for a in acks if a is not None and not a.event.is_set()}
            ready = not self._resub
        if ready:
            self._ready()

    def _ready(self) -> None:
        """The link is up and every subscription is back: tell the waiters and listeners."""
        self._up_since = time.monotonic()
        self._connected.set()
        log.debug("connected to %s as %s", self.url, self.config.client_id)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            self._call_listener(listener, True)

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is current.
        err = sys.exc_info()[1]
        if err is not None:
            self._last_error = f"{self.url}: {type(err).__name__}: {err}"
        self._next_node()

    def _next_node(self) -> None:
        """Point paho's next reconnect at the next broker URL (several URLs only)."""
        if len(self._endpoints) < 2 or self._closed:
            return
        self._at = (self._at + 1) % len(self._endpoints)
        host, port, _ = self._endpoints[self._at]
        # Not the host/port setters: they refuse while paho still counts the dead link as
        # established, which it does inside on_disconnect. reconnect() reads these two.
        self._client._host = host
        self._client._port = port
        log.debug("next connection attempt: %s", self.url)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       reason: object, properties: object) -> None:
        was = self._connected.is_set()
        self._link_up = False
        self._connected.clear()
        with self._lock:
            self._resub.clear()
            # No SUBACK comes for a SUBSCRIBE sent on a dead link, and paho reuses message
            # ids: a stale entry would take the SUBACK meant for a later subscription.
            lost = list(self._suback.values())
            self._suback.clear()
        for ack in lost:
            ack.lost = True
            ack.event.set()
        self._last_error = f"{self.url}: {reason}" if len(self._urls) > 1 else str(reason)
        if was:
            log.debug("disconnected from %s: %s", self.url, reason)
            self._note_link_length(time.monotonic() - self._up_since)
            with self._lock:
                listeners = list(self._listeners)
            for listener in listeners:
                self._call_listener(listener, False)
        self._arm_will()  # the next connection gets a will of its own
        self._next_node()

    def _note_link_length(self, seconds: float) -> None:
        """Say once per streak when the broker keeps closing the link right after accepting
        it: MQTT 3.1.1 gives no reason, and the usual one is a second client with the same
        client id, the two taking the session from each other in turn."""
        if self._closed or seconds >= _SHORT_LINK_S:
            self._short_links = 0
            return
        self._short_links += 1
        if self._short_links == _SHORT_LINKS_TO_WARN:
            user = self.config.credentials()[0]
            log.warning(
                "broker %s closed the link within %g s of accepting it %d times in a row: "
                "another client is probably connected with client id %s%s; the two take the "
                "session from each other in turn (give each its own client id, or user)",
                self.url, _SHORT_LINK_S, self._short_links, self.config.client_id,
                f" (or, on a broker with use_username_as_clientid, as user {user})"
                if user else "")

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reason_codes: object, properties: object) -> None:
        codes = reason_codes if isinstance(reason_codes, list) else [reason_codes]
        refused = any(getattr(c, "is_failure", False) for c in codes)
        with self._lock:
            ack = self._suback.pop(mid, None)
            if ack is None:
                if len(self._early_acks) > 1000:
                    self._early_acks.clear()
                self._early_acks[mid] = refused
        if ack is not None:
            ack.refused = refused
            self._after_suback(ack.topic_filter, refused)
            ack.event.set()
            with self._lock:
                last = ack in self._resub and len(self._resub) == 1
                self._resub.discard(ack)
            if last:
                self._ready()

    def _after_suback(self, topic_filter: str, refused: bool) -> None:
        """Retry a refused subscription that is still wanted, with backoff.

        A clustered broker refuses a QoS 1 subscription while it cannot store its state
        (NATS: no JetStream leader for ~10-20 s after a node dies); the refusal of one
        :meth:`subscribe` waits for is the caller's to handle (it cancels it), so only
        subscriptions still remembered a moment later are sent again, and only those are
        reported. One retry is pending per filter, however often the link flaps.
        """
        with self._lock:
            if not refused:
                self._retrying.pop(topic_filter, None)
                return
            attempt = self._retrying.get(topic_filter, 0)
            self._retrying[topic_filter] = attempt + 1
            if topic_filter in self._retry_pending:
                return
            self._retry_pending.add(topic_filter)
        # Linear, not exponential: a leader election takes 5-20 s, and doubling delays
        # would leave a device waiting up to as long again after it is over.
        delay = min(self.config.reconnect_max_delay, 0.5 * (attempt + 1))
        timer = threading.Timer(delay, self._retry_subscribe, (topic_filter, attempt, delay))
        timer.daemon = True
        timer.start()

    def _retry_subscribe(self, topic_filter: str, attempt: int, delay: float) -> None:
        with self._lock:
            self._retry_pending.discard(topic_filter)
            qos = next((s.qos for s in self._subs if s.topic_filter == topic_filter), None)
            if qos is None:
                self._retrying.pop(topic_filter, None)
        if qos is None or self._closed or not self._link_up:
            return  # gone, or the reconnect will send it again
        (log.warning if attempt == 0 else log.debug)(
            "broker %s refused the subscription to %s; sending it again every %.1f-%.0f s "
            "until it is granted", self.url, topic_filter, delay,
            self.config.reconnect_max_delay)
        self._send_subscribe(topic_filter, qos)

    def _quickack(self) -> None:
        # A broker without set_tcp_nodelay holds its next small packet (a chunk
        # request, a PUBACK) until we ACK the previous one, and Linux delays that
        # ACK by up to 40 ms. Asking for an immediate ACK after each inbound
        # packet removes that stall from every request/response round trip.
        sock = self._sock
        if _QUICKACK is not None and sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason: object, properties: object) -> None:
        self._quickack()

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        self._quickack()
        topic = msg.topic
        with self._lock:
            subs = [s for s in self._subs if _matches(s.topic_filter, topic)]
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        for sub in subs:
            try:
                sub.handler(topic, payload)
            except Exception:
                log.exception("handler for %s failed on a message on %s", sub.topic_filter,
                              topic)

    @staticmethod
    def _call_listener(listener: ConnectionListener, up: bool) -> None:
        try:
            listener(up)
        except Exception:
            log.exception("connection listener failed")
