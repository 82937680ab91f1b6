"""One received `generate` job on the worker side: its execution lease, the serve call, retries and dead letters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Reject, TaskPredicate

from cachemgr.names import release_of_queue
from fleetstate import jobstats
from fleetstate.dead import DeadJob, DeadLetters
from fleetstate.leases import Claim, JobDead, JobLease, effective_lease_seconds
from fleetstate.timelimits import limit_or_default
from tasks.errors import JobFailed, JobRefused, one_line
from tasks.generate import NotServing, attach_runner
from tasks.requests import BadRequest, GenerateRequest

from .breaker import FailureBreaker
from .gpu import is_out_of_memory, release_device_memory
from .limits import describe_limits
from .runtime import WorkerRuntime
from .watchdog import JobWatchdog, TimedOut


class JobRunner:
    """What `tasks.generate` calls in a worker process (attached with `tasks.generate.attach_runner`).

    A duplicate delivery of a finished job returns the stored result (nothing recomputed); a job whose
    serve call fails is retried with backoff while retries are left, then recorded as dead and failed."""

    def __init__(self, runtime: WorkerRuntime, redis_client: Any, settings: Any,
                 breaker: FailureBreaker | None = None) -> None:
        self.runtime = runtime
        self.redis = redis_client
        self.settings = settings
        self.breaker = breaker
        self.on_timeout: Callable[[TimedOut], None] | None = None
        """Told of every try that ran past its time limit, just before the worker is recycled (a failure)."""
        if breaker is not None:
            self.on_timeout = lambda t: breaker.failure(t.task_id, f"ran past its time limit of {t.limit_s:g} s")

    def attach(self, celery_app: Any) -> JobRunner:
        """Become the runner of `celery_app`'s `generate` (Celery writes the job's STARTED and SUCCESS records itself,
        through its result backend)."""
        attach_runner(celery_app, self)
        return self

    def run(self, task: Task, request: GenerateRequest) -> dict[str, Any]:
        if self.breaker is not None and self.breaker.tripped:  # sick: run nothing, put the job back for a peer
            raise Reject(f"worker is sick ({self.breaker.reason}); job put back on its queue", requeue=True)
        delivery = task.request.delivery_info or {}
        queue = delivery.get("routing_key") or delivery.get("queue")
        sent_at = getattr(task.request, "fleet_sent_at", None)
        release = release_of_queue(queue) if queue else None
        with self._lease(task, str(release) if release else request.release) as lease:
            claim = lease.claim()
            if claim.result is not None:
                return claim.result  # a duplicate delivery of a finished job: its stored result, nothing recomputed
            if claim.dead is not None:
                raise JobDead(claim.dead)
            try:
                with self._time_limit(lease, claim, queue, task):
                    result = self._serve(request, task.request.id, queue, sent_at)
            except BadRequest as exc:
                self._count(task, release or request.release, "failed",
                            "out_of_memory" if "out of device memory" in str(exc) else "bad_request")
                raise
            except TaskPredicate:
                raise
            except Exception as exc:
                lease.release()  # the retry's delivery takes the lease afresh
                if not isinstance(exc, NotServing):  # each failed try of the release counts (a retry may succeed)
                    self._count(task, release, "failed", "other")
                if (self.breaker is not None and not isinstance(exc, NotServing)
                        and self.breaker.failure(task.request.id, one_line(exc))):
                    # this worker is sick, not the job: it goes back whole to its queue, no retry spent
                    raise Reject(f"worker is sick; job put back on its queue ({one_line(exc)})", requeue=True) from None
                raise self._retry_or_bury(task, exc, lease, queue) from None
            if self.breaker is not None:
                self.breaker.success()
            lease.complete(result, {"jobs": self.runtime.state.jobs})  # the registry's count in the same script
            self._count(task, result.get("release"), "served", result.get("timings") or {})
            return result

    def _count(self, task: Task, release: Any, what: str, detail: Any) -> None:
        """The release's job counters (fleetstate/jobstats.py); review jobs are never counted; best effort."""
        if not release or getattr(task.request, jobstats.REVIEW_HEADER, None):
            return
        try:
            if what == "served":
                jobstats.record_served(self.redis, str(release), detail)
            else:
                jobstats.record_failed(self.redis, str(release), detail)
        except Exception:  # the job's outcome must not depend on its statistics
            pass

    def _serve(self, request: GenerateRequest, task_id: str, queue: str | None, sent_at: float | None) -> dict[str, Any]:
        """Serve the job; out of device memory, free what it held and try once more here, then refuse it."""
        reason = ""
        for _ in range(2):
            try:
                return self.runtime.serve(request, task_id=task_id, queue=queue, sent_at=sent_at)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                reason = one_line(exc, limit=160)
            # outside the except block: the traceback, and the tensors its frames held, are gone
            release_device_memory(self._device(request, queue))
        raise self._out_of_memory(request, queue, reason)

    def _device(self, request: GenerateRequest, queue: str | None) -> str:
        try:
            return self.runtime.pick(request, queue).resident.device
        except Exception:
            return "cpu"

    def _out_of_memory(self, request: GenerateRequest, queue: str | None, reason: str) -> JobRefused:
        release, resident = self.runtime.pick(request, queue)
        params = resident.resolve(request)
        return JobRefused(
            f"out of device memory for {params['width']}x{params['height']}, {params['steps']} steps on {release} "
            f"({resident.device}) even after freeing cached memory and trying again; this release allows "
            f"{describe_limits(resident.limits)}: ask for a smaller image ({reason})")

    def _lease(self, task: Task, release: str | None) -> JobLease:
        settings = self.settings
        properties = getattr(task.request, "properties", None) or {}
        return JobLease(
            self.redis, task.request.id, task.request.hostname or "?",
            effective_lease_seconds(settings.job_lease_seconds, settings.visibility_timeout),
            delivery_tag=properties.get("delivery_tag"), extend_visibility=settings.job_extend_visibility,
            release=release,
        )

    def _time_limit(self, lease: JobLease, claim: Claim, queue: str | None, task: Task) -> JobWatchdog:
        """The job's release's own limit (read by the claim), else the fleet's (`FLEET_JOB_TIME_LIMIT_S`)."""
        limit = limit_or_default(claim.time_limit, self.settings.job_time_limit_s)
        release = release_of_queue(queue) if queue else None

        def timed_out(outcome: TimedOut) -> None:
            self._count(task, release, "failed", "time_limit")  # each try past its limit, as for any failed try
            if self.on_timeout is not None:
                self.on_timeout(outcome)

        return JobWatchdog(lease, limit, self.settings.job_max_retries, queue, dict(task.request.kwargs or {}),
                           on_timeout=timed_out)

    def _retry_or_bury(self, task: Task, exc: Exception, lease: JobLease, queue: str | None) -> BaseException:
        """Retry with exponential backoff while retries are left; then record the job as dead and fail it."""
        settings = self.settings
        retries = task.request.retries or 0
        if retries < settings.job_max_retries:
            countdown = min(60.0, settings.job_retry_backoff * 2**retries)
            try:
                return task.retry(exc=exc, countdown=countdown, max_retries=settings.job_max_retries, throw=False)
            except Reject:  # the retry could not be published (broker down): keep the message, never drop the job
                return Reject(exc, requeue=True)
        reason = one_line(exc)
        lease.bury(reason)
        try:
            DeadLetters(lease.redis).record(DeadJob(task.request.id, reason, dict(task.request.kwargs or {}), retries,
                                                    task.request.hostname or "?", queue))
        except Exception:  # the failure itself still reaches the result backend and the producer
            pass
        return JobFailed(f"{reason} (failed {retries + 1} times on {task.request.hostname or '?'}; in `warmfleet dead`)")
