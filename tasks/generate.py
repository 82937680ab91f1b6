"""`generate`: what producers call. Its body runs only in a worker process that holds a resident pipeline."""

from __future__ import annotations

from typing import Any, Protocol

from celery import Task
from kombu.utils.uuid import uuid

from .app import app
from .requests import BadRequest, GenerateRequest, params_of_call, request_of_job
from .router import GENERATE_TASK, ROUTE_KEY_HEADER


class JobRunner(Protocol):
    """What a worker process attaches to its app (`attach_runner`): it runs one received job end to end."""

    def run(self, task: Task, request: GenerateRequest) -> dict[str, Any]:
        ...


class NotServing(RuntimeError):
    """The process that received a generate job holds no pipeline: a routing or deployment mistake."""


def attach_runner(celery_app: Any, runner: JobRunner | None) -> None:
    """The worker process hands its job runner to the app it consumes with; producers never do."""
    celery_app.fleet_runner = runner


class GenerateTask(Task):
    """Validates on the producer side too, so a bad job is refused before it ever reaches a queue.

    It also makes the task id itself (Celery's router is never shown the id) and hands it to the router in a
    header, so a canary split is decided by the id: the same id always lands on the same release.
    """

    resultrepr_maxsize = 320
    """The result's text in the worker's success log line and the task-succeeded event (Flower): Celery's `saferepr`
    of the whole result dict costs ~75 µs per job, under half of that at this length, which still shows the
    task id, where the image is and the release."""

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any) -> Any:
        params = params_of_call(args, kwargs)
        GenerateRequest.parse(**params)
        task_id = task_id or uuid()
        options["headers"] = {**(options.get("headers") or {}), ROUTE_KEY_HEADER: task_id}
        return super().apply_async(args=(), kwargs=params, task_id=task_id, **options)


@app.task(bind=True, base=GenerateTask, name=GENERATE_TASK, throws=(BadRequest,))
def generate(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate one image on this worker's resident pipeline; returns where it is, never its bytes.

    Parameters: those of `tasks.requests.GenerateRequest`, in its field order. A raw send that skipped the
    producer's checks (another language, a hand-made message) may carry anything: a missing prompt, extra
    positional values or unknown names are refused as BadRequest too, never a TypeError."""
    request = request_of_job(self.request.id, args, kwargs)
    runner = getattr(self.app, "fleet_runner", None)
    if runner is None:
        raise NotServing(
            "this process holds no resident pipeline; generate jobs must be consumed by `warmfleet worker` processes"
        )
    return runner.run(self, request)
