"""The failure breaker: a worker whose jobs all fail (a poisoned CUDA context, a lost device) stops taking jobs.

Different jobs failing in a row, with no success between, say the worker is sick rather than the jobs bad: after
`threshold` of them it leaves the warm registry (state `sick`, with the reason), cancels its queue consumers, and
`warmfleet health` fails so the orchestrator restarts it. Jobs it still holds (prefetched, or retries waiting for
their countdown) are put back on their queue whole, for a healthy peer. Retries of one job count once, and a
job refused for its own parameters (BadRequest, over a limit, out of memory at the size asked) never counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("warmfleet.breaker")


class FailureBreaker:
    def __init__(self, threshold: int, on_trip: Callable[[str], None] | None = None) -> None:
        self.threshold = threshold
        self.on_trip = on_trip
        self.failing: dict[str, str] = {}  # task id → its last reason, since the last success
        self.reason: str | None = None
        self._lock = threading.Lock()

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def success(self) -> None:
        with self._lock:
            self.failing.clear()

    def failure(self, task_id: str, reason: str) -> bool:
        """Count a failed job; True once the worker is sick (this failure tripped it, or an earlier one did)."""
        with self._lock:
            if self.reason is not None:
                return True
            self.failing[task_id] = reason
            if not self.threshold or len(self.failing) < self.threshold:
                return False
            self.reason = f"{len(self.failing)} different jobs failed in a row; last: {reason}"
        log.error("worker is sick and stops consuming: %s", self.reason)
        if self.on_trip is not None:
            try:
                self.on_trip(self.reason)
            except Exception:  # being sick must not depend on the broker being reachable
                log.exception("could not announce the sick state")
        return True


def sick_handler(app: Any, registry: Any, state: Any, queues: list[str], events: Any = None) -> Callable[[str], None]:
    """What a tripped breaker does in a worker process: out of the warm registry, consumers cancelled."""

    def trip(reason: str) -> None:
        state.state = "sick"
        state.error = reason
        registry.publish(state)  # a non-warm state deletes the worker's warm keys: routing and health see it at once
        if events is not None:
            events.emit("WORKER_SICK", worker=state.worker, releases=",".join(state.releases), reason=reason,
                        outcome="STOPPED_CONSUMING")
        for queue in queues:  # handled by this worker's own event loop as soon as the current job returns
            app.control.cancel_consumer(queue, destination=[state.worker], reply=False)

    return trip
