"""Job time limits: how long one job may run before its worker is recycled and the job retried on a peer.

The fleet-wide default is the setting `FLEET_JOB_TIME_LIMIT_S`; a release may carry its own limit in its metadata
(`fleet:release-meta:<release>`, field `job_time_limit_s`), which wins. A limit of 0 means none.
"""

from __future__ import annotations

import redis

from cachemgr.names import Release

from .keys import JOB_KEY, RELEASE_META_KEY, STATS_KEY

LIMIT_FIELD = "job_time_limit_s"


def set_release_time_limit(client: redis.Redis, release: str, seconds: float | None) -> None:
    """Record (or, with None, remove) a release's own job time limit."""
    key = RELEASE_META_KEY.format(release=str(Release.parse(release)))
    if seconds is None:
        client.hdel(key, LIMIT_FIELD)
    elif seconds < 0:
        raise ValueError("a job time limit is a number of seconds >= 0 (0: no limit)")
    else:
        client.hset(key, LIMIT_FIELD, repr(float(seconds)))


def time_limit_for(client: redis.Redis, release: str | None, default: float) -> float:
    """The limit a job of `release` runs under: the release's own, else `default`; 0 = no limit. (A worker reads the
    release's own limit in its claim script instead: fleetstate.leases.)"""
    raw = None
    if release:
        try:
            raw = client.hget(RELEASE_META_KEY.format(release=release), LIMIT_FIELD)
        except redis.RedisError:
            pass  # Redis restarting: the fleet-wide limit still holds
    return limit_or_default(raw, default)


def limit_or_default(raw: bytes | str | None, default: float) -> float:
    """A release's own limit as stored (None or empty: it has none; unreadable: ignored), else `default`."""
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
    return max(0.0, float(default))


def limit_text(seconds: float) -> str:
    return f"{seconds:g}"


def timed_out_reason(seconds: float) -> str:
    """The one-line reason a job that timed out on every try is dead-lettered with."""
    return f"ran past its time limit of {limit_text(seconds)} s"


def count_timeout(client: redis.Redis, task_id: str, worker: str) -> int:
    """Record one timed-out try of a job (its record's `timeouts`, the fleet counter `job_timeouts`); returns how
    many tries of it have timed out so far."""
    key = JOB_KEY.format(task_id=task_id)
    with client.pipeline() as pipe:
        pipe.hincrby(key, "timeouts", 1)
        pipe.hset(key, "timed_out_on", worker)
        pipe.hincrby(STATS_KEY, "job_timeouts", 1)
        count, *_ = pipe.execute()
    return int(count)
