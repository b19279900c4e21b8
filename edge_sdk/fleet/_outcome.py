"""What really happened to each device of a rollout, and per wave: one summary that the
page and ``rollout status`` both show.

A device's ``status`` alone does not say it: a device that committed the new version and
was then sent back by an abort keeps ``status`` "committed" (its ``rollback_status`` says
"committed" too, of the rollback). :func:`device_outcome` reads both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..quality import ShadowFigures

#: Outcomes, worst first: a wave is shown by its worst. ``gate_failed``: its shadow
#: figures failed the rollout's gate; ``no_traffic``: too few compared requests.
OUTCOMES = ("failed", "gate_failed", "rolled_back", "silent", "rolling_back", "no_traffic",
            "shadowing", "pending", "skipped", "committed")

_FORWARD = {"committed": "committed", "rolled_back": "rolled_back", "failed": "failed",
            "refused": "failed", "silent": "silent", "cancelled": "skipped",
            "pending": "pending", "signing": "pending", "sent": "pending",
            "shadow_signing": "shadowing", "shadowing": "shadowing",
            "gate_failed": "gate_failed", "no_traffic": "no_traffic"}


def device_outcome(status: str, rollback_status: str | None) -> str:
    """One of :data:`OUTCOMES` for a device's rollout row."""
    if status == "cancelled":  # its document ending a shadow run, if any, changes nothing
        return "rolling_back" if rollback_status in ("pending", "signing", "sent") \
            else "skipped"
    if rollback_status == "committed":
        return "rolled_back"  # sent back to its earlier version by the abort
    if rollback_status in ("pending", "signing", "sent"):
        return "rolling_back"
    if rollback_status in ("failed", "silent"):
        return "failed"  # it was to go back and did not: it may still run the new one
    if rollback_status == "withdrawn" and status == "sent":
        return "skipped"  # its document was taken back before it answered
    return _FORWARD.get(status, "pending")


def device_note(reason: str | None, back: str | None, before: str | None,
                rollout_reason: str | None, status: str | None = None) -> str | None:
    """Why a device ended as it did, in words (None when it committed as planned), from
    its row's ``reason``, ``rollback_status``, ``before_version`` and ``status``."""
    if status == "cancelled":
        return reason or None
    if back == "committed":
        return f"rolled back to {before} after the rollout was aborted" + (
            f": {rollout_reason}" if rollout_reason else "")
    if back in ("pending", "signing", "sent"):
        return f"being rolled back to {before}"
    if back == "skipped":
        return "kept the new version: it had no earlier version of this model to go back to"
    return reason or None


def worst(outcomes: Iterable[str]) -> str | None:
    """The worst of ``outcomes`` (None for none)."""
    rank = [OUTCOMES.index(o) for o in outcomes if o in OUTCOMES]
    return OUTCOMES[min(rank)] if rank else None


def wave_summary(wave: int, outcomes: Iterable[str]) -> dict[str, Any]:
    """``{"wave", "devices", "by_outcome" (worst first), "outcome" (the worst)}``."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    by = {o: counts[o] for o in OUTCOMES if o in counts}
    return {"wave": wave, "devices": sum(by.values()), "by_outcome": by,
            "outcome": worst(by)}


#: A gated rollout's devices per wave, by where their shadow run is.
SHADOW_STAGES = ("shadowing", "passed", "failed", "no_traffic")


def shadow_stage(status: str, verdict: str | None) -> str | None:
    """Where a gated device's shadow run is: ``shadowing``, ``passed`` (promoted or about
    to be), ``failed``, ``no_traffic``; None when it has not started one (or never
    needed one: it ran the rollout's versions already)."""
    if status in ("shadow_signing", "shadowing"):
        return "shadowing"
    if status == "gate_failed" or verdict == "failed":
        return "failed"
    if status == "no_traffic" or verdict == "insufficient":
        return "no_traffic"
    if verdict == "passed":
        return "passed"
    return None


def shadow_summary(stages: Iterable[str | None]) -> dict[str, int]:
    """``{stage: count}`` over :data:`SHADOW_STAGES` (only the ones present)."""
    got = [x for x in stages if x is not None]
    return {k: got.count(k) for k in SHADOW_STAGES if k in got}


def shadow_figures(figures: Any) -> dict[str, Any]:
    """What the page and ``rollout status`` show of a shadow run's reported figures (read
    as hostile: :meth:`ShadowFigures.from_json`): ``compared``, ``agreement``, ``worst``,
    ``worst_detail``, ``latency_ratio``, ``errors``, and ``text``, all in one line; {} for
    no figures."""
    if not isinstance(figures, Mapping):
        return {}
    f = ShadowFigures.from_json(figures)
    return {"compared": f.compared, "agreement": f.agreement, "worst": f.worst,
            "worst_detail": f.worst_detail, "latency_ratio": f.latency_ratio,
            "errors": f.errors, "text": f.summary()}


def summary_text(by_outcome: Mapping[str, int]) -> str:
    """``"1 rolled back, 2 skipped"`` (worst first)."""
    return ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in by_outcome.items())


def _n(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def download_text(d: Any) -> str:
    """How a device got a deployment's model, from its ``downloaded`` event's
    ``download``: ``"delta from 1: 5120 bytes vs full 4194432 bytes (0.1 %)"``."""
    if not isinstance(d, Mapping):
        return "not reported"
    kind, got, full = d.get("kind"), _n(d.get("bytes")), _n(d.get("full_bytes"))
    if kind == "local":
        return "a copy the device held (nothing downloaded)"
    if kind == "delta":
        text = f"delta from {d.get('from')}: {got} bytes"
        if full:
            text += f" vs full {full} bytes ({100 * (got or 0) / full:.1f} %)"
        return text
    if kind == "full":
        text = f"full: {got} bytes"
        if d.get("fallback"):
            text += f" (the delta from {d.get('from')} failed: {d.get('fallback')})"
        return text
    return str(d.get("message") or "not reported")


def update_text(u: Mapping[str, Any]) -> str:
    """What became of one update of a device, in words (see ``FleetDB.device_updates``)."""
    back = u.get("rolled_back")
    result = u.get("result")
    if isinstance(back, Mapping) and back.get("by") == "rollout":
        text = f"committed, then rolled back to {back.get('to')} by rollout " \
               f"{back.get('rollout')}'s abort"
        return text + (f": {back['reason']}" if back.get("reason") else "")
    if isinstance(back, Mapping):
        return f"rolled back by the device to {back.get('to') or 'its previous model'}" + (
            f": {back['reason']}" if back.get("reason") else "")
    text = str(result).replace("_", " ") if result else "under way"
    if result in ("failed", "refused") and u.get("reason"):
        text += f": {u['reason']}"
    of = u.get("rollback_of")
    if isinstance(of, Mapping):
        text += f" (the rollback of rollout {of.get('rollout')}, away from {of.get('version')})"
    return text
