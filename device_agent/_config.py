"""Agent configuration: one TOML file, checked strictly at start.

Every section is a frozen dataclass with defaults that are safe on a small
device. An unknown key, a wrong type or an out-of-range value is a
:class:`~edge_sdk.errors.ConfigError` naming the file, the key and what was
expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from edge_sdk._internal import add_secret, host_name, redact_url
from edge_sdk.errors import ConfigError
from edge_sdk.profiling import ProfilingLimits
from edge_sdk.samples import SampleLimits

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: What becomes one MQTT topic level: no '.', which makes NATS close the connection.
_TOPIC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: A tag value: printable, no control characters (it is shown in tables and selectors).
_TAG_VALUE = re.compile(r"[^\x00-\x1f\x7f]{0,128}")
MAX_TAGS = 32
#: The most models one device may be set to serve (``limits.max_models``): every one of
#: them fits in its state report, and the fleet reads this many from it.
MAX_SERVED_MODELS = 64


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards the broker; used when the broker URL is ``mqtts://``."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Skips hostname checks; only for test brokers with self-made certificates.
    insecure: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    #: The nodes of a clustered broker, tried in turn: the agent starts on the first and
    #: moves to the next whenever a connection attempt fails or the link drops. Replaces
    #: ``url`` (give one or the other); all nodes share the credentials and TLS settings.
    urls: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Read the password from this file (kept out of the config file).
    password_file: Path | None = None
    #: Default: the user name (brokers such as the examples/mosquitto one name the
    #: session after it anyway), else ``agent-<device_id>``.
    client_id: str | None = None
    keepalive_s: int = 30
    topic_prefix: str = "edge"
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def all_urls(self) -> tuple[str, ...]:
        """The broker URLs in the order they are tried (``urls``, else ``url``)."""
        return self.urls or tuple(u.strip() for u in self.url.split(",") if u.strip())

    @property
    def host(self) -> str:
        return urlparse(self.all_urls[0]).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        u = urlparse(self.all_urls[0])
        return u.port or (8883 if u.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return urlparse(self.all_urls[0]).scheme == "mqtts"

    def client_id_for(self, device_id: str) -> str:
        """The MQTT client id: ``client_id``, else the user name, else ``agent-<device_id>``."""
        user = self.username or unquote(urlparse(self.all_urls[0]).username or "")
        return self.client_id or user or f"agent-{device_id}"

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            try:
                secret = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ConfigError(
                    f"broker.password_file {self.password_file}: cannot read: {err.strerror}"
                ) from err
            add_secret(secret)  # never printed, wherever it would appear
            return secret
        return self.password


@dataclass(frozen=True)
class TrustConfig:
    """Where the device's trust anchors live (copied there at provisioning)."""

    #: Trusted TUF root metadata (root.json) of the release repository.
    root: Path | None = None
    #: Public key that signs deployments (the director key).
    deployment_key: Path | None = None


@dataclass(frozen=True)
class HttpConfig:
    #: Loopback only by default: the endpoint has no authentication.
    bind: str = "127.0.0.1"
    port: int = 8080
    #: Bodies above this are refused with 413 before being read.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Requests running at once; more wait up to ``queue_timeout_s`` then get 429.
    max_inflight: int = 64
    queue_timeout_s: float = 5.0
    #: Accept NaN / Inf in float inputs (refused with 400 by default).
    allow_nan: bool = False
    #: Open connections at once; more are answered 503 and closed (each holds a thread).
    max_connections: int = 32
    #: Kernel queue of connections not yet accepted; too small a queue makes bursts of
    #: new connections wait for SYN retransmits (1 s and more).
    listen_backlog: int = 128
    #: A keep-alive connection with no request starting is closed after this long.
    idle_timeout_s: float = 30.0
    #: Whole-request deadline, from its first byte to its last (not per read), so a
    #: client trickling bytes cannot hold a connection and its buffer.
    request_timeout_s: float = 30.0
    #: Request line plus headers; a longer request line is 414, longer headers 431.
    max_header_bytes: int = 64 * 1024
    #: Request bodies held in memory at once across connections; a body that does not fit
    #: is refused with 503 before it is read.
    max_buffered_bytes: int = 64 * 1024 * 1024
    #: Memory for decoding requests at once (a JSON body takes several times its size as
    #: Python objects); a request waits up to ``queue_timeout_s`` for room, then 503.
    max_decode_bytes: int = 128 * 1024 * 1024
    #: Host names clients may reach the endpoint by, besides IP addresses, ``localhost``
    #: and ``bind``; a request naming another ``Host`` is refused with 421, so a web page
    #: whose DNS name an attacker points at the device (DNS rebinding) cannot call it.
    allowed_hosts: tuple[str, ...] = ()
    #: Width x height of an image body (JPEG/PNG to /v2/models/{name}/infer), read from
    #: its header: a larger one is refused with 413 before it is decoded. Default: a 4K
    #: UHD frame (24 MiB of RGB pixels).
    max_image_pixels: int = 3840 * 2160


@dataclass(frozen=True)
class HealthConfig:
    """The window after a swap in which the new model must behave."""

    window_s: float = 10.0
    #: The agent runs the manifest's sample through the live model this often.
    probe_interval_s: float = 1.0
    #: Share of failed inferences that triggers rollback. Counted: failed probes of the
    #: manifest's sample, and requests the previous version runs but the new one fails.
    #: Not counted: bad requests (4xx) and requests the previous version fails on too.
    max_error_rate: float = 0.0
    #: p99 latency limit over the window in ms; 0 disables the check.
    max_p99_ms: float = 0.0
    #: Restarts of the agent tolerated inside one health window before rolling back.
    max_restarts: int = 1
    #: A request the new model fails on is run again on the previous version (kept
    #: loaded in the window) to tell whose failure it is; at most this many re-runs a
    #: second, one at a time, so a flood of bad requests costs a bounded amount of CPU.
    #: A failure not re-run is not counted against the new model.
    recheck_per_s: float = 5.0
    #: Re-runs waiting for the one running; more failures are not re-run.
    recheck_queue: int = 4
    #: How long a failed request waits for the previous version's answer.
    recheck_timeout_s: float = 2.0


@dataclass(frozen=True)
class LimitsConfig:
    max_artifact_bytes: int = 512 * 1024 * 1024
    #: Reports kept on disk while the broker is away; the oldest are dropped first.
    max_queued_reports: int = 1000
    #: Warm-up runs of the new model before its smoke test.
    warmup_runs: int = 3
    #: Wait before retrying an install interrupted by the broker or responder going away.
    retry_s: float = 5.0
    #: Bytes kept free on the state directory's filesystem: a deployment is refused
    #: before its download unless it fits next to the current and previous models
    #: with this much left (for the state file, reports, TUF metadata, logs).
    reserve_bytes: int = 4 * 1024 * 1024
    #: While the state directory cannot be written (full, read-only), try again this often.
    storage_retry_s: float = 30.0
    #: Memory budget of the served models, in model file bytes: a deployment is refused
    #: before its download when what serves plus its new models would exceed it (both
    #: versions of a replaced model are held while the new one loads and is watched).
    #: Default: half of the device's memory; 0: no limit.
    max_models_bytes: int = field(default_factory=lambda: half_of_memory())
    #: The most models served at once: a deployment that would make more serve is refused
    #: before its download (1 to :data:`MAX_SERVED_MODELS`, what the fleet reads of a
    #: device's state report).
    max_models: int = 16


@dataclass(frozen=True)
class TelemetryConfig:
    heartbeat_s: float = 30.0
    #: How often a running download is reported (bytes, rate, time left) in the events
    #: and the retained state.
    progress_s: float = 10.0
    #: After a reconnect the state is sent again within a random 0 to this many seconds
    #: (0: at once), so that a broker's fleet does not all report in the same instant.
    #: The first connection reports at once.
    reconnect_jitter_s: float = 2.0


@dataclass(frozen=True)
class ProfilingConfig:
    """On-device profiling (``convert --profile-on``, ``bench --on``): candidates are timed
    in a child process at low priority, one request at a time, never touching serving."""

    enabled: bool = True
    #: Intra-op threads of the timed candidate; 0 lets the runtime decide.
    threads: int = 1
    #: Requests waiting behind the running one; more are refused ("busy").
    max_queued: int = 2
    #: What one request may ask (size, candidates, bytes, runs, lifetime), checked with
    #: its signature. Its keys sit in this section itself (``profiling.max_runs``), not
    #: in a sub-table: the file format predates the object.
    limits: ProfilingLimits = field(default_factory=ProfilingLimits,
                                    metadata={"flat": True})
    #: Request ids remembered until their requests expire (``STATE/seen/profiling.json``,
    #: ~100 bytes each), so that a replay is refused across restarts; when more are
    #: unexpired, requests expiring before the dropped ones are refused.
    max_seen: int = 512
    #: One candidate's child process (load, warm-up, timed runs) is killed after this.
    timeout_s: float = 120.0
    #: Address-space limit (RLIMIT_AS) of the child; 0 disables it.
    max_memory_bytes: int = 4 * 1024 * 1024 * 1024
    #: Niceness of the child (19: only idle CPU time).
    nice: int = 19


@dataclass(frozen=True)
class ShadowConfig:
    """Shadow runs (a deployment's ``shadow`` section): what comparing a candidate with the
    served model on live requests may cost. Requests are never delayed: over a bound, a
    sampled request is left out of the comparison (``dropped``)."""

    #: Sampled requests waiting for the candidate; more are dropped.
    queue: int = 16
    #: CPU seconds the comparing worker may use per wall second, over 10 s; above it the
    #: run pauses ("paused: cpu") and drops what is sampled until it is below again. The
    #: worker is also paced to this share in short turns. 0.1, measured (bench/agent.py
    #: [10], a saturated 2-core host, every request sampled): serving p99 grew 1.5-2x at
    #: 0.5, 1.2-1.6x at 0.25, 1.0-1.2x at 0.1 (still ~60 comparisons a second).
    cpu_share: float = 0.1
    #: Process memory (RSS) above which the run pauses ("paused: memory"). 0: 80 % of
    #: ``limits.max_models_bytes`` (or of the device's memory when that is 0).
    max_rss_bytes: int = 0
    #: A sampled request whose inputs and served outputs take more bytes together is
    #: dropped (both are held while it waits in the queue).
    max_input_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class SamplesConfig:
    """Field samples (``edge-sdk samples request``): inputs the served model saw, kept on
    disk only while a signed request asks for them, bundled for the host to pull."""

    #: The device's own veto: false refuses every request (the operator's allow list
    #: is the other key).
    enabled: bool = True
    #: What one request may ask (size, count, bundle bytes, lifetime), checked with its
    #: signature; keys in this section (``samples.max_count``).
    limits: SampleLimits = field(default_factory=SampleLimits, metadata={"flat": True})
    #: Everything under ``STATE/samples`` (kept samples and the bundle) stays within
    #: these; past them the oldest kept sample is dropped.
    max_buffer_bytes: int = 160 * 1024 * 1024
    max_buffer_count: int = 2000
    #: Served requests waiting to be looked at; more are skipped (never blocks serving).
    queue: int = 16
    #: Request ids remembered until they expire (``STATE/seen/samples.json``).
    max_seen: int = 512
    #: A ready bundle is deleted this long after it was made.
    keep_s: float = 24 * 3600.0
    #: Chunks of a bundle answered per second (the rest: "slow down").
    chunks_per_s: float = 32.0


@dataclass(frozen=True)
class DriftConfig:
    """Input drift statistics (``[drift]``, device_agent._drift): per-input, per-channel
    figures of the requests a model answered, over a sliding window, reported with the
    heartbeat. Off the request path: a request is only handed to a worker thread (at a
    lowered priority) through a bounded queue, and skipped (counted) when the queue is
    full, the rate cap is reached or its inputs are too large."""

    enabled: bool = True
    #: Requests analysed per second at most, over all models; the rest are skipped.
    max_per_s: float = 50.0
    #: The window: the last this many analysed requests per model, kept as ``slots``
    #: slots of ``window / slots`` requests (the oldest slot is dropped as a new one
    #: starts).
    window: int = 1000
    slots: int = 10
    #: Requests waiting for the worker; more are skipped.
    queue: int = 8
    #: A request whose inputs are larger than this is skipped (it would hold the worker).
    max_input_bytes: int = 8 * 1024 * 1024
    #: Bytes of the heartbeat's ``drift`` block at most (the registry takes 16 KiB per
    #: report): when every model's inputs do not fit, each heartbeat carries the next ones
    #: in turn.
    max_report_bytes: int = 12 * 1024

    def check(self, bad: Callable[[str, str], ConfigError]) -> None:
        if not 0 < self.max_per_s <= 10_000:
            raise bad("drift.max_per_s", "must be > 0 and at most 10000")
        if not 1 <= self.slots <= 100:
            raise bad("drift.slots", "must be 1-100")
        if not self.slots <= self.window <= 1_000_000:
            raise bad("drift.window", "must be at least drift.slots and at most 1000000")
        if not 1 <= self.queue <= 1024:
            raise bad("drift.queue", "must be 1-1024")
        if self.max_input_bytes < 1:
            raise bad("drift.max_input_bytes", "must be > 0")
        if not 1024 <= self.max_report_bytes <= 64 * 1024:
            raise bad("drift.max_report_bytes", "must be 1024-65536 (the registry takes "
                                                "16 KiB per report by default)")


#: The largest claim password file read (``edge-sdk claim create`` writes ~33 bytes).
_MAX_CLAIM_PASSWORD_BYTES = 1024


@dataclass(frozen=True)
class IdentityConfig:
    """Enrolment by claim (``[identity]``; the section's presence turns it on): the device
    makes its own key, asks the controller for broker credentials through the claim
    account of ``batch``, and renews them before they expire. ``broker.username`` and
    ``broker.password`` are then not given: the credentials are the controller's."""

    #: The claim batch the device was provisioned with (the claim account's name is
    #: ``_claim-<batch>``).
    batch: str = ""
    #: The claim account's password, read from this file (kept out of the config file).
    claim_password_file: Path | None = None
    #: The claim account's password itself (tests; prefer ``claim_password_file``).
    claim_password: str | None = field(default=None, repr=False)
    #: The device's private key (made on first start, never leaves the device).
    #: Default: ``<state_dir>/identity/device.key``.
    key_file: Path | None = None
    #: Renew when less than this share of the credentials' lifetime is left.
    renew_fraction: float = 0.33
    #: While not enrolled, ask again this often (with +-50 % jitter).
    poll_s: float = 30.0
    #: How long one exchange waits for the controller's answer.
    answer_wait_s: float = 5.0
    #: The claim's broker accounts ("sessions", ``edge-sdk claim create --sessions``): the
    #: device asks through session ``sha256(device id) % claim_sessions``
    #: (``_claim<k>-<batch>``), and through session 0 (``_claim-<batch>``) when the broker
    #: refuses that one (a claim with fewer sessions).
    claim_sessions: int = 16
    #: Facts sent with the enrolment request (shown to the operator who accepts it).
    facts: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))

    def resolved_claim_password(self) -> str:
        if self.claim_password_file is not None:
            where = f"identity.claim_password_file {self.claim_password_file}"
            try:
                # Bounded: a password is short; a device image may hold anything there.
                with open(self.claim_password_file, "rb") as f:
                    raw = f.read(_MAX_CLAIM_PASSWORD_BYTES + 1)
            except OSError as err:
                raise ConfigError(f"{where}: cannot read: {err.strerror}") from None
            if len(raw) > _MAX_CLAIM_PASSWORD_BYTES:
                raise ConfigError(f"{where}: over {_MAX_CLAIM_PASSWORD_BYTES} bytes: "
                                  "expected one password")
            try:
                secret = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not UTF-8 text") from None
            if not secret or any(not ch.isprintable() for ch in secret):
                raise ConfigError(f"{where}: expected one line holding the password "
                                  "('edge-sdk claim create --out' writes it)")
            add_secret(secret)
            return secret
        add_secret(self.claim_password)
        return self.claim_password or ""


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    state_dir: Path
    #: Intra-op threads of the runtime; 0 lets the runtime decide.
    threads: int = 1
    #: Device groups whose deployments this device follows (besides its own id).
    groups: tuple[str, ...] = ()
    #: Facts the operator chose (``{site = "berlin", line = "3"}``), reported in the state
    #: so that rollouts can select devices with ``--tag site=berlin``. Read-only.
    tags: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    #: Enrolment by claim and renewed credentials (None: broker credentials are given).
    identity: IdentityConfig | None = None

    @property
    def identity_dir(self) -> Path:
        """Where the device key, its credentials and the broker's CA bundle live."""
        return self.state_dir / "identity"

    @property
    def key_path(self) -> Path:
        ident = self.identity
        return (ident.key_file if ident is not None and ident.key_file is not None
                else self.identity_dir / "device.key")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AgentConfig:
        """Read and check a TOML config; relative paths are relative to the file."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except OSError as err:
            raise ConfigError(f"{p}: cannot read: {err.strerror}") from err
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: invalid TOML: {err}") from err
        return cls.from_dict(data, where=str(p), base=p.parent.absolute())

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, where: str = "config", base: Path | None = None
    ) -> AgentConfig:
        cfg = _build(cls, data, where, "", base or Path.cwd())
        assert isinstance(cfg, AgentConfig)
        cfg.check(where)
        return cfg

    def check(self, where: str = "config") -> None:
        """Raise :class:`ConfigError` naming the first invalid key (``from_file`` and
        ``from_dict`` call it; a config built field by field may too)."""
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}: {key}: {msg}")

        named = [("device_id", self.device_id), ("fleet", self.fleet)]
        named += [(f"groups[{i}]", g) for i, g in enumerate(self.groups)]
        for key, value in named:
            if not _TOPIC_ID.fullmatch(value):
                why = ("; '.' is refused: NATS closes the connection on a '.' in a topic"
                       if "." in value else "")
                raise bad(key, f"{value!r} must be 1-64 letters, digits, '_' or '-' "
                               f"(it becomes part of MQTT topics){why}")
        _check_labels(bad, "tags", "tag", self.tags)
        url_key = "broker.urls" if self.broker.urls else "broker.url"
        if self.broker.urls and self.broker.url != BrokerConfig.url:
            raise bad("broker", "give either url or urls, not both")
        if not self.broker.all_urls:
            raise bad(url_key, "names no broker (e.g. mqtt://host:1883)")
        for one in self.broker.all_urls:
            u = urlparse(one)
            try:
                u.port  # noqa: B018 (a property that raises for a bad port)
            except ValueError:
                raise bad(url_key, f"{redact_url(one)!r}: invalid port") from None
            if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
                raise bad(url_key, f"{redact_url(one)!r} must look like mqtt://host:1883 "
                                   "or mqtts://host:8883")
        if len({urlparse(one).scheme for one in self.broker.all_urls}) > 1:
            raise bad(url_key, "mixes mqtt:// and mqtts://; use one scheme for every node")
        if not _TOPIC_ID.fullmatch(self.broker.topic_prefix):
            # What MqttConfig checks later, named here with its key.
            raise bad("broker.topic_prefix", "must be one topic level: 1-64 letters, digits, "
                      "'_', '-' (no '.', which NATS refuses in topics)")
        for i, name in enumerate(self.http.allowed_hosts):
            if ":" in name or host_name(name) != name.lower().removesuffix("."):
                raise bad(f"http.allowed_hosts[{i}]", f"{name!r} must be a host name (no "
                          "port, no scheme), e.g. \"cam-1.local\"")
        positive: list[tuple[str, float]] = [
            ("threads", self.threads + 1),
            ("http.max_body_bytes", self.http.max_body_bytes),
            ("http.max_inflight", self.http.max_inflight),
            ("http.queue_timeout_s", self.http.queue_timeout_s),
            ("http.max_connections", self.http.max_connections),
            ("http.listen_backlog", self.http.listen_backlog),
            ("http.idle_timeout_s", self.http.idle_timeout_s),
            ("http.request_timeout_s", self.http.request_timeout_s),
            ("http.max_header_bytes", self.http.max_header_bytes),
            ("http.max_buffered_bytes", self.http.max_buffered_bytes),
            ("http.max_decode_bytes", self.http.max_decode_bytes),
            ("http.max_image_pixels", self.http.max_image_pixels),
            ("health.probe_interval_s", self.health.probe_interval_s),
            ("health.recheck_per_s", self.health.recheck_per_s),
            ("health.recheck_queue", self.health.recheck_queue),
            ("health.recheck_timeout_s", self.health.recheck_timeout_s),
            ("limits.max_artifact_bytes", self.limits.max_artifact_bytes),
            ("limits.max_queued_reports", self.limits.max_queued_reports),
            ("limits.retry_s", self.limits.retry_s),
            ("limits.storage_retry_s", self.limits.storage_retry_s),
            ("telemetry.heartbeat_s", self.telemetry.heartbeat_s),
            ("telemetry.progress_s", self.telemetry.progress_s),
            ("broker.keepalive_s", self.broker.keepalive_s),
            ("profiling.threads", self.profiling.threads + 1),
            ("profiling.max_request_bytes", self.profiling.limits.max_request_bytes),
            ("profiling.max_candidates", self.profiling.limits.max_candidates),
            ("profiling.max_candidate_bytes", self.profiling.limits.max_candidate_bytes),
            ("profiling.max_total_bytes", self.profiling.limits.max_total_bytes),
            ("profiling.max_runs", self.profiling.limits.max_runs),
            ("profiling.max_ttl_s", self.profiling.limits.max_ttl_s),
            ("profiling.max_seen", self.profiling.max_seen),
            ("profiling.timeout_s", self.profiling.timeout_s),
            ("shadow.queue", self.shadow.queue),
            ("shadow.max_input_bytes", self.shadow.max_input_bytes),
        ]
        sm = self.samples
        positive += [("samples.max_request_bytes", sm.limits.max_request_bytes),
                     ("samples.max_count", sm.limits.max_count),
                     ("samples.max_bytes", sm.limits.max_bytes),
                     ("samples.max_ttl_s", sm.limits.max_ttl_s),
                     ("samples.max_buffer_bytes", sm.max_buffer_bytes),
                     ("samples.max_buffer_count", sm.max_buffer_count),
                     ("samples.queue", sm.queue), ("samples.max_seen", sm.max_seen),
                     ("samples.keep_s", sm.keep_s), ("samples.chunks_per_s", sm.chunks_per_s)]
        for key, num in positive:
            if num <= 0:
                raise bad(key, "must be > 0")
        for key, num in (("health.window_s", self.health.window_s),
                         ("health.max_p99_ms", self.health.max_p99_ms),
                         ("health.max_restarts", self.health.max_restarts),
                         ("limits.warmup_runs", self.limits.warmup_runs),
                         ("limits.reserve_bytes", self.limits.reserve_bytes),
                         ("limits.max_models_bytes", self.limits.max_models_bytes),
                         ("profiling.max_queued", self.profiling.max_queued),
                         ("profiling.max_warmup", self.profiling.limits.max_warmup),
                         ("profiling.max_memory_bytes", self.profiling.max_memory_bytes)):
            if num < 0:
                raise bad(key, "must be >= 0")
        if not 0.0 < self.shadow.cpu_share <= 1.0:
            raise bad("shadow.cpu_share", "must be > 0 and <= 1 (CPU seconds per second)")
        if self.shadow.max_rss_bytes < 0:
            raise bad("shadow.max_rss_bytes", "must be >= 0 (0: 80 % of "
                                              "limits.max_models_bytes)")
        if not 1 <= self.limits.max_models <= MAX_SERVED_MODELS:
            raise bad("limits.max_models", f"must be 1-{MAX_SERVED_MODELS}")
        if not 0.0 <= self.telemetry.reconnect_jitter_s <= 300.0:
            raise bad("telemetry.reconnect_jitter_s", "must be 0-300 (seconds)")
        if not 0.0 <= self.health.max_error_rate <= 1.0:
            raise bad("health.max_error_rate", "must be between 0 and 1")
        if not 0 <= self.profiling.nice <= 19:
            raise bad("profiling.nice", "must be 0-19")
        if not 0 <= self.http.port <= 65535:
            raise bad("http.port", "must be 0-65535 (0 picks a free port)")
        if (self.broker.tls.cert_file is None) != (self.broker.tls.key_file is None):
            raise bad("broker.tls", "cert_file and key_file go together")
        if self.broker.password is not None and self.broker.password_file is not None:
            raise bad("broker", "give either password or password_file, not both")
        self.drift.check(bad)
        if self.identity is not None:
            self._check_identity(bad)
        for key, path in (("trust.root", self.trust.root),
                          ("trust.deployment_key", self.trust.deployment_key),
                          ("broker.tls.ca_file", self.broker.tls.ca_file),
                          ("broker.tls.cert_file", self.broker.tls.cert_file),
                          ("broker.tls.key_file", self.broker.tls.key_file),
                          ("broker.password_file", self.broker.password_file)):
            if path is not None and not path.is_file():
                raise bad(key, f"{path}: no such file")

    def _check_identity(self, bad: Callable[[str, str], ConfigError]) -> None:
        ident = self.identity
        assert ident is not None
        url_user = any(urlparse(u).username for u in self.broker.all_urls)
        if (self.broker.username is not None or self.broker.password is not None
                or self.broker.password_file is not None or url_user):
            raise bad("identity", "the device's broker credentials come from enrolment: "
                      "remove broker.username and broker.password (or password_file, or "
                      "the user in broker.url), or remove [identity]")
        if not _TOPIC_ID.fullmatch(ident.batch) or len(ident.batch) > 32:
            raise bad("identity.batch", f"{ident.batch!r} must be the claim batch: 1-32 "
                      "letters, digits, '_' or '-'")
        if (ident.claim_password is None) == (ident.claim_password_file is None):
            raise bad("identity", "give the claim account's password: claim_password_file "
                      "(or claim_password), one of them")
        if ident.claim_password_file is not None and not ident.claim_password_file.is_file():
            raise bad("identity.claim_password_file",
                      f"{ident.claim_password_file}: no such file")
        if not 0.0 < ident.renew_fraction < 1.0:
            raise bad("identity.renew_fraction", "must be between 0 and 1 (e.g. 0.33)")
        for key, num in (("identity.poll_s", ident.poll_s),
                         ("identity.answer_wait_s", ident.answer_wait_s)):
            if num <= 0:
                raise bad(key, "must be > 0")
        if not 1 <= ident.claim_sessions <= 256:
            raise bad("identity.claim_sessions", "must be from 1 to 256 (the claim's "
                      "'edge-sdk claim create --sessions')")
        _check_labels(bad, "identity.facts", "fact", ident.facts)


def _check_labels(bad: Callable[[str, str], ConfigError], key: str, what: str,
                  labels: Mapping[str, str]) -> None:
    """The ``tags`` table and the like: at most MAX_TAGS names of 1-64 safe characters,
    values of at most 128 characters without control characters."""
    if len(labels) > MAX_TAGS:
        raise bad(key, f"{len(labels)} {what}s, at most {MAX_TAGS}")
    for k, v in labels.items():
        if not _SAFE_ID.fullmatch(k):
            raise bad(f"{key}.{k}", f"a {what} name must be 1-64 letters, digits, '.', '_' "
                                    "or '-'")
        if not _TAG_VALUE.fullmatch(v):
            raise bad(f"{key}.{k}", "must be at most 128 characters without control "
                                    "characters")


def half_of_memory() -> int:
    """Half of MemTotal (/proc/meminfo), or 0 (no limit) where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _build(cls: type[Any], data: Any, where: str, prefix: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # A "flat" dataclass field reads its own fields from this same table.
    flat = {name: {g.name for g in dataclasses.fields(hints[name])}
            for name, f in fields.items() if f.metadata.get("flat")}
    keys = (set(fields) - set(flat)).union(*flat.values())
    unknown = sorted(set(data) - keys)
    if unknown:
        known = ", ".join(sorted(keys))
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
            f"(known in {'[' + prefix.rstrip('.') + ']' if prefix else 'the top level'}: {known})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name in flat:
            own = {k: v for k, v in data.items() if k in flat[name]}
            kwargs[name] = _build(hints[name], own, where, prefix, base)
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key '{key}'")
            continue
        kwargs[name] = _convert(hints[name], data[name], where, key, base)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str, key: str, base: Path) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0]
    if typing.get_origin(hint) in (dict, collections.abc.Mapping):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: {key} must be a table of strings, like "
                              f'{key} = {{site = "berlin"}}, got {value!r}')
        return types.MappingProxyType(dict(value))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".", base)  # type: ignore[arg-type]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a non-empty path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported setting type")  # pragma: no cover
