"""What the broker retains on every device's ``desired`` topic, as the controller sees it.

One wildcard subscription: the broker first replays the retained messages, then forwards
every later publish on those topics — another controller's too, so a publish that lands
after its sender lost the lease is seen the moment it lands. The controller compares
this view with its record (``device_desired``) and publishes where they differ.

Only a digest and the claimed counter of each message are kept (no document), for at
most :data:`MAX_DEVICES` devices. The view starts over at every reconnect (a topic
cleared meanwhile is not replayed): :attr:`RetainedDesired.settled` says when the replay
has had time to arrive, so that a topic missing from the view can be taken as empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass

from ..errors import EdgeError
from ..transport import MqttConnection, Topics
from ..transport._connection import Subscription

log = logging.getLogger("edge_sdk.fleet.controller")

#: Devices whose retained message the view holds; past it, new ones are not tracked.
MAX_DEVICES = 1_000_000
#: Messages longer than this are not parsed for their counter (brokers refuse bigger).
MAX_DOCUMENT = 128 * 1024


@dataclass(frozen=True)
class Held:
    """One retained message: its sha256 ``digest`` and the counter it claims (unverified;
    None when it names none)."""

    digest: str
    counter: int | None


def digest(document: bytes) -> str:
    return hashlib.sha256(document).hexdigest()


def claimed_counter(payload: bytes) -> int | None:
    """The deployment counter a document says it has, or None (unreadable, oversized)."""
    if len(payload) > MAX_DOCUMENT:
        return None
    try:
        counter = json.loads(payload)["signed"]["counter"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return counter if isinstance(counter, int) and not isinstance(counter, bool) else None


class RetainedDesired:
    """A live view of the fleet's retained ``desired`` topics (see the module docstring)."""

    def __init__(self, connection: MqttConnection, topics: Topics, *,
                 settle_s: float = 1.0) -> None:
        self._conn = connection
        self._topics = topics
        self._settle_s = settle_s
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._changed: set[str] = set()
        self._since = 0.0  # monotonic time of the last (re)subscription
        #: Grows at every (re)subscription: everything must be compared again.
        self.generation = 0
        self._sub: Subscription | None = None
        self._head, self._tail = f"{topics.base}/dev/", "/desired"

    def start(self) -> None:
        """Subscribe. Raises :class:`EdgeError` (one line) when the broker refuses it."""
        self._conn.add_connection_listener(self._on_link)
        self._restart()
        try:
            self._sub = self._conn.subscribe(self._topics.every_device("desired"), self._on)
        except EdgeError:
            self._conn.remove_connection_listener(self._on_link)
            raise

    def stop(self) -> None:
        self._conn.remove_connection_listener(self._on_link)
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    @property
    def settled(self) -> bool:
        """True once the broker had ``settle_s`` to replay what it retains, on a live link."""
        with self._lock:
            since = self._since
        return self._conn.connected and time.monotonic() - since >= self._settle_s

    def held(self, device: str) -> Held | None:
        """The retained message on ``device``'s topic as last seen (None: none seen)."""
        with self._lock:
            return self._held.get(device)

    def take_changed(self) -> set[str]:
        """The devices whose topic received a message since the last call."""
        with self._lock:
            out, self._changed = self._changed, set()
        return out

    def _restart(self) -> None:
        with self._lock:
            self._since = time.monotonic()
            self.generation += 1

    def _on_link(self, up: bool) -> None:
        if up:  # the subscription was sent again: the replay is under way
            self._restart()
            return
        with self._lock:  # what is retained now arrives again after the reconnect
            self._held.clear()
            self._changed.clear()

    def _on(self, topic: str, payload: bytes) -> None:
        if not (topic.startswith(self._head) and topic.endswith(self._tail)):
            return
        device = topic[len(self._head):-len(self._tail)]
        if not device or "/" in device or len(device) > 128:
            return
        held = Held(digest(payload), claimed_counter(payload)) if payload else None
        with self._lock:
            if held is None:
                self._held.pop(device, None)
            elif device in self._held or len(self._held) < MAX_DEVICES:
                self._held[device] = held
            else:
                return
            if len(self._changed) < MAX_DEVICES:
                self._changed.add(device)


__all__ = ["Held", "RetainedDesired", "claimed_counter", "digest"]
