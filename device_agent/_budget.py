"""A shared byte budget: memory that requests reserve before they use it."""

from __future__ import annotations

import threading


class Budget:
    """``total`` bytes shared by threads; :meth:`acquire` waits for room or gives up."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float = 0.0) -> bool:
        """Reserve ``n`` bytes, waiting up to ``timeout`` s; False if they never fit."""
        if n > self.total:
            return False
        with self._cond:
            return self._cond.wait_for(lambda: self.used + n <= self.total, timeout) and \
                self._take(n)

    def _take(self, n: int) -> bool:
        self.used += n
        return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()
