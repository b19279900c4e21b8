"""Read a retained message again, so that the handlers already subscribed to it see it.

A subscription that already covers a topic is no proof that its retained message
arrived: on a NATS cluster a state published on one node while the registry subscribes
on another is in neither the retained copy that node sends with the SUBACK nor the live
stream the new subscription starts after (measured under load: 4 of 10 runs of 30
devices lost 1-3 first states each, every one acknowledged 0.2-0.8 s before the
registry's SUBACK). A fresh QoS 0 subscription to the one topic makes the broker send
its retained message again; the connection hands it to every handler whose filter
matches, and the extra subscription is dropped ``window_s`` later. QoS 0: a NATS cluster
sets it up without JetStream, so it works even while JetStream elects a leader.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError, EdgeError
from ..transport import MqttConnection, Subscription

log = logging.getLogger("edge_sdk.fleet.registry")


@dataclass(frozen=True)
class RereadLimits:
    """``every_s``: at most one re-read per topic in this long; ``window_s``: how long the
    extra subscription stays; ``max_pending``: re-reads running at once (more are
    skipped: the next trigger asks again); ``max_topics``: topics remembered."""

    every_s: float = 60.0
    window_s: float = 10.0
    max_pending: int = 32
    max_topics: int = 100_000

    def __post_init__(self) -> None:
        if not (self.every_s > 0 and self.window_s > 0 and self.max_pending >= 1
                and self.max_topics >= 1):
            raise ConfigError("re-read limits must be positive (every_s, window_s, "
                              "max_pending, max_topics)")


class RetainedReread:
    """Re-reads of retained messages over one connection, rate-limited per topic."""

    def __init__(self, connection: MqttConnection, limits: RereadLimits | None = None) -> None:
        self._conn = connection
        self.limits = limits or RereadLimits()
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}  # topic -> monotonic time it may be re-read again
        self._pending = 0
        #: Re-reads started so far.
        self.started = 0

    def request(self, topic: str) -> bool:
        """Ask the broker for ``topic``'s retained message again, unless that topic was
        asked for within ``every_s`` or ``max_pending`` re-reads are running. Never blocks
        on the network (safe in a message handler); True when a re-read started."""
        lim = self.limits
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(topic, 0.0) or self._pending >= lim.max_pending:
                return False
            if len(self._next) >= lim.max_topics:
                self._next = {t: at for t, at in self._next.items() if at > now}
                if len(self._next) >= lim.max_topics:
                    return False
            self._next[topic] = now + lim.every_s
            self._pending += 1
            self.started += 1
        try:
            sub = self._conn.subscribe(topic, _ignore, qos=0, wait=False)
        except EdgeError as err:
            log.warning("registry: cannot read the retained %s again: %s", topic, err)
            self._done()
            return False
        log.info("registry: reading the retained %s again", topic)
        timer = threading.Timer(lim.window_s, self._end, (sub,))
        timer.daemon = True
        timer.start()
        return True

    def _end(self, sub: Subscription) -> None:
        try:
            sub.cancel()
        except EdgeError as err:
            log.debug("re-read subscription not cancelled: %s", err)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1


def _ignore(topic: str, payload: bytes) -> None:
    """The retained message reaches the subscription that wants it; this one only asked."""
