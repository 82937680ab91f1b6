"""At most one execution of a job at a time, and none once it has finished.

Celery on Redis acknowledges late: a job's message stays in kombu's `unacked` hash until the job returns, and a
message older than `visibility_timeout` is put back in its queue. That is what brings a killed worker's job back;
it is also what would run a job twice when it simply takes longer than the timeout, or when a worker finished a
job but died (or lost Redis) before its ack. Three mechanisms keep that from losing or doubling anything:

1. Visibility kept fresh: while a job runs, a thread re-scores its message in kombu's `unacked_index` (ZADD XX),
   so Redis never hands a live job to another worker; a killed worker stops doing so, and its message comes back
   `visibility_timeout` after the last refresh.
2. An execution lease per task id (SET NX PX, renewed by the same thread): a second delivery that finds a live
   lease waits for its holder instead of running the job again; when the holder's lease expires unfinished (the
   holder died), the waiter takes it and runs the job.
3. A job record (`fleet:job:<id>`): the holder stores the result there before it returns, so any later delivery
   returns that result without running the pipeline. Such deliveries are counted as duplicates (the record's
   `duplicates`, the fleet counter `duplicate_deliveries`) and logged as DUPLICATE.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from .keys import JOB_KEY, KOMBU_UNACKED_INDEX, LEASE_KEY, STATS_KEY
from .orphans import index_delivery, unindex_delivery

log = logging.getLogger("warmfleet.lease")

RECORD_TTL_SECONDS = 24 * 3600
"""A job record lives as long as Celery keeps results (`result_expires`)."""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

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


def effective_lease_seconds(lease_seconds: float, visibility_timeout: float) -> float:
    """The lease must expire before a dead holder's message comes back, so the redelivery never waits for it."""
    return max(1.0, min(lease_seconds, visibility_timeout / 2))


class JobLease:
    """One delivery of one job on one worker: claim, run under a renewed lease, record the outcome, release."""

    def __init__(self, client: redis.Redis, task_id: str, worker: str, lease_seconds: float,
                 delivery_tag: str | None = None, extend_visibility: bool = True, poll_seconds: float = 0.2) -> None:
        self.redis = client
        self.task_id = task_id
        self.worker = worker
        self.ttl_ms = int(lease_seconds * 1000)
        self.delivery_tag = delivery_tag
        self.extend_visibility = extend_visibility and bool(delivery_tag)
        self.poll = poll_seconds
        self.token = f"{worker}:{uuid.uuid4().hex[:12]}"
        self.held = False
        self.lease_key = LEASE_KEY.format(task_id=task_id)
        self.record_key = JOB_KEY.format(task_id=task_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the life of one delivery
    def __enter__(self) -> JobLease:
        if self.delivery_tag:  # in this worker's hands: the orphan sweep puts it back if this worker dies
            self._redis_call(lambda: index_delivery(self.redis, self.delivery_tag, self.worker, self.task_id), None)
        self._thread = threading.Thread(target=self._keepalive, name=f"lease-{self.task_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()
        if self.delivery_tag:
            self._redis_call(lambda: unindex_delivery(self.redis, self.delivery_tag), None)

    def claim(self) -> Claim:
        """Decide this delivery's fate; waits while another live worker holds the job's lease (it renews it only
        while alive, so a dead holder's lease expires and this delivery then runs the job)."""
        waited_on: str | None = None
        while True:
            record = self._redis_call(self._read_record, default={})
            if record.get("result"):
                self._duplicate("finished", waited_on)
                return Claim(run=False, result=json.loads(record["result"]))
            if record.get("dead"):
                self._duplicate("dead", waited_on)
                return Claim(run=False, dead=record["dead"])
            if self._redis_call(self._acquire, default=True):
                return Claim(run=True)
            if waited_on is None:
                waited_on = self._redis_call(lambda: _text(self.redis.get(self.lease_key)), default="?") or "?"
                log.warning("job %s is running on %s: this delivery waits for it instead of running it again",
                            self.task_id, waited_on)
            time.sleep(self.poll)

    def complete(self, result: dict[str, Any]) -> None:
        """Store the result where any later delivery finds it, before Celery stores it and acknowledges."""
        def write() -> None:
            with self.redis.pipeline() as pipe:
                pipe.hset(self.record_key, mapping={"result": json.dumps(result), "finished_by": self.worker})
                pipe.hincrby(self.record_key, "completed", 1)
                pipe.expire(self.record_key, RECORD_TTL_SECONDS)
                pipe.execute()

        self._redis_call(write, default=None)

    def bury(self, reason: str) -> None:
        """Mark the job dead, so a later delivery of it fails with the same reason instead of running again."""
        self._redis_call(lambda: self.redis.hset(self.record_key, "dead", reason), default=None)

    def release(self) -> None:
        if self.held:
            self._redis_call(lambda: self.redis.eval(_RELEASE, 1, self.lease_key, self.token), default=None)
            self.held = False

    # -- internals
    def _read_record(self) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.redis.hgetall(self.record_key).items()}

    def _acquire(self) -> bool:
        if not self.held:
            taken = self.redis.set(self.lease_key, self.token, nx=True, px=self.ttl_ms)
            if not taken and _text(self.redis.get(self.lease_key)) != self.token:  # ours if a retried SET landed
                return False
            self.held = True
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.record_key, "runs", 1)
            pipe.hset(self.record_key, "holder", self.worker)
            pipe.expire(self.record_key, RECORD_TTL_SECONDS)
            pipe.execute()
        return True

    def _duplicate(self, why: str, waited_on: str | None) -> None:
        log.warning("DUPLICATE delivery of job %s on %s: the job is %s%s; its stored outcome is returned, nothing runs",
                    self.task_id, self.worker, why, f" (waited for {waited_on})" if waited_on else "")

        def count() -> None:
            with self.redis.pipeline() as pipe:
                pipe.hincrby(self.record_key, "duplicates", 1)
                pipe.hincrby(STATS_KEY, "duplicate_deliveries", 1)
                pipe.execute()

        self._redis_call(count, default=None)

    def _keepalive(self) -> None:
        """Renew the lease while held, and keep this delivery's message from being redelivered while it runs."""
        interval = max(0.1, self.ttl_ms / 3000)
        while not self._stop.wait(interval):
            try:
                if self.held and not self.redis.eval(_RENEW, 1, self.lease_key, self.token, self.ttl_ms):
                    log.warning("job %s: lease lost (expired while Redis was unreachable?)", self.task_id)
                if self.extend_visibility:
                    self.redis.zadd(KOMBU_UNACKED_INDEX, {self.delivery_tag: time.time()}, xx=True)
            except redis.RedisError:
                continue  # Redis restarting: the next beat tries again

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


def job_record(client: redis.Redis, task_id: str) -> dict[str, str]:
    """A job's execution record as text: runs, completed, duplicates, holder, finished_by, dead, result."""
    return {_text(k): _text(v) for k, v in client.hgetall(JOB_KEY.format(task_id=task_id)).items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))
