"""Shadow runs: candidate models compared with the served ones on live requests, off the
request path.

:class:`Shadowing` is a request tap (see ``_tap``). For a request to a shadowed model,
sampled at the run's rate by a counter (every ``1/rate``-th request, not at random), it
queues the request's feed, the served model's raw outputs and its time in a bounded
queue (``[shadow] queue``), and returns: a full queue, an input over
``[shadow] max_input_bytes`` or a paused run drops the request from the comparison
(``dropped``), never delays it. One worker thread per run, at a lowered CPU priority,
runs the candidate on the same feed, compares the outputs in the artifact's task terms
(:class:`edge_sdk.quality.Comparer`) and updates the figures.

Whatever the candidate does (raise, return garbage, take long) stays here: it counts in
``errors`` and the figures, never in a client's answer or the served model's health.
The worker pauses itself above ``[shadow] cpu_share`` (its CPU seconds per wall second
over the last 10 s) and above ``[shadow] max_rss_bytes`` of process memory; while
paused, sampled requests are dropped.

The run ends when ``min_requests`` requests were handled (compared or failed) or at its
deadline (``started + time_limit_s``, kept across restarts): judged by the signed gate
(no gate: passed, unless the candidate failed on a request). The worker only records the
verdict; the installer's thread takes it (:meth:`Shadowing.take_ended`) and saves it.
Figures start from zero after a restart (only the deadline carries over).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._internal import one_line

from ._config import AgentConfig, half_of_memory

if TYPE_CHECKING:
    from ._metrics import Metrics
    from ._serving import Served
    from ._state import ShadowRun

log = logging.getLogger("device_agent")

#: The CPU share is measured over this many seconds of wall time.
CPU_WINDOW_S = 10.0
#: How often the worker reads the process's memory and the deadline.
_CHECK_S = 0.5
#: How long past its deadline a run whose worker is stuck is ended from outside it.
_OVERDUE_S = 4 * _CHECK_S
#: Latencies kept for the percentiles.
_KEEP = 2048

#: (deployment counter, outcome, reason, figures) of an ended run.
Ended = tuple[int, str, str, dict[str, Any]]


class Tally:
    """The running figures of one run (every candidate of it together)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compared = 0
        self.agreed = 0
        self.errors = 0
        self.dropped = 0
        self.worst: float | None = None
        self.worst_detail: str | None = None
        self.last_error: str | None = None
        self._serving: deque[float] = deque(maxlen=_KEEP)
        self._shadow: deque[float] = deque(maxlen=_KEEP)

    def drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def failed(self, why: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = why

    def compared_one(self, agree: bool, score: float, detail: str, serving_s: float,
                     shadow_s: float) -> None:
        with self._lock:
            self.compared += 1
            self.agreed += 1 if agree else 0
            if self.worst is None or score < self.worst:
                self.worst, self.worst_detail = float(score), detail
            self._serving.append(serving_s * 1e3)
            self._shadow.append(shadow_s * 1e3)

    @property
    def handled(self) -> int:
        return self.compared + self.errors

    def figures(self) -> Any:
        """A :class:`edge_sdk.quality.ShadowFigures` of the figures now."""
        from edge_sdk.quality import ShadowFigures

        with self._lock:
            serving, shadow = list(self._serving), list(self._shadow)
            return ShadowFigures(
                compared=self.compared, agreed=self.agreed, errors=self.errors,
                dropped=self.dropped, worst=self.worst, worst_detail=self.worst_detail,
                serving_ms_p50=_pct(serving, 50), serving_ms_p99=_pct(serving, 99),
                shadow_ms_p50=_pct(shadow, 50), shadow_ms_p99=_pct(shadow, 99))


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class _Run:
    """One run: its candidates, queue, figures and worker."""

    def __init__(self, run: ShadowRun, candidates: list[Served], queue_size: int) -> None:
        self.run = run
        self.candidates = {s.name: s for s in candidates}
        self.queue: queue.Queue[tuple[Served, Mapping[str, np.ndarray],
                                      Mapping[str, np.ndarray], float]] = \
            queue.Queue(maxsize=queue_size)
        self.count = itertools.count()
        self.rate = run.sample_rate
        self.tally = Tally()
        #: Why the worker paused ("cpu", "memory"), or None while it runs.
        self.paused: str | None = None
        self.done = False
        self.stop = threading.Event()
        #: The ``edge_agent_shadow_dropped`` series by (model, why), once looked up.
        self.dropped: dict[tuple[str, str], Any] = {}
        self.thread: threading.Thread | None = None

    def sampled(self) -> bool:
        """Whether the next request is compared: the n-th is when ``rate * n`` passes a
        whole number (every request at 1.0, every fourth at 0.25)."""
        n = next(self.count)
        return int((n + 1) * self.rate) > int(n * self.rate)


class Shadowing:
    """Runs at most one shadow run at a time; a :class:`~device_agent._tap.RequestTap`.

    ``metrics``: where the ``edge_agent_shadow_*`` series go; ``on_end``: called (from the
    worker) once a run has a verdict, so that the installer's thread takes it soon."""

    def __init__(self, config: AgentConfig, metrics: Metrics | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        self.config = config.shadow
        limits = config.limits
        self.max_rss = self.config.max_rss_bytes or int(
            0.8 * (limits.max_models_bytes or 2 * half_of_memory()))
        self.metrics = metrics
        self.on_end = on_end
        #: Told of each request the candidate disagreed on (model name, feed, the served
        #: model's outputs, the comparison's score), on the worker's thread: field samples
        #: keep them (``_samples``).
        self.on_disagree: Callable[[str, Mapping[str, np.ndarray],
                                    Mapping[str, np.ndarray], float], None] | None = None
        self._run: _Run | None = None
        self._ended: Ended | None = None
        self._lock = threading.Lock()

    # -- the request tap (request threads: microseconds, never raises) -------------------

    def served(self, model: Served, feed: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        r = self._run
        if r is None or r.done:
            return
        candidate = r.candidates.get(model.name)
        if candidate is None or not r.sampled():
            return
        why = r.paused
        if why is None:
            # The queue holds the served outputs too: a segmentation map or a big
            # detection head weighs more than its input.
            size = sum(getattr(a, "nbytes", 0) for a in feed.values()) + \
                sum(getattr(a, "nbytes", 0) for a in outputs.values())
            if size > self.config.max_input_bytes:
                why = "size"
            else:
                try:
                    r.queue.put_nowait((candidate, feed, outputs, seconds))
                    return
                except queue.Full:
                    why = "full"
        r.tally.drop()
        if self.metrics is not None:
            child = r.dropped.get((model.name, why))
            if child is None:  # looked up once per run: labels() costs a lock and a hash
                child = r.dropped[(model.name, why)] = \
                    self.metrics.shadow_dropped.labels(model.name, why)
            child.inc()

    # -- the installer's side ------------------------------------------------------------

    def start(self, run: ShadowRun, candidates: list[Served]) -> None:
        """Start comparing ``candidates`` (loaded, smoke-tested) as ``run`` says."""
        self.stop()
        r = _Run(run, candidates, self.config.queue)
        if self.metrics is not None:
            for name in r.candidates:
                self.metrics.shadow_reset(name)
        r.thread = threading.Thread(target=self._work, args=(r,), daemon=True,
                                    name=f"agent-shadow-{run.deployment}")
        with self._lock:
            self._ended = None
            self._run = r
        r.thread.start()

    def stop(self) -> None:
        """Stop the run (its candidates are let go of once the worker is done with them)."""
        with self._lock:
            r, self._run = self._run, None
            self._ended = None
        if r is None:
            return
        r.done = True
        r.stop.set()
        if r.thread is not None and r.thread is not threading.current_thread():
            # A candidate still running finishes on its own (daemon) thread.
            r.thread.join(5.0)

    def take_ended(self) -> Ended | None:
        """The verdict of the run, once there is one (taken once)."""
        with self._lock:
            ended, self._ended = self._ended, None
        return ended

    def figures(self) -> dict[str, Any] | None:
        """The running run's figures (``ShadowFigures.to_json()``), None without one."""
        r = self._run
        if r is None:
            return None
        out: dict[str, Any] = r.tally.figures().to_json()
        return out

    def status(self) -> dict[str, Any] | None:
        """The state's and heartbeat's ``shadow`` block (None: no run)."""
        r = self._run
        if r is None:
            return None
        first = r.run.models[0]
        out: dict[str, Any] = {
            "deployment": r.run.deployment, "model": first.name, "version": first.version,
            "started": r.run.started, "figures": r.tally.figures().to_json(),
            "status": "running" if r.paused is None else f"paused: {r.paused}"}
        if len(r.run.models) > 1:
            out["models"] = [{"name": m.name, "version": m.version} for m in r.run.models]
        return out

    def model_status(self, name: str) -> dict[str, Any] | None:
        """``GET /v2/models/{name}/shadow``: the run comparing with model ``name``."""
        r = self._run
        if r is None or name not in r.candidates:
            return None
        return self.status()

    # -- the worker ----------------------------------------------------------------------

    def _work(self, r: _Run) -> None:
        from ._agent import _lower_thread_priority

        _lower_thread_priority(19)
        comparers = {name: _comparer(s) for name, s in r.candidates.items()}
        #: (wall time, CPU seconds) of each job in the last CPU_WINDOW_S.
        spent: deque[tuple[float, float]] = deque()
        next_check = 0.0
        try:
            while not r.stop.is_set():
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + _CHECK_S
                    if time.time() >= r.run.deadline:
                        self._end(r, deadline=True)
                        return
                    r.paused = "memory" if _rss_bytes() > self.max_rss else (
                        None if r.paused == "memory" else r.paused)
                if r.paused == "cpu":
                    if _share(spent, now) <= self.config.cpu_share:
                        r.paused = None
                    else:
                        r.stop.wait(0.1)
                        continue
                try:
                    candidate, feed, outputs, seconds = r.queue.get(timeout=_CHECK_S)
                except queue.Empty:
                    continue
                c0, w0 = time.thread_time(), time.monotonic()
                self._compare(r, comparers[candidate.name], candidate, feed, outputs, seconds)
                now = time.monotonic()
                spent.append((now, time.thread_time() - c0))
                if r.tally.handled >= r.run.min_requests:
                    self._end(r, deadline=False)
                    return
                share = self.config.cpu_share
                if _share(spent, now) > share:
                    r.paused = "cpu"
                    continue
                # Paced: busy at most cpu_share of the wall time, in short turns, so that
                # request threads find the CPU (and the GIL) free most of the time.
                r.stop.wait(min(_CHECK_S, (now - w0) * (1.0 - share) / share))
        except Exception:  # the worker must never take the agent with it
            log.exception("the shadow run of deployment %d failed", r.run.deployment)

    def _compare(self, r: _Run, comparer: Any, candidate: Served,
                 feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 seconds: float) -> None:
        name = candidate.name
        m = self.metrics
        t0 = time.perf_counter()
        try:
            got = candidate.run(feed)
        except Exception as err:
            r.tally.failed(f"{type(err).__name__}: {one_line(err)}"[:200])
            if m is not None:
                m.shadow_errors.labels(name).inc()
            return
        took = time.perf_counter() - t0
        try:
            c = comparer.compare(outputs, got)
        except Exception as err:  # Q's comparer does not raise; a bug must not end the run
            r.tally.failed(f"compare: {type(err).__name__}: {one_line(err)}"[:200])
            if m is not None:
                m.shadow_errors.labels(name).inc()
            return
        r.tally.compared_one(bool(c.agree), float(c.score), str(c.detail)[:200], seconds,
                             took)
        if not c.agree and self.on_disagree is not None:
            try:
                self.on_disagree(name, feed, outputs, float(c.score))
            except Exception:
                log.exception("keeping a disagreement of the shadow run failed")
        if m is not None:
            m.shadow_compared.labels(name).inc()
            if c.agree:
                m.shadow_agreed.labels(name).inc()
            m.shadow_latency.labels(name).observe(took)
            t = r.tally
            m.shadow_agreement.labels(name).set(t.agreed / t.compared)
            if t.worst is not None:
                m.shadow_worst.labels(name).set(t.worst)

    def end_overdue(self) -> bool:
        """End the run whose deadline passed while its worker is stuck in the candidate (a
        model that hangs never returns to the worker's own deadline check): judged on the
        figures so far. Called from the agent's install thread; True when it ended one."""
        r = self._run
        if r is None or r.done or time.time() < r.run.deadline + _OVERDUE_S:
            return False
        r.stop.set()
        self._end(r, deadline=True)
        return True

    def _end(self, r: _Run, *, deadline: bool) -> None:
        with self._lock:  # the worker and end_overdue may both get here: one verdict
            if r.done:
                return
            r.done = True
        figures = r.tally.figures()
        outcome, reason = judge(r.run, figures, r.tally.last_error, deadline=deadline)
        log.info("shadow run of deployment %d: %s (%s)", r.run.deployment, outcome, reason)
        with self._lock:
            if self._run is r:
                self._ended = (r.run.deployment, outcome, reason, figures.to_json())
        if self.on_end is not None:
            self.on_end()


def judge(run: ShadowRun, figures: Any, last_error: str | None, *,
          deadline: bool) -> tuple[str, str]:
    """The outcome (``shadow_passed`` / ``_failed`` / ``_insufficient``) and its reason."""
    handled = figures.compared + figures.errors
    if run.gate is not None:
        from edge_sdk.quality import Gate

        verdict = Gate.from_json(run.gate).judge(figures)
        return f"shadow_{verdict.outcome}", verdict.why
    if handled < run.min_requests:
        return "shadow_insufficient", (f"{handled} of {run.min_requests} requests compared "
                                       f"within {run.time_limit_s:g} s")
    if figures.errors:
        return "shadow_failed", (f"the shadow model failed on {figures.errors} of {handled} "
                                 f"requests: {last_error}")
    agreement = figures.agreement
    return "shadow_passed", (f"{figures.compared} requests compared, agreement "
                             f"{agreement if agreement is not None else 0:.4f}")


def _comparer(candidate: Served) -> Any:
    from edge_sdk.quality import Comparer

    return Comparer.for_manifest(candidate.predictor.manifest)


def _share(spent: deque[tuple[float, float]], now: float) -> float:
    """CPU seconds per wall second over the last :data:`CPU_WINDOW_S`."""
    while spent and spent[0][0] < now - CPU_WINDOW_S:
        spent.popleft()
    return sum(c for _, c in spent) / CPU_WINDOW_S


def _rss_bytes() -> int:
    """The process's resident memory (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
