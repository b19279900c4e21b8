"""On-device profiling: time the host's candidate models on this device, without
installing them and without disturbing serving.

A request arrives on the device's ``profile/req`` topic. The MQTT thread only
checks it (size, then signature, type, freshness, limits: cheap) and admits it
to a small queue (:class:`Admission`, pure); anything refused gets an event and
a ``refused`` reply saying why. An admitted id is written to
``STATE/seen/profiling.json`` before anything runs and kept until its request
expires, so a replay is refused after a restart (``kill -9`` included) as well.
One worker thread at a time fetches the files through the release client
(TUF-verified, into ``STATE/profiling/ID``, never ``models/``), times each
candidate in a child process (nice 19, RLIMIT_AS, killed on timeout;
:mod:`device_agent._profile_child`), replies with the figures and deletes the
files, whatever happened.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._config import AgentConfig, ProfilingConfig
from ._state import SEEN_FILE, SeenRecord, read_seen, write_seen

if TYPE_CHECKING:  # imported when a request comes: the agent starts without them
    from securesystemslib.signer import Key  # type: ignore[attr-defined]

    from edge_sdk.profiling import (
        CandidateTiming,
        FileRef,
        ProfileCandidate,
        ProfilingRequest,
        ProfilingResult,
    )

log = logging.getLogger("device_agent.profiling")

PROFILING_DIR = "profiling"
_CHILD_OUTPUT_MAX = 64 * 1024
#: Raw requests waiting to be checked; more are dropped (the broker thread never waits).
_INTAKE_MAX = 16


@dataclass(frozen=True)
class _Oversized:
    """A request over profiling.max_request_bytes: its size and claimed id, not its bytes."""

    size: int
    rid: str | None


@dataclass
class Admission:
    """Which requests may run: one running, ``max_queued`` waiting, ids never taken twice:
    ``seen`` keeps each admitted id until its request expires (at most ``seen_max`` of
    them), and the caller persists it after every admission, so that a replay inside a
    request's lifetime is refused across restarts too. Pure: no I/O, no threads."""

    max_queued: int
    seen_max: int = 512
    seen: SeenRecord = field(default_factory=SeenRecord)
    waiting: collections.deque[str] = field(default_factory=collections.deque)
    running: str | None = None

    def replayed(self, rid: str) -> bool:
        """True when ``rid`` was already admitted (a QoS 1 redelivery or a replay): it gets
        no answer, the first copy's answer is the one that counts."""
        return rid in self.seen.ids

    def admit(self, rid: str, *, expires: float, now: float) -> str | None:
        """None when ``rid`` (valid until ``expires``, Unix seconds) is queued; otherwise
        why it is refused."""
        if rid in self.seen.ids:
            return f"request {rid[:12]} was already received (replayed)"
        if expires <= self.seen.floor:
            return (f"request {rid[:12]} may be a replay: this device no longer knows every "
                    f"request it admitted that expires before {_utc(self.seen.floor)} (its "
                    f"record was lost, or held more than profiling.max_seen); requests "
                    "expiring later are accepted")
        busy = len(self.waiting) + (self.running is not None)
        if busy >= self.max_queued + 1:
            return (f"busy: {busy} profiling request(s) running or queued, at most "
                    f"{self.max_queued} may wait (profiling.max_queued)")
        ids = {**self.seen.ids, rid: math.ceil(expires)}
        self.seen = SeenRecord(ids, self.seen.floor).pruned(now).bounded(self.seen_max)
        self.waiting.append(rid)
        return None

    def withdraw(self, rid: str, seen: SeenRecord) -> None:
        """Undo :meth:`admit` of ``rid`` (its record could not be saved): ``seen`` is what
        :attr:`seen` was before."""
        self.seen = seen
        with contextlib.suppress(ValueError):
            self.waiting.remove(rid)

    def start(self) -> str | None:
        if self.running is None and self.waiting:
            self.running = self.waiting.popleft()
            return self.running
        return None

    def finish(self) -> None:
        self.running = None


@runtime_checkable
class ProfilingSource(Protocol):
    """What answering profiling requests needs of the release source
    (:class:`~device_agent._source.ReleaseSource`): the deployment key, which signs the
    requests, and verified, serialised downloads of the files they name."""

    @property
    def key(self) -> Key: ...

    def fetch_file(self, target: str, dest: Path, *, sha256: str, length: int) -> Path:
        """A signed target verified by the TUF client; raises EdgeError."""
        ...

    def drop_partial(self, sha256s: Sequence[str]) -> None:
        """Forget the resumable partial downloads of these files."""
        ...


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Profiler:
    """Answers profiling requests. ``publish(topic, payload)`` sends a reply;
    ``event(kind, **fields)`` reports; ``source`` checks and fetches them (without one,
    every request is refused: an agent with no release source has nothing to fetch
    candidates from)."""

    def __init__(self, config: AgentConfig, state_dir: Path,
                 publish: Callable[[str, bytes], None], event: Callable[..., None],
                 hardware: Callable[[], Mapping[str, Any]],
                 result_topic: str, stop: threading.Event, *,
                 source: ProfilingSource | None = None) -> None:
        self.config = config
        self.cfg: ProfilingConfig = config.profiling
        self.root = state_dir / PROFILING_DIR
        self.state_dir = state_dir
        self.publish = publish
        self.event = event
        self.hardware = hardware
        self.result_topic = result_topic
        self._stop = stop
        self.source = source
        self._lock = threading.Lock()
        record, lost = read_seen(state_dir, max_seen=self.cfg.max_seen,
                                 max_ttl_s=self.cfg.limits.max_ttl_s, now=time.time())
        self._admission = Admission(self.cfg.max_queued, self.cfg.max_seen, seen=record)
        if lost is not None:
            # Fail closed for replays, stay up for everything else.
            log.warning("the record of profiling requests seen is lost (%s): requests "
                        "expiring before %s are refused as possible replays", lost,
                        _utc(record.floor))
            try:
                write_seen(state_dir, record)  # so that a restart keeps refusing them
            except OSError as err:
                log.warning("cannot write %s: %s", state_dir / SEEN_FILE,
                            err.strerror or err)
        self._queue: queue.Queue[ProfilingRequest | None] = queue.Queue()
        self._intake: queue.Queue[bytes | _Oversized | None] = queue.Queue(_INTAKE_MAX)
        self._thread: threading.Thread | None = None
        self._intake_thread: threading.Thread | None = None
        #: The running child, killed on stop.
        self._child: subprocess.Popen[bytes] | None = None
        shutil.rmtree(self.root, ignore_errors=True)  # leftovers of a crash

    # -- intake (the MQTT thread) ------------------------------------------------------

    def on_request(self, topic: str, payload: bytes) -> None:
        """The MQTT callback: only hands the payload to the intake thread (checking writes
        events to disk, which must not hold up the broker link). An oversized one is not
        kept: only its size and the id it claims wait for the refusal."""
        item: bytes | _Oversized = payload
        if len(payload) > self.cfg.limits.max_request_bytes:
            from edge_sdk.profiling import claimed_request_id

            item = _Oversized(len(payload),
                              claimed_request_id(payload, self.cfg.limits.max_request_bytes))
        try:
            self._intake.put_nowait(item)
        except queue.Full:
            log.warning("profiling request dropped: %d wait to be checked", _INTAKE_MAX)
            return
        self._ensure_worker()

    def _intake_loop(self) -> None:
        while not self._stop.is_set():
            try:
                payload = self._intake.get(timeout=1.0)
            except queue.Empty:
                continue
            if payload is None:
                return
            try:
                self._on_request(payload)
            except Exception:  # no message may end this thread
                log.exception("profiling request handling failed")

    def _on_request(self, payload: bytes | _Oversized) -> None:
        from edge_sdk.errors import EdgeError
        from edge_sdk.profiling import claimed_request_id, verify_profiling_request

        if not payload:
            return
        c = self.cfg
        if isinstance(payload, _Oversized):
            self._refuse(payload.rid or "0" * 16,
                         f"profiling request is {payload.size} bytes, over the device's "
                         f"limit of {c.limits.max_request_bytes} "
                         "(profiling.max_request_bytes)",
                         verified=False)
            return
        rid = claimed_request_id(payload, c.limits.max_request_bytes) or "0" * 16
        # Until the signature checks, the id is only claimed: such refusals say so
        # (``verified`` False), and the host does not take them for the real answer.
        source = self.source
        if source is None:
            self._refuse(rid, "this agent has no release source to fetch candidates from",
                         verified=False)
            return
        try:
            req = verify_profiling_request(payload, source.key,
                                           device_id=self.config.device_id,
                                           fleet=self.config.fleet, limits=c.limits)
        except EdgeError as err:
            self._refuse(rid, str(err), verified=False)
            return
        if not c.enabled:  # checked after the signature: the host may take this answer
            self._refuse(req.id, "profiling is disabled on this device (profiling.enabled)")
            return
        with self._lock:
            replayed = self._admission.replayed(req.id)
            why = None
            if not replayed:
                before = self._admission.seen
                why = self._admission.admit(req.id, expires=req.expires.timestamp(),
                                            now=time.time())
                if why is None:
                    try:
                        # Before anything runs: a restart must not forget this id.
                        write_seen(self.state_dir, self._admission.seen)
                    except OSError as err:
                        self._admission.withdraw(req.id, before)
                        why = (f"cannot record request {req.id[:12]} in "
                               f"{self.state_dir / SEEN_FILE} ({err.strerror or err}); "
                               "refused, as it could be replayed after a restart")
        if replayed:
            log.info("profiling request %s received again: ignored", req.id[:12])
            self.event("profiling_replayed", request=req.id)
            return
        if why is not None:
            self._refuse(req.id, why)
            return
        self.event("profiling_queued", request=req.id, candidates=len(req.candidates))
        self._queue.put(req)

    def _refuse(self, rid: str, why: str, *, verified: bool = True) -> None:
        from edge_sdk.profiling import ProfilingResult

        log.warning("profiling request %s refused: %s", rid[:12], why)
        self.event("profiling_refused", request=rid, reason=why, verified=verified)
        self._reply(ProfilingResult(rid, self.config.device_id, "refused", reason=why,
                                    verified=verified))

    def _reply(self, result: ProfilingResult) -> None:
        try:
            self.publish(self.result_topic, result.dumps())
        except Exception as err:
            log.warning("cannot send the profiling result %s: %s", result.id[:12], err)

    # -- the worker --------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._intake_thread is None or not self._intake_thread.is_alive():
                self._intake_thread = threading.Thread(
                    target=self._intake_loop, name="agent-profiler-intake", daemon=True)
                self._intake_thread.start()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="agent-profiler",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.kill()
        self._queue.put(None)
        with contextlib.suppress(queue.Full):
            self._intake.put_nowait(None)
        for t in (self._thread, self._intake_thread):
            if t is not None:
                t.join(5)

    def _work(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            try:
                req = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if req is None:
                return
            with self._lock:
                self._admission.start()
            try:
                self._run(req)
            except Exception as err:  # the thread must survive any request
                log.exception("profiling request %s failed", req.id[:12])
                from edge_sdk.profiling import ProfilingResult

                self._reply(ProfilingResult(req.id, self.config.device_id, "failed",
                                            reason=f"{type(err).__name__}: {err}"[:300]))
            finally:
                with self._lock:
                    self._admission.finish()

    def _run(self, req: ProfilingRequest) -> None:
        from edge_sdk.errors import EdgeError
        from edge_sdk.profiling import ProfilingResult

        work = self.root / req.id
        reserve = self.config.limits.reserve_bytes
        try:
            st = os.statvfs(self.state_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        if req.total_bytes + reserve > free:
            self._refuse(req.id, f"not enough disk space: the candidates need "
                                 f"{req.total_bytes} bytes and {reserve} must stay free "
                                 f"(limits.reserve_bytes), {free} are free")
            return
        started = time.monotonic()
        self.event("profiling_started", request=req.id, candidates=len(req.candidates))
        timings: list[CandidateTiming] = []
        refs = [req.sample, *(r for c in req.candidates for r in (c.model, c.expected))]
        try:
            work.mkdir(parents=True, exist_ok=True)
            try:
                sample = self._fetch(req.sample, work / "sample.npz")
                files = []
                for i, c in enumerate(req.candidates):
                    suffix = Path(c.model.target).suffix or ".onnx"
                    files.append((c, self._fetch(c.model, work / f"c{i}{suffix}"),
                                  self._fetch(c.expected, work / f"c{i}.expected.npz")))
            except EdgeError as err:
                result = ProfilingResult(req.id, self.config.device_id, "failed",
                                         reason=f"fetching the candidates failed: {err}")
                self.event("profiling_failed", request=req.id, reason=result.reason)
                self._reply(result)
                return
            for c, model, expected in files:
                if self._stop.is_set():
                    break
                timings.append(self._measure(c, model, sample, expected, req, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
            # A failed fetch leaves its partial download: nobody resumes a profiling file.
            if self.source is not None:
                self.source.drop_partial([r.sha256 for r in refs])
        if self._stop.is_set():
            # Candidates killed or never measured because the agent stops are not figures:
            # the host must not choose among the rest as if they were all there was.
            result = ProfilingResult(req.id, self.config.device_id, "failed",
                                     reason="the agent is stopping; request not finished")
            self.event("profiling_failed", request=req.id, reason=result.reason)
            self._reply(result)
            return
        hw = {**self.hardware(), "threads": self.cfg.threads}
        result = ProfilingResult(req.id, self.config.device_id, "done", hardware=hw,
                                 threads=self.cfg.threads, candidates=tuple(timings))
        self.event("profiling_done", request=req.id, seconds=round(time.monotonic() - started,
                                                                     2),
                   excluded=[t.name for t in timings if not t.ok])
        self._reply(result)

    def _fetch(self, ref: FileRef, dest: Path) -> Path:
        assert self.source is not None  # no request is admitted without one
        return self.source.fetch_file(ref.target, dest, sha256=ref.sha256, length=ref.length)

    def _measure(self, cand: ProfileCandidate, model: Path, sample: Path, expected: Path,
                 req: ProfilingRequest, work: Path) -> CandidateTiming:
        from edge_sdk.profiling import CandidateTiming

        name = cand.name
        spec = json.dumps({"model": str(model), "sample": str(sample),
                           "expected": str(expected), "threads": self.cfg.threads,
                           "runs": req.runs, "warmup": req.warmup, "rounds": req.rounds,
                           "rtol": req.rtol,
                           "atol": max(req.atol, cand.spread or 0.0)})
        out, rss, why = run_child(
            [sys.executable, "-m", "device_agent._profile_child", spec],
            timeout_s=self.cfg.timeout_s, nice=self.cfg.nice,
            max_memory=self.cfg.max_memory_bytes, stderr_path=work / f"{name}.stderr",
            on_start=self._started_child, stop=self._stop)
        self._child = None
        if why is not None:
            return CandidateTiming(name, peak_rss_bytes=rss, error=why)
        err = out.get("error")
        return CandidateTiming(
            name, load_ms=_f(out.get("load_ms")), warmup_ms=_f(out.get("warmup_ms")),
            median_ms=None if err else _f(out.get("median_ms")),
            p90_ms=None if err else _f(out.get("p90_ms")), peak_rss_bytes=rss,
            max_abs_diff=_f(out.get("max_abs_diff")), runs=int(out.get("runs") or 0),
            error=str(err)[:300] if err else None)

    def _started_child(self, child: subprocess.Popen[bytes]) -> None:
        self._child = child


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


_LAUNCHER = (
    "import os, resource, sys\n"
    "nice, mem, cpu, parent = (int(a) for a in sys.argv[1:5])\n"
    "try:\n"  # killed with the agent, even by kill -9 (Linux; elsewhere RLIMIT_CPU only)
    "    import ctypes, signal\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != parent:\n"  # the agent died before the line above
    "    sys.exit(1)\n"
    "os.nice(max(0, nice - os.nice(0)))\n"
    "if mem:\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
    "if cpu:\n"
    "    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))\n"
    "os.execv(sys.argv[5], sys.argv[5:])\n"
)


def run_child(cmd: list[str], *, timeout_s: float, nice: int, max_memory: int,
              stderr_path: Path,
              on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
              stop: threading.Event | None = None,
              ) -> tuple[dict[str, Any], int | None, str | None]:
    """Run ``cmd`` at niceness ``nice`` under RLIMIT_AS ``max_memory`` (0: none), killed
    after ``timeout_s`` or as soon as ``stop`` is set, and by the kernel if this process
    dies (PR_SET_PDEATHSIG; RLIMIT_CPU as a backstop). Returns (its JSON output, its peak
    RSS in bytes, why it failed or None)."""

    # No preexec_fn: it runs Python in a fork of this many-threaded process (a deadlock
    # risk) and forces fork() over vfork(). The limits are applied by a tiny launcher
    # before it execs the measuring command, so they hold before any model byte is read.
    # CPU seconds over all its threads: generous, only for a child nobody kills any more.
    cpu = int(timeout_s * (os.cpu_count() or 1)) + 60
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(nice), str(max_memory), str(cpu),
                str(os.getpid()), *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    with open(stderr_path, "wb") as err_file:
        child = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err_file, env=env)
    if on_start is not None:
        on_start(child)
    deadline = time.monotonic() + timeout_s
    status, usage = 0, None
    killed = stopped = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid == child.pid:
            break
        if not (killed or stopped):
            stopped = stop is not None and stop.is_set()
            killed = not stopped and time.monotonic() > deadline
            if killed or stopped:
                with contextlib.suppress(OSError):
                    child.kill()
        time.sleep(0.02)
    child.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * 1024 if usage is not None else None
    assert child.stdout is not None
    raw = child.stdout.read(_CHILD_OUTPUT_MAX)
    child.stdout.close()
    if stopped:
        return {}, rss, "killed: the agent is stopping"
    if killed:
        return {}, rss, f"timed out after {timeout_s:g} s (profiling.timeout_s); killed"
    try:
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        out = json.loads(lines[-1]) if lines else None
    except ValueError:
        out = None
    if child.returncode != 0 or not isinstance(out, dict):
        tail = ""
        with contextlib.suppress(OSError):
            tail = " ".join(stderr_path.read_bytes()[-400:].decode("utf-8", "replace").split())
        code = child.returncode
        what = (f"killed by signal {-code}" if code < 0 else f"exited with {code}")
        if max_memory and ("MemoryError" in tail or "bad_alloc" in tail):
            what += f" (out of memory under profiling.max_memory_bytes={max_memory})"
        return {}, rss, f"the measuring process {what}: {tail[-200:] or 'no output'}"
    return out, rss, None


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), 10))
