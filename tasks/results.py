"""Celery's result backend on Redis, whose writes for a `generate` job the worker folds into its own scripts.

Celery stores a task's state twice per run, each time with two round trips (a GET, so a late duplicate never
overwrites SUCCESS, then SET + PUBLISH): STARTED before the body, SUCCESS after it. A fleet worker already runs one
script to claim the job and one to complete it (fleetstate/leases.py). When the result backend is the fleet's own
Redis server and database (the default: the broker's URL), those scripts write Celery's records too: the claim the
STARTED meta, the completion the SUCCESS meta, each the same bytes Celery would write (built here by the backend's own
encoding), with the same expiry, published on the same channel. The job record's check takes the place of Celery's
GET: a finished job is never claimed again, and its result and its SUCCESS meta are written in one script. Celery is
then told not to store them again (`track_started` off for the task; `store_result` skips a SUCCESS the completion
already wrote). Everything else (FAILURE, RETRY, other tasks, another result server) goes through Celery unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend

from fleetstate.leases import CeleryRecord

_WRITTEN: set[str] = set()
"""Task ids whose SUCCESS meta this process's completion script wrote; Celery's own store of it is skipped once."""


class FleetResults:
    """Mixed into the Redis (and Sentinel) backends: the records a worker's scripts write in Celery's place."""

    def fleet_record(self, task_id: str, result: Any, state: str, request: Any) -> CeleryRecord:
        """(key, value, expiry seconds or 0) of `state` for `task_id`, exactly as `store_result` would write it."""
        meta = self._get_result_meta(result=self.encode_result(result, state),  # type: ignore[attr-defined]
                                     state=state, traceback=None, request=request)
        meta["task_id"] = task_id
        key = self.get_key_for_task(task_id)  # type: ignore[attr-defined]
        return key, self.encode(meta), int(self.expires or 0)  # type: ignore[attr-defined]

    def fleet_started(self, task_id: str, request: Any) -> CeleryRecord:
        """The STARTED record Celery's trace writes before a task's body (`track_started`)."""
        return self.fleet_record(task_id, {"pid": os.getpid(), "hostname": request.hostname}, states.STARTED, request)

    def store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                     **kwargs: Any) -> Any:
        if state == states.SUCCESS and task_id in _WRITTEN:
            _WRITTEN.discard(task_id)
            return result  # the worker's completion script wrote this very record
        return super().store_result(task_id, result, state, traceback=traceback,  # type: ignore[misc]
                                    request=request, **kwargs)


def written_by_fleet(task_id: str) -> None:
    """The completion script wrote `task_id`'s SUCCESS record: Celery's store of it that follows is skipped."""
    _WRITTEN.add(task_id)


def writes_celery_records(celery_app: Any) -> bool:
    """Whether a worker of `celery_app` may write Celery's records in its own scripts: its result backend is one of
    these and on the fleet's own server and database (tasks/app.py sets `fleet_results_shared`)."""
    return bool(getattr(celery_app, "fleet_results_shared", False)) and isinstance(celery_app.backend, FleetResults)


class FleetRedisBackend(FleetResults, RedisBackend):
    pass


BACKEND = f"{__name__}:FleetRedisBackend"
