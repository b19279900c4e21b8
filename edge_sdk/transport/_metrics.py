"""Prometheus metrics of a running :class:`RepoResponder` (``edge-sdk serve --metrics``).

Counters read from :class:`ResponderStats` at scrape time, and the seconds before each
role of the served metadata expires (read from ``REPO/metadata/ROLE.json`` at scrape
time: what devices get now), in a registry of their own: no device id appears in them
(a fleet has too many, and a device's name is not the scraper's business). Needs
``prometheus-client`` (the ``[agent]`` extra, which ``serve`` needs anyway).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import ConfigError
from ._responder import RepoResponder

#: (ResponderStats field, metric name without ``_total``, help)
_COUNTERS = (
    ("requests", "edge_responder_requests", "Chunk requests received."),
    ("chunks", "edge_responder_chunks", "Chunks sent."),
    ("bytes_sent", "edge_responder_sent_bytes", "Bytes of chunk payload sent."),
    ("dropped", "edge_responder_dropped_requests",
     "Requests dropped unanswered: the device was over its request rate."),
    ("slowed", "edge_responder_slow_downs",
     "SLOW_DOWN answers (a device over its byte budget, or responses queued past a cap)."),
    ("refused", "edge_responder_refused_requests", "Bad or not-found requests."),
    ("resends_dropped", "edge_responder_resends_dropped",
     "Chunks not sent again: sent within the device's retransmit timeout."),
    ("stalls", "edge_responder_stalls",
     "Times the watchdog found the path to the broker stalled and reconnected."),
)


class _ResponderCollector(Collector):
    def __init__(self, responder: RepoResponder) -> None:
        self.responder = responder

    def collect(self) -> Iterator[Metric]:
        r = self.responder
        for field, name, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(r.stats, field))
        yield GaugeMetricFamily("edge_responder_queued_bytes",
                                "Bytes of responses waiting to be written to the broker.",
                                value=r.queued_bytes)
        yield GaugeMetricFamily("edge_responder_broker_connected",
                                "1 while the link to the broker is up.",
                                value=1 if r.connection.connected else 0)


_ROLES = ("root", "targets", "snapshot", "timestamp")


class _ExpiryCollector(Collector):
    def __init__(self, responder: RepoResponder) -> None:
        self.meta = responder.repo / "metadata"

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "edge_release_seconds_to_expiry",
            "Seconds before the served metadata of each TUF role expires (negative: "
            "expired). serve re-signs the roles whose keys it holds at half their lifetime.",
            labels=["role"])
        now = datetime.now(UTC)
        for role in _ROLES:
            try:
                doc = json.loads((self.meta / f"{role}.json").read_bytes())
                expires = datetime.fromisoformat(doc["signed"]["expires"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: the series goes missing, which alerts can catch
            g.add_metric([role], (expires - now).total_seconds())
        yield g


class MetricsServer:
    """``/metrics`` of one responder on ``HOST:PORT`` until :meth:`close`."""

    def __init__(self, responder: RepoResponder, host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ResponderCollector(responder))
        registry.register(_ExpiryCollector(responder))
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise ConfigError(f"--metrics {host}:{port}: cannot listen: {err.strerror}") from err
        self._server: Any = server
        self._thread: threading.Thread = thread
        self.port = int(server.server_address[1])
        self.url = f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown()
            self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", spec
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics {spec!r} must be HOST:PORT, e.g. 127.0.0.1:9108")
    return host, int(port)
