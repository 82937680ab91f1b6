"""A job past its time limit: recorded, its lease released, its message put back for a peer, this worker recycled.

A solo-pool worker runs a job on its main thread; a pipeline call that hangs (a driver stuck, a kernel that never
returns) cannot be interrupted from Python. So each job arms an alarm on the process's one watchdog thread
(fleetstate.alarms: arming and disarming is a dict write, no thread started or woken per job). Past the limit it:

1. records the timed-out try (the job record's `timeouts`, the fleet counter `job_timeouts`) and tells the
   runner's `on_timeout` hook (where a failure breaker counts it as a failure of this worker);
2. when every try has now timed out (more than `job_max_retries` timeouts), records the job as dead with the reason
   "ran past its time limit of N s", so the next delivery fails with that reason and runs nothing;
3. releases the execution lease, so a peer may take the job at once;
4. puts the message back in its queue in one Lua script (fleetstate.orphans.restore, as the orphan sweep does);
5. ends the process with `TIMED_OUT_EXIT` (os._exit: the hung thread cannot be joined); its supervisor starts a
   fresh worker. With prefetch 1 nothing else was reserved by this worker, so nothing waits behind the hung job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fleetstate.alarms import Alarms
from fleetstate.dead import DeadJob, DeadLetters
from fleetstate.keys import KOMBU_UNACKED
from fleetstate.leases import JobLease
from fleetstate.orphans import restore
from fleetstate.timelimits import count_timeout, limit_text, timed_out_reason

log = logging.getLogger("warmfleet.watchdog")

_WATCH = Alarms("warmfleet-watchdog")
"""The process's one watchdog thread: apart from the lease keeper's, so a renewal stuck on Redis delays no limit."""

TIMED_OUT_EXIT = 75
"""The exit status of a worker recycled because a job ran past its time limit (EX_TEMPFAIL: start it again)."""


@dataclass(frozen=True)
class TimedOut:
    """One try of a job that ran past its limit: what a failure breaker counts against the worker."""

    task_id: str
    worker: str
    queue: str | None
    limit_s: float
    tries_timed_out: int
    dead: bool


class JobWatchdog:
    """Guards one job's run: `with JobWatchdog(...): serve()`; leaving the block in time disarms it."""

    def __init__(self, lease: JobLease, limit_s: float, max_retries: int, queue: str | None, kwargs: dict[str, Any],
                 on_timeout: Callable[[TimedOut], None] | None = None,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.lease = lease
        self.limit_s = limit_s
        self.max_retries = max_retries
        self.queue = queue
        self.kwargs = kwargs
        self.on_timeout = on_timeout
        self.exit_process = exit_process

    def __enter__(self) -> JobWatchdog:
        if self.limit_s > 0:
            _WATCH.set(self, time.monotonic() + self.limit_s, self._expired)
        return self

    def __exit__(self, *exc: object) -> None:
        _WATCH.cancel(self)

    def _expired(self) -> None:
        try:
            self.fire()
        except Exception:  # whatever failed, the worker must still go: the orphan sweep brings the job back then
            log.exception("job %s: time limit handling failed; recycling the worker anyway", self.lease.task_id)
        finally:
            self.exit_process(TIMED_OUT_EXIT)

    def fire(self) -> TimedOut:
        lease, client = self.lease, self.lease.redis
        task_id, worker = lease.task_id, lease.worker
        tries = count_timeout(client, task_id, worker)
        dead = tries > self.max_retries
        log.error("job %s ran past its time limit of %s s on %s (try %d timed out)%s; recycling this worker",
                  task_id, limit_text(self.limit_s), worker, tries,
                  ": every try did, it is dead" if dead else ": a peer retries it")
        if dead:
            reason = timed_out_reason(self.limit_s)
            lease.bury(reason)
            try:
                DeadLetters(client).record(DeadJob(task_id, reason, dict(self.kwargs), tries - 1, worker, self.queue))
            except redis.RedisError:
                pass  # the job record says dead already: the next delivery fails with the reason
        outcome = TimedOut(task_id, worker, self.queue, self.limit_s, tries, dead)
        if self.on_timeout is not None:
            try:
                self.on_timeout(outcome)
            except Exception:
                log.exception("on_timeout hook failed")
        lease.release()
        tag = lease.delivery_tag
        if tag:
            raw = client.hget(KOMBU_UNACKED, tag)
            if raw is not None:
                restore(client, tag, raw, holder=None)
        return outcome
