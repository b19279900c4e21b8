"""The durable state directory.

Layout::

    state_dir/
      installed.json       the models served / replaced, the install phase
      models/<id>/         complete, verified artifact directories (never edited in place)
      staging/<digest>/    downloads in progress (kept across restarts: fetch resumes)
      partial/             the release client's resumable partial downloads
      outbox/              reports waiting for the broker
      seen/profiling.json  ids of the profiling requests admitted, until they expire

Serving never needs to write here: :meth:`StateStore.load` and the model files are
only read, and every cleanup ignores what it cannot delete, so a full or read-only
state directory still boots into the last verified model.

``installed.json`` is the single source of truth and is only ever replaced
atomically (temp file + fsync + rename). A model directory appears under
``models/`` by an atomic rename of a fully written and fsynced directory
*before* ``installed.json`` names it, and disappears only *after*
``installed.json`` stopped naming it. So ``kill -9`` at any instant leaves
either the old or the new ``installed.json``, and every model it names is
complete on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_sdk import Artifact
from edge_sdk._internal import (
    MANIFEST_NAME,
    REPORT_NAME,
    atomic_write_bytes,
    atomic_write_text,
    loads_bounded,
    staged_dir,
)
from edge_sdk.errors import ConfigError, InstallError

STATE_FILE = "installed.json"
_STATE_SCHEMA = 2
#: Results kept in the state (the newest last).
MAX_RESULTS = 8
#: Model names whose deciding counter is remembered (see ``InstalledState.counters``).
MAX_COUNTERS = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: How many refused or failed deployments are remembered so they are not retried.
_MAX_FAILED = 32
#: The profiling request ids this device admitted (its own directory: ``clean`` deletes
#: stray temp files in the state root, which an atomic write of this file makes).
SEEN_FILE = Path("seen") / "profiling.json"
_SEEN_SCHEMA = 1
_REQUEST_ID = re.compile(r"[0-9a-f]{16,64}")
#: Bytes one remembered id takes in the file at most (64 hex digits, an expiry, quotes).
_SEEN_ENTRY_BYTES = 96
#: Past 9999-12-31: no expiry a request can carry (the record then is not ours).
_SEEN_MAX_TS = 253402300800


@dataclass(frozen=True)
class ModelRecord:
    """One installed model: where it lives under ``models/`` and what it is."""

    id: str
    name: str
    version: str
    sha256: str
    #: The deployment that installed it (its digest), or None for a model installed by hand.
    deployment: str | None = None

    @classmethod
    def for_artifact(cls, art: Artifact, deployment: str | None) -> ModelRecord:
        m = art.manifest
        ident = _UNSAFE.sub("_", f"{m.name}-{m.version}")[:80] + "-" + m.sha256[:12]
        return cls(ident, m.name, m.version, m.sha256, deployment)

    def stored_apart(self) -> ModelRecord:
        """The record under the id used when :attr:`id` already holds another model: the
        same file as another name and version whose id text is the same ("det-1" "x" and
        "det" "1-x"; names and versions cut at 80 characters)."""
        exact = hashlib.sha256(f"{self.name}\0{self.version}".encode()).hexdigest()[:8]
        return replace(self, id=f"{self.id}-{exact}")

    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ShadowRun:
    """A shadow run in progress (``installed.json``'s ``shadow``): the candidates stored
    under ``models/`` and compared with the served models of the same names, the signed
    terms of the run, and when it started (wall clock: a restart resumes the run and
    keeps its deadline, ``started + time_limit_s``)."""

    deployment: int
    digest: str
    models: tuple[ModelRecord, ...]
    sample_rate: float
    min_requests: int
    time_limit_s: float
    gate: dict[str, Any] | None
    started: float

    def to_json(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "digest": self.digest,
                "models": [asdict(r) for r in self.models], "sample_rate": self.sample_rate,
                "min_requests": self.min_requests, "time_limit_s": self.time_limit_s,
                "gate": self.gate, "started": self.started}

    @classmethod
    def from_json(cls, data: Any) -> ShadowRun:
        if not isinstance(data, dict):
            raise TypeError("the shadow run is not an object")
        gate = data.get("gate")
        return cls(deployment=int(data["deployment"]), digest=str(data["digest"]),
                   models=tuple(ModelRecord(**r) for r in data["models"]),
                   sample_rate=float(data["sample_rate"]),
                   min_requests=int(data["min_requests"]),
                   time_limit_s=float(data["time_limit_s"]),
                   gate=dict(gate) if isinstance(gate, dict) else None,
                   started=float(data["started"]))

    @property
    def deadline(self) -> float:
        return self.started + self.time_limit_s


@dataclass(frozen=True)
class InstalledState:
    """``installed.json``: the set of models the device serves and what it knows about the
    deployments it saw. Pure data; :class:`StateStore` reads and writes it.

    Schema 2 (several models); a schema-1 file (one ``current`` model) is read and
    migrated (:meth:`from_json`), and the next save writes schema 2."""

    #: The served set (committed, or on trial), by model name.
    models: dict[str, ModelRecord] = field(default_factory=dict)
    #: The version each model replaced, kept on disk (a delta base, a local rollback).
    previous: dict[str, ModelRecord] = field(default_factory=dict)
    #: "committed", or "trial" while the set's new models are inside their health window.
    phase: str = "committed"
    #: In a trial: for each name the set under trial changed, what it was before (None:
    #: the model was absent). A rollback puts these back.
    trial: dict[str, ModelRecord | None] = field(default_factory=dict)
    #: Agent starts seen during the current trial (crash-loop guard).
    trial_boots: int = 0
    #: Highest deployment counter accepted (for display).
    deployment_counter: int = 0
    #: Per scope ("device", "group:NAME"): the last counter accepted from it; an older
    #: or equal one is a replay. A scope not listed starts at ``floor``.
    scopes: dict[str, int] = field(default_factory=dict)
    #: Per model name: the counter of the deployment that last decided it (installed or
    #: removed it); an older deployment does not decide it again. A name not listed
    #: starts at ``floor``.
    counters: dict[str, int] = field(default_factory=dict)
    floor: int = 0
    #: Digest of the deployment the device last acted on (installed, refused or failed).
    deployment_digest: str | None = None
    #: Deployment digest → reason, for deployments that failed and must not be retried.
    failed: dict[str, str] = field(default_factory=dict)
    last_result: dict[str, Any] | None = None
    #: The last :data:`MAX_RESULTS` results, newest last.
    results: tuple[dict[str, Any], ...] = ()
    #: The shadow run in progress (None: none).
    shadow: ShadowRun | None = None
    #: By name: the candidates of the last shadow run that ended, kept on disk (not
    #: loaded) so that a deployment promoting one needs no download; dropped once a
    #: deployment decides that name.
    shadow_kept: dict[str, ModelRecord] = field(default_factory=dict)

    @property
    def current(self) -> ModelRecord | None:
        """The most recently installed model (the one the newest counter decided): what
        readers of one model are told."""
        if not self.models:
            return None
        return max(self.models.values(),
                   key=lambda r: (self.counters.get(r.name, self.floor), r.name))

    def counter_of(self, name: str) -> int:
        return self.counters.get(name, self.floor)

    def scope_counter(self, scope: str) -> int:
        return self.scopes.get(scope, self.floor)

    def to_json(self) -> dict[str, Any]:
        def recs(d: dict[str, Any]) -> dict[str, Any]:
            return {k: None if v is None else asdict(v) for k, v in sorted(d.items())}

        return {
            "schema": _STATE_SCHEMA, "models": recs(self.models),
            "previous": recs(self.previous), "phase": self.phase, "trial": recs(self.trial),
            "trial_boots": self.trial_boots, "deployment_counter": self.deployment_counter,
            "scopes": dict(self.scopes), "counters": dict(self.counters),
            "floor": self.floor, "deployment_digest": self.deployment_digest,
            "failed": dict(self.failed), "last_result": self.last_result,
            "results": list(self.results),
            "shadow": None if self.shadow is None else self.shadow.to_json(),
            "shadow_kept": recs(self.shadow_kept),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> InstalledState:
        if not isinstance(data, dict) or data.get("schema") not in (1, _STATE_SCHEMA):
            raise ConfigError(f"{where}: not an agent state file of schema {_STATE_SCHEMA}")
        try:
            if data["schema"] == 1:
                return _from_schema_1(data)

            def recs(value: Any, *, absent: bool = False) -> dict[str, Any]:
                if not isinstance(value, dict):
                    raise TypeError("a table of models is not an object")
                return {str(k): None if v is None and absent else ModelRecord(**v)
                        for k, v in value.items()}

            return cls(
                models=recs(data.get("models") or {}),
                previous=recs(data.get("previous") or {}),
                phase=str(data.get("phase", "committed")),
                trial=recs(data.get("trial") or {}, absent=True),
                trial_boots=int(data.get("trial_boots", 0)),
                deployment_counter=int(data.get("deployment_counter", 0)),
                scopes={str(k): int(v) for k, v in (data.get("scopes") or {}).items()},
                counters={str(k): int(v) for k, v in (data.get("counters") or {}).items()},
                floor=int(data.get("floor", 0)),
                deployment_digest=data.get("deployment_digest"),
                failed=dict(data.get("failed") or {}),
                last_result=data.get("last_result"),
                # Each entry is read by the lifecycle: anything but an object is dropped.
                results=tuple(r for r in data.get("results") or ()
                              if isinstance(r, dict))[-MAX_RESULTS:],
                shadow=None if data.get("shadow") is None
                else ShadowRun.from_json(data["shadow"]),
                shadow_kept=recs(data.get("shadow_kept") or {}),
            )
        except (TypeError, ValueError, AttributeError, KeyError) as err:
            raise ConfigError(f"{where}: malformed agent state: {err}") from err

    def with_failed(self, digest: str, reason: str) -> InstalledState:
        failed = dict(self.failed)
        failed.pop(digest, None)
        failed[digest] = reason
        while len(failed) > _MAX_FAILED:
            failed.pop(next(iter(failed)))
        return replace(self, failed=failed)

    def with_result(self, result: dict[str, Any]) -> InstalledState:
        """``result`` as ``last_result`` and, when it names a deployment, the newest of
        ``results`` (one entry per deployment: a later outcome replaces an earlier one)."""
        results = self.results
        if "deployment" in result:
            results = (*(r for r in results if r.get("deployment") != result["deployment"]),
                       result)[-MAX_RESULTS:]
        return replace(self, last_result=result, results=results)

    def with_counters(self, scope: str, counter: int,
                      names: Iterable[str]) -> InstalledState:
        """Deployment ``counter`` from ``scope`` accepted, deciding ``names``."""
        counters = {**self.counters, **{n: counter for n in names}}
        floor = self.floor
        if len(counters) > MAX_COUNTERS:
            # Forget the names decided longest ago; the floor rises to the newest of those,
            # so that an old deployment of a forgotten name is still not taken.
            order = sorted(counters.items(), key=lambda kv: (kv[1], kv[0]))
            cut = len(order) - MAX_COUNTERS
            floor = max(floor, order[cut - 1][1])
            counters = dict(order[cut:])
        return replace(self, scopes={**self.scopes, scope: max(counter,
                                                               self.scope_counter(scope))},
                       counters=counters, floor=floor,
                       deployment_counter=max(self.deployment_counter, counter))


def _from_schema_1(data: dict[str, Any]) -> InstalledState:
    """A state file of an agent that served one model: its ``current`` becomes the set,
    its counter the ``floor`` of every scope and model."""

    def rec(value: Any) -> ModelRecord | None:
        return None if value is None else ModelRecord(**value)

    current, previous = rec(data.get("current")), rec(data.get("previous"))
    counter = int(_renamed(data, "deployment_counter", "deployment_version", 0))
    phase = str(data.get("phase", "committed"))
    models = {} if current is None else {current.name: current}
    trial: dict[str, ModelRecord | None] = {}
    if phase == "trial" and current is not None:
        # One slot: the model on trial replaced ``previous``, whatever its name.
        trial[current.name] = previous if previous and previous.name == current.name \
            else None
        if previous is not None and previous.name != current.name:
            trial[previous.name] = previous
    last = data.get("last_result")
    return InstalledState(
        models=models, previous={} if previous is None else {previous.name: previous},
        phase=phase if current is not None else "committed", trial=trial,
        trial_boots=int(data.get("trial_boots", 0)), deployment_counter=counter,
        counters={} if current is None else {current.name: counter}, floor=counter,
        deployment_digest=_renamed(data, "deployment_digest", "deployment_key", None),
        failed=dict(data.get("failed") or {}), last_result=last,
        results=(last,) if isinstance(last, dict) and "deployment" in last else ())


def _renamed(data: dict[str, Any], key: str, old: str, default: Any) -> Any:
    """``data[key]``, or the value under ``old``, the name a previous agent wrote it under
    (a device upgraded in place keeps its state; the next save writes the new name)."""
    return data[key] if key in data else data.get(old, default)


class StateStore:
    """The state directory. All methods are called from one thread (the agent's worker)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.staging = root / "staging"
        self.outbox = root / "outbox"
        #: Resumable downloads of the release client (kept while an install is pending).
        self.partial = root / "partial"
        try:
            for d in (self.root, self.models, self.staging, self.outbox):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"state_dir {root}: cannot create: {err.strerror}") from err
        self._file = root / STATE_FILE

    def load(self) -> InstalledState:
        try:
            raw = self._file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return InstalledState()
        except OSError as err:
            raise ConfigError(f"{self._file}: cannot read: {err.strerror}") from err
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{self._file}: invalid JSON: {err.msg}") from err
        return InstalledState.from_json(data, str(self._file))

    def save(self, state: InstalledState) -> None:
        """Replace the state file atomically; OSError when the directory cannot be written."""
        atomic_write_text(self._file, json.dumps(state.to_json(), indent=2) + "\n")

    def probe(self) -> None:
        """Write, sync and delete a small file; OSError when the directory cannot be written."""
        atomic_write_text(self.root / ".probe", "ok\n")
        os.unlink(self.root / ".probe")

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use on the state directory's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def model_dir(self, record: ModelRecord) -> Path:
        return self.models / record.id

    def open_model(self, record: ModelRecord, *, verify_hash: bool = True) -> Artifact:
        """The installed artifact, with its manifest and (unless ``verify_hash`` is False:
        only for a model :meth:`adopt` stored a moment ago) its hash re-verified."""
        art = Artifact.from_dir(self.model_dir(record), verify_hash=verify_hash)
        m = art.manifest
        if m.sha256 != record.sha256:
            raise InstallError(
                f"{self.model_dir(record)}: holds sha256 {m.sha256[:16]}…, the state "
                f"file expects {record.sha256[:16]}… for {record.label()}"
            )
        if (m.name, m.version) != (record.name, record.version):
            raise InstallError(f"{self.model_dir(record)}: holds {m.name} {m.version}, the "
                               f"state file expects {record.label()}")
        return art

    def model_file(self, record: ModelRecord) -> Path | None:
        """The model file of an installed model (not re-hashed; None when it is gone)."""
        try:
            art = Artifact.from_dir(self.model_dir(record), verify_hash=False)
        except Exception:
            return None
        return art.model_path if art.manifest.sha256 == record.sha256 else None

    def find(self, sha256: str) -> ModelRecord | None:
        """A complete model directory already on disk with this model hash (for rollbacks)."""
        for d in sorted(self.models.iterdir()):
            if d.name.startswith(".") or f"-{sha256[:12]}" not in d.name:
                continue
            try:
                art = Artifact.from_dir(d, verify_hash=False)
            except Exception:
                continue
            record = ModelRecord.for_artifact(art, None)
            if art.manifest.sha256 == sha256 and d.name in (record.id,
                                                            record.stored_apart().id):
                return replace(record, id=d.name)
        return None

    def adopt(self, artifact: Artifact, deployment: str | None, *,
              verified: bool = False) -> ModelRecord:
        """Put a verified artifact into ``models/`` (atomically) and return its record. An
        artifact under ``staging/`` is moved, not copied, so an install needs the model's
        size once, not twice.

        ``verified``: the caller has checked the model's bytes against the manifest's
        sha256 (hashed them, or was told the hash a source checked them against as it
        wrote them into staging); a moved model is then not hashed again. A copy always
        is: its source is outside the state directory and may have changed since."""
        record = ModelRecord.for_artifact(artifact, deployment)
        if self._holds_another(record):
            record = record.stored_apart()
        target = self.model_dir(record)
        if target.is_dir():
            try:
                self.open_model(record)
                return record
            except Exception:
                pass  # a damaged copy: replace it below
        move = artifact.path.resolve().is_relative_to(self.staging.resolve())
        names = [MANIFEST_NAME, artifact.manifest.model, REPORT_NAME]
        if artifact.manifest.sample:
            names.append(artifact.manifest.sample)
        try:
            with staged_dir(target, overwrite=True) as tmp:
                for name in names:
                    src = artifact.path / name
                    if not src.is_file():
                        continue
                    if move:
                        os.replace(src, tmp / name)
                    else:
                        shutil.copyfile(src, tmp / name)
                stored = Artifact.from_dir(tmp, verify_hash=not (move and verified))
                if stored.manifest.sha256 != record.sha256:
                    raise InstallError(f"{artifact.path}: its manifest changed while it was "
                                       f"stored under {self.models}")
        except OSError as err:
            raise InstallError(f"cannot store {record.label()} under {self.models}: "
                               f"{err.strerror or err}") from err
        return record

    def _holds_another(self, record: ModelRecord) -> bool:
        """Whether ``record``'s directory holds a model of another name or version."""
        try:
            m = Artifact.from_dir(self.model_dir(record), verify_hash=False).manifest
        except Exception:
            return False
        return (m.name, m.version) != (record.name, record.version)

    def staging_dir(self, digest: str) -> Path:
        d = self.staging / _UNSAFE.sub("_", digest)[:120]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def clean(self, *states: InstalledState) -> None:
        """Delete model dirs none of ``states`` names (the one in memory and the one on
        disk, when a save failed), every staging dir and stale temp files. What cannot be
        deleted (a read-only disk) is left for the next cleanup."""
        keep = {r.id for st in states
                for r in (*st.models.values(), *st.previous.values(), *st.trial.values(),
                          *(st.shadow.models if st.shadow else ()),
                          *st.shadow_kept.values())
                if r is not None}
        for parent in (self.models, self.staging):
            for d in _entries(parent):
                if parent is self.staging or d.name not in keep:
                    _remove(d)
        # A rebuilt delta target is moved away by the fetch that wrote it: one left here is
        # from a fetch a crash interrupted (clean never runs during a fetch).
        for f in (*self.root.glob(".*.tmp"), self.root / ".probe",
                  *_entries_matching(self.partial, "*.applied")):
            _remove(f)

    def clean_partial(self) -> None:
        """Drop resumable partial downloads (once an install is settled)."""
        for f in _entries(self.partial):
            _remove(f)


def _entries_matching(parent: Path, pattern: str) -> list[Path]:
    try:
        return list(parent.glob(pattern))
    except OSError:
        return []


def _entries(parent: Path) -> list[Path]:
    try:
        return list(parent.iterdir())
    except OSError:
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SeenRecord:
    """The profiling requests this device admitted, each kept until its request expires
    (after that the request is refused as expired anyway), so that a restart does not make
    a replay of one look new.

    ``ids`` maps a request id to its expiry (Unix seconds). ``floor``: requests expiring at
    or before it are refused, because ids they may have had are no longer known: the
    record was lost (unreadable file), or an unexpired id was dropped to keep the record
    within ``max_seen`` entries. Pure: :func:`read_seen` and :func:`write_seen` do the I/O.
    """

    ids: dict[str, int] = field(default_factory=dict)
    floor: int = 0

    def pruned(self, now: float) -> SeenRecord:
        """Without what expired at ``now`` (such a request is refused as expired)."""
        return SeenRecord({k: v for k, v in self.ids.items() if v > now},
                          self.floor if self.floor > now else 0)

    def bounded(self, max_seen: int) -> SeenRecord:
        """At most ``max_seen`` ids: those expiring first go, and ``floor`` rises to the
        latest expiry among them, so that their replays are still refused."""
        if len(self.ids) <= max_seen:
            return self
        order = sorted(self.ids.items(), key=lambda kv: (kv[1], kv[0]))
        cut = len(order) - max_seen
        return SeenRecord(dict(order[cut:]), max(self.floor, order[cut - 1][1]))

    def to_bytes(self) -> bytes:
        return json.dumps({"schema": _SEEN_SCHEMA, "floor": self.floor, "ids": self.ids},
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_seen: int, where: str) -> SeenRecord:
        """Parse the file (bounded: :func:`seen_max_bytes`); ValueError says what is wrong."""
        try:
            doc = loads_bounded(raw, max_bytes=seen_max_bytes(max_seen), max_depth=4)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not isinstance(doc, dict) or doc.get("schema") != _SEEN_SCHEMA:
            raise ValueError(f"{where}: not a record of seen requests of schema {_SEEN_SCHEMA}")
        ids, floor = doc.get("ids"), doc.get("floor")
        if not isinstance(floor, int) or not _stamp(floor) or not isinstance(ids, dict) or \
                not all(isinstance(k, str) and _REQUEST_ID.fullmatch(k) and _stamp(v)
                        for k, v in ids.items()):
            raise ValueError(f"{where}: malformed 'floor' or 'ids'")
        return cls(dict(ids), floor)


def _stamp(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _SEEN_MAX_TS


def seen_max_bytes(max_seen: int) -> int:
    """The most bytes a record of ``max_seen`` ids takes (a longer file is not ours)."""
    return 128 + max_seen * _SEEN_ENTRY_BYTES


def read_seen(state_dir: Path, *, max_seen: int, max_ttl_s: float, now: float,
              name: str = "profiling") -> tuple[SeenRecord, str | None]:
    """The record of seen profiling requests, pruned at ``now`` and bounded, and why it had
    to be rebuilt (None when it was read, or is simply not there yet).

    Unreadable, oversized or malformed, the record is lost; every request admitted
    before expires within ``max_ttl_s`` (the longest lifetime the device accepts), so
    the new record refuses all requests expiring before ``now + max_ttl_s``: a replay is
    refused, and the agent stays up. ``name``: whose requests (``seen/NAME.json``:
    ``profiling``, ``samples``)."""
    path = state_dir / SEEN_FILE.with_name(f"{name}.json")
    cap = seen_max_bytes(max_seen)
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
        record = SeenRecord.from_bytes(raw, max_seen=max_seen, where=str(path))
    except FileNotFoundError:
        return SeenRecord(), None
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        floor = min(_SEEN_MAX_TS - 1, math.ceil(now + max_ttl_s))
        return SeenRecord({}, floor), why
    return record.pruned(now).bounded(max_seen), None


def write_seen(state_dir: Path, record: SeenRecord, name: str = "profiling") -> None:
    """Replace the record atomically; OSError when the state directory cannot be written."""
    path = state_dir / SEEN_FILE.with_name(f"{name}.json")
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, record.to_bytes())
