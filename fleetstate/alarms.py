"""Alarms: one thread that runs callbacks when they fall due, so a job arms its timers without starting a thread.

A worker arms two kinds of timers per job: its execution lease's renewal (every third of the lease period) and its
time limit (minutes away). Both are set when a job starts and cancelled when it ends, almost always long before
they are due. Setting one here is a dict write under a lock; the thread is woken only when the new alarm falls due
before the thread would wake anyway (while it has nothing to do it wakes once per `tick` to look again), so a job
that sets and cancels far alarms causes no thread switch at all.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger("warmfleet.alarms")


class Alarms:
    """Callbacks by key, each due at a `time.monotonic()` instant and, with `every`, again after each run."""

    def __init__(self, name: str, tick: float = 1.0) -> None:
        self.name = name
        self.tick = tick
        self._due: dict[Hashable, tuple[float, Callable[[], None], float | None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._wake_at = math.inf  # when the thread next looks by itself (inf: not running, or about to look now)
        self._thread: threading.Thread | None = None

    def set(self, key: Hashable, due: float, fn: Callable[[], None], every: float | None = None) -> None:
        """Run `fn` (on this object's thread) at `due`, and with `every`, every `every` seconds after that until
        cancelled. Setting a key again replaces its alarm."""
        with self._lock:
            self._due[key] = (due, fn, every)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._wake_at = math.inf
                self._thread.start()
            elif due < self._wake_at:
                self._wake.set()

    def cancel(self, key: Hashable) -> None:
        """Forget `key`'s alarm; a run of it already under way finishes, and it is not set again."""
        with self._lock:
            self._due.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._wake.clear()
                now = time.monotonic()
                fired = []
                for key, (due, fn, every) in list(self._due.items()):
                    if due <= now:
                        fired.append(fn)
                        if every is None:
                            del self._due[key]
                        else:
                            self._due[key] = (now + every, fn, every)
                self._wake_at = min(min((due for due, _, _ in self._due.values()), default=math.inf), now + self.tick)
            for fn in fired:
                try:
                    fn()
                except Exception:
                    log.exception("%s: an alarm's callback failed", self.name)
            self._wake.wait(max(0.0, self._wake_at - time.monotonic()))
