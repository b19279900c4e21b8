"""The repository responder: answers chunk requests from a repository directory.

It serves only ``REPO/metadata/*`` and ``REPO/targets/**``, keeps no state
per device (every request names path, offset and length), and so several
responders can run side by side: by default they join one MQTT shared
subscription and split the requests. After each change of the repository's
timestamp it publishes ``{"timestamp_version": N, ...}`` retained on the
announce topic, which is how devices learn that a release happened.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeError, TransportError
from . import _chunks as proto
from ._connection import MqttConnection, Subscription
from ._topics import RESPONDER_SHARE_GROUP, Topics

log = logging.getLogger("edge_sdk.transport")


@dataclass(frozen=True)
class ResponderConfig:
    """``shared`` joins the ``$share/{share_group}/...`` subscription so responders split
    the load; ``announce_interval`` is how often (s) the repository is checked for a
    new timestamp to announce."""

    shared: bool = True
    share_group: str = RESPONDER_SHARE_GROUP
    announce_interval: float = 1.0


@dataclass
class ResponderStats:
    requests: int = 0
    bytes_sent: int = 0
    refused: int = 0


class RepoResponder:
    """Serve ``repo_dir`` over ``connection``. :meth:`start` returns; work runs on threads."""

    def __init__(self, connection: MqttConnection, repo_dir: str | os.PathLike[str], *,
                 topics: Topics | None = None, config: ResponderConfig | None = None) -> None:
        self.connection = connection
        self.repo = Path(repo_dir).resolve()
        self.topics = topics or Topics.for_config(connection.config)
        self.config = config or ResponderConfig()
        self.stats = ResponderStats()
        self._roots = (self.repo / "metadata", self.repo / "targets")
        self._sub: Subscription | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._announced: int | None = None
        self._resolved: dict[str, Path] = {}
        if not (self.repo / "metadata").is_dir():
            raise TransportError(f"{self.repo}: not a release repository (no metadata/ directory)")

    def start(self) -> None:
        topic = (self.topics.shared_repo_request(self.config.share_group) if self.config.shared
                 else self.topics.repo_request)
        self._sub = self.connection.subscribe(topic, self._on_request, qos=1)
        self.announce()
        self._watcher = threading.Thread(target=self._watch, name="edge-responder-announce",
                                         daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None
        if self._watcher is not None:
            self._watcher.join(5)

    def __enter__(self) -> RepoResponder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def announcement(self) -> dict[str, Any] | None:
        """What the announce topic should say now (None if the repository has no timestamp)."""
        try:
            data = json.loads((self.repo / "metadata" / "timestamp.json").read_bytes())
            signed = data["signed"]
            return {"timestamp_version": int(signed["version"]),
                    "snapshot_version": int(signed["meta"]["snapshot.json"]["version"]),
                    "expires": signed["expires"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def announce(self, *, force: bool = False) -> None:
        """Publish the current timestamp version retained, if it changed since the last time."""
        info = self.announcement()
        if info is None:
            return
        if not force and info["timestamp_version"] == self._announced:
            return
        self.connection.publish(self.topics.announce, json.dumps(info).encode(), qos=1,
                                retain=True)
        self._announced = info["timestamp_version"]
        log.info("announced timestamp v%s", info["timestamp_version"])

    def _watch(self) -> None:
        while not self._stop.wait(self.config.announce_interval):
            try:
                self.announce()
            except EdgeError as err:
                log.warning("announce failed: %s", err)

    def _resolve(self, path: str) -> Path | None:
        # Resolving walks every path component with a syscall; a transfer asks for the
        # same few paths thousands of times, so remember the answers for safe paths.
        hit = self._resolved.get(path)
        if hit is not None:
            return hit
        p = (self.repo / path).resolve()
        if not any(p.is_relative_to(root) for root in self._roots) or not p.is_file():
            return None
        if len(self._resolved) > 4096:
            self._resolved.clear()
        self._resolved[path] = p
        return p

    def _on_request(self, topic: str, payload: bytes) -> None:
        self.stats.requests += 1
        try:
            req = proto.ChunkRequest.decode(payload)
            reply_to = self.topics.repo_response(req.device)
        except EdgeError as err:
            self.stats.refused += 1
            log.warning("dropping a bad chunk request on %s: %s", topic, err)
            return
        for i in range(req.count):
            one = req if req.count == 1 else proto.ChunkRequest(
                req.corr, req.device, req.path, req.offset + i * req.length, req.length)
            resp = self.answer(one)
            self.connection.publish(reply_to, resp.encode(), qos=1)
            if resp.status != proto.OK or one.offset + len(resp.payload) >= resp.total:
                break

    def answer(self, req: proto.ChunkRequest) -> proto.ChunkResponse:
        """The response to one chunk of ``req`` (test responders override it)."""
        path = self._resolve(req.path)
        if path is None:
            self.stats.refused += 1
            return proto.ChunkResponse(proto.NOT_FOUND, req.corr, req.offset, 0,
                                       f"{req.path} not found".encode())
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                data = os.pread(f.fileno(), min(req.length, proto.MAX_CHUNK), req.offset)
        except FileNotFoundError:
            self._resolved.pop(req.path, None)
            self.stats.refused += 1
            return proto.ChunkResponse(proto.NOT_FOUND, req.corr, req.offset, 0,
                                       f"{req.path} not found".encode())
        except OSError as err:
            self.stats.refused += 1
            return proto.ChunkResponse(proto.SERVER_ERROR, req.corr, req.offset, 0,
                                       f"cannot read {req.path}: {err.strerror}".encode())
        self.stats.bytes_sent += len(data)
        return proto.ChunkResponse(proto.OK, req.corr, req.offset, total, data)
