"""Dead jobs: those whose pipeline call kept failing after every retry. Recorded with their reason and arguments,
so an operator sees them (`warmfleet dead`) and can resend them once the cause is fixed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .keys import DEAD_KEY, STATS_KEY

MAX_DEAD = 10_000
"""The list keeps the newest records only; a poison flood cannot fill Redis."""


@dataclass(frozen=True)
class DeadJob:
    task_id: str
    reason: str
    kwargs: dict[str, Any]
    retries: int
    worker: str
    queue: str | None = None
    at: float = field(default_factory=time.time)


class DeadLetters:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def record(self, job: DeadJob) -> None:
        with self.redis.pipeline() as pipe:
            pipe.lpush(DEAD_KEY, json.dumps(asdict(job), default=str))
            pipe.ltrim(DEAD_KEY, 0, MAX_DEAD - 1)
            pipe.hincrby(STATS_KEY, "dead_jobs", 1)
            pipe.execute()

    def list(self, last: int = 50) -> list[DeadJob]:
        """Newest first."""
        out = []
        for raw in self.redis.lrange(DEAD_KEY, 0, max(0, last - 1)):
            try:
                out.append(DeadJob(**json.loads(raw)))
            except (TypeError, ValueError):
                continue  # a record from another version of the fleet: skip, never fail the listing
        return out

    def count(self) -> int:
        return int(self.redis.llen(DEAD_KEY))
