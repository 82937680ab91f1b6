"""Dynamic batching: a worker that finds several compatible `generate` jobs waiting runs them as one pipeline call.

Mechanism, chosen over the `celery-batches` task class: a Celery task *Strategy* (the per-message handler the
worker builds for a task) that wraps Celery's own default strategy and changes only its last step. Every message
still becomes a real `celery.worker.request.Request` (revocation checks, task-received events, `task_reserved`
bookkeeping all happen as today); instead of executing it at once, the handler holds it in a small buffer. The
buffer is flushed when it holds `batch_max` jobs or when its first job has waited `batch_wait_ms`. A flush
1. groups the buffered jobs by call shape (release, and every pipeline argument but the prompts and seeds),
2. runs each group of two or more as ONE pipeline call (prompts as a list, one seeded generator per job) and
   leaves each job's image in `WorkerRuntime.prepared` (a `PreparedImages`) under its own task id,
3. then executes every buffered request through Celery's ordinary path, in arrival order: the `generate` task
   body finds its prepared image, stores it under its own key and returns its own result; Celery stores the
   result, sends the events and acks the message (acks late) — job by job, exactly as without batching.
Why not celery-batches: its task receives a list of stripped-down requests and the task must store each result,
send no per-job events, skip revocation checks and lose the message headers (our queued-time stamp); and it would
make `generate` a different task class on batching workers. Here the task, its results and its failure handling
are the same code whatever the batch size, and `batch_max = 1` installs nothing at all.

Invariants kept: a job never loads a model (a batch uses the resident pipeline only); a bad job fails alone (a job
that does not validate or pick is left out of every batch and fails on its own path; if a batched call raises, no
image is prepared and each job of that group runs alone); a redelivered job writes the same key (`<task id>.png`).
The worker's prefetch is raised to `batch_max` (workers/boot.py) so the buffer can fill; those messages stay
unacknowledged until their own job is stored, so a worker that dies mid-batch loses nothing: Redis restores every
unacked message of the batch after `visibility_timeout`, and each job then runs again under its own id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from kombu.utils.uuid import uuid

from tasks.errors import one_line
from tasks.requests import GenerateRequest, request_of_job
from tasks.router import GENERATE_TASK

from .gpu import release_device_memory
from .runtime import Prepared, WorkerRuntime

log = logging.getLogger("warmfleet.batching")

BATCHABLE_FAMILIES = frozenset({"sd", "sdxl", "single-file"})
"""Families whose pipeline takes a list of prompts and one generator per image, verified against unbatched twins
(tests/test_batching.py). Others (Würstchen's prior + decoder) are served one job at a time."""

PER_JOB_ARGUMENTS = ("prompt", "negative_prompt")
"""Pipeline arguments that may differ inside a batch; every other argument must be equal (the call shape)."""

PIXEL_TOLERANCE = 3
"""Max abs difference (0–255) allowed between a batched image and its unbatched twin. Batched convolutions and
matmuls take other kernel paths on CPU, so some pixels move by a level or two: measured ≤ 2 over 64×64/4-step and
32×32/2-step batches of 8 (bench/bench_batching.py); not byte-identical on this backend."""


def call_shape(runtime: WorkerRuntime, request: GenerateRequest, queue: str | None) -> Hashable | None:
    """What must be equal for two jobs to share a pipeline call; None when the job must run alone."""
    release, resident = runtime.pick(request, queue)
    if resident.family not in BATCHABLE_FAMILIES:
        return None
    kwargs = resident.call_kwargs(request, resident.resolve(request), resident.defaults)
    fixed = tuple(sorted((k, v) for k, v in kwargs.items() if k not in PER_JOB_ARGUMENTS))
    return release, id(resident), fixed, kwargs.get("negative_prompt") is None  # SDXL: None ≠ "" (zeroed embeds)


class Job:
    """One buffered Celery request with its parsed parameters (None when it does not parse: it will fail alone)."""

    def __init__(self, request: Any, generate: GenerateRequest | None, queue: str | None) -> None:
        self.request = request
        self.generate = generate
        self.queue = queue

    @property
    def task_id(self) -> str:
        return self.request.id


def parse_job(task: Any, request: Any) -> Job:
    delivery = request.delivery_info or {}
    queue = delivery.get("routing_key") or delivery.get("queue")
    try:
        # read as the task body reads it, stable seed included: batched or not, a job (and any redelivery of it)
        # makes the same image
        return Job(request, request_of_job(request.id, request.args, request.kwargs), queue)
    except Exception:  # the task itself will report why, on its own path
        return Job(request, None, queue)


def plan_batches(runtime: WorkerRuntime, jobs: list[Job], batch_max: int) -> list[list[Job]]:
    """Groups of compatible jobs, each at most batch_max long, in arrival order; singletons are left out."""
    groups: dict[Hashable, list[Job]] = {}
    sizes: dict[Hashable, int] = {}
    for job in jobs:
        if job.generate is None:
            continue
        try:
            key = call_shape(runtime, job.generate, job.queue)
        except Exception:  # a job for a release this worker does not hold, or over its limits: it fails alone
            continue
        if key is not None:
            groups.setdefault(key, []).append(job)
            limits = runtime.pick(job.generate, job.queue).resident.limits
            sizes.setdefault(key, max(1, min(batch_max, limits.get("max_batch", batch_max))))
    batches = []
    for key, group in groups.items():
        size = sizes[key]
        for start in range(0, len(group), size):
            if len(group[start:start + size]) > 1:
                batches.append(group[start:start + size])
    return batches


def prepare(runtime: WorkerRuntime, batch: list[Job]) -> int:
    """Run one batched pipeline call and leave each job's image for serve(); returns how many were prepared.

    If the call fails, nothing is prepared: each job of the batch then runs alone, so only a bad one fails."""
    release, resident = runtime.pick(batch[0].generate, batch[0].queue)  # type: ignore[arg-type]
    started = time.time()
    try:
        images, inference = resident.generate_batch([job.generate for job in batch], release)  # type: ignore[misc]
    except Exception as exc:
        log.warning("batch of %d failed (%s); its jobs run one at a time", len(batch), one_line(exc))
        failed = True
    else:
        failed = False
    if failed:  # outside the except block, so the tensors the failed call held can go
        release_device_memory(resident.device)
        return 0
    batch_id = uuid()
    for job, (png, params) in zip(batch, images, strict=True):
        runtime.prepared.put(job.task_id, Prepared(release, png, params, inference, started, batch_id, len(batch)))
    return len(batch)


class JobBuffer:
    """Holds requests the strategy received; flushes on size or on the first job's wait budget."""

    def __init__(self, runtime: WorkerRuntime, task: Any, handle: Callable[[Any], None], timer: Any,
                 batch_max: int, wait_seconds: float) -> None:
        self.runtime = runtime
        self.task = task
        self.handle = handle
        self.timer = timer
        self.batch_max = batch_max
        self.wait_seconds = wait_seconds
        self.jobs: list[Job] = []
        self.deadline: Any = None

    def add(self, request: Any) -> None:
        self.jobs.append(parse_job(self.task, request))
        if len(self.jobs) >= self.batch_max:
            self.flush()
        elif self.deadline is None:
            self.deadline = self.timer.call_after(self.wait_seconds, self.flush)

    def flush(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        jobs, self.jobs = self.jobs, []
        if not jobs:
            return
        try:
            for batch in plan_batches(self.runtime, jobs, self.batch_max):
                prepare(self.runtime, batch)
            for job in jobs:
                try:
                    self.handle(job.request)  # Celery's own path: trace, result, events, ack — one job at a time
                except Exception:
                    log.exception("job %s could not be handed to the pool", job.task_id)
        finally:
            self.runtime.prepared.clear()  # a job revoked meanwhile must not leave its image behind


    def drop(self) -> None:
        """Forget the held jobs without running them: their unacked messages go back to the queue."""
        from celery.worker.state import task_ready

        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        for job in self.jobs:
            task_ready(job.request)
        self.jobs = []


class _Handing:
    """The consumer as Celery's default strategy sees it, except that requests are handed to the buffer."""

    def __init__(self, consumer: Any, on_task_request: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class BatchingStrategy:
    """A Celery `Task.Strategy`: Celery's default strategy, with requests buffered instead of executed at once."""

    def __init__(self, runtime: WorkerRuntime, batch_max: int, wait_seconds: float) -> None:
        self.runtime = runtime
        self.batch_max = batch_max
        self.wait_seconds = wait_seconds
        self.buffer: JobBuffer | None = None

    def __call__(self, task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        from celery.worker.strategy import default

        if self.buffer is not None:  # the consumer restarted (broker reconnect): the broker redelivers what it held
            self.buffer.drop()
        self.buffer = JobBuffer(self.runtime, task, consumer.on_task_request, consumer.timer, self.batch_max,
                                self.wait_seconds)
        return default(task, app, _Handing(consumer, self.buffer.add), **kwargs)


def enable_batching(app: Any, runtime: WorkerRuntime, batch_max: int, batch_wait_ms: float,
                    task_name: str = GENERATE_TASK) -> BatchingStrategy | None:
    """Install the batching strategy on `generate` in this worker process; batch_max 1 installs nothing."""
    if batch_max <= 1:
        return None
    strategy = BatchingStrategy(runtime, batch_max, batch_wait_ms / 1000.0)
    app.tasks[task_name].Strategy = strategy
    runtime.batching = True
    return strategy
