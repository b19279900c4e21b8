"""Lifetimes of TUF roles: durations with units, and when a role is due for re-signing.

A role's *lifetime* is what ``release init --expires ROLE=DURATION`` set (``30s``, ``2m``,
``12h``, ``7d``; a bare number is days, as ``--expires ROLE=DAYS`` always meant). A role
is *due* once half its lifetime has passed (:func:`refresh_due`).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from ..errors import UsageError

#: Re-sign a role once less than this fraction of its lifetime is left.
REFRESH_MARGIN = 0.5
#: ``status`` and the fleet page warn about a role that expires within this and that no
#: online key can re-sign.
WARN_WITHIN = timedelta(days=1)
MAX_LIFETIME = timedelta(days=36500)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d{1,9})([smhd]?)")
DURATION_HELP = ("a duration: a whole number >= 1 with a unit s, m, h or d (e.g. 90s, 2m, "
                 "12h, 7d; no unit: days)")


def parse_duration(text: str, what: str) -> timedelta:
    """``90s``, ``2m``, ``12h``, ``7d`` or a bare number of days (what ``--expires ROLE=N``
    always meant). Raises :class:`UsageError` naming ``what`` and the expected form."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or int(m[1]) < 1:
        raise UsageError(f"{what}: expected {DURATION_HELP}")
    d = timedelta(seconds=int(m[1]) * _UNITS[m[2] or "d"])
    if d > MAX_LIFETIME:
        raise UsageError(f"{what}: expected at most {MAX_LIFETIME.days}d")
    return d


def format_duration(d: timedelta) -> str:
    """The shortest exact form :func:`parse_duration` reads back (``2m``, ``7d``)."""
    s = int(d.total_seconds())
    for unit in ("d", "h", "m"):
        if s and s % _UNITS[unit] == 0:
            return f"{s // _UNITS[unit]}{unit}"
    return f"{s}s"


def refresh_due(expires: datetime, lifetime: timedelta, now: datetime) -> bool:
    """Whether metadata expiring at ``expires`` must be re-signed at ``now``: once half its
    ``lifetime`` has passed (less than ``REFRESH_MARGIN`` of it left)."""
    return expires - now <= lifetime * REFRESH_MARGIN


def refresh_at(expires: datetime, lifetime: timedelta) -> datetime:
    """The moment :func:`refresh_due` turns true."""
    return expires - lifetime * REFRESH_MARGIN
