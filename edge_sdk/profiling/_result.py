"""Profiling results (device → host): the figures a device measured, unsigned.

The result is unsigned JSON from the device (the broker's ACL says who may
publish on that device's topic); :func:`parse_profiling_result` bounds and
checks it before anything reads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ..errors import VerificationError
from ._request import _ID, _NAME, SPEC

RESULT_TYPE = "edge-profiling-result"
#: Result documents are small; one candidate row is ~300 bytes.
RESULT_MAX_BYTES = 64 * 1024
_MAX_TEXT = 300


class MalformedProfilingResultError(VerificationError):
    """A device's profiling result is not JSON of the expected shape."""



@dataclass(frozen=True)
class CandidateTiming:
    """One candidate as a device measured it (``error`` set: excluded, with the reason)."""

    name: str
    load_ms: float | None = None
    warmup_ms: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    peak_rss_bytes: int | None = None
    max_abs_diff: float | None = None
    runs: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.why_excluded is None

    @property
    def why_excluded(self) -> str | None:
        """Why this candidate has no usable figure (None: it has one)."""
        if self.error is not None:
            return self.error
        if self.median_ms is None:
            return "the device reported no median latency for it"
        return None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ProfilingResult:
    """A device's answer to one request: ``status`` done (timings), or refused / failed
    (``reason``). ``verified`` False: a refusal of a payload whose signature did not check
    (its id only claimed), so not necessarily the answer to the host's real request."""

    id: str
    device: str
    status: str
    reason: str | None = None
    hardware: Mapping[str, Any] = field(default_factory=dict)
    threads: int | None = None
    candidates: tuple[CandidateTiming, ...] = ()
    verified: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"type": RESULT_TYPE, "spec": SPEC, "id": self.id, "device": self.device,
                "status": self.status, "reason": self.reason, "hardware": dict(self.hardware),
                "threads": self.threads, "candidates": [c.to_json() for c in self.candidates],
                "verified": self.verified}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    def timing(self, name: str) -> CandidateTiming | None:
        return next((c for c in self.candidates if c.name == name), None)


_STATUSES = ("done", "refused", "failed")


def parse_profiling_result(payload: bytes) -> ProfilingResult:
    """Check a device's result document (untrusted) and return it; raises
    :class:`MalformedProfilingResultError` with the reason."""
    try:
        doc = loads_bounded(payload, max_bytes=min(RESULT_MAX_BYTES, MESSAGE_MAX_BYTES),
                            max_depth=MESSAGE_MAX_DEPTH)
    except ValueError as err:
        raise MalformedProfilingResultError(f"profiling result refused: {err}") from None
    if not isinstance(doc, dict) or doc.get("type") != RESULT_TYPE:
        raise MalformedProfilingResultError(f"profiling result: 'type' must be {RESULT_TYPE!r}")
    rid, device, status = doc.get("id"), doc.get("device"), doc.get("status")
    if not isinstance(rid, str) or not _ID.fullmatch(rid) or not isinstance(device, str) \
            or not _NAME.fullmatch(device) or status not in _STATUSES:
        raise MalformedProfilingResultError("profiling result: bad 'id', 'device' or 'status'")
    hw = doc.get("hardware")
    threads = doc.get("threads")
    rows = doc.get("candidates")
    if not isinstance(rows, list) or len(rows) > 256:
        raise MalformedProfilingResultError("profiling result: 'candidates' must be a list")
    return ProfilingResult(
        id=rid, device=device, status=str(status), reason=_text(doc.get("reason")),
        hardware=_hardware(hw),
        threads=threads if isinstance(threads, int) and not isinstance(threads, bool)
        else None,
        candidates=tuple(_timing(r, i) for i, r in enumerate(rows)),
        verified=doc.get("verified") is not False)


#: What a device may say about its hardware, and the type each fact must have.
_HW_STR = ("arch", "cpu", "os", "agent")
_HW_INT = ("cores", "usable_cores", "threads")
_HW_LIST = ("cpu_features", "onnxruntime_providers")
_HW_LIST_MAX = 256
_HW_WORD_MAX = 64


def _hardware(hw: Any) -> dict[str, Any]:
    """Only the known facts with the right types (the document is unsigned: anything else
    is dropped, so that reports and manifests never hold what a hostile device sent)."""
    if not isinstance(hw, dict):
        return {}
    out: dict[str, Any] = {}
    for k in _HW_STR:
        if isinstance(hw.get(k), str):
            out[k] = hw[k][:_MAX_TEXT]
    for k in _HW_INT:
        v = hw.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20:
            out[k] = v
    for k in _HW_LIST:
        v = hw.get(k)
        if isinstance(v, list):
            out[k] = [x[:_HW_WORD_MAX] for x in v[:_HW_LIST_MAX] if isinstance(x, str)]
    rt = hw.get("runtimes")
    if isinstance(rt, dict):
        out["runtimes"] = {k[:_HW_WORD_MAX]: v[:_HW_WORD_MAX] for k, v in
                           list(rt.items())[:32] if isinstance(k, str) and isinstance(v, str)}
    return out


def _text(v: Any) -> str | None:
    return " ".join(v.split())[:_MAX_TEXT] if isinstance(v, str) else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    x = float(v)
    return x if math.isfinite(x) and x >= 0 else None


def _timing(row: Any, i: int) -> CandidateTiming:
    if not isinstance(row, dict) or not isinstance(row.get("name"), str) or \
            not _NAME.fullmatch(row["name"]):
        raise MalformedProfilingResultError(f"profiling result: candidates[{i}] has no name")
    rss = row.get("peak_rss_bytes")
    runs = row.get("runs")
    return CandidateTiming(
        name=row["name"], load_ms=_num(row.get("load_ms")),
        warmup_ms=_num(row.get("warmup_ms")), median_ms=_num(row.get("median_ms")),
        p90_ms=_num(row.get("p90_ms")),
        peak_rss_bytes=rss if isinstance(rss, int) and not isinstance(rss, bool) else None,
        max_abs_diff=_num(row.get("max_abs_diff")),
        runs=runs if isinstance(runs, int) and not isinstance(runs, bool) else 0,
        error=_text(row.get("error")))
