"""`generate`: what producers call. It runs only in a worker process that holds a resident pipeline."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from celery import Task
from celery.exceptions import Reject, TaskPredicate
from kombu.utils.uuid import uuid

from . import serving
from .app import app
from .dead import DeadJob, DeadLetters
from .leases import JobDead, JobLease, effective_lease_seconds
from .requests import BadRequest, GenerateRequest
from .routing import ROUTE_KEY_HEADER

POISON_ENV = "WARMFLEET_TEST_POISON_PROMPT"
"""TEST-ONLY fault injection: a worker whose environment sets this fails every job whose prompt equals its value,
as a pipeline call that always raises would (tests/test_reliability.py drives retries and dead letters with it).
Nothing else reads it; never set it in production."""

_clients: dict[str, Any] = {}


class InjectedFault(RuntimeError):
    """Raised only by the test-only POISON_ENV hook."""


class GenerateTask(Task):
    """Validates on the producer side too, so a bad job is refused before it ever reaches a queue.

    It also makes the task id itself (Celery's router is never shown the id) and hands it to the router in a
    header, so a canary split is decided by the id: the same id always lands on the same release.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any) -> Any:
        params = dict(kwargs or {})
        if args:
            names = ["prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed", "release", "model"]
            if len(args) > len(names):
                raise BadRequest(f"bad generate request: too many positional arguments ({len(args)})")
            params.update(zip(names, args, strict=False))
        GenerateRequest.parse(**params)
        task_id = task_id or uuid()
        options["headers"] = {**(options.get("headers") or {}), ROUTE_KEY_HEADER: task_id}
        return super().apply_async(args=(), kwargs=params, task_id=task_id, **options)


@app.task(bind=True, base=GenerateTask, name="warmfleet.generate", throws=(BadRequest,))
def generate(
    self: Task,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    release: str | None = None,
    model: str | None = None,
    *extra: Any,
    **unknown: Any,
) -> dict[str, Any]:
    """Generate one image on this worker's resident pipeline; returns where it is, never its bytes.

    A raw send that skipped the producer's checks (another language, a hand-made message) may carry anything: a
    missing prompt, extra positional values or unknown names are refused as BadRequest too, never a TypeError."""
    if extra:
        raise BadRequest(f"bad generate request: too many positional arguments ({9 + len(extra)})")
    request = GenerateRequest.parse(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width,
        height=height, seed=seed, release=release, model=model, **unknown,
    )
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or delivery.get("queue")
    sent_at = getattr(self.request, "fleet_sent_at", None)
    runtime = serving.current()
    request = stable_seed(request, self.request.id)
    with _lease(self) as lease:
        claim = lease.claim()
        if claim.result is not None:
            return claim.result  # a duplicate delivery of a finished job: its stored result, nothing recomputed
        if claim.dead is not None:
            raise JobDead(claim.dead)
        try:
            _inject_fault(request)
            result = runtime.serve(request, task_id=self.request.id, queue=queue, sent_at=sent_at)
        except (BadRequest, TaskPredicate):
            raise
        except Exception as exc:
            lease.release()  # the retry's delivery takes the lease afresh
            raise _retry_or_bury(self, exc, lease, queue) from None
        lease.complete(result)
        return result


def stable_seed(request: GenerateRequest, task_id: str) -> GenerateRequest:
    """A job without a seed gets one derived from its task id, so a redelivered job makes the same image."""
    if request.seed is not None:
        return request
    return request.model_copy(update={"seed": int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big")})


def _redis(url: str) -> Any:
    import redis

    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def _lease(task: Task) -> JobLease:
    settings = task.app.fleet_settings
    properties = getattr(task.request, "properties", None) or {}
    return JobLease(
        _redis(settings.resolved_broker_url), task.request.id, task.request.hostname or "?",
        effective_lease_seconds(settings.job_lease_seconds, settings.visibility_timeout),
        delivery_tag=properties.get("delivery_tag"), extend_visibility=settings.job_extend_visibility,
    )


def _retry_or_bury(task: Task, exc: Exception, lease: JobLease, queue: str | None) -> BaseException:
    """Retry with exponential backoff while retries are left; then record the job as dead and fail it."""
    settings = task.app.fleet_settings
    retries = task.request.retries or 0
    if retries < settings.job_max_retries:
        countdown = min(60.0, settings.job_retry_backoff * 2**retries)
        try:
            return task.retry(exc=exc, countdown=countdown, max_retries=settings.job_max_retries, throw=False)
        except Reject:  # the retry could not be published (broker down): keep the message, never drop the job
            return Reject(exc, requeue=True)
    reason = f"{type(exc).__name__}: {exc}"
    lease.bury(reason)
    try:
        DeadLetters(lease.redis).record(DeadJob(task.request.id, reason, dict(task.request.kwargs or {}), retries,
                                                task.request.hostname or "?", queue))
    except Exception:  # the failure itself still reaches the result backend and the producer
        pass
    return exc


def _inject_fault(request: GenerateRequest) -> None:
    poison = os.environ.get(POISON_ENV)
    if poison and request.prompt == poison:
        raise InjectedFault(f"injected by the test-only {POISON_ENV} hook: this job's pipeline call always fails")
