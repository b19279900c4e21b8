"""When a rollout stops: the one abort rule of both rollout engines.

``edge-sdk rollout run`` (:func:`edge_sdk.release.rollout`, waves followed over MQTT
from the operator's machine) and ``edge-sdk rollout start`` (the fleet controller's state
machine, ``edge_sdk.fleet._machine``) both ask :meth:`AbortRule.verdict` about the
devices of the rollout that have finished so far, every wave together:

- a device *failed* when it answered and did not take the release (``failed``,
  ``rolled_back``, ``refused``; a deployment that could not be signed fails its devices);
- a device is *silent* when it did not answer within the wave timeout (an offline
  device included: it has had its chance);
- devices still under way (not sent yet, sent and within the timeout) are not counted.

Failed and silent devices are counted apart, each against its own limit. Pure: no I/O,
so the fleet (an optional extra) and the release package share it without importing each
other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import UsageError

COMMITTED = "committed"
#: Answers that say the device did not take the release.
FAILED = ("failed", "rolled_back", "refused")
#: No answer within the wave timeout.
SILENT = "silent"
#: Every result that ends a device's part in a wave.
FINISHED = (COMMITTED, *FAILED, SILENT)


def _limit_ok(v: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
        and v >= 0


@dataclass(frozen=True)
class Verdict:
    """Why a rollout must stop: ``count`` of ``finished`` devices ``failed`` or stayed
    ``silent`` (``kind``), more than the ``allowed`` number."""

    kind: str
    count: int
    finished: int
    allowed: int


@dataclass(frozen=True)
class AbortRule:
    """Stop once at least ``min_finished`` devices have finished and more of them failed
    than ``max_failures`` allows, or more stayed silent than ``max_silent`` allows. A limit
    below 1 is a share of the finished devices (exceeded when the share is over it: 0
    stops at the first one); 1 or more is a count (``2``: the third one stops it)."""

    max_failures: float = 0.0
    max_silent: float = 0.0
    min_finished: int = 1

    def __post_init__(self) -> None:
        if not (_limit_ok(self.max_failures) and _limit_ok(self.max_silent)):
            raise UsageError("abort limits (max failures, max silent) must be numbers >= 0")
        if isinstance(self.min_finished, bool) or not isinstance(self.min_finished, int) \
                or self.min_finished < 1:
            raise UsageError("--min-finished must be >= 1")

    def verdict(self, results: Iterable[str]) -> Verdict | None:
        """The reason to stop (failures first), or None to go on; ``results``: one per
        device of the rollout, as :data:`FINISHED` names them (any other is under way)."""
        done = failed = silent = 0
        for r in results:
            if r in FINISHED:
                done += 1
                failed += r in FAILED
                silent += r == SILENT
        if done < self.min_finished:
            return None
        for kind, n, limit in (("failed", failed, self.max_failures),
                               ("silent", silent, self.max_silent)):
            if _exceeds(n, done, limit):
                return Verdict(kind, n, done, allowed(limit, done))
        return None


def _exceeds(n: int, finished: int, limit: float) -> bool:
    return n > limit if limit >= 1 else n / finished > limit


def allowed(limit: float, finished: int) -> int:
    """How many of ``finished`` devices ``limit`` lets fail (or stay silent)."""
    if limit >= 1:
        return int(limit)
    k = min(finished, math.floor(limit * finished))
    # A share compares n / finished with it; floor(limit * finished) may be one off in
    # binary floating point (0.57 * 100 < 57): step to the count that comparison allows.
    while k < finished and not _exceeds(k + 1, finished, limit):
        k += 1
    while k > 0 and _exceeds(k, finished, limit):
        k -= 1
    return k


__all__ = ["COMMITTED", "FAILED", "FINISHED", "SILENT", "AbortRule", "Verdict", "allowed"]
