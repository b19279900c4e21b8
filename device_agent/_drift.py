"""Input drift on the device: per-input, per-channel statistics of live requests.

:class:`DriftTap` is a request tap (``_tap.py``). On the request thread it only decides
whether to look at a request — at most ``[drift] max_per_s`` per second, inputs up to
``max_input_bytes``, while its bounded queue has room — and hands the feed's arrays (never
copied: nothing writes to them after the model ran) to one worker thread at a lowered
priority. Every request it does not look at is skipped and counted by why.

The worker adds each request's inputs up per channel with the artifact's reference (the
manifest's ``input_stats``: the evaluation set's histogram edges, see
:mod:`edge_sdk.quality._drift`), into a sliding window of the last ``window`` analysed
requests per model kept as ``slots`` slots: the oldest slot is dropped when a new one
starts, so the figures never hold more than ``window`` requests nor fewer than
``window - window / slots`` once that many came. A model whose manifest has no
reference gets the statistics without histograms or PSI.

What it reports (heartbeat ``drift``): ``{model: {input: {"n", "channels": [{mean, std,
min, max, nan_share, count, hist}], "psi": [...], "psi_max"}}}``, ``hist`` scaled down to
sum to 10,000 when more values were seen, bounded to ``max_report_bytes`` (the inputs
that do not fit go with the next heartbeats, in turn). The host recomputes PSI from the
histograms; the device's own ``psi`` is for its ``/metrics`` and a reader of the state.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edge_sdk.quality import InputAccumulator, Reference, channel_rule, psi

from ._config import DriftConfig
from ._serving import Served

log = logging.getLogger("device_agent.drift")

#: Why a request was not analysed (``edge_agent_drift_skipped_total{why}``).
SKIP_REASONS = ("rate", "queue", "size", "shape")
#: Inputs of one model and models followed at most (a device serves at most 16).
MAX_INPUTS = 32
MAX_MODELS = 64
#: A reported histogram is scaled down to this many counts (PSI needs proportions; the
#: host's chi-square counts requests, not values).
HIST_SCALE = 10_000


class _ModelDrift:
    """One served model version's window (touched by the worker; read under the lock)."""

    def __init__(self, served: Served, config: DriftConfig) -> None:
        self.version = served.version
        self.sha256 = served.record.sha256
        manifest = served.predictor.manifest
        stats = manifest.extra.get("input_stats") if manifest is not None else None
        self.references: dict[str, Reference] = {}
        if isinstance(stats, Mapping):
            for name, doc in list(stats.items())[:MAX_INPUTS]:
                ref = Reference.from_json(doc)
                if ref is not None:
                    self.references[str(name)] = ref
        #: Per input: an empty accumulator to copy (None: the channel rule skips it).
        self.templates: dict[str, InputAccumulator | None] = {}
        self.slot_size = max(1, config.window // config.slots)
        self.slots: deque[dict[str, InputAccumulator]] = deque(maxlen=config.slots)
        self.in_slot = self.slot_size
        self.analysed = 0
        self.mismatched = 0
        self.cpu_s = 0.0

    def template(self, name: str, arr: np.ndarray) -> InputAccumulator | None:
        if name in self.templates:
            return self.templates[name]
        if len(self.templates) >= MAX_INPUTS:
            return None
        ref = self.references.get(name)
        t: InputAccumulator | None
        if ref is not None:
            t = ref.accumulator()
        else:
            rule = channel_rule(arr.shape, arr.dtype)
            t = None if rule is None else InputAccumulator(rule)
        self.templates[name] = t
        return t

    def window(self) -> dict[str, InputAccumulator]:
        """The slots merged, per input."""
        out: dict[str, InputAccumulator] = {}
        for slot in self.slots:
            for name, acc in slot.items():
                have = out.get(name)
                if have is None:
                    have = out[name] = acc.empty()
                have.merge(acc)
        return out


class DriftTap:
    """The request tap and its worker (see the module docstring). ``serving``: the models
    served now (figures of others are dropped); ``on_worker_start``: called on the worker
    thread first (the agent lowers its priority)."""

    def __init__(self, config: DriftConfig, *,
                 serving: Callable[[], Mapping[str, Served]] | None = None,
                 on_worker_start: Callable[[], None] | None = None) -> None:
        self.config = config
        self._serving = serving
        self._on_start = on_worker_start
        self._queue: queue.Queue[tuple[Served, Mapping[str, np.ndarray]]] = queue.Queue(
            config.queue)
        self._interval = 1.0 / config.max_per_s
        self._next = 0.0
        self._lock = threading.Lock()
        self._models: dict[str, _ModelDrift] = {}
        #: (model, why) -> requests skipped.
        self.skipped: dict[tuple[str, str], int] = {}
        self._count_lock = threading.Lock()
        self._cursor = 0
        self._said = False  # the last report had figures
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- the request thread ----------------------------------------------------------------

    def served(self, model: Served, feed: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skip(model.name, "rate")
            return
        self._next = now + self._interval
        size = 0
        for a in feed.values():
            size += getattr(a, "nbytes", 0)
        if size > self.config.max_input_bytes:
            self._skip(model.name, "size")
            return
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait((model, feed))
        except queue.Full:
            self._skip(model.name, "queue")

    def _skip(self, model: str, why: str) -> None:
        key = (model, why)
        with self._count_lock:
            if key in self.skipped or len(self.skipped) < MAX_MODELS * len(SKIP_REASONS):
                self.skipped[key] = self.skipped.get(key, 0) + 1

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._work, name="agent-drift",
                                                 daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._start_lock:
            t = self._thread
        if t is not None:
            t.join(5)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while not self._stop.is_set():
            try:
                served, feed = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.analyse(served, feed)
            except Exception:  # statistics are never worth the thread
                log.exception("drift statistics failed on a request of %s", served.name)
            finally:
                # Waiting for the next request must not keep this one's model alive: a
                # model the device let go of would never give its memory back.
                del served, feed

    def analyse(self, served: Served, feed: Mapping[str, np.ndarray]) -> None:
        """Add one request to its model's window (the worker; tests call it directly)."""
        t0 = time.thread_time()
        with self._lock:
            md = self._models.get(served.name)
            if md is None or md.version != served.version \
                    or md.sha256 != served.record.sha256:
                if md is None and len(self._models) >= MAX_MODELS:
                    return
                md = self._models[served.name] = _ModelDrift(served, self.config)
            templates = {name: md.template(name, np.asarray(arr))
                         for name, arr in feed.items()}
        # The arithmetic outside the lock: a heartbeat never waits for it.
        added: dict[str, InputAccumulator] = {}
        bad = False
        for name, arr in feed.items():
            t = templates.get(name)
            if t is None:
                continue
            one = t.empty()
            if one.add(np.asarray(arr)):
                added[name] = one
            else:
                bad = True
        with self._lock:
            if self._models.get(served.name) is not md:
                return
            if md.in_slot >= md.slot_size:
                md.slots.append({})
                md.in_slot = 0
            slot = md.slots[-1]
            for name, one in added.items():
                have = slot.get(name)
                if have is None:
                    slot[name] = one
                else:
                    have.merge(one)
            md.in_slot += 1
            md.analysed += 1
            md.mismatched += bad
            md.cpu_s += time.thread_time() - t0
        if bad:
            self._skip(served.name, "shape")

    # -- reports ---------------------------------------------------------------------------

    def _current(self) -> list[tuple[str, _ModelDrift]]:
        """The followed models still served at the version followed; the others dropped."""
        serving = self._serving() if self._serving is not None else None
        with self._lock:
            if serving is not None:
                for name in list(self._models):
                    s = serving.get(name)
                    if s is None or s.version != self._models[name].version:
                        del self._models[name]
            return sorted(self._models.items())

    def figures(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model: {input: figures}}`` over each model's window (see the module)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name, md in self._current():
            with self._lock:
                merged = md.window()
                refs = dict(md.references)
            inputs: dict[str, dict[str, Any]] = {}
            for inp, acc in sorted(merged.items()):
                inputs[inp] = _input_figures(acc, refs.get(inp))
            out[name] = inputs
        return out

    def report(self) -> dict[str, Any] | None:
        """The heartbeat's ``drift`` block, within ``max_report_bytes``: the inputs that
        do not fit come in the next reports, in turn (a single input larger than the
        whole budget is never sent). None when there is nothing to say: no figures now,
        and none in the last report (an empty block once tells the host they are gone)."""
        entries = [(m, i, f) for m, ins in self.figures().items() for i, f in ins.items()]
        if not entries:
            said, self._said = self._said, False
            return {} if said else None
        self._said = True
        budget = self.config.max_report_bytes
        start = self._cursor % len(entries)
        out: dict[str, dict[str, Any]] = {}
        used = 2
        taken = 0
        for k in range(len(entries)):
            m, i, f = entries[(start + k) % len(entries)]
            size = len(json.dumps(f)) + len(m) + len(i) + 12
            if used + size > budget:
                if taken:
                    break
                continue  # too big on its own: skip it, or nothing would ever move on
            out.setdefault(m, {})[i] = f
            used += size
            taken += 1
        self._cursor = start + max(taken, 1)
        return out

    def summary(self) -> dict[str, Any]:
        """The state's short form: ``{model: {input: {"n", "psi_max"}}}``."""
        return {m: {i: {"n": f["n"], "psi_max": f.get("psi_max")} for i, f in ins.items()}
                for m, ins in self.figures().items()}

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per model served now: requests analysed, skipped by why, worker CPU seconds (a
        model the device no longer serves leaves no series behind)."""
        current = dict(self._current())
        done = {n: (md.analysed, md.cpu_s) for n, md in current.items()}
        serving = self._serving() if self._serving is not None else None
        with self._count_lock:
            if serving is not None:
                for key in [k for k in self.skipped if k[0] not in serving]:
                    del self.skipped[key]
            skipped = dict(self.skipped)
        out: dict[str, dict[str, Any]] = {}
        for model in sorted({*done, *(m for m, _ in skipped)}):
            n, cpu = done.get(model, (0, 0.0))
            out[model] = {"analysed": n, "cpu_s": cpu,
                          "skipped": {w: c for (m, w), c in skipped.items() if m == model}}
        return out

    def collector(self) -> _Collector:
        return _Collector(self)


def _input_figures(acc: InputAccumulator, ref: Reference | None) -> dict[str, Any]:
    channels = acc.channels(digits=4)
    for c in channels:
        h = c.get("hist")
        if h is not None and sum(h) > HIST_SCALE:
            total = sum(h)
            c["hist"] = [round(v * HIST_SCALE / total) for v in h]
    out: dict[str, Any] = {"n": acc.samples, "channels": channels}
    if ref is not None and acc.hist is not None:
        values = [psi(r, g) for r, g in zip(ref.hist, acc.hist, strict=True)]
        shown = [None if math.isnan(v) else round(v, 4) for v in values]
        finite = [v for v in shown if v is not None]
        out["psi"] = shown
        out["psi_max"] = max(finite) if finite else None
    return out


class _Collector:
    """``/metrics``: requests analysed and skipped, the worker's CPU time, and each
    input's largest per-channel PSI against the artifact's reference."""

    def __init__(self, tap: DriftTap) -> None:
        self._tap = tap

    def describe(self) -> list[Any]:
        return []  # collected on demand (auto_describe would call collect)

    def collect(self) -> Iterator[Any]:
        counts = self._tap.counts()
        analysed = CounterMetricFamily(
            "edge_agent_drift_analysed", "Requests whose inputs the drift statistics took "
            "in, by model.", labels=["model"])
        skipped = CounterMetricFamily(
            "edge_agent_drift_skipped", "Requests the drift statistics skipped, by model and "
            "why (rate: [drift] max_per_s; queue: the worker was busy; size: inputs over "
            "max_input_bytes; shape: an input that does not fit the reference's channels).",
            labels=["model", "why"])
        cpu = CounterMetricFamily(
            "edge_agent_drift_cpu_seconds", "CPU time the drift worker spent, by model.",
            labels=["model"])
        for model, c in sorted(counts.items()):
            analysed.add_metric([model], c["analysed"])
            cpu.add_metric([model], c["cpu_s"])
            for why, n in sorted(c["skipped"].items()):
                skipped.add_metric([model, why], n)
        yield analysed
        yield skipped
        yield cpu
        gauge = GaugeMetricFamily(
            "edge_agent_input_psi", "Largest per-channel population stability index of an "
            "input over the drift window against the evaluation set the model was verified "
            "on (0.1: moderate shift, 0.25: major).", labels=["model", "input"])
        window = GaugeMetricFamily(
            "edge_agent_drift_window_requests", "Requests in a model's drift window.",
            labels=["model"])
        for model, inputs in sorted(self._tap.figures().items()):
            window.add_metric([model], max((f["n"] for f in inputs.values()), default=0))
            for inp, f in sorted(inputs.items()):
                if f.get("psi_max") is not None:
                    gauge.add_metric([model, inp], f["psi_max"])
        yield gauge
        yield window


__all__ = ["DriftTap"]
