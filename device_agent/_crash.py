"""Test-only crash points: named places in an install (and in a delta fetch) where the
kill -9 tests stop the agent, with ``EDGE_SDK_AGENT_CRASH_AT=NAME``, to prove that every
durable step survives a crash at any point."""

from __future__ import annotations

import os
import signal

#: Test-only: kill the agent with SIGKILL when it reaches the named point; with a
#: ``:thread`` suffix (``install_started:thread``) end only the thread that reached it.
CRASH_ENV = "EDGE_SDK_AGENT_CRASH_AT"
#: Every crash point, in the order an install reaches them. The last two are reached
#: at boot, after a restart inside a trial: ``boot_trial_saved`` when the trial
#: resumes, ``rollback_saved`` when it has used up ``health.max_restarts`` (also
#: reached when a health window fails). The kill -9 test crashes at each one.
CRASH_POINTS = (
    "install_started", "fetched", "adopted", "loaded", "smoke_tested", "trial_saved",
    "swapped", "health_probe", "committed", "cleaned", "boot_trial_saved", "rollback_saved",
)
#: Crash points inside a fetch that applies a delta (before ``fetched``): the delta is
#: downloaded and verified; the first block of the rebuilt model is written.
DELTA_CRASH_POINTS = ("delta_fetched", "delta_applying")
#: Crash points of a shadow run: its start saved (before the comparing starts), its end
#: saved (before the candidates are let go of).
SHADOW_CRASH_POINTS = ("shadow_saved", "shadow_ended")
#: In an install of several models, ``fetched:NAME`` follows ``fetched`` once the model
#: NAME is downloaded (so a crash can fall between two models of a set).


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS or name in DELTA_CRASH_POINTS or \
        name in SHADOW_CRASH_POINTS or \
        name.startswith("fetched:"), \
        f"crash point {name!r} is missing from CRASH_POINTS"
    at = os.environ.get(CRASH_ENV)
    if at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif at == f"{name}:thread":
        raise ThreadCrash(f"test crash point {name}")


class ThreadCrash(BaseException):
    """Test-only: ends the thread that reached a ``:thread`` crash point. A BaseException,
    so that no ``except Exception`` on the way stops it, as with a real thread death."""
