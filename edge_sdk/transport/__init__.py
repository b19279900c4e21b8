"""MQTT transport: connection, topics, chunked resumable transfer, repository responder.

Public API (paho never appears in it):

- :class:`MqttConfig` / :class:`LastWill`: broker URL (``mqtt://`` or ``mqtts://``),
  credentials, TLS files, client id, keepalive, fleet, topic prefix, last will.
- :class:`MqttConnection`: one connection with automatic reconnect.
  ``connect(timeout=None, wait=True)``, ``close()``, ``connected``,
  ``wait_connected(timeout)``, ``add_connection_listener(fn(up: bool))`` (and remove),
  ``publish(topic, payload, qos=1, retain=False) -> PublishHandle``, ``publish_wait(...)``,
  ``subscribe(filter, handler(topic: str, payload: bytes), qos=1) -> Subscription``
  (re-subscribed after every reconnect; handlers run on the network thread),
  ``set_credentials(user, password)`` / ``set_ca_file(path)`` (from the next connection
  on), ``on_refused(fn(reason: str))`` (stop and report instead of retrying a refusal
  for good), ``refused``.
- :class:`PublishHandle`: ``published`` (acknowledged by the broker, QoS 1; written,
  QoS 0) and ``wait(timeout) -> bool``.
- :class:`Topics`: ``edge/{fleet}/...`` names (announce, repo_request(dev),
  repo_response(dev), desired(dev), group_desired(group), state(dev), events(dev),
  enrol_request(batch, dev), enrol_answer(batch, dev), cred_request(dev), cred_answer(dev)).
- :class:`RepositoryFetcher`: the interface the trust client downloads through
  (``download(path, sink, start=, length=, max_length=, progress=)``, ``stats``,
  ``transfer`` (a :class:`TransferProgress` while a download runs), ``close()``).
- :class:`FetchConfig`, :class:`ChunkClient` (the MQTT ``RepositoryFetcher``),
  :class:`MqttFetcher` (python-tuf's ``FetcherInterface`` over one): device-side
  transfer (flow control that follows the link, RTT-derived retransmits, resumable,
  bounded; fails only when nothing arrives for ``stall_timeout``).
- :class:`ChunkRequest`, :class:`ChunkResponse` (statuses as its class attributes),
  :class:`ChunkRequestError`: the chunk protocol's messages, for a device that answers
  for its own files (field sample bundles).
- :class:`RepoResponder`, :class:`ResponderConfig`, :class:`DeviceLimits`: host-side
  chunk server; answers each device on its own topic, within a per-device budget.
- Errors: :class:`EndlessDataError` (a ``VerificationError``), :class:`SlowRetrievalError`
  and :class:`RemoteNotFoundError` (``TransportError``: transient).
"""

from ._chunks import (
    DEFAULT_CHUNK,
    MAX_CHUNK,
    MESSAGE_LIMIT,
    ChunkRequest,
    ChunkRequestError,
    ChunkResponse,
)
from ._config import LastWill, MqttConfig
from ._connection import MqttConnection, PublishHandle, Subscription
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError
from ._fetcher import (
    REPO_URL,
    ChunkClient,
    FetchConfig,
    FetchStats,
    MqttFetcher,
    RepositoryFetcher,
    TransferProgress,
)
from ._responder import DeviceLimits, RepoResponder, ResponderConfig
from ._topics import Topics

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_CHUNK",
    "MESSAGE_LIMIT",
    "REPO_URL",
    "ChunkClient",
    "ChunkRequest",
    "ChunkRequestError",
    "ChunkResponse",
    "DeviceLimits",
    "EndlessDataError",
    "FetchConfig",
    "FetchStats",
    "LastWill",
    "MqttConfig",
    "MqttConnection",
    "MqttFetcher",
    "PublishHandle",
    "RemoteNotFoundError",
    "RepoResponder",
    "RepositoryFetcher",
    "ResponderConfig",
    "SlowRetrievalError",
    "Subscription",
    "Topics",
    "TransferProgress",
]
