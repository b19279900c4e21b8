"""The host's view of input drift: a device's reported histograms judged against the
reference of the artifact version it serves.

A heartbeat's ``drift`` block (device_agent._drift) holds, per model and input, the
request count ``n`` and per-channel figures with histograms on the reference's edges.
:class:`DriftJudge` never trusts the device's own ``psi``: it looks up the served
version's ``input_stats`` in the release repository's signed targets metadata (the
manifest rides there) and recomputes PSI and the chi-square test per channel
(:func:`edge_sdk.quality.judge_input`, thresholds in :class:`DriftConfig`).

The block is hostile input: at most :data:`MAX_MODELS` models (only those the same
heartbeat says it serves) of :data:`MAX_INPUTS` inputs, names up to
:data:`MAX_NAME` characters, each input's figures checked by
:meth:`ReportedInput.from_json`; anything else is left out and counted in ``refused``.
A device that sends only some inputs per heartbeat (its budget) keeps the others'
last figures, as long as it serves the same version.

What the registry stores (``devices.drift``)::

    {"at": ts, "models": {model: {"version": v, "inputs": {input: InputDrift json
     + {"mean": [device, reference], "std": [...]} of the worst channel}}},
     "flagged": ["model/input", ...], "warn": [...], "refused": n}

``devices.drifting`` is 1 when ``flagged`` is not empty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..quality._drift import (
    ALERT,
    FEW,
    NO_REFERENCE,
    OK,
    WARN,
    DriftConfig,
    Reference,
    ReportedInput,
    judge_input,
)

log = logging.getLogger("edge_sdk.fleet.drift")

MAX_MODELS = 16
MAX_INPUTS = 32
MAX_NAME = 256

#: (model name, version) -> its inputs' references (empty: the version has none).
References = Callable[[str, str], Mapping[str, Reference] | None]


class ReleaseReferences:
    """References read from a release repository's targets metadata, cached per
    (name, version); the metadata is read again on a miss at most every ``reread_s``."""

    def __init__(self, repository: Any, reread_s: float = 30.0) -> None:
        self._repo = repository
        self._reread_s = reread_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], dict[str, Reference]] = {}
        self._read_at = -1e18

    def __call__(self, name: str, version: str) -> Mapping[str, Reference] | None:
        key = (name, version)
        with self._lock:
            got = self._cache.get(key)
            if got is not None:
                return got
            now = time.monotonic()
            if now - self._read_at < self._reread_s:
                return None
            self._read_at = now
            try:
                targets = self._repo.targets()
            except Exception as err:  # a repository mid-write, or gone: try again later
                log.warning("drift: cannot read the release metadata: %s", err)
                return None
            for t in targets:
                stats = t.manifest.get("input_stats") if isinstance(t.manifest, Mapping) \
                    else None
                refs: dict[str, Reference] = {}
                if isinstance(stats, Mapping):
                    for inp, doc in stats.items():
                        r = Reference.from_json(doc)
                        if r is not None:
                            refs[str(inp)] = r
                self._cache[(t.name, t.version)] = refs
            return self._cache.get(key)


def _name(v: object) -> str | None:
    return v if isinstance(v, str) and 0 < len(v) <= MAX_NAME and v.isprintable() else None


class DriftJudge:
    """Turns a heartbeat's drift block into the stored document (see the module)."""

    def __init__(self, config: DriftConfig | None = None,
                 references: References | None = None) -> None:
        self.config = config or DriftConfig()
        self.references = references

    def judge(self, block: object, served: object, old: Mapping[str, Any] | None,
              now: float) -> tuple[dict[str, Any], bool] | None:
        """The new stored document and whether the device is drifting; None when
        ``block`` is not a drift block at all (nothing to store)."""
        if not isinstance(block, Mapping):
            return None
        versions: dict[str, str] = {}
        if isinstance(served, list):
            for m in served[:MAX_MODELS * 4]:
                if isinstance(m, Mapping) and _name(m.get("name")) is not None \
                        and _name(m.get("version")) is not None:
                    versions[m["name"]] = m["version"]
        refused = 0
        old_models = old.get("models") if isinstance(old, Mapping) else None
        models: dict[str, dict[str, Any]] = {}
        # what was stored and is still served at the same version stays
        if isinstance(old_models, Mapping):
            for name, m in old_models.items():
                if isinstance(m, Mapping) and versions.get(name) == m.get("version") \
                        and isinstance(m.get("inputs"), Mapping):
                    models[name] = {"version": m["version"], "inputs": dict(m["inputs"])}
        for k, (name, inputs) in enumerate(block.items()):
            if k >= MAX_MODELS or _name(name) is None or name not in versions \
                    or not isinstance(inputs, Mapping):
                refused += 1
                continue
            version = versions[name]
            refs = self.references(name, version) if self.references is not None else None
            entry = models.get(name)
            if entry is None or entry["version"] != version:
                entry = models[name] = {"version": version, "inputs": {}}
            for j, (inp, doc) in enumerate(inputs.items()):
                reported = ReportedInput.from_json(doc)
                if j >= MAX_INPUTS or _name(inp) is None or reported is None:
                    refused += 1
                    continue
                ref = refs.get(inp) if refs else None
                verdict = judge_input(ref, reported, self.config)
                out = verdict.to_json()
                w = verdict.worst_channel
                if w is not None and ref is not None:
                    out["mean"] = [reported.channels[w].get("mean"), _ref_stat(ref, w, "mean")]
                    out["std"] = [reported.channels[w].get("std"), _ref_stat(ref, w, "std")]
                entry["inputs"][inp] = out
            if len(entry["inputs"]) > MAX_INPUTS:
                entry["inputs"] = dict(list(entry["inputs"].items())[:MAX_INPUTS])
        models = dict(list(models.items())[:MAX_MODELS])
        flagged = sorted(f"{m}/{i}" for m, e in models.items()
                         for i, d in e["inputs"].items() if d.get("level") == ALERT)
        warn = sorted(f"{m}/{i}" for m, e in models.items()
                      for i, d in e["inputs"].items() if d.get("level") == WARN)
        return ({"at": now, "models": models, "flagged": flagged, "warn": warn,
                 "refused": refused}, bool(flagged))


def _ref_stat(ref: Reference, channel: int, key: str) -> float | None:
    v = ref.stats[channel].get(key) if channel < len(ref.stats) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def drift_line(drift: object) -> str:
    """One table cell for ``edge-sdk status``: ``-`` (nothing reported), ``ok``,
    ``warn model/input psi 0.14``, ``DRIFT model/input psi 0.41`` (the worst input)."""
    if not isinstance(drift, Mapping) or not isinstance(drift.get("models"), Mapping):
        return "-"
    worst: tuple[int, float, str] | None = None
    rank = {ALERT: 4, WARN: 3, OK: 2, FEW: 1, NO_REFERENCE: 0}
    for m, e in drift["models"].items():
        inputs = e.get("inputs") if isinstance(e, Mapping) else None
        if not isinstance(inputs, Mapping):
            continue
        for i, d in inputs.items():
            if not isinstance(d, Mapping) or d.get("level") not in rank:
                continue
            p = d.get("psi_max")
            p = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else 0.0
            if worst is None or (rank[d["level"]], p) > worst[:2]:
                worst = (rank[d["level"]], p, f"{m}/{i}")
    if worst is None:
        return "-"
    r, p, where = worst
    return {4: f"DRIFT {where} psi {p:.2f}", 3: f"warn {where} psi {p:.2f}", 2: "ok",
            1: "few requests", 0: "no reference"}[r]


__all__ = ["DriftJudge", "ReleaseReferences", "drift_line"]
