"""What arrived on the ``desired`` topics and waits for the worker: a pure data structure.

Messages are checked (signature, fleet, device, expiry) as they arrive, before
they are coalesced, so that ranking rests on verified counters only: per topic
the verified deployment with the highest counter waits; a message that does not
verify never displaces it, it only waits to be reported as refused (a bounded
list; the oldest of those are dropped first and counted). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verified:
    """A message whose signature checked out, with its (so authentic) counter."""

    topic: str
    counter: int
    payload: bytes


@dataclass(frozen=True)
class Unverified:
    """A message that failed the check; named by its digest since its content is untrusted."""

    topic: str
    #: The first 32 hex digits of the payload's sha256 (what the installer keys messages by).
    digest: str
    size: int
    #: The counter the message claims, if it is readable at all (not to be trusted).
    claimed: int | None
    reason: str


class DesiredInbox:
    """Pending work of the agent's worker. Not thread-safe: the agent holds a lock."""

    def __init__(self, max_refusals: int = 16) -> None:
        self.max_refusals = max_refusals
        self._verified: dict[str, Verified] = {}
        self._refused: dict[str, Unverified] = {}
        #: Refusals dropped unreported because too many were waiting.
        self.dropped = 0

    def offer(self, item: Verified) -> bool:
        """Keep ``item`` unless its topic already has one with a higher counter waiting."""
        cur = self._verified.get(item.topic)
        if cur is not None and cur.counter > item.counter:
            return False
        self._verified[item.topic] = item
        return True

    def refuse(self, item: Unverified) -> None:
        """Queue a refusal report (one per digest); the verified work is left alone."""
        self._refused.pop(item.digest, None)
        self._refused[item.digest] = item
        while len(self._refused) > self.max_refusals:
            self._refused.pop(next(iter(self._refused)))
            self.dropped += 1

    def forget(self, topic: str) -> None:
        """Drop what waits from ``topic`` (a group the device no longer follows)."""
        self._verified.pop(topic, None)
        self._refused = {d: u for d, u in self._refused.items() if u.topic != topic}

    def take(self) -> tuple[list[Verified], list[Unverified]]:
        """Everything waiting: verified work newest counter first, refusals oldest first."""
        work = sorted(self._verified.values(), key=lambda v: -v.counter)
        refused = list(self._refused.values())
        self._verified, self._refused = {}, {}
        return work, refused

    def __bool__(self) -> bool:
        return bool(self._verified or self._refused)
