"""At most one execution of a job at a time, and none once it has finished.

Celery on Redis acknowledges late: a job's message stays in kombu's `unacked` hash until the job returns, and a
message older than `visibility_timeout` is put back in its queue. That is what brings a killed worker's job back;
it is also what would run a job twice when it simply takes longer than the timeout, or when a worker finished a
job but died (or lost Redis) before its ack. Three mechanisms keep that from losing or doubling anything:

1. Visibility kept fresh: while a job runs, the process's lease keeper thread re-scores its message in kombu's
   `unacked_index` (ZADD XX), so Redis never hands a live job to another worker; a killed worker stops doing so,
   and its message comes back `visibility_timeout` after the last refresh.
2. An execution lease per task id (SET NX PX, renewed by the same thread): a second delivery that finds a live
   lease waits for its holder instead of running the job again; when the holder's lease expires unfinished (the
   holder died), the waiter takes it and runs the job.
3. A job record (`fleet:job:<id>`): the holder stores the result there before it returns, so any later delivery
   returns that result without running the pipeline. Such deliveries are counted as duplicates (the record's
   `duplicates`, the fleet counter `duplicate_deliveries`) and logged as DUPLICATE.

A job costs the worker two Redis round trips of its own: one script to claim it (delivery index, outbox entry
removed, record, lease, run count, the release's own time limit) and one to complete it (result record, lease
release, unindexing, the served-jobs counter and the worker's job count in the registry); the scripts are
fleetstate/lua/lease_*.lua. Renewals run on one thread per process (fleetstate.alarms), which a job neither starts
nor wakes. Celery's own result records (STARTED before the task body, SUCCESS after it) are Celery's to write,
through its result backend, which never overwrites a SUCCESS: a later delivery's STARTED leaves a finished job's
result in place.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from .alarms import Alarms
from .keys import (
    DELIVERIES_KEY,
    JOB_KEY,
    KOMBU_UNACKED_INDEX,
    LEASE_KEY,
    OUTBOX_AT_KEY,
    OUTBOX_KEY,
    RELEASE_META_KEY,
    STATS_KEY,
    WORKER_KEY,
)
from .scripts import LEASE_CLAIM, LEASE_COMPLETE, LEASE_LEAVE, extend_token, release_token
from .timelimits import LIMIT_FIELD

log = logging.getLogger("warmfleet.lease")

RECORD_TTL_SECONDS = 24 * 3600
"""A job record lives as long as Celery keeps results (`result_expires`)."""

REDIS_GRACE_SECONDS = 15.0
"""How long a lease call retries while Redis is unreachable (a restart) before the job runs unguarded."""


class JobDead(RuntimeError):
    """A job already recorded as dead was delivered again: it fails with its recorded reason and runs nothing."""


@dataclass(frozen=True)
class Claim:
    """What a delivery may do: run the job (`run`), or return a finished job's stored result, or fail as dead."""

    run: bool
    result: dict[str, Any] | None = None
    dead: str | None = None
    time_limit: str = ""
    """With `run`: the job's release's own time limit as stored (timelimits.py), read in the claim; '' for none."""


def effective_lease_seconds(lease_seconds: float, visibility_timeout: float) -> float:
    """The lease must expire before a dead holder's message comes back, so the redelivery never waits for it."""
    return max(1.0, min(lease_seconds, visibility_timeout / 2))


class JobLease:
    """One delivery of one job on one worker: claim, run under a renewed lease, record the outcome, release."""

    def __init__(self, client: redis.Redis, task_id: str, worker: str, lease_seconds: float,
                 delivery_tag: str | None = None, extend_visibility: bool = True, poll_seconds: float = 0.2,
                 release: str | None = None) -> None:
        self.redis = client
        self.task_id = task_id
        self.worker = worker
        self.ttl_ms = int(lease_seconds * 1000)
        self.delivery_tag = delivery_tag
        self.extend_visibility = extend_visibility and bool(delivery_tag)
        self.poll = poll_seconds
        self.token = f"{worker}:{uuid.uuid4().hex[:12]}"
        self.held = False
        self.indexed = False  # this delivery's entry in the delivery index (orphans.py) is ours to remove
        self.lease_key = LEASE_KEY.format(task_id=task_id)
        self.record_key = JOB_KEY.format(task_id=task_id)
        self.job_release = release  # the claim reads this release's own time limit
        self.interval = max(0.1, self.ttl_ms / 3000)  # renewals per lease period: three

    # -- the life of one delivery
    def __enter__(self) -> JobLease:
        _KEEPER.set(self, time.monotonic() + self.interval, self.beat, every=self.interval)
        return self

    def __exit__(self, *exc: object) -> None:
        _KEEPER.cancel(self)
        if self.held or self.indexed:
            self._redis_call(lambda: LEASE_LEAVE(self.redis, [self.lease_key, DELIVERIES_KEY],
                                                 [self.token if self.held else "", self.delivery_tag or ""]), None)
            self.held = self.indexed = False

    def claim(self) -> Claim:
        """Decide this delivery's fate; waits while another live worker holds the job's lease (it renews it only
        while alive, so a dead holder's lease expires and this delivery then runs the job).

        One script per attempt (fleetstate/lua/lease_claim.lua): the delivery indexed as in this worker's hands (the
        orphan sweep puts it back if this worker dies), the job record read, the lease taken, the run counted and the
        release's own time limit read."""
        waited_on: str | None = None
        while True:
            answer = self._redis_call(lambda: self._claim_once(), default=None)
            if answer is None:  # Redis unreachable past the grace period: run unguarded, never lose the job
                return Claim(run=True)
            kind, value = answer
            if kind == "result":
                self._duplicate("finished", waited_on)
                return Claim(run=False, result=json.loads(value))
            if kind == "dead":
                self._duplicate("dead", waited_on)
                return Claim(run=False, dead=value)
            if kind == "run":
                return Claim(run=True, time_limit=value)
            if waited_on is None:
                waited_on = value or "?"
                log.warning("job %s is running on %s: this delivery waits for it instead of running it again",
                            self.task_id, waited_on)
            time.sleep(self.poll)

    def complete(self, result: dict[str, Any], worker_fields: dict[str, Any] | None = None) -> bool:
        """Store the result where any later delivery finds it, before Celery stores it and acknowledges; in the same
        script (fleetstate/lua/lease_complete.lua) release the lease, unindex the delivery, count the job served
        (`l1_hits`) and set `worker_fields` (e.g. the worker's job count) in the worker's registry hash, so the
        registry needs no write of its own. False when Redis stayed unreachable."""
        pairs = [str(x) for item in (worker_fields or {}).items() for x in item]

        def write() -> bool:
            LEASE_COMPLETE(self.redis,
                           [self.record_key, self.lease_key, DELIVERIES_KEY, STATS_KEY,
                            WORKER_KEY.format(worker=self.worker)],
                           [json.dumps(result), self.worker, RECORD_TTL_SECONDS, self.token, self.delivery_tag or "",
                            *pairs])
            self.held = self.indexed = False
            return True

        return self._redis_call(write, default=False)

    def bury(self, reason: str) -> None:
        """Mark the job dead, so a later delivery of it fails with the same reason instead of running again."""
        self._redis_call(lambda: self.redis.hset(self.record_key, "dead", reason), default=None)

    def release(self) -> None:
        if self.held:
            self._redis_call(lambda: release_token(self.redis, self.lease_key, self.token), default=None)
            self.held = False

    # -- internals
    def _claim_once(self) -> tuple[str, str]:
        entry = json.dumps({"worker": self.worker, "task_id": self.task_id}) if self.delivery_tag else ""
        answer = LEASE_CLAIM(self.redis,
                             [self.record_key, self.lease_key, DELIVERIES_KEY, OUTBOX_KEY, OUTBOX_AT_KEY,
                              RELEASE_META_KEY.format(release=self.job_release) if self.job_release else ""],
                             [self.token, self.ttl_ms, self.worker, self.delivery_tag or "", entry, RECORD_TTL_SECONDS,
                              LIMIT_FIELD if self.job_release else ""])
        self.indexed = bool(self.delivery_tag)
        kind = _text(answer[0])
        if kind == "run":
            self.held = True
        return kind, _text(answer[1]) if len(answer) > 1 else ""

    def _duplicate(self, why: str, waited_on: str | None) -> None:
        log.warning("DUPLICATE delivery of job %s on %s: the job is %s%s; its stored outcome is returned, nothing runs",
                    self.task_id, self.worker, why, f" (waited for {waited_on})" if waited_on else "")

        def count() -> None:
            with self.redis.pipeline() as pipe:
                pipe.hincrby(self.record_key, "duplicates", 1)
                pipe.hincrby(STATS_KEY, "duplicate_deliveries", 1)
                pipe.execute()

        self._redis_call(count, default=None)

    def beat(self) -> None:
        """Renew the lease while held, and keep this delivery's message from being redelivered while it runs."""
        try:
            # one that expired while Redis refused writes (a restart, a failover) and that nobody took meanwhile is
            # taken back (2), so a copy delivered after the outage still finds the job held
            renewed = (extend_token(self.redis, self.lease_key, self.token, self.ttl_ms, take_back=True)
                       if self.held else 1)
            if renewed == 2:
                log.warning("job %s: lease expired while Redis was unreachable; taken back", self.task_id)
            elif not renewed:
                log.warning("job %s: lease lost (expired while Redis was unreachable, and taken)", self.task_id)
            if self.extend_visibility:
                self.redis.zadd(KOMBU_UNACKED_INDEX, {self.delivery_tag: time.time()}, xx=True)
        except redis.RedisError:
            pass  # Redis restarting: the next beat tries again

    def _redis_call(self, fn: Any, default: Any) -> Any:
        """Retry through a Redis restart; past the grace period go on without the guard (never lose the job)."""
        deadline = time.monotonic() + REDIS_GRACE_SECONDS
        while True:
            try:
                return fn()
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    log.warning("job %s: Redis unreachable (%s); going on without the execution lease", self.task_id, exc)
                    return default
                time.sleep(0.5)


_KEEPER = Alarms("warmfleet-lease-keeper")
"""One thread per process beats every lease in use on its own schedule, so a job starts no thread of its own."""


def job_record(client: redis.Redis, task_id: str) -> dict[str, str]:
    """A job's execution record as text: runs, completed, duplicates, holder, finished_by, dead, result."""
    return {_text(k): _text(v) for k, v in client.hgetall(JOB_KEY.format(task_id=task_id)).items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))
