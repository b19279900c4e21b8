"""Broker connection settings: one dataclass, parsed from an ``mqtt://`` / ``mqtts://`` URL."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, urlsplit

from .._redact import add_secret, redact_url
from ..errors import ConfigError

#: One topic level. No ``.``: NATS maps ``/`` to its subject separator ``.`` and closes the
#: connection of a client that publishes or subscribes to a topic with a ``.`` in it, so a
#: fleet that works on Mosquitto must not need one to move to a NATS cluster.
_TOPIC_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_topic_word(value: str, what: str) -> str:
    """Raise :class:`ConfigError` unless ``value`` is safe as one topic level (no ``/+#.``)."""
    if not _TOPIC_WORD.fullmatch(value):
        why = (" ('.' is refused: NATS closes the connection on a '.' in a topic)"
               if "." in value else "")
        raise ConfigError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '-' "
            f"(it becomes one MQTT topic level){why}"
        )
    return value


def split_urls(url: str) -> tuple[str, ...]:
    """The broker URLs of a comma-separated list, in order (``mqtt://a:1883,mqtt://b:1883``)."""
    return tuple(u.strip() for u in url.split(",") if u.strip())


@dataclass(frozen=True)
class LastWill:
    """Message the broker publishes for us when the link dies without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker and which fleet namespace to use.

    ``url`` is ``mqtt://host:port`` (default port 1883) or ``mqtts://host:port``
    (TLS, default port 8883), or several of them separated by commas (the nodes of a
    clustered broker): the connection starts on the first and moves to the next one
    each time a connection attempt fails or the link drops. All of them share the
    credentials, TLS files and scheme (credentials in the first URL count). TLS uses
    ``ca_file`` (or the system CAs) and, for client-certificate brokers such as AWS IoT
    Core, ``cert_file``/``key_file``.
    Credentials may also be given in the URL (``mqtt://user:pass@host``).
    ``reconnect_min_delay``/``reconnect_max_delay`` bound the exponential backoff
    of automatic reconnects. ``connect_timeout`` bounds :meth:`MqttConnection.connect`.
    ``persistent_session`` asks the broker to keep our subscriptions and queue QoS 1
    messages for us while we are away (MQTT ``clean_session=0``); it needs a fixed
    ``client_id``. Operator-side listeners use it so no device event is lost while
    they reconnect; devices keep clean sessions (their state is retained).
    """

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    client_id: str = ""
    keepalive: int = 30
    fleet: str = "default"
    topic_prefix: str = "edge"
    last_will: LastWill | None = None
    connect_timeout: float = 10.0
    reconnect_min_delay: float = 0.2
    reconnect_max_delay: float = 10.0
    max_inflight: int = 64
    persistent_session: bool = False

    def __post_init__(self) -> None:
        for secret in (self.password, self.url):  # never printed (edge_sdk._redact)
            add_secret(secret)
        self.endpoints()  # validates the URLs early
        check_topic_word(self.fleet, "fleet")
        check_topic_word(self.topic_prefix, "topic prefix")
        if self.keepalive < 5:
            raise ConfigError(f"keepalive {self.keepalive}s is too short (minimum 5 s)")
        if self.persistent_session and not self.client_id:
            raise ConfigError("a persistent MQTT session needs a fixed client id")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("TLS client authentication needs both a certificate and a key file")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{path}: TLS file not found")

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker URL of :attr:`url`, in the order they are tried."""
        return split_urls(self.url)

    def endpoint(self) -> tuple[str, int, bool]:
        """``(host, port, tls)`` of the first URL."""
        return self.endpoints()[0]

    def endpoints(self) -> tuple[tuple[str, int, bool], ...]:
        """``(host, port, tls)`` of every URL of :attr:`url`; all must agree on TLS."""
        urls = self.urls
        if not urls:
            raise ConfigError("no broker URL given (e.g. mqtt://localhost:1883)")
        out = tuple(_endpoint(u) for u in urls)
        if len({tls for _, _, tls in out}) > 1:
            raise ConfigError(f"broker URLs {redact_url(self.url)!r} mix mqtt:// and "
                              "mqtts://; use one scheme for every node")
        return out

    def credentials(self) -> tuple[str | None, str | None]:
        parts = urlsplit(self.urls[0] if self.urls else self.url)
        user = self.username if self.username is not None else (
            unquote(parts.username) if parts.username else None)
        pw = self.password if self.password is not None else (
            unquote(parts.password) if parts.password else None)
        return user, pw

    def with_client_id(self, prefix: str) -> MqttConfig:
        """A copy with a fresh unique client id (``prefix-<random>``) unless one is set."""
        if self.client_id:
            return self
        return replace(self, client_id=f"{prefix}-{secrets.token_hex(4)}")

    @property
    def tls(self) -> bool:
        return self.endpoint()[2]


def _endpoint(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(
            f"broker URL {redact_url(url)!r} must start with mqtt:// or mqtts:// (e.g. "
            "mqtt://localhost:1883)"
        )
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ConfigError(f"broker URL {redact_url(url)!r} has no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as err:
        raise ConfigError(f"broker URL {redact_url(url)!r}: invalid port") from err
    return parts.hostname, port, tls
