"""Field samples: keep the inputs a signed request asks for, bundle them, let the host pull.

A request arrives (retained) on ``dev/{id}/samples/req``. The MQTT thread only queues
it; the collector's thread checks it (size, signature, type, device, expiry,
limits, then the local veto ``samples.enabled``, the model and the rule) and
answers on ``samples/res`` with a :class:`~edge_sdk.samples.SampleStatus`. Nothing is
stored without an admitted request, and one request collects at a time: a newer one
replaces it (its buffer is deleted). Ids are remembered until they expire
(``STATE/seen/samples.json``), so a replay is refused across restarts; the retained
copy of the current request, delivered again at every reconnect, is answered with its
status instead.

Requests that served reach :meth:`SampleCollector.served` (a request tap: it only
enqueues, and drops when the queue is full); the shadow runner hands disagreements to
:meth:`SampleCollector.offer`. The collector's thread scores each row of a batch by the
rule (``low_confidence``: the top class score or best detection score below the
threshold; ``drift``: the largest per-channel z-score of the row's channel means against
the manifest's ``extra["input_stats"]`` above it; ``random``: a reservoir of ``count``
rows over the next ``threshold`` requests, or over every request until expiry;
``disagreement``: every row offered) and writes each kept row as its own ``.npz`` under
``STATE/samples/ID`` (atomic), within the request's ``max_bytes``, the buffer's bytes and
count (oldest dropped) and never leaving less than ``limits.reserve_bytes`` free.

At ``count`` (or at expiry with some kept) the rows become one ``bundle.npz`` (inputs
stacked along axis 0 under their names, ``out.NAME`` when the request asked for outputs,
``rule``, ``scores``), announced as ``ready`` with its size and sha256. The host pulls it
with the chunk protocol, roles reversed: chunk requests on ``samples/get`` for path
``samples/ID``, answers on ``samples/put``, at most ``samples.chunks_per_s`` chunks a
second. A restart keeps the buffer: the stored request is verified again and collection
goes on (a random rule's count of requests seen starts again from the rows kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._internal import atomic_write_bytes, load_npz, npz_bytes, one_line

from ._config import AgentConfig, SamplesConfig
from ._state import read_seen, write_seen

if TYPE_CHECKING:
    from securesystemslib.signer import Key  # type: ignore[attr-defined]

    from edge_sdk import Manifest
    from edge_sdk.samples import SampleRequest, SampleStatus
    from edge_sdk.transport import Topics

    from ._serving import Served

log = logging.getLogger("device_agent.samples")

SAMPLES_DIR = "samples"
REQUEST_FILE = "request.json"
STATUS_FILE = "status.json"
BUNDLE_FILE = "bundle.npz"
_ROW = re.compile(r"s(\d{6})\.npz")
_DIR = re.compile(r"[0-9a-f]{16,64}")
#: Raw requests and chunk requests waiting for the collector's threads.
_INTAKE_MAX = 16
_EPS = 1e-12


@dataclass
class _Active:
    """The request collecting now: its kept rows (path, bytes), in the order kept."""

    req: SampleRequest
    root: Path
    rows: list[tuple[Path, int]] = field(default_factory=list)
    seen: int = 0
    seq: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    #: The first kept row's input shapes (after axis 0) and dtypes: the bundle stacks them.
    shapes: dict[str, tuple[tuple[int, ...], str]] | None = None

    @property
    def size(self) -> int:
        return sum(n for _, n in self.rows)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


@dataclass(frozen=True)
class _Oversized:
    """A request over samples.max_request_bytes: its size and claimed id, not its bytes."""

    size: int
    rid: str | None


@dataclass(frozen=True)
class _Item:
    model: str
    manifest: Manifest | None
    feed: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    tag: str | None
    score: float | None


class SampleCollector:
    """Collects field samples for the signed requests the host sends (see the module doc).

    ``publish(topic, payload, retain)`` sends a status or a chunk; ``key()`` is the
    deployment key requests must be signed by (None: every request is refused);
    ``served(name)`` is the model that serves under ``name`` now (its manifest says the
    task and the drift reference)."""

    def __init__(self, config: AgentConfig, state_dir: Path, topics: Topics,
                 publish: Callable[[str, bytes, bool], None], event: Callable[..., None],
                 key: Callable[[], Key | None], served: Callable[[str], Served | None],
                 stop: threading.Event) -> None:
        self.config = config
        self.cfg: SamplesConfig = config.samples
        self.state_dir = state_dir
        self.root = state_dir / SAMPLES_DIR
        self.topics = topics
        self.publish = publish
        self.event = event
        self.key = key
        self.lookup = served
        self._stop = stop
        self._lock = threading.Lock()
        self._items: queue.Queue[_Item] = queue.Queue(self.cfg.queue)
        self._intake: queue.Queue[bytes | _Oversized] = queue.Queue(_INTAKE_MAX)
        self._gets: queue.Queue[bytes] = queue.Queue(_INTAKE_MAX)
        self._wake = threading.Event()
        #: Read on the request path without the lock: one attribute, replaced whole.
        self.active: _Active | None = None
        #: The current request's last status (what a redelivered request is answered).
        self.status: SampleStatus | None = None
        self._ready_at = 0.0
        #: Rows were skipped since the last status (published at most once a second).
        self._pending = False
        self._shown_at = 0.0
        self._threads: list[threading.Thread] = []
        self.skipped_items = 0
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        now = time.time()
        self._seen, lost = read_seen(state_dir, max_seen=self.cfg.max_seen,
                                     max_ttl_s=self.cfg.limits.max_ttl_s, now=now,
                                     name="samples")
        if lost is not None:
            log.warning("the record of sample requests seen is lost (%s): older requests "
                        "are refused as possible replays", lost)
            self._save_seen()

    # -- the request path (must return in microseconds) ---------------------------------

    def served(self, model: Served, feed: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], seconds: float) -> None:
        """The request tap: queue what ``model`` served, if a request collects for it."""
        act = self.active
        if act is None or act.req.model != model.name or act.req.rule == "disagreement":
            return
        self._put(_Item(model.name, model.predictor.manifest, feed, outputs, None, None))

    def offer(self, model: str, feed: Mapping[str, np.ndarray],
              outputs: Mapping[str, np.ndarray], tag: str = "disagreement",
              score: float | None = None) -> None:
        """An input another part found worth keeping (``tag``: the shadow runner's
        ``disagreement``, the drift watcher's ``drift``), with its score if it has one.
        Kept when a request collects ``model`` by that rule. Never blocks, never raises."""
        act = self.active
        if act is None or act.req.model != model or act.req.rule != tag:
            return
        served = self.lookup(model)
        self._put(_Item(model, served.predictor.manifest if served is not None else None,
                        feed, outputs, tag, score))

    @property
    def queued(self) -> int:
        """Served requests waiting for the collector's thread."""
        return self._items.qsize()

    def _put(self, item: _Item) -> None:
        try:
            self._items.put_nowait(item)
        except queue.Full:
            self.skipped_items += 1

    # -- broker callbacks (the MQTT thread: only queue) ---------------------------------

    def on_request(self, topic: str, payload: bytes) -> None:
        item: bytes | _Oversized = payload
        if len(payload) > self.cfg.limits.max_request_bytes:
            # Only the size and the id it claims wait for the refusal, not the bytes.
            from edge_sdk.profiling import claimed_request_id

            item = _Oversized(len(payload),
                              claimed_request_id(payload, self.cfg.limits.max_request_bytes))
        with contextlib.suppress(queue.Full):
            self._intake.put_nowait(item)
        self._ensure_threads()
        self._wake.set()

    def on_get(self, topic: str, payload: bytes) -> None:
        try:
            self._gets.put_nowait(payload[:4096])
        except queue.Full:
            log.debug("sample chunk request dropped: %d wait", _INTAKE_MAX)
            return
        self._ensure_threads()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Pick up what a restart left; the threads start with the first request (a fleet
        simulator runs a thousand agents in one process, most never asked)."""
        self._resume()
        if self.active is not None or self.status is not None:
            self._ensure_threads()

    def _ensure_threads(self) -> None:
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            for name, target in (("samples", self._work),
                                 ("samples-put", self._answer_loop)):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._wake.set()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)

    def _work(self) -> None:
        from ._agent import _lower_thread_priority

        _lower_thread_priority()
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # nothing a request brings may end this thread
                log.exception("field samples: handling failed")

    def _step(self) -> None:
        while True:
            try:
                raw = self._intake.get_nowait()
            except queue.Empty:
                break
            self._on_request(raw)
        try:
            item = self._items.get(timeout=0.2)
        except queue.Empty:
            item = None
        if item is not None:
            self._take(item)
        self._tick(time.time())

    # -- requests -----------------------------------------------------------------------

    def _answer(self, status: SampleStatus, *, retain: bool) -> None:
        try:
            self.publish(self.topics.samples_status(self.config.device_id),
                         json.dumps(status.to_json(), separators=(",", ":")).encode(), retain)
        except Exception as err:  # the link's trouble, not the request's
            log.warning("cannot publish the sample status: %s", err)

    def _refuse(self, rid: str, why: str) -> None:
        from edge_sdk.samples import SampleStatus

        line = " ".join(why.split())[:300]
        log.warning("sample request %s refused: %s", rid[:12], line)
        self.event("samples_refused", request=rid, reason=line)
        # Not retained: the current request's status stays what a late reader finds.
        self._answer(SampleStatus(rid, "refused", reason=line), retain=False)

    def _on_request(self, payload: bytes | _Oversized) -> None:
        from edge_sdk.errors import EdgeError
        from edge_sdk.profiling import claimed_request_id
        from edge_sdk.samples import verify_sample_request

        lim = self.cfg.limits
        if isinstance(payload, _Oversized):
            self._refuse(payload.rid or "0" * 16,
                         f"sample request is {payload.size} bytes, over the device's "
                         f"limit of {lim.max_request_bytes} (samples.max_request_bytes)")
            return
        if not payload:
            return  # a cleared retained request
        rid = claimed_request_id(payload, lim.max_request_bytes) or "0" * 16
        key = self.key()
        if key is None:
            self._refuse(rid, "this agent has no deployment key to check requests with")
            return
        try:
            req = verify_sample_request(payload, key, device_id=self.config.device_id,
                                        fleet=self.config.fleet, limits=lim)
        except EdgeError as err:
            self._refuse(rid, str(err))
            return
        cur = self.status
        if cur is not None and cur.id == req.id:
            self._answer(cur, retain=True)  # the retained copy, delivered again
            return
        if req.id in self._seen.ids:
            self._refuse(req.id, f"sample request {req.id[:12]} was already received "
                                 "(replayed)")
            return
        if req.expires.timestamp() <= self._seen.floor:
            self._refuse(req.id, f"sample request {req.id[:12]} may be a replay: this "
                                 "device lost its record of the requests it received")
            return
        why = self._unfit(req)
        self._remember(req)
        if why is not None:
            self._refuse(req.id, why)
            return
        self._admit(req, payload)

    def _unfit(self, req: SampleRequest) -> str | None:
        """Why this device cannot collect ``req`` (None: it can)."""
        if not self.cfg.enabled:
            return "field samples are disabled on this device (samples.enabled)"
        served = self.lookup(req.model)
        if served is None:
            return f"this device serves no model {req.model}"
        manifest = served.predictor.manifest
        if req.rule == "low_confidence" and _task(manifest) not in ("classify", "detect"):
            return (f"model {req.model} is a {_task(manifest)} model: low_confidence needs "
                    "a classify or detect model (the manifest's task)")
        if req.rule == "drift" and not _stats(manifest):
            return (f"model {req.model} has no input reference (the artifact's "
                    "extra.input_stats): convert it again to sample by drift")
        return None

    def _remember(self, req: SampleRequest) -> None:
        from ._state import SeenRecord

        ids = {**self._seen.ids, req.id: math.ceil(req.expires.timestamp())}
        self._seen = SeenRecord(ids, self._seen.floor).pruned(time.time()).bounded(
            self.cfg.max_seen)
        self._save_seen()

    def _save_seen(self) -> None:
        try:
            write_seen(self.state_dir, self._seen, name="samples")
        except OSError as err:
            log.warning("cannot write the record of sample requests: %s",
                        err.strerror or err)

    def _admit(self, req: SampleRequest, payload: bytes) -> None:
        old = self.active
        self._drop_all()
        root = self.root / req.id
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / REQUEST_FILE, payload)
        except OSError as err:
            self._refuse(req.id, f"cannot store the request: {err.strerror or err}")
            return
        if old is not None:
            self.event("samples_replaced", request=old.req.id, by=req.id)
        self.active = _Active(req, root, rng=random.Random(req.id))
        self.event("samples_started", request=req.id, model=req.model, rule=req.rule,
                   count=req.count)
        self._collecting()

    def _collecting(self) -> None:
        from edge_sdk.samples import SampleStatus

        act = self.active
        if act is None:
            return
        why = ", ".join(f"{n} skipped: {w}" for w, n in sorted(act.skipped.items()))
        self.status = SampleStatus(act.req.id, "collecting", len(act.rows), act.size,
                                   reason=why)
        self._pending, self._shown_at = False, time.monotonic()
        self._answer(self.status, retain=True)

    def _drop_all(self) -> None:
        """Delete every request's files (one request collects or is ready at a time)."""
        self.active, self.status = None, None
        for d in _entries(self.root):
            shutil.rmtree(d, ignore_errors=True)

    # -- keeping rows -------------------------------------------------------------------

    def _take(self, item: _Item) -> None:
        act = self.active
        if act is None or item.model != act.req.model:
            return
        req = act.req
        n = _rows(item.feed)
        if n is None:
            act.skip("inputs of unequal batch sizes")
            self._pending = True
            return
        if item.tag is not None:
            scores = np.full(n, np.nan if item.score is None else item.score)
            keep = list(range(n))
        elif req.rule == "random":
            scores = np.full(n, np.nan)
            keep = self._reservoir(act, n)
        else:
            try:
                if req.rule == "low_confidence":
                    scores = confidence(item.manifest, item.outputs, n)
                    keep = [i for i in range(n) if scores[i] < req.threshold]
                else:
                    scores = drift_distance(_stats(item.manifest), item.feed, n)
                    keep = [i for i in range(n) if scores[i] > req.threshold]
            except ValueError as err:
                act.skip(str(err)[:80])
                self._pending = True
                return
        before = sum(act.skipped.values())
        changed = False
        for i in keep:
            changed |= self._keep(act, _row(item.feed, item.outputs, i, n, req.outputs),
                                  float(scores[i]))
            if self.active is not act:
                return  # the byte limit finished the request
        if req.rule == "random" and req.threshold and act.seen >= req.threshold:
            self._finish(act, f"drawn from {act.seen} requests")
        elif req.rule != "random" and len(act.rows) >= req.count:
            self._finish(act, "")
        elif changed:
            self._collecting()
        elif sum(act.skipped.values()) != before:
            self._pending = True  # told at most once a second (_tick)

    def _reservoir(self, act: _Active, n: int) -> list[int]:
        """Rows of this batch that enter the reservoir (one that replaces a kept row
        deletes it first)."""
        keep: list[int] = []
        for i in range(n):
            act.seen += 1
            if act.req.threshold and act.seen > act.req.threshold:
                break
            if len(act.rows) + len(keep) < act.req.count:
                keep.append(i)
                continue
            j = act.rng.randrange(act.seen)
            if j < act.req.count and act.rows:
                path, _ = act.rows.pop(min(j, len(act.rows) - 1))
                path.unlink(missing_ok=True)
                keep.append(i)
        return keep

    def _keep(self, act: _Active, row: dict[str, np.ndarray], score: float) -> bool:
        plain = {k: _plain(v) for k, v in row.items()}
        if any(v is None for k, v in plain.items() if k.startswith("in.")):
            act.skip("an input is neither numbers nor text")
            return False
        # Outputs that are no tensor of numbers or text (a ZipMap's maps) are left out:
        # saving them would pickle them, and nothing reads a pickle back.
        row = {k: v for k, v in plain.items() if v is not None}
        shapes = {k: (v.shape[1:], str(v.dtype)) for k, v in row.items()
                  if k.startswith("in.")}
        if act.shapes is None:
            act.shapes = shapes
        elif shapes != act.shapes:
            act.skip("input shape differs from the first sample's")
            return False
        data = npz_bytes({**row, "score": np.float64(score)})
        size = len(data)
        if act.size + size > act.req.max_bytes:
            self._finish(act, f"max_bytes {act.req.max_bytes} reached")
            return False
        c = self.cfg
        while act.rows and (act.size + size > c.max_buffer_bytes or
                            len(act.rows) + 1 > c.max_buffer_count):
            path, _ = act.rows.pop(0)  # the oldest goes
            path.unlink(missing_ok=True)
            act.skip("buffer full, oldest dropped")
        if size > c.max_buffer_bytes:
            act.skip("larger than samples.max_buffer_bytes")
            return False
        if _free(self.state_dir) - size < self.config.limits.reserve_bytes:
            act.skip("disk reserve (limits.reserve_bytes)")
            return False
        act.seq += 1
        path = act.root / f"s{act.seq:06d}.npz"
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            act.skip(f"cannot write: {err.strerror or err}")
            return False
        act.rows.append((path, size))
        return True

    # -- bundles ------------------------------------------------------------------------

    def _finish(self, act: _Active, note: str) -> None:
        from edge_sdk.errors import EdgeError
        from edge_sdk.samples import SampleStatus

        req = act.req
        rows = list(act.rows)
        data = b""
        broken = ""
        try:
            while rows:
                data = _bundle(rows, req.rule)
                if len(data) <= req.max_bytes:
                    break
                rows.pop()  # npz headers: the bundle can come out a little larger
        except (EdgeError, ValueError, OSError) as err:
            # A kept row that cannot be read back must end the request, not leave it
            # collecting forever (retried, and failing, on every turn of the thread).
            broken = f"cannot bundle the samples: {one_line(err)}"[:300]
        if broken:
            status = SampleStatus(req.id, "refused", reason=broken)
        elif not rows:
            status = SampleStatus(req.id, "expired", reason=note or "no input matched the "
                                  "rule before the request expired")
        else:
            try:
                atomic_write_bytes(act.root / BUNDLE_FILE, data)
            except OSError as err:
                status = SampleStatus(req.id, "refused",
                                      reason=f"cannot write the bundle: {err.strerror or err}")
            else:
                if len(rows) < req.count and not note:
                    note = f"{len(rows)} of {req.count}"
                status = SampleStatus(req.id, "ready", len(rows), len(data),
                                      hashlib.sha256(data).hexdigest(), reason=note)
        for path, _ in act.rows:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            atomic_write_bytes(act.root / STATUS_FILE, json.dumps(status.to_json()).encode())
        self.active, self.status, self._ready_at = None, status, time.time()
        self.event("samples_" + status.state, request=req.id, count=status.count,
                   bytes=status.size, reason=status.reason)
        self._answer(status, retain=True)

    def _tick(self, now: float) -> None:
        act = self.active
        if act is not None and self._pending and time.monotonic() - self._shown_at >= 1.0:
            self._collecting()
        if act is not None and act.req.expires.timestamp() <= now:
            self._finish(act, f"expired with {len(act.rows)} of {act.req.count}"
                         if act.rows else "")
        elif act is None and self.status is not None and \
                now - self._ready_at > self.cfg.keep_s:
            self.event("samples_deleted", request=self.status.id)
            self._drop_all()

    def _resume(self) -> None:
        """Pick up what a restart left in ``STATE/samples``: a ready bundle, or a request
        still collecting (verified again), with its rows."""
        from edge_sdk.errors import EdgeError
        from edge_sdk.samples import SampleStatus, verify_sample_request

        dirs = sorted((d for d in _entries(self.root) if _DIR.fullmatch(d.name)),
                      key=lambda d: d.stat().st_mtime)
        for d in dirs[:-1]:
            shutil.rmtree(d, ignore_errors=True)
        for d in _entries(self.root):
            if d not in dirs[-1:]:
                shutil.rmtree(d, ignore_errors=True)
        if not dirs:
            return
        d = dirs[-1]
        if (d / STATUS_FILE).exists():
            try:
                st = SampleStatus.from_bytes((d / STATUS_FILE).read_bytes()[:4096])
                if st.state == "ready" and (d / BUNDLE_FILE).stat().st_size != st.size:
                    raise OSError("the bundle's size is not the one announced")
            except (OSError, EdgeError) as err:
                log.warning("sample bundle in %s dropped at restart: %s", d, err)
                shutil.rmtree(d, ignore_errors=True)
                return
            self.status, self._ready_at = st, (d / STATUS_FILE).stat().st_mtime
            return
        key = self.key()
        try:
            if key is None:
                raise OSError("no deployment key")
            payload = (d / REQUEST_FILE).read_bytes()[:self.cfg.limits.max_request_bytes + 1]
            req = verify_sample_request(payload, key, device_id=self.config.device_id,
                                        fleet=self.config.fleet, limits=self.cfg.limits,
                                        now=None)
        except (OSError, EdgeError) as err:
            why = f"the collection was dropped at restart: {err}"
            log.warning("sample request in %s: %s", d, why)
            self.event("samples_dropped", request=d.name, reason=why[:300])
            shutil.rmtree(d, ignore_errors=True)
            if _DIR.fullmatch(d.name):
                self.status = SampleStatus(d.name, "refused", reason=why[:300])
                self._answer(self.status, retain=True)
            return
        rows = sorted((p for p in _entries(d) if _ROW.fullmatch(p.name)),
                      key=lambda p: p.name)
        act = _Active(req, d, rng=random.Random(req.id))
        for p in rows:
            with contextlib.suppress(OSError):
                act.rows.append((p, p.stat().st_size))
        act.seq = int(_ROW.fullmatch(rows[-1].name).group(1)) if rows else 0  # type: ignore[union-attr]
        act.seen = len(act.rows)
        self.active = act
        self.event("samples_resumed", request=req.id, count=len(act.rows))
        self._collecting()

    # -- the chunk answers (roles reversed: the host asks, the device answers) ---------

    def _answer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._gets.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._answer_chunks(raw)
            except Exception:
                log.exception("field samples: a chunk answer failed")

    def _spend(self, want: int) -> tuple[int, int]:
        """Chunks that may go now (of ``want``), and ms to wait for the next one."""
        rate = self.cfg.chunks_per_s
        now = time.monotonic()
        burst = max(1.0, rate)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        n = min(want, int(self._tokens))
        self._tokens -= n
        wait = 0 if n == want else math.ceil(1000 * (1 - (self._tokens % 1)) / rate)
        return n, max(1, wait)

    def _answer_chunks(self, raw: bytes) -> None:
        from edge_sdk.errors import TransportError
        from edge_sdk.transport import ChunkRequest, ChunkRequestError, ChunkResponse

        topic = self.topics.samples_put(self.config.device_id)

        def send(resp: ChunkResponse) -> None:
            self.publish(topic, resp.encode(), False)

        try:
            req = ChunkRequest.decode(raw, roots=(SAMPLES_DIR,))
        except TransportError as err:
            corr = err.corr if isinstance(err, ChunkRequestError) else None
            if corr is not None and self._spend(1)[0]:
                send(ChunkResponse(ChunkResponse.BAD_REQUEST, corr, 0, 0,
                                         str(err)[:200].encode()))
            return
        rid = req.path[len(SAMPLES_DIR) + 1:]
        st = self.status
        path = self.root / rid / BUNDLE_FILE
        if st is None or st.id != rid or st.state != "ready" or not _DIR.fullmatch(rid):
            what = (f"{st.count} of the request's samples kept so far" if st is not None and
                    st.id == rid and st.state == "collecting" else "no bundle")
            if self._spend(1)[0]:
                send(ChunkResponse(ChunkResponse.NOT_FOUND, req.corr, req.offset, 0,
                                         f"{req.path}: {what}".encode()))
            return
        total = st.size
        if req.offset >= total and not (req.offset == 0 and total == 0):
            if self._spend(1)[0]:
                send(ChunkResponse(ChunkResponse.BAD_REQUEST, req.corr, req.offset, total,
                                         f"offset {req.offset} is past the end "
                                         f"({total})".encode()))
            return
        want = min(req.count, math.ceil((total - req.offset) / req.length))
        n, wait = self._spend(want)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            send(ChunkResponse(ChunkResponse.NOT_FOUND, req.corr, req.offset, 0,
                                     f"{req.path}: the bundle was deleted".encode()))
            return
        try:
            for k in range(n):
                off = req.offset + k * req.length
                data = os.pread(fd, min(req.length, total - off), off)
                send(ChunkResponse(ChunkResponse.OK, req.corr, off, total, data))
        finally:
            os.close(fd)
        if n < want:
            send(ChunkResponse(ChunkResponse.SLOW_DOWN, req.corr, req.offset + n * req.length,
                                     wait, b"over samples.chunks_per_s"))


# -- scoring (pure) ---------------------------------------------------------------------

def _task(manifest: Manifest | None) -> str:
    if manifest is None:
        return "generic"
    post = manifest.extra.get("postprocess")
    if isinstance(post, Mapping) and isinstance(post.get("task"), str):
        return str(post["task"])
    return manifest.task


def _stats(manifest: Manifest | None) -> Mapping[str, Any]:
    stats = manifest.extra.get("input_stats") if manifest is not None else None
    return stats if isinstance(stats, Mapping) else {}


def confidence(manifest: Manifest | None, outputs: Mapping[str, np.ndarray],
               n: int) -> np.ndarray:
    """Per row of a batch of ``n``: the top class score (classify) or the best detection
    score (detect; 0 for a row with no detection). A classify model's raw logits are
    softmaxed first. ValueError when the outputs do not say."""
    from edge_sdk.quality import is_probabilities, softmax

    task = _task(manifest)
    if task == "detect":
        scores, batch = outputs.get("scores"), outputs.get("batch_index")
        if scores is None or (batch is None and n > 1):
            return _raw_detect_best(manifest, outputs, n)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        b = (np.zeros(s.shape, np.int64) if batch is None else
             np.asarray(batch).reshape(-1).astype(np.int64))
        best = np.zeros(n)
        ok = (b >= 0) & (b < n)
        np.maximum.at(best, b[ok], s[ok])
        return best
    if task != "classify":
        raise ValueError(f"a {task} model has no confidence")
    names = [o.name for o in manifest.outputs] if manifest is not None else list(outputs)
    arr = outputs.get("scores")
    if arr is None:
        # The class scores, not whatever comes first: a scikit-learn classifier's first
        # output is its label (one int per row, whose softmax is always 1).
        rows = [np.asarray(v, dtype=np.float64).reshape(n, -1) for v in
                (outputs[k] for k in names if k in outputs)
                if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim >= 1
                and v.size and v.shape[0] == n]
        arr = next((x for x in rows if is_probabilities(x)), None)
        if arr is None:
            arr = next((x for x in rows if x.shape[1] >= 2), None)
        if arr is None and rows:
            x = rows[0]  # one score per row: a binary classifier's p (or logit)
            p = x[:, 0] if not (x.min() < 0 or x.max() > 1) else 1.0 / (1.0 + np.exp(-x[:, 0]))
            return np.asarray(np.maximum(p, 1.0 - p))
    if arr is None or np.asarray(arr).size == 0 or np.asarray(arr).shape[0] != n:
        raise ValueError("classify outputs without per-row scores")
    x = np.asarray(arr, dtype=np.float64).reshape(n, -1)
    if "scores" not in outputs and not is_probabilities(x):
        x = softmax(x, axis=1)
    return np.asarray(x.max(axis=1))


def _raw_detect_best(manifest: Manifest | None, outputs: Mapping[str, np.ndarray],
                     n: int) -> np.ndarray:
    """Per image: the best class score of a raw detection head the converter described
    (``extra["task_outputs"]``; NMS never removes the best box, so no NMS is needed)."""
    from edge_sdk.quality import Comparer, decode

    rules = [r for r in Comparer.for_manifest(manifest).rules
             if r.kind.startswith("detect-") and r.output in outputs] if manifest else []
    if not rules:
        raise ValueError("detect outputs without 'scores' or a described raw head")
    rule = rules[0]
    head = np.asarray(outputs[rule.output])
    part = np.asarray(outputs[rule.partners[0]]) if rule.partners and \
        rule.partners[0] in outputs else None
    if head.ndim < 2 or head.shape[0] != n:
        raise ValueError(f"detect head {rule.output} is not a batch of {n}")
    best = np.zeros(n)
    for i in range(n):
        cls = decode(rule.kind, head[i], None if part is None else part[i])[1]
        if cls.size and (float(cls.min()) < 0.0 or float(cls.max()) > 1.0):
            cls = decode(rule.kind, head[i], None if part is None else part[i],
                         sigmoid=True)[1]
        best[i] = float(cls.max()) if cls.size else 0.0
    return best


def drift_distance(stats: Mapping[str, Any], feed: Mapping[str, np.ndarray],
                   n: int) -> np.ndarray:
    """Per row: the largest ``|channel mean - reference mean| / reference std`` over the
    inputs and channels the reference describes (``extra["input_stats"]``: per input an
    ``axis`` and per channel, or per contiguous group of channels as the drift reference
    groups them, a ``mean`` and ``std``; token ids, ``kind: "ids"``, have no mean)."""
    out = np.zeros(n)
    for name, ref in stats.items():
        arr = feed.get(name)
        if arr is None or not isinstance(ref, Mapping) or arr.dtype.kind not in "fiu" \
                or ref.get("kind", "values") != "values":
            continue
        chans = ref.get("channels")
        if not isinstance(chans, list) or not chans:
            continue
        try:
            mean = np.array([float(c["mean"]) for c in chans])
            std = np.array([max(float(c["std"]), _EPS) for c in chans])
        except (KeyError, TypeError, ValueError):
            continue
        axis = ref.get("axis")
        for i in range(n):
            x = np.asarray(arr[i:i + 1], dtype=np.float64)
            if isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis < x.ndim:
                per = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
                c, g = per.shape[0], len(chans)
                if c < g:
                    continue
                group = (np.arange(c) * g) // c  # contiguous groups, as the reference's
                means = np.array([per[group == k].mean() for k in range(g)])
            else:
                means = np.full(len(chans), x.mean())
            z = np.abs(means - mean) / std
            out[i] = max(out[i], float(np.nanmax(z)) if np.isfinite(z).any() else 0.0)
    return out


def _rows(feed: Mapping[str, np.ndarray]) -> int | None:
    """The batch size every input shares along axis 0 (None when they do not)."""
    sizes = {a.shape[0] if a.ndim else -1 for a in feed.values()}
    if len(sizes) != 1 or -1 in sizes:
        return None
    n = sizes.pop()
    return n if n > 0 else None


def _row(feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], i: int, n: int,
         with_outputs: bool) -> dict[str, np.ndarray]:
    row = {f"in.{k}": np.ascontiguousarray(v[i:i + 1]) for k, v in feed.items()}
    if not with_outputs:
        return row
    batch = outputs.get("batch_index")
    for k, v in outputs.items():
        if not isinstance(v, np.ndarray):
            continue  # a sequence of maps (ZipMap) has no rows to split
        if n == 1:
            row[f"out.{k}"] = np.asarray(v)
        elif v.ndim and v.shape[0] == n:
            row[f"out.{k}"] = np.ascontiguousarray(v[i:i + 1])
        elif batch is not None and v.ndim and v.shape[0] == batch.reshape(-1).shape[0]:
            row[f"out.{k}"] = np.asarray(v[batch.reshape(-1) == i])
    return row


def _plain(v: np.ndarray) -> np.ndarray | None:
    """``v`` as an array ``np.savez`` writes without pickling: text in an object array
    becomes a unicode array; None for other object arrays."""
    if v.dtype != object:
        return v
    if all(isinstance(x, str) for x in v.flat):
        return v.astype(str)
    if all(isinstance(x, bytes) for x in v.flat):
        return v.astype(bytes)
    return None


def _bundle(rows: list[tuple[Path, int]], rule: str) -> bytes:
    """The bundle of kept rows: inputs stacked along axis 0 under their names,
    ``out.NAME`` (rows of varying length with ``out.NAME.sample`` saying whose),
    ``rule`` and ``scores``."""
    loaded = [load_npz(p) for p, _ in rows]
    arrays: dict[str, np.ndarray] = {}
    for k in loaded[0]:
        if k.startswith("in."):
            arrays[k[3:]] = np.concatenate([r[k] for r in loaded])
    outs = [k for k in loaded[0] if k.startswith("out.") and all(k in r for r in loaded)]
    for k in outs:
        parts = [np.asarray(r[k]) for r in loaded]
        if len({p.shape[1:] for p in parts}) != 1 or any(p.ndim == 0 for p in parts):
            continue
        arrays[k] = np.concatenate(parts)
        if len({p.shape[0] for p in parts}) != 1 or parts[0].shape[0] != 1:
            arrays[k + ".sample"] = np.concatenate(
                [np.full(p.shape[0], i, np.int64) for i, p in enumerate(parts)])
    arrays["rule"] = np.array(rule)
    arrays["scores"] = np.array([float(r["score"]) for r in loaded])
    return npz_bytes(arrays)


def _free(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _entries(parent: Path) -> list[Path]:
    try:
        return list(parent.iterdir())
    except OSError:
        return []
