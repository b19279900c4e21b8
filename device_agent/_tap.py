"""Taps: what watches live requests beside the answer (shadow runs, input drift, field
samples).

A tap sees each request that a model answered, after the answer is computed and before it
is sent. It runs on the request's thread, so it must hand the work on (a bounded queue,
dropping when full) and return at once; it never changes, delays or fails the answer. The
feed's arrays are the request's own and nothing writes to them after the model ran, so a
tap may keep references to them without copying.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np

from ._serving import Served

log = logging.getLogger("device_agent")


class RequestTap(Protocol):
    def served(self, model: Served, feed: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        """``model`` answered ``feed`` with ``outputs`` in ``seconds`` (the model's run
        alone). Must return in microseconds and should not raise."""


class Taps:
    """The taps of one agent, called in the order they were added. A tap that raises is
    logged (once per tap) and counted in :attr:`failures`; the request is answered all
    the same."""

    def __init__(self) -> None:
        self._taps: tuple[RequestTap, ...] = ()
        self._lock = threading.Lock()
        self._logged: set[int] = set()
        self.failures = 0

    def add(self, tap: RequestTap) -> None:
        with self._lock:
            self._taps = (*self._taps, tap)

    def remove(self, tap: RequestTap) -> None:
        with self._lock:
            self._taps = tuple(t for t in self._taps if t is not tap)

    def __iter__(self) -> Iterator[RequestTap]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def served(self, model: Served, feed: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        for tap in self._taps:  # a tuple: adding a tap never disturbs this loop
            try:
                tap.served(model, feed, outputs, seconds)
            except Exception:
                self.failures += 1
                if id(tap) not in self._logged:
                    self._logged.add(id(tap))
                    log.exception("a request tap (%s) failed; the answer is sent all the "
                                  "same", type(tap).__name__)
