"""Who keeps the release metadata fresh, and what to warn about when nobody can.

A role is *due* once half its lifetime has passed (:func:`refresh_due`), so a device
never sees metadata with less than half its lifetime left while serve runs. A role is
*online* where the key directory holds enough of its keys to meet its threshold: only
those can be re-signed without the operator.

:class:`FreshnessKeeper` is the thread ``edge-sdk serve`` runs: it re-signs every due
role it holds the keys of (under the repository's lock, so ``release add`` and the
controller writing at the same time are serialised with it) and logs one line per role.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import EdgeError
from ._durations import WARN_WITHIN, format_duration, refresh_at
from ._repository import Repository

log = logging.getLogger("edge_sdk.release")

def _left(seconds: float) -> str:
    s = int(seconds)
    if s <= 0:
        return f"expired {format_duration(timedelta(seconds=max(1, -s)))} ago"
    return f"expires in {format_duration(timedelta(seconds=s)) if s < 120 else _rough(s)}"


def _rough(s: int) -> str:
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m"


@dataclass(frozen=True)
class ExpiryWarning:
    """A role that expires soon and that no online key can re-sign."""

    role: str
    expires: datetime
    seconds_left: float
    command: str

    @property
    def message(self) -> str:
        return (f"{self.role} metadata {_left(self.seconds_left)} "
                f"({self.expires.isoformat()}) and its key is not online, so serve cannot "
                f"re-sign it: run '{self.command}' with DIR holding the {self.role} key")

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "expires": self.expires.isoformat(),
                "seconds_left": round(self.seconds_left), "command": self.command,
                "message": self.message}


def expiry_warnings(repo: Repository, *, within: timedelta = WARN_WITHIN,
                    now: datetime | None = None) -> list[ExpiryWarning]:
    """The roles of ``repo`` expiring within ``within`` whose keys are not online."""
    now = now or datetime.now(UTC)
    out = []
    for role, expires in repo.expiries().items():
        left = expires - now
        if left <= within and not repo.online(role):
            force = " --force" if role in ("root", "targets") else ""
            out.append(ExpiryWarning(role, expires, left.total_seconds(),
                                     f"edge-sdk release refresh {repo.path} --keys DIR{force}"))
    return out


class FreshnessKeeper:
    """Re-sign ``repo``'s due roles whose keys are online, on a thread, until :meth:`stop`.

    It wakes when the next role falls due (at least every ``max_sleep`` seconds, to see
    what other processes changed) and re-checks under the repository's lock, so any
    number of serve processes on one repository re-sign each role once."""

    def __init__(self, repo: Repository, *, max_sleep: float = 60.0,
                 say: Callable[[str], None] | None = None) -> None:
        """``say``: where the one line per re-signed role (or failure) goes; default the
        ``edge_sdk.release`` logger."""
        self.repo = repo
        self.max_sleep = max_sleep
        self.say = say or log.info
        self.refreshes = 0
        self.roles = tuple(r for r in repo.lifetimes() if repo.online(r))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FreshnessKeeper:
        self._thread = threading.Thread(target=self._run, name="edge-release-freshness",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FreshnessKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def step(self) -> float:
        """Re-sign what is due now; return the seconds until the next role falls due."""
        if not self.roles:
            return self.max_sleep
        for role, version, expires in self.repo.keep_fresh(self.roles):
            self.refreshes += 1
            self.say(f"re-signed {role} v{version}, expires {expires.isoformat()}")
        lifetimes = self.repo.lifetimes()
        now = datetime.now(UTC)
        nxt = min(refresh_at(e, lifetimes[r]) for r, e in self.repo.expiries().items()
                  if r in self.roles)
        return max(0.05, min(self.max_sleep, (nxt - now).total_seconds()))

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                wait = self.step()
            except EdgeError as err:
                self.say(f"cannot re-sign the release metadata: {err}")
                wait = min(self.max_sleep, 5.0)
            except Exception as err:  # the thread must outlive a full disk, say
                self.say(f"cannot re-sign the release metadata: {type(err).__name__}: {err}")
                wait = min(self.max_sleep, 5.0)


def describe_lifetimes(lifetimes: Mapping[str, timedelta]) -> str:
    return ", ".join(f"{r}={format_duration(d)}" for r, d in lifetimes.items())
