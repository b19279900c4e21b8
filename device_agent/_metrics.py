"""Prometheus metrics of one agent, in its own registry (several agents can share a process).

Per model: ``edge_agent_requests_total`` and ``edge_agent_request_latency_seconds`` (label
``model``), ``edge_agent_model_info`` (one series per served model) and
``edge_agent_model_ready`` (1 serving, 0 installed but not serving). The series of a model
that stops serving are dropped with it. ``edge_agent_ready`` is 1 when every model the
device should serve does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from ._serving import ModelState

#: Sub-millisecond buckets: local inference on a small model is often < 1 ms.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Outcomes of ``edge_agent_requests_total``.
OUTCOMES = ("ok", "bad_request", "cannot_run", "error")
#: Why a sampled request was left out of a shadow comparison.
_DROPPED = ("full", "size", "cpu", "memory")


class ModelMetrics(NamedTuple):
    """One model's request series, looked up once per request."""

    ok: Any
    bad_request: Any
    cannot_run: Any
    error: Any
    latency: Any


class Metrics:
    """``states``: every model that serves or should (see ``_serving.model_states``),
    read when the metrics are; without it, a model serves when :meth:`set_models`
    names it."""

    def __init__(self, states: Callable[[], Sequence[ModelState]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edge_agent_requests", "Inference requests by model and outcome (ok, "
            "bad_request, cannot_run: fits the signature but fails in the runtime, 422; "
            "error: a failure the model introduced in its health window, 500).",
            ["model", "outcome"], registry=r)
        self.trial_failures = Counter(
            "edge_agent_trial_failures", "Requests a model in its health window failed on, "
            "by what the previous version did with the same input (client: fails too, not "
            "counted; model: runs it, counted against the new model; unjudged: not re-run, "
            "a [health] recheck bound was reached, not counted).", ["verdict"], registry=r)
        self.latency = Histogram(
            "edge_agent_request_latency_seconds", "Inference latency inside the agent "
            "(decode, predict, encode).", ["model"], buckets=_BUCKETS, registry=r)
        self.errors = Counter(
            "edge_agent_errors", "Requests answered with an error, by HTTP status.",
            ["status"], registry=r)
        self.model_info = Gauge(
            "edge_agent_model_info", "The models being served (value 1); ``name`` repeats "
            "``model`` for the readers of one model per device.",
            ["model", "name", "version", "sha256"], registry=r)
        self.updates = Counter(
            "edge_agent_update_events", "Install pipeline events (install_started, verified, "
            "swapped, committed, rolled_back, failed, refused).", ["event"], registry=r)
        self.queued_reports = Gauge(
            "edge_agent_queued_reports", "Reports waiting on disk for the broker.", registry=r)
        self.download_bytes = Counter(
            "edge_agent_download_bytes", "Bytes received for model files, by how they came "
            "(delta: a delta rebuilt the model from one the device held; full).", ["kind"],
            registry=r)
        for kind in ("delta", "full"):
            self.download_bytes.labels(kind)
        self.broker_connected = Gauge(
            "edge_agent_broker_connected", "1 while connected to the broker.", registry=r)
        self.storage_ok = Gauge(
            "edge_agent_storage_ok", "1 while the state directory can be written (0: full, "
            "read-only or denied; the agent serves on and installs wait).", registry=r)
        self.credential_seconds_left: Gauge | None = None
        # -- shadow runs (see _shadow): the series of a model go when its run ends.
        self.shadow_compared = Counter(
            "edge_agent_shadow_compared", "Requests a shadow model was compared on.",
            ["model"], registry=r)
        self.shadow_agreed = Counter(
            "edge_agent_shadow_agreed", "Compared requests on which the shadow model "
            "agreed with the served one.", ["model"], registry=r)
        self.shadow_dropped = Counter(
            "edge_agent_shadow_dropped", "Sampled requests left out of the comparison, by "
            "why (full: queue full; size: inputs over shadow.max_input_bytes; cpu, "
            "memory: the run is paused at a limit).", ["model", "why"], registry=r)
        self.shadow_errors = Counter(
            "edge_agent_shadow_errors", "Requests the shadow model failed on (never a "
            "client's answer).", ["model"], registry=r)
        self.shadow_agreement = Gauge(
            "edge_agent_shadow_agreement", "Share of compared requests agreed on.",
            ["model"], registry=r)
        self.shadow_worst = Gauge(
            "edge_agent_shadow_worst", "The lowest comparison score so far (1: identical).",
            ["model"], registry=r)
        self.shadow_latency = Histogram(
            "edge_agent_shadow_latency_seconds", "The shadow model's inference time.",
            ["model"], buckets=_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._models: dict[str, ModelMetrics] = {}
        self._served: tuple[str, ...] = ()
        self._states = states
        r.register(_Readiness(self))

    def track_credentials(self, seconds_left: Callable[[], float]) -> None:
        """Export ``edge_agent_credential_seconds_left`` (a device with ``[identity]``)."""
        if self.credential_seconds_left is None:
            self.credential_seconds_left = Gauge(
                "edge_agent_credential_seconds_left", "Seconds until the device's broker "
                "credentials expire (0: it holds none and is enrolling).",
                registry=self.registry)
        self.credential_seconds_left.set_function(seconds_left)

    def track_drift(self, collector: Any) -> None:
        """Export the input drift figures (``edge_agent_drift_*``, ``edge_agent_input_psi``:
        device_agent._drift's collector, read when the metrics are)."""
        self.registry.register(collector)

    def model(self, name: str) -> ModelMetrics:
        """The request series of model ``name``."""
        got = self._models.get(name)
        if got is None:
            with self._lock:
                got = self._models.get(name)
                if got is None:
                    req = self.requests
                    got = ModelMetrics(req.labels(name, "ok"), req.labels(name, "bad_request"),
                                       req.labels(name, "cannot_run"), req.labels(name, "error"),
                                       self.latency.labels(name))
                    self._models[name] = got
        return got

    def set_models(self, served: Iterable[tuple[str, str, str]]) -> None:
        """The models serving now, as (name, version, sha256); the request series of a
        model no longer among them are dropped (a removed model leaves nothing behind)."""
        with self._lock:
            now = {name: (version, sha) for name, version, sha in served}
            self.model_info.clear()
            for name, (version, sha) in now.items():
                self.model_info.labels(name, name, version, sha).set(1)
            for name in [n for n in self._models if n not in now]:
                del self._models[name]
                for outcome in OUTCOMES:
                    _remove(self.requests, name, outcome)
                _remove(self.latency, name)
            self._served = tuple(sorted(now))

    def shadow_reset(self, name: str) -> None:
        """A shadow run of model ``name`` starts: its series start at zero."""
        self.shadow_clear(name)
        for c in (self.shadow_compared, self.shadow_agreed, self.shadow_errors):
            c.labels(name)
        for why in _DROPPED:
            self.shadow_dropped.labels(name, why)

    def shadow_clear(self, name: str) -> None:
        """The shadow run of model ``name`` ended: its series go."""
        for metric in (self.shadow_compared, self.shadow_agreed, self.shadow_errors,
                       self.shadow_agreement, self.shadow_worst, self.shadow_latency):
            _remove(metric, name)
        for why in _DROPPED:
            _remove(self.shadow_dropped, name, why)

    def states(self) -> list[tuple[str, bool]]:
        """(model, serving) for every model that serves or should, sorted by name."""
        if self._states is None:
            return [(name, True) for name in self._served]
        return [(s.name, s.state == "READY") for s in self._states()]

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never used
        metric.remove(*labels)


class _Readiness:
    """``edge_agent_ready`` and ``edge_agent_model_ready``, computed when read."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("edge_agent_ready", _READY_HELP),
                GaugeMetricFamily("edge_agent_model_ready", _MODEL_READY_HELP,
                                  labels=["model"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self._metrics.states()
        yield GaugeMetricFamily("edge_agent_ready", _READY_HELP,
                                value=1 if states and all(ok for _, ok in states) else 0)
        each = GaugeMetricFamily("edge_agent_model_ready", _MODEL_READY_HELP, labels=["model"])
        for name, ok in states:
            each.add_metric([name], 1 if ok else 0)
        yield each


_READY_HELP = "1 when every model the device should serve is loaded and serving."
_MODEL_READY_HELP = ("1 for a model that serves, 0 for one the device should serve and "
                     "does not (see /v2/repository/index for why).")
