"""Resumable, pipelined file transfer over MQTT, and python-tuf's ``FetcherInterface`` on it.

:class:`ChunkClient` downloads one repository file at a time: up to
``FetchConfig.window`` chunk requests in flight, a per-chunk timeout, retries
with jittered exponential backoff, a hard maximum length, and a pause (not a
failure) while the broker link is down. After a reconnect only the requests
whose answers were lost are sent again, so a broker restart costs at most one
window of chunks. Bytes are handed to the caller strictly in order, which is
what makes a partial file on disk resumable from its size. Requests go out on
the device's own request topic; a responder whose per-device budget is spent
answers ``SLOW_DOWN`` with a wait, which the client honours before asking again.

:class:`MqttFetcher` plugs :class:`ChunkClient` into python-tuf's ngclient
(URLs ``mqtt://repo/metadata/...`` and ``mqtt://repo/targets/...``).
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from ..errors import ConfigError, TransportError
from . import _chunks as proto
from ._connection import MqttConnection, Subscription
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError
from ._topics import Topics

log = logging.getLogger("edge_sdk.transport")

REPO_URL = "mqtt://repo/"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FetchConfig:
    """Limits of a device-side transfer; the defaults suit a small device on a slow link.

    ``chunk_size`` ≤ 127 KiB keeps every message under the 128 KiB broker limit.
    ``window`` is how many chunks are in flight, requested ``batch`` at a time (one
    small request message answered by up to ``batch`` chunk messages). ``chunk_timeout`` is how
    long one chunk may take before it is requested again, up to ``retries`` times
    with backoff ``backoff_base * 2**attempt`` (jittered, capped at ``backoff_max``).
    A ``SLOW_DOWN`` answer (the responder's per-device budget is spent) is not a
    failed attempt: the chunks it names are asked for again after the wait it
    gives (jittered), until one chunk has been held back ``max_slowdown_s`` in
    total. ``reconnect_timeout`` is how long a transfer waits for a lost broker
    link before failing. ``max_artifact_bytes`` is a hard cap on any file.
    """

    chunk_size: int = proto.DEFAULT_CHUNK
    window: int = 64
    batch: int = 8
    chunk_timeout: float = 5.0
    retries: int = 4
    backoff_base: float = 0.25
    backoff_max: float = 5.0
    reconnect_timeout: float = 60.0
    max_slowdown_s: float = 120.0
    max_artifact_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_size <= proto.MAX_CHUNK:
            raise ConfigError(
                f"chunk size {self.chunk_size} must be 1024..{proto.MAX_CHUNK} bytes so that "
                "each message stays under 128 KiB"
            )
        if not 1 <= self.window <= 256:
            raise ConfigError(f"window {self.window} must be 1..256 chunks in flight")
        if not 1 <= self.batch <= proto.MAX_BATCH:
            raise ConfigError(f"batch {self.batch} must be 1..{proto.MAX_BATCH} chunks")
        if (self.chunk_timeout <= 0 or self.retries < 0 or self.max_artifact_bytes <= 0
                or self.max_slowdown_s <= 0):
            raise ConfigError("chunk timeout, max slowdown and max artifact size must be > 0, "
                              "retries >= 0")


@dataclass
class FetchStats:
    """Counters of one :class:`ChunkClient` (cumulative over its transfers)."""

    requests_sent: int = 0
    chunks_resent: int = 0
    chunks_received: int = 0
    bytes_received: int = 0
    stale_responses: int = 0
    reconnects: int = 0
    slowdowns: int = 0


@dataclass
class _Pending:
    offset: int
    length: int
    corr: bytes
    sent_at: float
    generation: int
    attempts: int = 0
    acked: Callable[[], bool] = field(default=lambda: False)
    resend_at: float | None = None
    slowed_for: float = 0.0


def _never() -> bool:
    return False


class ChunkClient:
    """Downloads repository files through the responders, one transfer at a time."""

    def __init__(self, connection: MqttConnection, device_id: str, *,
                 topics: Topics | None = None, config: FetchConfig | None = None) -> None:
        self.connection = connection
        self.device_id = device_id
        self.topics = topics or Topics.for_config(connection.config)
        self.config = config or FetchConfig()
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._transfer = threading.Lock()
        self._inbox: queue.Queue[proto.ChunkResponse] | None = None
        self._generation = 0
        self._sub: Subscription | None = None
        self._wake = threading.Event()
        connection.add_connection_listener(self._on_link)

    def close(self) -> None:
        self.connection.remove_connection_listener(self._on_link)
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    def _ensure_subscribed(self) -> None:
        if self._sub is None:
            self._sub = self.connection.subscribe(
                self.topics.repo_response(self.device_id), self._on_response, qos=1)

    def _on_link(self, up: bool) -> None:
        if up:
            with self._lock:
                self._generation += 1
            self.stats.reconnects += 1
        self._wake.set()
        inbox = self._inbox
        if inbox is not None:
            # An empty wake-up message makes the transfer loop re-check the link.
            inbox.put(proto.ChunkResponse(-1, b"", 0, 0, b""))

    def _on_response(self, topic: str, payload: bytes) -> None:
        inbox = self._inbox
        if inbox is None:
            self.stats.stale_responses += 1
            return
        try:
            resp = proto.ChunkResponse.decode(payload)
        except TransportError as err:
            log.warning("ignoring a malformed chunk response on %s: %s", topic, err)
            return
        inbox.put(resp)

    # -- the transfer loop -------------------------------------------------------------

    def download(self, path: str, sink: Callable[[bytes], object], *, start: int = 0,
                 length: int | None = None, max_length: int | None = None,
                 progress: Progress | None = None) -> int:
        """Fetch ``path`` from byte ``start`` and pass the bytes to ``sink`` in order.

        ``length`` is the full file size when known (signed metadata says so);
        a responder offering a different size is refused with
        :class:`EndlessDataError` if larger. Without ``length`` the size the
        responder reports is used, bounded by ``max_length`` and
        ``FetchConfig.max_artifact_bytes``. Returns the file's total size.
        Raises :class:`RemoteNotFoundError`, :class:`SlowRetrievalError`,
        :class:`EndlessDataError` or :class:`TransportError`.
        """
        if not proto.is_safe_path(path):
            raise TransportError(f"{path!r} is not a repository path")
        cap = min(self.config.max_artifact_bytes,
                  max_length if max_length is not None else self.config.max_artifact_bytes)
        if length is not None and length > cap:
            raise EndlessDataError(
                f"{path}: signed length {length} bytes exceeds the limit of {cap} bytes")
        with self._transfer:
            self._ensure_subscribed()
            inbox: queue.Queue[proto.ChunkResponse] = queue.Queue()
            self._inbox = inbox
            try:
                return self._run(path, sink, start, length, cap, progress, inbox)
            finally:
                self._inbox = None

    def _run(self, path: str, sink: Callable[[bytes], object], start: int, length: int | None,
             cap: int, progress: Progress | None,
             inbox: queue.Queue[proto.ChunkResponse]) -> int:
        cfg = self.config
        total = length
        delivered = start
        next_offset = start
        pending: dict[tuple[bytes, int], _Pending] = {}
        by_offset: dict[int, _Pending] = {}
        ready: dict[int, bytes] = {}
        if total is not None and start >= total:
            if start > total:
                raise TransportError(f"{path}: resume offset {start} is past the end ({total})")
            return total

        def send(batch: list[_Pending], now: float) -> None:
            # One request covers consecutive chunks: fewer small messages each way.
            corr = secrets.token_bytes(16)
            with self._lock:
                gen = self._generation
            for p in batch:
                p.corr, p.sent_at, p.resend_at, p.generation = corr, now, None, gen
                pending[(corr, p.offset)] = p
            first = batch[0]
            req = proto.ChunkRequest(corr, path, first.offset,
                                     cfg.chunk_size if len(batch) > 1 else first.length,
                                     len(batch))
            self.stats.requests_sent += 1
            acked: Callable[[], bool]
            try:
                handle = self.connection.publish(self.topics.repo_request(self.device_id),
                                                 req.encode(), qos=1)
                acked = lambda: handle.published  # noqa: E731
            except TransportError:
                acked = _never
            for p in batch:
                p.acked = acked

        link_lost_at: float | None = None
        while True:
            now = time.monotonic()
            if not self.connection.connected:
                link_lost_at = link_lost_at or now
                if now - link_lost_at > cfg.reconnect_timeout:
                    raise SlowRetrievalError(
                        f"{path}: broker {self.connection.config.url} unreachable for "
                        f"{cfg.reconnect_timeout:.0f} s; {delivered - start} bytes received, "
                        "the partial download is kept for resume"
                    )
                self.connection.wait_connected(0.2)
                continue
            if link_lost_at is not None:
                link_lost_at = None
            # After a reconnect, answers to requests the broker had acknowledged are
            # lost for good; unacknowledged requests are re-sent by the client itself.
            with self._lock:
                gen = self._generation
            for key, p in list(pending.items()):
                if p.generation != gen and p.acked():
                    del pending[key]
                    self.stats.chunks_resent += 1
                    send([p], now)
                elif p.generation != gen:
                    p.generation = gen
                    p.sent_at = now
            # Fill the window, a batch at a time. Before the size is known, ask for the
            # first chunk only.
            if total is None:
                if not by_offset and next_offset == start:
                    p = _Pending(next_offset, cfg.chunk_size, b"", now, gen)
                    by_offset[next_offset] = p
                    send([p], now)
                    next_offset += cfg.chunk_size
            else:
                while next_offset < total and (
                        cfg.window - len(by_offset) >= min(cfg.batch, cfg.window)
                        or (not by_offset)):
                    batch: list[_Pending] = []
                    while (next_offset < total and len(batch) < cfg.batch
                           and len(by_offset) < cfg.window):
                        want = min(cfg.chunk_size, total - next_offset)
                        p = _Pending(next_offset, want, b"", now, gen)
                        by_offset[next_offset] = p
                        batch.append(p)
                        next_offset += want
                    if not batch:
                        break
                    send(batch, now)
            if total is not None and delivered >= total:
                return total
            # Timeouts and backoff.
            wait = 0.5
            resend: list[_Pending] = []
            for p in list(by_offset.values()):
                if p.resend_at is not None:
                    if now >= p.resend_at:
                        resend.append(p)
                    else:
                        wait = min(wait, p.resend_at - now)
                    continue
                due = p.sent_at + cfg.chunk_timeout
                if now >= due:
                    pending.pop((p.corr, p.offset), None)
                    p.attempts += 1
                    if p.attempts > cfg.retries:
                        raise SlowRetrievalError(
                            f"{path}: no answer for bytes {p.offset}..{p.offset + p.length} "
                            f"after {cfg.retries + 1} requests of {cfg.chunk_timeout:g} s each; "
                            f"{delivered - start} bytes received, partial download kept"
                        )
                    backoff = min(cfg.backoff_max, cfg.backoff_base * 2 ** (p.attempts - 1))
                    p.resend_at = now + backoff * (0.5 + random.random())
                    wait = 0.0
                else:
                    wait = min(wait, due - now)
            if resend:
                self.stats.chunks_resent += len(resend)
                for run in _runs(resend, cfg.chunk_size, cfg.batch):
                    send(run, now)
            try:
                resp = inbox.get(timeout=max(0.0, wait))
            except queue.Empty:
                continue
            while True:
                if resp.status >= 0:
                    total = self._accept(path, resp, pending, by_offset, ready, total, cap)
                try:
                    resp = inbox.get_nowait()
                except queue.Empty:
                    break
            while delivered in ready:
                data = ready.pop(delivered)
                sink(data)
                delivered += len(data)
                if progress is not None and total is not None:
                    progress(delivered, total)
            if total is not None and delivered >= total:
                return total

    def _accept(self, path: str, resp: proto.ChunkResponse,
                pending: dict[tuple[bytes, int], _Pending],
                by_offset: dict[int, _Pending], ready: dict[int, bytes], total: int | None,
                cap: int) -> int | None:
        if resp.status == proto.SLOW_DOWN:
            self._slow_down(path, resp, pending)
            return total
        p = pending.pop((resp.corr, resp.offset), None)
        if p is None:
            if resp.status != proto.OK:
                # Errors answer a whole request; match them to any chunk it covered.
                key = next((k for k in pending if k[0] == resp.corr), None)
                p = pending.pop(key) if key is not None else None
            if p is None:
                self.stats.stale_responses += 1
                return total
        if resp.status == proto.NOT_FOUND:
            raise RemoteNotFoundError(f"{path}: not in the repository ({resp.reason})")
        if resp.status != proto.OK:
            raise TransportError(f"{path}: the responder refused the request: {resp.reason}")
        if resp.offset != p.offset:
            raise TransportError(
                f"{path}: asked for offset {p.offset}, the responder answered {resp.offset}")
        if resp.total > cap or (total is not None and resp.total > total):
            limit = cap if total is None else total
            raise EndlessDataError(
                f"{path}: the responder offers {resp.total} bytes but at most {limit} are "
                "allowed (signed length or configured maximum)"
            )
        if len(resp.payload) > p.length:
            raise EndlessDataError(
                f"{path}: asked for {p.length} bytes at offset {p.offset}, received "
                f"{len(resp.payload)}"
            )
        if total is None:
            total = resp.total
        if len(resp.payload) < p.length and p.offset + len(resp.payload) < total:
            raise TransportError(
                f"{path}: short chunk at offset {p.offset} ({len(resp.payload)} of "
                f"{p.length} bytes)")
        del by_offset[p.offset]
        self.stats.chunks_received += 1
        self.stats.bytes_received += len(resp.payload)
        if resp.payload or p.offset >= total:
            ready[p.offset] = resp.payload
        return total

    def _slow_down(self, path: str, resp: proto.ChunkResponse,
                   pending: dict[tuple[bytes, int], _Pending]) -> None:
        # The responder sent the chunks of this request before resp.offset and none
        # after: ask for those again once the wait it names is over (capped, jittered
        # so that devices slowed down together do not come back together).
        cfg = self.config
        held = [k for k in pending if k[0] == resp.corr and k[1] >= resp.offset]
        if not held:
            self.stats.stale_responses += 1
            return
        self.stats.slowdowns += 1
        wait = min(resp.total / 1000 * (1 + 0.25 * random.random()), cfg.max_slowdown_s)
        now = time.monotonic()
        for key in held:
            p = pending.pop(key)
            p.slowed_for += wait
            if p.slowed_for > cfg.max_slowdown_s:
                raise SlowRetrievalError(
                    f"{path}: the responder held back bytes {p.offset}..{p.offset + p.length} "
                    f"for more than {cfg.max_slowdown_s:g} s ({resp.reason}); partial "
                    "download kept")
            p.resend_at = now + wait


def _runs(chunks: list[_Pending], chunk_size: int, batch: int) -> Iterator[list[_Pending]]:
    """Consecutive chunks in groups of at most ``batch``, each group one request's worth."""
    run: list[_Pending] = []
    for p in sorted(chunks, key=lambda c: c.offset):
        if run and (len(run) >= batch or run[-1].offset + chunk_size != p.offset
                    or run[-1].length != chunk_size):
            yield run
            run = []
        run.append(p)
    if run:
        yield run


class MqttFetcher(FetcherInterface):
    """python-tuf ``FetcherInterface`` over :class:`ChunkClient`.

    Give ngclient ``metadata_base_url=REPO_URL + "metadata/"`` (see
    :data:`REPO_URL`). A missing file maps to HTTP 404 so that ngclient's root
    rotation walk ends where it should.
    """

    def __init__(self, client: ChunkClient) -> None:
        self.client = client

    def _path(self, url: str) -> str:
        if not url.startswith(REPO_URL):
            raise tuf_exc.DownloadError(f"{url}: not a {REPO_URL} URL")
        return url[len(REPO_URL):]

    def _fetch(self, url: str) -> Iterator[bytes]:
        chunks: list[bytes] = []
        self._download(url, chunks.append, None)
        return iter(chunks)

    def _download(self, url: str, sink: Callable[[bytes], object], max_length: int | None) -> None:
        path = self._path(url)
        try:
            self.client.download(path, sink, max_length=max_length)
        except RemoteNotFoundError as err:
            raise tuf_exc.DownloadHTTPError(str(err), 404) from err
        except EndlessDataError as err:
            raise tuf_exc.DownloadLengthMismatchError(str(err)) from err
        except SlowRetrievalError as err:
            raise _SlowRetrieval(str(err)) from err
        except TransportError as err:
            raise tuf_exc.DownloadError(str(err)) from err

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        # Overridden so the length bound reaches the transfer itself: a responder
        # announcing endless data is refused before the bytes are requested.
        with tempfile.TemporaryFile() as tmp:
            self._download(url, tmp.write, max_length)
            tmp.seek(0)
            yield tmp


class _SlowRetrieval(tuf_exc.DownloadError):
    """Carries a :class:`SlowRetrievalError` through ngclient (which only passes DownloadError)."""
