"""Resumable, pipelined file transfer over MQTT, and python-tuf's ``FetcherInterface`` on it.

:class:`ChunkClient` downloads one repository file at a time: as many chunks in
flight as the link carries (the flow control of :mod:`._pace`), a chunk asked for
again only when it is lost (the window of :mod:`._window`), a hard maximum length,
and a pause (not a failure) while the broker link is down. After a reconnect only
the requests whose answers were lost are sent again, so a broker restart costs at
most one window of chunks. Bytes are handed to the caller strictly in order, which
is what makes a partial file on disk resumable from its size. Requests go out on
the device's own request topic; a responder whose per-device budget is spent
answers ``SLOW_DOWN`` with a wait, which the client honours before asking again.

:class:`RepositoryFetcher` is the interface it implements (the trust client takes
any); :class:`MqttFetcher` plugs one into python-tuf's ngclient
(URLs ``mqtt://repo/metadata/...`` and ``mqtt://repo/targets/...``).
:class:`FetchConfig`, :class:`FetchStats` and :class:`TransferProgress` are their
public types (kept in :mod:`._fetch_types`, which the window reads too).
"""

from __future__ import annotations

import abc
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from ..errors import TransportError
from . import _chunks as proto
from ._connection import MqttConnection, PublishHandle, Subscription
from ._errors import EndlessDataError, RemoteNotFoundError, SlowRetrievalError
from ._fetch_types import FetchConfig, FetchStats, TransferProgress
from ._pace import BbrPace, Pace
from ._topics import Topics
from ._window import ChunkWindow

__all__ = ["REPO_URL", "ChunkClient", "FetchConfig", "FetchStats", "MqttFetcher",
           "RepositoryFetcher", "TransferProgress"]

log = logging.getLogger("edge_sdk.transport")

REPO_URL = "mqtt://repo/"
Progress = Callable[[int, int], None]
#: A transfer that starts within this long of the last one starts from what that one
#: learnt of the link (an artifact is several files fetched back to back).
PACE_MEMORY_S = 30.0


class RepositoryFetcher(abc.ABC):
    """How a device reaches the release repository: one file at a time, resumable, bounded.

    The one interface behind which all network access of the trust client sits,
    as python-tuf's ``FetcherInterface`` is for ngclient. :class:`ChunkClient` is
    the MQTT implementation; the tests' repository simulator is an in-memory one.
    """

    stats: FetchStats
    #: The download running now (updated about twice a second), None between downloads.
    transfer: TransferProgress | None = None

    @abc.abstractmethod
    def download(self, path: str, sink: Callable[[bytes], object], *, start: int = 0,
                 length: int | None = None, max_length: int | None = None,
                 progress: Progress | None = None) -> int:
        """Fetch ``path`` from byte ``start`` and pass the bytes to ``sink`` in order.

        ``length`` is the full file size when known (signed metadata says so);
        a repository offering a different size is refused with
        :class:`EndlessDataError` if larger. Without ``length`` the size the
        repository reports is used, bounded by ``max_length`` and
        ``FetchConfig.max_artifact_bytes``. Returns the file's total size.
        Raises :class:`RemoteNotFoundError`, :class:`SlowRetrievalError`,
        :class:`EndlessDataError` or :class:`TransportError`.
        """

    def close(self) -> None:  # noqa: B027 - optional hook; most fetchers hold nothing
        """Release what the fetcher holds (subscriptions)."""


class ChunkClient(RepositoryFetcher):
    """Downloads repository files through the responders, one transfer at a time.

    ``new_pace`` makes the flow control of a transfer from ``config``; a transfer that
    starts soon after the last one goes on with that one's pace.

    By default a device asks on its ``repo/req`` topic and hears on ``repo/res``;
    ``request_topic``, ``response_topic`` and ``roots`` (the first path levels asked
    for) turn the roles round: the host pulling a device's sample bundle
    (``samples/get`` → ``samples/put``, path ``samples/ID``) is the same client.
    """

    def __init__(self, connection: MqttConnection, device_id: str, *,
                 topics: Topics | None = None, config: FetchConfig | None = None,
                 new_pace: Callable[[FetchConfig], Pace] = BbrPace,
                 request_topic: str | None = None, response_topic: str | None = None,
                 roots: tuple[str, ...] = proto.REPO_ROOTS) -> None:
        self.connection = connection
        self.device_id = device_id
        self.topics = topics or Topics.for_config(connection.config)
        self.request_topic = request_topic or self.topics.repo_request(device_id)
        self.response_topic = response_topic or self.topics.repo_response(device_id)
        self.roots = roots
        self.config = config or FetchConfig()
        self.stats = FetchStats()
        self._lock = threading.Lock()
        self._transfer = threading.Lock()
        self._inbox: queue.Queue[proto.ChunkResponse] | None = None
        self._generation = 0
        self._sub: Subscription | None = None
        self._wake = threading.Event()
        self._new_pace = new_pace
        self._pace: Pace | None = None
        self._pace_used = 0.0
        connection.add_connection_listener(self._on_link)

    def close(self) -> None:
        self.connection.remove_connection_listener(self._on_link)
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    def _ensure_subscribed(self) -> None:
        if self._sub is None:
            self._sub = self.connection.subscribe(self.response_topic, self._on_response,
                                                  qos=1)

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
        """See :meth:`RepositoryFetcher.download`; waits while the broker link is down."""
        with self._transfer:
            pace = self._pace
            if pace is None or time.monotonic() - self._pace_used > PACE_MEMORY_S:
                pace = self._new_pace(self.config)
            window = ChunkWindow(path, self.config, start=start, length=length,
                                 max_length=max_length, stats=self.stats, pace=pace,
                                 roots=self.roots)
            self._ensure_subscribed()
            inbox: queue.Queue[proto.ChunkResponse] = queue.Queue()
            self._inbox = inbox
            try:
                return self._run(window, sink, progress, inbox)
            finally:
                self._inbox = None
                self.transfer = None
                self._pace, self._pace_used = pace, time.monotonic()

    def _run(self, window: ChunkWindow, sink: Callable[[bytes], object],
             progress: Progress | None, inbox: queue.Queue[proto.ChunkResponse]) -> int:
        # The I/O half: publish what the window asks for, feed it what arrives, and
        # pause while the link is down. Every transfer rule lives in ChunkWindow.
        cfg = self.config
        path, start = window.path, window.start
        topic = self.request_topic
        # Per request id: its publish handle (None if publishing failed) and the link
        # generation it went out on.
        sent: dict[bytes, tuple[PublishHandle | None, int]] = {}
        with self._lock:
            seen = self._generation
        link_lost_at: float | None = None
        shown = 0.0
        while True:
            now = time.monotonic()
            if now - shown >= 0.5:
                shown = now
                # Read by other threads (the agent's telemetry): one immutable object.
                self.transfer = window.progress(now)
            if not self.connection.connected:
                window.deliver(sink, progress)
                if window.done:
                    break
                link_lost_at = link_lost_at or now
                if now - link_lost_at > cfg.reconnect_timeout:
                    raise SlowRetrievalError(
                        f"{path}: broker {self.connection.url} unreachable for "
                        f"{cfg.reconnect_timeout:.0f} s; {window.delivered - start} bytes "
                        "received, the partial download is kept for resume"
                    )
                self.connection.wait_connected(0.2)
                continue
            link_lost_at = None
            with self._lock:
                gen = self._generation
            if gen != seen:
                # After a reconnect, answers to requests the broker had acknowledged are
                # lost for good; unacknowledged requests are re-sent by the connection.
                seen = gen
                live = window.in_flight()
                sent = {corr: sent[corr] for corr in live if corr in sent}
                lost = {c for c, (h, g) in sent.items() if g != gen and h and h.published}
                requeued = {c for c, (_, g) in sent.items() if g != gen and c not in lost}
                window.link_restored(now, lost=lost, requeued=requeued)
                for corr in requeued:
                    sent[corr] = (sent[corr][0], gen)
            for req in window.requests(now):
                handle: PublishHandle | None
                try:
                    handle = self.connection.publish(topic, req.encode(), qos=1)
                except TransportError:
                    handle = None
                sent[req.corr] = (handle, gen)
            if len(sent) > 4 * cfg.window:  # ids whose answers are all in
                live = window.in_flight()
                sent = {corr: v for corr, v in sent.items() if corr in live}
            # The sink (a disk write and a hash, say) after the requests the answers made
            # room for: they are on their way while it runs.
            window.deliver(sink, progress)
            if window.done:
                break
            try:
                resp = inbox.get(timeout=window.wait_s(now))
            except queue.Empty:
                continue
            now = time.monotonic()
            while True:
                if resp.status >= 0:
                    window.accept(resp, now)
                try:
                    resp = inbox.get_nowait()
                except queue.Empty:
                    break
        assert window.total is not None
        return window.total


class MqttFetcher(FetcherInterface):
    """python-tuf ``FetcherInterface`` over a :class:`RepositoryFetcher` (a :class:`ChunkClient`).

    Give ngclient ``metadata_base_url=REPO_URL + "metadata/"`` (see
    :data:`REPO_URL`). A missing file maps to HTTP 404 so that ngclient's root
    rotation walk ends where it should.
    """

    def __init__(self, client: RepositoryFetcher) -> None:
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
