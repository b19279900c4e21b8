"""Writes of ``installed.json`` to a state directory that may stop taking them (a full or
read-only disk): serving goes on from the state in memory, the save that failed is kept
and tried again every ``limits.storage_retry_s``, and the directory's health is reported.
Also the space check before a download."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from edge_sdk.errors import InstallError

from ._config import LimitsConfig
from ._events import NoSpace
from ._interfaces import Reporter
from ._state import InstalledState, StateStore

log = logging.getLogger("device_agent")


class NoSpaceError(InstallError):
    """A download does not fit in the state directory (raised by the space check)."""

    def __init__(self, needed: int, free: int, reserve: int) -> None:
        self.needed, self.free, self.reserve = needed, free, reserve
        super().__init__(NoSpace(needed, free, reserve).reason)


class StateWriter:
    """Saves the installed state through ``store``; ``on_change(ok)`` is told when the
    state directory becomes writable (True) or unwritable (False)."""

    def __init__(self, store: StateStore, limits: LimitsConfig, reporter: Reporter,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.limits = limits
        self.reporter = reporter
        self.on_change = on_change
        #: Why the state directory cannot be written (None while it can).
        self.error: str | None = None
        #: The state as last read or written on disk, and a newer one a save failed on.
        self.durable: InstalledState | None = None
        self.unsaved: InstalledState | None = None
        self._probed = 0.0

    def save(self, state: InstalledState) -> None:
        """Replace ``installed.json``; when that fails, keep ``state`` to try again."""
        try:
            self.store.save(state)
        except OSError as err:
            # Serving goes on from memory; the save is tried again later.
            self.unsaved = state
            self.failed(err)
        else:
            self.durable, self.unsaved = state, None

    def failed(self, err: OSError | str) -> None:
        """Note that the state directory cannot be written (``err``); serving goes on."""
        reason = err if isinstance(err, str) else (
            f"{self.store.root}: {err.strerror or err} ({_errno_name(err)})")
        first = self.error is None
        self.error = reason
        self._probed = time.monotonic()
        if not first:
            return
        log.error("state directory cannot be written: %s; serving goes on from the state as "
                  "read, installs wait until it can be written (tried again every %g s)",
                  reason, self.limits.storage_retry_s)
        self.reporter.event("storage", ok=False, reason=reason)
        self.reporter.state_changed()
        if self.on_change is not None:
            self.on_change(False)

    def retry(self, *, now: bool = False) -> bool:
        """When the state directory was unwritable and a retry is due (or ``now``): try
        the write that failed (or a probe). True when the directory can be written."""
        if self.error is None:
            return True
        if not now and time.monotonic() - self._probed < self.limits.storage_retry_s:
            return False
        self._probed = time.monotonic()
        try:
            if self.unsaved is not None:
                self.store.save(self.unsaved)
                self.durable, self.unsaved = self.unsaved, None
            else:
                self.store.probe()
        except OSError as err:
            self.error = f"{self.store.root}: {err.strerror or err} ({_errno_name(err)})"
            return False
        log.warning("state directory %s can be written again (%d byte(s) free)",
                    self.store.root, self.free())
        self.error = None
        self.reporter.event("storage", ok=True, free_bytes=self.free())
        self.reporter.state_changed()
        if self.on_change is not None:
            self.on_change(True)
        return True

    def free(self) -> int:
        try:
            return self.store.free_bytes()
        except OSError:
            return 0

    def reserve(self, needed: int) -> None:
        """The space check before a download's first chunk: ``needed`` more bytes must fit
        with ``limits.reserve_bytes`` left (the current and previous models stay)."""
        free, reserve = self.free(), self.limits.reserve_bytes
        if needed + reserve > free:
            raise NoSpaceError(needed, free, reserve)


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, "I/O error")
