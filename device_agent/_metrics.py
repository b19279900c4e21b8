"""Prometheus metrics of one agent, in its own registry (several agents can share a process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: Sub-millisecond buckets: local inference on a small model is often < 1 ms.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
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
            "edge_agent_model_info", "The model being served (value 1).",
            ["name", "version", "sha256"], registry=r)
        self.updates = Counter(
            "edge_agent_update_events", "Install pipeline events (install_started, verified, "
            "swapped, committed, rolled_back, failed, refused).", ["event"], registry=r)
        self.ready = Gauge("edge_agent_ready", "1 when a model is loaded and serving.",
                           registry=r)
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
        self._lock = threading.Lock()

    def set_model(self, name: str | None, version: str | None, sha256: str | None) -> None:
        with self._lock:
            self.model_info.clear()
            if name is not None:
                self.model_info.labels(name, version or "", sha256 or "").set(1)
            self.ready.set(1 if name is not None else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
