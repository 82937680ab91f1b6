"""`generate`: what producers call. It runs only in a worker process that holds a resident pipeline."""

from __future__ import annotations

from typing import Any

from celery import Task
from kombu.utils.uuid import uuid

from . import serving
from .app import app
from .requests import BadRequest, GenerateRequest
from .routing import ROUTE_KEY_HEADER


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
    prompt: str,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    release: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Generate one image on this worker's resident pipeline; returns where it is, never its bytes."""
    request = GenerateRequest.parse(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width,
        height=height, seed=seed, release=release, model=model,
    )
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or delivery.get("queue")
    sent_at = getattr(self.request, "fleet_sent_at", None)
    return serving.current().serve(request, task_id=self.request.id, queue=queue, sent_at=sent_at)
