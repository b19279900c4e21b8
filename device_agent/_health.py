"""The health window of swapped-in models: probe each with its sample every
``health.probe_interval_s`` for ``health.window_s`` and judge what it served (error rate,
p99 latency) against the limits. The verdict goes back to the state machine, which
commits or rolls back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._config import HealthConfig
from ._crash import crash_point
from ._serving import Served

log = logging.getLogger("device_agent")


class WindowInterrupted(Exception):
    """The agent is stopping inside a health window (the trial resumes at boot)."""


class HealthWindow:
    """Watches one model at a time; ``stop`` set ends a window early, ``sample(served)``
    gives the inputs it is probed with."""

    def __init__(self, config: HealthConfig, stop: threading.Event,
                 sample: Callable[[Served], Mapping[str, Any]]) -> None:
        self.config = config
        self.stop = stop
        self.sample = sample

    def watch(self, *served: Served) -> str | None:
        """Probe and watch the new models (one window for all of them: a set is judged
        as one); a reason to roll back, None when every one is healthy. Raises
        :class:`WindowInterrupted` when the agent is stopping."""
        hc = self.config
        samples = [(s, self.sample(s)) for s in served]
        deadline = time.monotonic() + hc.window_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self.stop.wait(min(hc.probe_interval_s, remaining)):
                raise WindowInterrupted
            for s, sample in samples:
                try:
                    s.predict(sample)
                except Exception as err:
                    log.warning("health probe on %s failed: %s", s.record.label(), err)
            crash_point("health_probe")
            reason = self._judge_all(served, final=False)
            if reason is not None:
                return reason
        return self._judge_all(served, final=True)

    def _judge_all(self, served: tuple[Served, ...], *, final: bool) -> str | None:
        for s in served:
            reason = self.judge(s, final=final)
            if reason is not None:
                return reason if len(served) == 1 else f"{s.record.label()}: {reason}"
        return None

    def judge(self, served: Served, *, final: bool) -> str | None:
        hc = self.config
        h = served.health
        total = h.ok + h.errors
        # Before the window ends, act on errors only once the rate means something.
        if total and (final or hc.max_error_rate == 0.0 or total >= 20) and \
                h.errors / total > hc.max_error_rate:
            return (f"{h.errors} of {total} inferences failed in the health window "
                    f"(limit {hc.max_error_rate:.0%}); last error: {h.last_error}")
        if final and hc.max_p99_ms > 0 and total:
            p99 = h.p99_ms()
            if p99 > hc.max_p99_ms:
                return (f"p99 latency {p99:.2f} ms in the health window is over the limit "
                        f"of {hc.max_p99_ms:.2f} ms")
        return None
