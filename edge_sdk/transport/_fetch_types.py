"""The public types of a device-side transfer: its limits, its counters, its progress.

They belong to the fetcher (:class:`~edge_sdk.transport.ChunkClient` and any
:class:`~edge_sdk.transport.RepositoryFetcher`) and are re-exported from
:mod:`._fetcher`; they live in a module of their own because the pace
(:mod:`._pace`) and the window (:mod:`._window`) below the fetcher read them too,
and the fetcher imports those.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from . import _chunks as proto

__all__ = ["FetchConfig", "FetchStats", "TransferProgress"]


@dataclass(frozen=True)
class FetchConfig:
    """Limits of a device-side transfer; the defaults suit a small device on a slow link.

    The pace adapts to the link (see :mod:`._pace`) within these bounds:
    ``chunk_size`` is the largest chunk (≤ 127 KiB, the default, keeps every message
    under the 128 KiB broker limit) and ``min_chunk_size`` the smallest; at most ``window``
    chunks are in flight, asked for at most ``batch`` per request (one small request
    message answered by up to ``batch`` chunk messages). ``chunk_timeout`` is the
    retransmit timeout until the first RTT is measured; after that it is derived from
    the RTT and, while nothing arrives, doubles up to ``max_rto``. The transfer fails
    with :class:`SlowRetrievalError` only when nothing at all arrived for
    ``stall_timeout`` seconds, however slow the link. A ``SLOW_DOWN`` answer (the
    responder's per-device budget is spent) is not a failure: the chunks it names are
    asked for again after the wait it gives (jittered), until one chunk has been held
    back ``max_slowdown_s`` in total. ``reconnect_timeout`` is how long a transfer
    waits for a lost broker link before failing. ``max_artifact_bytes`` is a hard cap
    on any file.
    """

    chunk_size: int = proto.DEFAULT_CHUNK
    min_chunk_size: int = 4 * 1024
    window: int = 64
    batch: int = 16
    chunk_timeout: float = 2.0
    max_rto: float = 30.0
    stall_timeout: float = 60.0
    reconnect_timeout: float = 60.0
    max_slowdown_s: float = 120.0
    max_artifact_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_size <= proto.MAX_CHUNK:
            raise ConfigError(
                f"chunk size {self.chunk_size} must be 1024..{proto.MAX_CHUNK} bytes so that "
                "each message stays under 128 KiB"
            )
        if not 1024 <= self.min_chunk_size <= proto.MAX_CHUNK:
            raise ConfigError(f"min chunk size {self.min_chunk_size} must be "
                              f"1024..{proto.MAX_CHUNK} bytes")
        if not 1 <= self.window <= 256:
            raise ConfigError(f"window {self.window} must be 1..256 chunks in flight")
        if not 1 <= self.batch <= proto.MAX_BATCH:
            raise ConfigError(f"batch {self.batch} must be 1..{proto.MAX_BATCH} chunks")
        if (self.chunk_timeout <= 0 or self.max_artifact_bytes <= 0 or self.max_slowdown_s <= 0
                or self.stall_timeout <= 0 or self.reconnect_timeout <= 0):
            raise ConfigError("chunk timeout, stall timeout, reconnect timeout, max slowdown "
                              "and max artifact size must be > 0")
        if self.max_rto < self.chunk_timeout:
            raise ConfigError(f"max_rto {self.max_rto:g} s must be at least the chunk timeout "
                              f"({self.chunk_timeout:g} s)")


@dataclass
class FetchStats:
    """Counters of one :class:`ChunkClient` (cumulative over its transfers).

    ``chunks_resent``: chunks asked for again (lost, timed out, slowed down or lost
    with the link); ``duplicates`` / ``duplicate_bytes``: answers for bytes already
    received; ``timeouts``: times nothing arrived for a whole retransmit timeout;
    ``stale_responses``: answers to no request of the running transfer."""

    requests_sent: int = 0
    chunks_resent: int = 0
    chunks_received: int = 0
    bytes_received: int = 0
    duplicates: int = 0
    duplicate_bytes: int = 0
    timeouts: int = 0
    stale_responses: int = 0
    reconnects: int = 0
    slowdowns: int = 0


@dataclass(frozen=True)
class TransferProgress:
    """Where one running download is: ``done`` of ``total`` bytes of ``path`` (``total``
    None until known), at ``rate`` bytes/s over the last few seconds, ``eta_s`` seconds
    left at that rate (None when unknown), ``elapsed_s`` since it started."""

    path: str
    done: int
    total: int | None
    rate: float
    eta_s: float | None
    elapsed_s: float

    def as_dict(self) -> dict[str, object]:
        """The form agents report (JSON-ready, rounded)."""
        return {"file": self.path, "bytes": self.done, "total": self.total,
                "rate_bytes_s": round(self.rate), "elapsed_s": round(self.elapsed_s, 1),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}
