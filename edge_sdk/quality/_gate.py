"""Quality gates: what a shadow run must show before a device is promoted.

A gate is written by the operator (``rollout start --gate "agreement>=0.99 over 500
requests within 30m sampling 0.25"``), signed into the shadow deployment, and judged
twice: by the device when its run ends, and again by the controller from the figures the
device reported (the controller never takes the device's word for the verdict).

:class:`ShadowFigures` is what a device reports of a shadow run; it arrives over the
network, so :meth:`ShadowFigures.from_json` treats it as hostile: unknown keys ignored,
numbers clamped, text cut short.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import UsageError

#: What a gate may test: the share of compared requests whose answers agree, the worst
#: single comparison's score (1.0: identical), the shadow model's median latency over the
#: serving model's, and the number of requests the shadow model failed on.
GATE_METRICS = ("agreement", "worst", "latency_ratio", "errors")
_OPS = (">=", "<=", ">", "<")
#: The default time a device may take to compare ``min_requests`` requests.
DEFAULT_TIME_LIMIT_S = 3600.0
MAX_MIN_REQUESTS = 10_000_000
MAX_TIME_LIMIT_S = 30 * 86400.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SYNTAX = ('expected "METRIC>=VALUE over N requests [within DURATION] [sampling RATE]", '
           'e.g. "agreement>=0.99 over 500 requests within 30m"; METRIC is one of '
           + ", ".join(GATE_METRICS))
_GATE = re.compile(
    r"\s*(?P<metric>[a-z_]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[0-9.eE+-]+)"
    r"\s+over\s+(?P<n>[0-9]+)\s+requests?"
    r"(?:\s+within\s+(?P<within>[0-9.]+)\s*(?P<unit>[smhd]?))?"
    r"(?:\s+sampling\s+(?P<rate>[0-9.eE+-]+))?\s*")
#: Outcomes of judging a run.
PASSED, FAILED, INSUFFICIENT = "passed", "failed", "insufficient"


def _decimal(value: float) -> str:
    """A float as the decimal string canonical JSON carries (it has no floats)."""
    return format(Decimal(repr(float(value))).normalize(), "f")


def _number(value: Any, what: str) -> float:
    try:
        out = float(Decimal(str(value))) if isinstance(value, str) else float("nan")
    except InvalidOperation:
        out = float("nan")
    if not math.isfinite(out):
        raise UsageError(f"gate: {what} must be a decimal string, got {str(value)[:40]!r}")
    return out


@dataclass(frozen=True)
class Verdict:
    outcome: str  # PASSED FAILED INSUFFICIENT
    why: str


@dataclass(frozen=True)
class Gate:
    """Pass when ``metric op threshold`` holds over at least ``min_requests`` compared
    requests; the run lasts at most ``time_limit_s``; ``sample_rate`` of the live requests
    is compared. Raises :class:`~edge_sdk.errors.UsageError` for values no run can use."""

    metric: str
    op: str
    threshold: float
    min_requests: int
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise UsageError(f"gate: unknown metric {self.metric[:40]!r}; {_SYNTAX}")
        if self.op not in _OPS:
            raise UsageError(f"gate: unknown comparison {self.op[:4]!r}; {_SYNTAX}")
        if not math.isfinite(self.threshold):
            raise UsageError("gate: the threshold must be a finite number")
        if not 1 <= self.min_requests <= MAX_MIN_REQUESTS:
            raise UsageError(f"gate: 'over N requests' needs 1 <= N <= {MAX_MIN_REQUESTS}")
        if not 0 < self.time_limit_s <= MAX_TIME_LIMIT_S:
            raise UsageError("gate: 'within' must be more than 0 and at most 30d")
        if not 0 < self.sample_rate <= 1:
            raise UsageError("gate: 'sampling' must be in (0, 1]")

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE.fullmatch(text or "")
        if m is None:
            raise UsageError(f"gate {str(text)[:80]!r} not understood: {_SYNTAX}")
        try:
            threshold = float(m["value"])
            rate = float(m["rate"]) if m["rate"] else 1.0
            within = (float(m["within"]) * _UNITS[m["unit"] or "s"]
                      if m["within"] else DEFAULT_TIME_LIMIT_S)
        except ValueError as err:
            raise UsageError(f"gate {text[:80]!r}: {err}; {_SYNTAX}") from err
        return cls(metric=m["metric"], op=m["op"], threshold=threshold,
                   min_requests=int(m["n"]), time_limit_s=within, sample_rate=rate)

    @property
    def text(self) -> str:
        out = f"{self.metric}{self.op}{self.threshold:g} over {self.min_requests} requests"
        out += f" within {_duration(self.time_limit_s)}"
        return out + (f" sampling {self.sample_rate:g}" if self.sample_rate < 1 else "")

    @property
    def condition(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "threshold": _decimal(self.threshold),
                "min_requests": self.min_requests,
                "time_limit_s": _decimal(self.time_limit_s),
                "sample_rate": _decimal(self.sample_rate)}

    @classmethod
    def from_json(cls, d: Any) -> Gate:
        """Read what :meth:`to_json` wrote; :class:`UsageError` (one line) otherwise."""
        if not isinstance(d, Mapping):
            raise UsageError("gate: expected an object")
        n = d.get("min_requests")
        if not isinstance(n, int) or isinstance(n, bool):
            raise UsageError("gate: 'min_requests' must be an integer")
        metric, op = d.get("metric"), d.get("op")
        if not isinstance(metric, str) or not isinstance(op, str):
            raise UsageError("gate: 'metric' and 'op' must be text")
        return cls(metric=metric, op=op, threshold=_number(d.get("threshold"), "threshold"),
                   min_requests=n, time_limit_s=_number(d.get("time_limit_s"), "time_limit_s"),
                   sample_rate=_number(d.get("sample_rate"), "sample_rate"))

    def value(self, figures: ShadowFigures) -> float | None:
        """The figure this gate tests (None: not measured yet)."""
        if self.metric == "agreement":
            return figures.agreement
        if self.metric == "worst":
            return figures.worst
        if self.metric == "latency_ratio":
            return figures.latency_ratio
        return float(figures.errors)

    def judge(self, figures: ShadowFigures) -> Verdict:
        """Passed, failed, or insufficient (fewer than ``min_requests`` compared)."""
        said = figures.summary()
        if figures.compared < self.min_requests:
            return Verdict(INSUFFICIENT, f"{figures.compared} of {self.min_requests} "
                                         f"requests compared ({said})")
        v = self.value(figures)
        ok = v is not None and {">=": v >= self.threshold, "<=": v <= self.threshold,
                                ">": v > self.threshold, "<": v < self.threshold}[self.op]
        return Verdict(PASSED if ok else FAILED, f"{said} (gate {self.condition})")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_TEXT_MAX = 200
_COUNT_MAX = 2**53


def _count(v: Any) -> int:
    return min(max(v, 0), _COUNT_MAX) if isinstance(v, int) and not isinstance(v, bool) else 0


def _real(v: Any, low: float = 0.0, high: float = 1e9) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return min(max(float(v), low), high)


@dataclass(frozen=True)
class ShadowFigures:
    """A shadow run's figures: requests compared and agreeing, shadow failures, requests
    not compared (queue full, limits), the worst comparison (score: 1.0 identical, 0.0
    nothing alike) and what it was, and both models' latencies on the compared requests."""

    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped: int = 0
    worst: float | None = None
    worst_detail: str | None = None
    serving_ms_p50: float | None = None
    serving_ms_p99: float | None = None
    shadow_ms_p50: float | None = None
    shadow_ms_p99: float | None = None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def latency_ratio(self) -> float | None:
        if not self.serving_ms_p50 or self.shadow_ms_p50 is None:
            return None
        return self.shadow_ms_p50 / self.serving_ms_p50

    def summary(self) -> str:
        """One phrase: "agreement 0.987 over 500, worst 0.41 (row 0: class 3 -> 5)"."""
        if not self.compared:
            out = "nothing compared"
        else:
            out = f"agreement {self.agreement:.4g} over {self.compared}"
            if self.worst is not None:
                out += f", worst {self.worst:.3g}"
                if self.worst_detail:
                    out += f" ({self.worst_detail})"
        if self.errors:
            out += f", {self.errors} shadow error(s)"
        if self.latency_ratio is not None:
            out += f", latency {self.latency_ratio:.2f}x"
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compared": self.compared, "agreed": self.agreed,
                               "errors": self.errors, "dropped": self.dropped}
        for k in ("worst", "worst_detail", "serving_ms_p50", "serving_ms_p99",
                  "shadow_ms_p50", "shadow_ms_p99"):
            v = getattr(self, k)
            if v is not None:
                out[k] = round(v, 6) if isinstance(v, float) else v
        if self.agreement is not None:
            out["agreement"] = round(self.agreement, 6)
        return out

    @classmethod
    def from_json(cls, d: Any) -> ShadowFigures:
        """Figures from a device's report; anything malformed reads as absent (a device's
        mistake never raises here)."""
        if not isinstance(d, Mapping):
            return cls()
        compared = _count(d.get("compared"))
        detail = d.get("worst_detail")
        return cls(
            compared=compared, agreed=min(_count(d.get("agreed")), compared),
            errors=_count(d.get("errors")), dropped=_count(d.get("dropped")),
            worst=_real(d.get("worst"), 0.0, 1.0),
            worst_detail=detail[:_TEXT_MAX] if isinstance(detail, str) else None,
            serving_ms_p50=_real(d.get("serving_ms_p50")),
            serving_ms_p99=_real(d.get("serving_ms_p99")),
            shadow_ms_p50=_real(d.get("shadow_ms_p50")),
            shadow_ms_p99=_real(d.get("shadow_ms_p99")),
        )
