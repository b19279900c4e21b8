"""The daemon: wires the state store, installer, HTTP endpoint, telemetry and broker link."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_sdk._internal import (
    MESSAGE_MAX_BYTES,
    MESSAGE_MAX_DEPTH,
    atomic_write_text,
    loads_bounded,
)
from edge_sdk.errors import EdgeError, InstallError

from ._config import AgentConfig
from ._install import Installer, describe
from ._intake import DesiredInbox, Unverified, Verified
from ._interfaces import (
    ArtifactSource,
    BrokerLink,
    ModelLoader,
    SourceFactory,
    Transfers,
)
from ._lifecycle import Mode, watched
from ._metrics import Metrics
from ._profiler import Profiler, ProfilingSource
from ._protocol import InferenceApp
from ._server import HttpServer
from ._serving import ModelSlots, ModelState, Served, Wanted, model_states
from ._shadow import Shadowing
from ._state import ModelRecord, StateStore
from ._tap import Taps
from ._telemetry import Outbox, Telemetry

if TYPE_CHECKING:
    from edge_sdk.identity import Credentials
    from edge_sdk.transport import LastWill, MqttConnection

    from ._drift import DriftTap
    from ._identity import IdentityService

log = logging.getLogger("device_agent")

RUNTIME_FILE = "agent.json"


class ThreadDiedError(InstallError):
    """A thread the agent cannot work without has ended; the process exits non-zero so
    that its service manager (systemd ``Restart=on-failure``) starts it again."""


class Agent:
    """One device agent. ``start()`` returns once the endpoint serves (with the last good
    model, broker or not); ``stop()`` shuts everything down; ``run()`` does both around a
    wait for SIGTERM / SIGINT.

    ``source`` is where deployments are verified and artifacts fetched: an
    :class:`ArtifactSource`, or a factory ``(config, connection) -> ArtifactSource`` that
    builds one over the broker link; by default the signed-release client over the
    configured broker. ``connect``
    False runs without any broker link (local serving only; a factory or the default
    then builds no source). The link and the source are built here; :meth:`start`
    connects.

    With ``config.identity`` (and ``connect``) the broker account comes from enrolment
    (:class:`~device_agent._identity.IdentityService`): the link connects once there are
    credentials, and follows the groups they name.

    ``http`` False runs the agent core without its HTTP endpoint (and without writing
    ``agent.json``); ``load_model`` replaces how a verified model file is opened (same
    arguments as :func:`edge_sdk.load`'s file loader). Both exist so that a fleet
    simulator can drive many agents in one process, sharing one runtime session per
    model; a device runs with the defaults.
    """

    def __init__(self, config: AgentConfig, *, source: ArtifactSource | SourceFactory | None
                 = None, connect: bool = True, http: bool = True,
                 load_model: ModelLoader | None = None) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.metrics = Metrics(self.model_states)
        self.slots = ModelSlots(on_change=self._model_changed)
        #: What watches answered requests beside the answer (shadow runs, input drift,
        #: field samples): each component adds its tap here.
        self.taps = Taps()
        #: Input drift statistics of answered requests (``[drift]``; None when off).
        self.drift: DriftTap | None = None
        if config.drift.enabled:
            from ._drift import DriftTap

            self.drift = DriftTap(config.drift, serving=self.slots.all,
                                  on_worker_start=_lower_thread_priority)
            self.taps.add(self.drift)
            self.metrics.track_drift(self.drift.collector())
        self._stop = threading.Event()
        self._started_at = time.monotonic()
        self._boot_ms = time.time_ns() // 1_000_000
        self._link_no = 0
        self.outbox = Outbox(self.store.outbox, config.limits.max_queued_reports)
        from edge_sdk.transport import Topics

        self.topics = Topics(config.fleet, config.broker.topic_prefix)
        self.telemetry = Telemetry(
            device=config.device_id, fleet=config.fleet, outbox=self.outbox,
            state_topic=self.topics.state(config.device_id),
            events_topic=self.topics.events(config.device_id),
            snapshot=self.snapshot, on_event=self._count_event,
            heartbeat_fields=self._heartbeat, heartbeat_s=config.telemetry.heartbeat_s,
            progress_fields=self.transfer, progress_s=config.telemetry.progress_s,
            reconnect_jitter_s=config.telemetry.reconnect_jitter_s,
        )
        self._serve_http = http
        #: The groups of the config file: followed whatever the credentials name.
        self._own_groups = config.groups
        #: Enrolment and renewed credentials (``[identity]``; None without, or offline).
        self.identity: IdentityService | None = None
        creds: Credentials | None = None
        if config.identity is not None and connect:
            from ._identity import IdentityService

            self.identity = IdentityService(config, event=self.telemetry.event)
            self.metrics.track_credentials(self.identity.seconds_left)
            creds = self.identity.boot()
            if creds is not None:
                config = self.config = _following(config, creds.groups)
        #: The link waits for credentials from enrolment before it connects.
        self._link_waits = self.identity is not None and creds is None
        link = self._new_link(creds) if connect else None
        self._mqtt = link
        #: The broker link (None with ``connect`` False).
        self.connection: BrokerLink | None = link
        #: The release source's fetcher, whose running download is reported (None with
        #: a source of the caller's).
        self._fetcher: Transfers | None = None
        chosen = self._new_source(source, link)
        self.metrics.storage_ok.set(1)
        # -- shadow runs: a request tap; a verdict wakes the worker, which records it.
        self.shadowing = Shadowing(config, self.metrics, on_end=self._desired_ev_set)
        self.taps.add(self.shadowing)
        self.installer = Installer(
            config, self.store, self.slots, chosen, self.telemetry, self._stop,
            load_model=load_model,
            on_storage=lambda ok: self.metrics.storage_ok.set(1 if ok else 0),
            shadowing=self.shadowing)
        self.http: HttpServer | None = None
        # Checked documents per desired topic (the device's own and its groups').
        self._desired = DesiredInbox()
        self._desired_topics = [self.topics.desired(config.device_id),
                                *(self.topics.group_desired(g) for g in config.groups)]
        #: The desired topics' subscriptions (to cancel a group's when it is removed).
        self._desired_subs: dict[str, Any] = {}
        self._desired_lock = threading.Lock()
        self._desired_ev = threading.Event()
        self._worker: threading.Thread | None = None
        #: Why the worker thread ended, once it has (read by :meth:`run`).
        self._worker_died: str | None = None
        self.profiler = Profiler(
            config, self.store.root, self._publish, self.telemetry.event,
            _hardware, self.topics.profile_result(config.device_id), self._stop,
            source=chosen if link is not None and isinstance(chosen, ProfilingSource)
            else None)
        # -- field samples (edge-sdk samples): a request tap, answered over the link.
        from ._samples import SampleCollector

        keyed = chosen if isinstance(chosen, ProfilingSource) else None
        self.samples = SampleCollector(
            config, self.store.root, self.topics, self._publish_retained, self.telemetry.event,
            key=lambda: keyed.key if keyed is not None else None, served=self.slots.get,
            stop=self._stop)
        self.taps.add(self.samples)
        # What a shadow candidate disagreed on is a field sample of rule "disagreement".
        self.shadowing.on_disagree = lambda name, feed, outputs, score: self.samples.offer(
            name, feed, outputs, "disagreement", score)

    def _desired_ev_set(self) -> None:
        self._desired_ev.set()

    def _new_link(self, creds: Credentials | None = None) -> MqttConnection:
        """The broker connection, not connected yet (:meth:`start` does that); with
        ``[identity]`` as the device's account (``creds``, or none yet)."""
        from edge_sdk.transport import MqttConfig, MqttConnection

        b = self.config.broker
        user, password = b.username, b.resolved_password()
        ca_file = b.tls.ca_file
        if self.identity is not None:
            user, password = (creds.username, creds.password) if creds else (None, None)
            ca_file = self.identity.ca_file or ca_file
        mqtt_cfg = MqttConfig(
            url=",".join(b.all_urls), username=user, password=password,
            ca_file=str(ca_file) if ca_file else None,
            cert_file=str(b.tls.cert_file) if b.tls.cert_file else None,
            key_file=str(b.tls.key_file) if b.tls.key_file else None,
            tls_insecure=b.tls.insecure,
            client_id=b.client_id_for(self.config.device_id),
            keepalive=b.keepalive_s, fleet=self.config.fleet, topic_prefix=b.topic_prefix,
        )
        conn = MqttConnection(mqtt_cfg, name=f"agent-{self.config.device_id}")

        def on_link(up: bool) -> None:
            self.metrics.broker_connected.set(1 if up else 0)
            self.telemetry.link_changed(up)

        conn.add_connection_listener(on_link)
        return conn

    def _new_source(self, given: ArtifactSource | SourceFactory | None,
                    link: MqttConnection | None) -> ArtifactSource | None:
        """The source deployments go through: the one given, or the one a factory (or, by
        default, the signed-release client) builds over ``link``; None without a link."""
        if isinstance(given, ArtifactSource):
            return given
        if link is None:
            return None
        if given is not None:
            return given(self.config, link)
        from ._source import ReleaseSource

        release = ReleaseSource(self.config, link)
        self._fetcher = release.fetcher
        return release

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.installer.boot()
        if self._serve_http:
            app = InferenceApp(self.slots, self.metrics, self.config.http, self.wanted,
                               taps=self.taps, shadow=self.shadowing.model_status)
            self.http = HttpServer(app, self.config.http.bind, self.config.http.port)
            self.http.start()
            try:
                atomic_write_text(self.store.root / RUNTIME_FILE, json.dumps(
                    {"pid": os.getpid(), "url": self.http.url,
                     "device": self.config.device_id}) + "\n")
            except OSError as err:
                self.installer.storage.failed(err)
        self.telemetry.start()
        self.samples.start()
        if self.connection is not None:
            self._open_link(self.connection)
        self._worker = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        self._worker.start()
        cur = self.slots.current
        log.info("agent %s serving %s on %s", self.config.device_id,
                 cur.record.label() if cur else "no model yet",
                 self.http.url if self.http is not None else "no HTTP endpoint")

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._desired_ev.set()
        if self._worker is not None:
            self._worker.join(10)
        self.shadowing.stop()
        self.profiler.stop()
        self.samples.stop()
        if self.drift is not None:
            self.drift.stop()
        if self.identity is not None:
            self.identity.stop()
        if self.connection is not None:
            self.telemetry.stop()
            self.telemetry.publish_offline()
            self.connection.close()
        else:
            self.telemetry.stop(0)
        if self.http is not None:
            self.http.stop()

    def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop."""
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not done.wait(0.5):
                dead = self.dead_threads()
                if dead:
                    # A zombie agent (HTTP answering, no updates, no heartbeats) is worse
                    # than a restart: no supervisor would ever notice it.
                    log.critical("%s; exiting so that the agent is restarted", dead)
                    raise ThreadDiedError(f"{dead}; the agent exits so that its service "
                                          "manager restarts it")
        finally:
            self.stop()

    def dead_threads(self) -> str | None:
        """One line naming the agent threads that ended while the agent runs, or None."""
        if self._stop.is_set():
            return None
        dead = []
        if self._worker is not None and not self._worker.is_alive():
            dead.append(f"the install worker thread died ({self._worker_died or 'no reason'})")
        if not self.telemetry.alive:
            dead.append("the telemetry thread died")
        if self.identity is not None and not self.identity.alive:
            dead.append("the identity thread died")
        return "; ".join(dead) or None

    @property
    def url(self) -> str:
        assert self.http is not None
        return self.http.url

    # -- broker --------------------------------------------------------------------------

    def _open_link(self, conn: BrokerLink) -> None:
        # Armed once serving has started: the first will carries the facts after boot.
        conn.arm_last_will(self._last_will)
        for topic in self._desired_topics:
            self._desired_subs[topic] = conn.subscribe(topic, self._on_desired, wait=False)
        if self.config.profiling.enabled:
            # Only then: a broker ACL written before profiling existed refuses the topic.
            conn.subscribe(self.topics.profile_request(self.config.device_id),
                           self.profiler.on_request, wait=False)
        if self.config.samples.enabled:
            # Only then, as profiling: an older broker ACL refuses these topics.
            conn.subscribe(self.topics.samples_request(self.config.device_id),
                           self.samples.on_request, wait=False)
            conn.subscribe(self.topics.samples_get(self.config.device_id),
                           self.samples.on_get, wait=False)
        self.telemetry.attach(conn)
        if self.identity is not None and self._mqtt is not None:
            self.identity.start(self._mqtt, on_credentials=self._follow)
            if self._link_waits:
                log.info("no broker credentials yet: serving locally while enrolling")
                return  # the identity service connects once enrolment gave credentials
        try:
            conn.connect(wait=False)
        except EdgeError as err:
            log.warning("broker link not started: %s (serving locally)", err)

    def _follow(self, creds: Credentials) -> None:
        """New credentials are about to be used: follow exactly the groups they name (the
        controller's assignment) and the config's ``groups``; stop following the groups
        the operator removed."""
        import dataclasses

        groups = _following(dataclasses.replace(self.config, groups=self._own_groups),
                            creds.groups).groups
        old = self.config.groups
        if groups == old:
            return
        new = [g for g in groups if g not in old]
        gone = [g for g in old if g not in groups]
        cfg = dataclasses.replace(self.config, groups=groups)
        # One config for everything that reads the groups (verification: a group
        # deployment must name one of them; replay scopes; the reported facts).
        self.config = self.installer.config = cfg
        from ._source import ReleaseSource

        if isinstance(self.installer.source, ReleaseSource):
            self.installer.source.config = cfg
        for g in gone:
            topic = self.topics.group_desired(g)
            if topic in self._desired_topics:
                self._desired_topics.remove(topic)
            sub = self._desired_subs.pop(topic, None)
            if sub is not None:
                sub.cancel()
            with self._desired_lock:
                self._desired.forget(topic)
        for g in new:
            topic = self.topics.group_desired(g)
            self._desired_topics.append(topic)
            if self.connection is not None:
                self._desired_subs[topic] = self.connection.subscribe(
                    topic, self._on_desired, wait=False)
        if new:
            log.info("following group(s) %s from the device's credentials", ", ".join(new))
        if gone:
            log.info("no longer following group(s) %s: the device's credentials do not "
                     "name them", ", ".join(gone))

    def _last_will(self) -> LastWill:
        """The will of the next connection: offline, which connection it is (``link``), and
        the facts as they are now, for whoever reads only the broker. The registry keeps
        its own newer record of the facts and ignores a will older than the link it has
        heard from (a will published late, after a quick reconnect)."""
        from edge_sdk.transport import LastWill

        self._link_no += 1
        doc = {"device": self.config.device_id, "fleet": self.config.fleet,
               "online": False, "will": True, "link": self.link, **self._facts()}
        return LastWill(self.topics.state(self.config.device_id), json.dumps(doc).encode())

    @property
    def link(self) -> list[int]:
        """``[process start in ms, connection number]``: ordered, so that a report of an
        older connection (its will) can be told from a newer one's."""
        return [self._boot_ms, self._link_no]

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        # Checked before it is coalesced with what waits: an unverifiable message must never
        # take the place of a signed deployment the worker has not got to yet.
        try:
            dep = self.installer.screen(payload)
        except EdgeError as err:
            item = Unverified(topic, hashlib.sha256(payload).hexdigest()[:32], len(payload),
                              _claimed_counter(payload), str(err))
            with self._desired_lock:
                self._desired.refuse(item)
        else:
            with self._desired_lock:
                if not self._desired.offer(Verified(topic, dep.counter, payload)):
                    log.debug("deployment #%d on %s: a newer one waits", dep.counter, topic)
        self._desired_ev.set()

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.connection is not None:
            self.connection.publish(topic, payload, qos=1)

    def _publish_retained(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.connection is not None:
            self.connection.publish(topic, payload, qos=1, retain=retain)

    def submit(self, payload: bytes) -> None:
        """Hand a raw deployment to the worker (what the broker subscription does)."""
        self._on_desired("", payload)

    # -- worker --------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException as err:
            self._worker_died = f"{type(err).__name__}: {err}"
            raise

    def _work_loop(self) -> None:
        _lower_thread_priority()
        try:
            self.installer.resume()
        except Exception:
            log.exception("resuming the health window failed")
        # Heartbeats are the telemetry thread's: an install here may take minutes.
        while not self._stop.is_set():
            try:
                self.installer.settle_shadow()
                if self.installer.storage.error is not None:
                    self.installer.storage.retry()
                    for payload in self.installer.take_waiting():
                        self.submit(payload)
                if not self._desired_ev.wait(1.0):
                    continue
                self._desired_ev.clear()
                self._drain()
            except Exception:
                # No message may end this thread; whatever got here is a bug, and a reason
                # to log loudly, not to stop taking updates.
                log.exception("the worker failed on pending deployments; going on")
                self._stop.wait(1.0)

    def _drain(self) -> None:
        with self._desired_lock:
            work, refused = self._desired.take()
            dropped, self._desired.dropped = self._desired.dropped, 0
        if dropped:
            log.warning("%d unverifiable desired message(s) dropped unreported (too many "
                        "arrived at once)", dropped)
        for r in refused:
            self.installer.refuse_unverified(r)
        # Newest verified counter first. A device that follows groups finds older documents
        # retained on its other desired topics after every newer install; those are passed
        # over quietly instead of being reported as refused replays each time (they are
        # never installed either way). apply() checks replays per scope and model.
        quiet = len(self._desired_topics) > 1
        for item in work:
            if self._stop.is_set():
                break
            self._apply(item, quiet)
        self.metrics.queued_reports.set(len(self.outbox))

    def _apply(self, item: Verified, quiet: bool = False) -> None:
        retry = False
        try:
            retry = self.installer.apply(item.payload, counter=item.counter, quiet=quiet,
                                         topic=item.topic)
        except Exception as err:  # the worker must survive anything a deployment does
            log.exception("install failed unexpectedly")
            self.telemetry.event("failed", stage="internal",
                                 reason=f"{type(err).__name__}: {err}")
        if retry and not self._stop.wait(self.config.limits.retry_s):
            with self._desired_lock:
                # Try again, unless a newer document arrived on that topic meanwhile.
                self._desired.offer(item)
            self._desired_ev.set()

    # -- reporting -----------------------------------------------------------------------

    def transfer(self) -> dict[str, Any] | None:
        """The artifact download running now, as reported (None when there is none)."""
        life = self.installer.life
        dep = life.deployment
        fetcher = self._fetcher
        t = None if fetcher is None else fetcher.transfer
        if life.mode is not Mode.INSTALLING or dep is None or t is None or t.total is None \
                or not t.path.startswith("targets/"):
            return None
        return {"deployment": describe(dep), **t.as_dict()}

    def _facts(self) -> dict[str, Any]:
        """What the device is (models, phase, last result, groups, tags, hardware): the
        part of its state that stays true while it is offline."""
        st = self.installer.state
        cur = self.slots.current

        def rec(r: ModelRecord | None) -> dict[str, Any] | None:
            return None if r is None else {"name": r.name, "version": r.version,
                                           "sha256": r.sha256}

        on_trial = set(watched(st))
        models = [{**(rec(r) or {}), "phase": "trial" if n in on_trial else "committed"}
                  for n, r in sorted(st.models.items())]
        last = cur.record if cur else None
        return {
            # For readers of one model: the one swapped in last, and what it replaced.
            "model": rec(last),
            "previous": rec(st.previous.get(last.name) if last else None),
            "models": models,
            # installed.json's phase ("committed" by default) is about the served models:
            # a device that never installed one is idle, not committed.
            "phase": st.phase if st.models else "idle",
            "deployment": st.deployment_counter,
            "last_update": st.last_result,
            "results": list(st.results),
            "shadow": self.shadowing.status(),
            "groups": list(self.config.groups),
            "tags": dict(self.config.tags),
            "hardware": {**_hardware(), "threads": self.config.threads},
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            **self._facts(),
            "link": self.link,
            "queued_reports": len(self.outbox),
            "dropped_reports": self.outbox.dropped,
            "storage": self._storage(),
            "transfer": self.transfer(),
            # Short: n and largest PSI per input (the heartbeat carries the figures).
            "drift": self.drift.summary() if self.drift is not None else None,
        }

    def _storage(self) -> dict[str, Any]:
        err = self.installer.storage.error
        try:
            free: int | None = self.store.free_bytes()
        except OSError:
            free = None
        out: dict[str, Any] = {"ok": err is None, "free_bytes": free}
        if err is not None:
            out["reason"] = err
        return out

    def _heartbeat(self) -> dict[str, Any]:
        cur = self.slots.current
        beat = {"uptime_s": round(time.monotonic() - self._started_at, 1),
                "model": None if cur is None else {"name": cur.name, "version": cur.version},
                "models": [{"name": n, "version": s.version}
                           for n, s in sorted(self.slots.all().items())],
                "shadow": self.shadowing.status(),
                "queued_reports": len(self.outbox)}
        drift = self.drift.report() if self.drift is not None else None
        if drift is not None:  # input figures (device_agent._drift), when there are any
            beat["drift"] = drift
        return beat

    def wanted(self) -> list[Wanted]:
        """The models the device should serve: those of its installed state (a model that
        cannot be loaded at boot leaves it, reported as failed)."""
        return [Wanted(name, r.version) for name, r in self.installer.state.models.items()]

    def model_states(self) -> list[ModelState]:
        """Every model that serves or should (the endpoint's repository index)."""
        return model_states(self.slots.all(), self.wanted())

    def _model_changed(self, name: str, served: Served | None) -> None:
        self.metrics.set_models((s.name, s.version, s.record.sha256)
                                for s in self.slots.all().values())

    def _count_event(self, kind: str, fields: dict[str, Any]) -> None:
        self.metrics.updates.labels(kind).inc()
        got = fields.get("download")
        if kind == "downloaded" and isinstance(got, dict) and got.get("kind") in ("delta", "full"):
            self.metrics.download_bytes.labels(got["kind"]).inc(max(0, int(got["bytes"])))
        self.metrics.queued_reports.set(len(self.outbox))


#: CPU flags worth knowing when choosing a quantization scheme (SIMD width, int8 dot
#: products, bf16/fp16 arithmetic, matrix units), from /proc/cpuinfo ``flags`` (x86) or
#: ``Features`` (ARM). An x86 CPU lists 100-200 flags; the registry keeps only these.
CPU_FEATURES = frozenset({
    # x86
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8",
    "amx_tile",
    # ARM
    "neon", "asimd", "asimdhp", "asimddp", "asimdfhm", "fphp", "i8mm", "bf16", "sve",
    "sve2", "svei8mm", "svebf16", "sme",
})


def cpu_facts(cpuinfo: str) -> tuple[str | None, list[str]]:
    """The CPU model and its :data:`CPU_FEATURES` (sorted) from /proc/cpuinfo text."""
    model: str | None = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "Hardware"):
            model = value.strip() or None
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return model, sorted(flags & CPU_FEATURES)


@functools.cache
def _hardware() -> dict[str, Any]:
    """What the registry keeps about the device; cheap facts read once per process."""
    import platform

    cpu = platform.processor() or None
    features: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, features = cpu_facts(f.read(1 << 20))
        cpu = model or cpu
    except OSError:
        pass
    runtimes: dict[str, str] = {"python": platform.python_version()}
    for dist in ("onnxruntime", "ai-edge-litert"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            runtimes[dist] = importlib.metadata.version(dist)
    try:
        agent = importlib.metadata.version("edge-sdk")
    except importlib.metadata.PackageNotFoundError:
        agent = "unknown"
    providers: list[str] = []
    with contextlib.suppress(Exception):  # serving imports onnxruntime anyway
        import onnxruntime

        providers = [str(p) for p in onnxruntime.get_available_providers()]
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"arch": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": usable, "cpu_features": features,
            "os": platform.system().lower(), "runtimes": runtimes,
            "onnxruntime_providers": providers, "agent": agent}


def _following(config: AgentConfig, groups: tuple[str, ...]) -> AgentConfig:
    """``config`` with ``groups`` added to the groups it follows."""
    import dataclasses

    more = tuple(g for g in groups if g not in config.groups)
    return dataclasses.replace(config, groups=config.groups + more) if more else config


def _claimed_counter(payload: bytes) -> int | None:
    """The counter a raw deployment document says it has (unverified; None if unreadable)."""
    try:
        doc = loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=MESSAGE_MAX_DEPTH)
        counter = doc["signed"]["counter"]
    except (ValueError, KeyError, TypeError):
        return None
    return counter if isinstance(counter, int) and not isinstance(counter, bool) else None


def _lower_thread_priority(nice: int = 10) -> None:
    """Installs (hashing, TUF, loading) run at a lower CPU priority than serving, so that a
    busy small device answers requests first (shadow comparisons, at ``nice`` 19: only
    what serving leaves). Linux applies a thread id's nice value to that thread alone;
    elsewhere this is a no-op."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except (AttributeError, OSError):
        pass

