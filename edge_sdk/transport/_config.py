"""Broker connection settings: one dataclass, parsed from an ``mqtt://`` / ``mqtts://`` URL."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

_TOPIC_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_topic_word(value: str, what: str) -> str:
    """Raise :class:`ConfigError` unless ``value`` is safe as one topic level (no ``/+#``)."""
    if not _TOPIC_WORD.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_', '-' "
            "(it becomes one MQTT topic level)"
        )
    return value


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
    (TLS, default port 8883). TLS uses ``ca_file`` (or the system CAs) and, for
    client-certificate brokers such as AWS IoT Core, ``cert_file``/``key_file``.
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
    password: str | None = None
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
        self.endpoint()  # validates the URL early
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

    def endpoint(self) -> tuple[str, int, bool]:
        """``(host, port, tls)`` from :attr:`url`."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(
                f"broker URL {self.url!r} must start with mqtt:// or mqtts:// (e.g. "
                "mqtt://localhost:1883)"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ConfigError(f"broker URL {self.url!r} has no host")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as err:
            raise ConfigError(f"broker URL {self.url!r}: invalid port") from err
        return parts.hostname, port, tls

    def credentials(self) -> tuple[str | None, str | None]:
        parts = urlsplit(self.url)
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
