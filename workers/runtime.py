"""What a worker process serves with: its resident pipelines, keyed by release, and the output store.

Several releases may map to one ResidentPipeline (same base, different LoRA); a job then activates its
release's adapters before it runs, which costs milliseconds and loads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from cachemgr.names import release_of_queue
from fleetstate.registry import WorkerState
from tasks.generate import NotServing
from tasks.requests import BadRequest, GenerateRequest

from .outputs import OutputStore
from .provenance import provenance, with_text
from .resident import ResidentPipeline


class Pick(NamedTuple):
    release: str
    resident: ResidentPipeline


class Prepared(NamedTuple):
    """A job's image, already made by a batched pipeline call (workers/batching.py); serve() stores and reports it."""

    release: str
    png: bytes
    params: dict[str, Any]
    inference: float
    started: float
    batch_id: str
    batch_size: int


class PreparedImages:
    """Images a batched pipeline call already made, by task id: put by workers.batching, taken once by serve()."""

    def __init__(self) -> None:
        self._images: dict[str, Prepared] = {}

    def put(self, task_id: str, prepared: Prepared) -> None:
        self._images[task_id] = prepared

    def take(self, task_id: str, release: str) -> Prepared | None:
        """The job's image if a batch made it for this release; an image made for another release is never served."""
        prepared = self._images.pop(task_id, None)
        return prepared if prepared is not None and prepared.release == release else None

    def clear(self) -> None:
        """Forget every image left (a job revoked meanwhile must not leave its image behind)."""
        self._images.clear()

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._images


class WorkerRuntime:
    def __init__(self, worker: str, pipelines: dict[str, ResidentPipeline], outputs: OutputStore, state: WorkerState,
                 after_job: Callable[[WorkerState], None] | None = None) -> None:
        self.after_job = after_job
        self.worker = worker
        self.pipelines = pipelines
        self.outputs = outputs
        self.state = state
        self.batching = False  # set by workers.batching: results then say which batch made them
        self.prepared = PreparedImages()

    def pick(self, request: GenerateRequest, queue: str | None) -> Pick:
        """The job's release (its queue's, else the one it names) and the pipeline that holds it."""
        queued_for = release_of_queue(queue) if queue else None
        release = str(queued_for) if queued_for else request.release
        if request.release and release and request.release != release:
            raise BadRequest(f"job pinned to {request.release} arrived on the queue of {release}")
        if release is None:
            if len(self.pipelines) == 1:
                return Pick(*next(iter(self.pipelines.items())))
            raise BadRequest("job names no release and arrived on no release queue")
        try:
            return Pick(release, self.pipelines[release])
        except KeyError:
            raise NotServing(f"worker {self.worker} is not warm on {release}; it serves {', '.join(self.pipelines)}") from None

    def serve(self, request: GenerateRequest, task_id: str, queue: str | None, sent_at: float | None) -> dict[str, Any]:
        started = time.time()
        release, resident = self.pick(request, queue)
        switch_seconds = resident.activate(release)
        prepared = self.prepared.take(task_id, release)
        if prepared is not None:
            png, params, inference, started = prepared.png, prepared.params, prepared.inference, prepared.started
        else:
            png, params, inference = resident.generate(request, release)
        png = with_text(png, provenance(request.prompt, {"negative_prompt": request.negative_prompt, **params}, release))
        stored_at = time.perf_counter()
        uri = self.outputs.put(f"{task_id}.png", png, "image/png")
        store_seconds = time.perf_counter() - stored_at
        finished = time.time()
        self.state.jobs += 1
        if self.after_job:
            try:
                self.after_job(self.state)
            except Exception:  # the registry is best effort; the job's result must not depend on it
                pass
        queued = max(0.0, started - sent_at) if sent_at else None
        batch = {"batch_size": 1, "batch_id": None}
        if prepared is not None:
            batch = {"batch_size": prepared.batch_size, "batch_id": prepared.batch_id}
        return {
            **(batch if self.batching else {}),
            "task_id": task_id,
            "image_uri": uri,
            "image_key": f"{task_id}.png",
            "release": release,
            "worker": self.worker,
            "device": resident.device,
            "prompt": request.prompt,
            **params,
            "timings": {
                "queued_ms": round(queued * 1000, 2) if queued is not None else None,
                "switch_ms": round(switch_seconds * 1000, 3),
                "inference_ms": round(inference * 1000, 2),
                "store_ms": round(store_seconds * 1000, 2),
                "total_ms": round((finished - (sent_at or started)) * 1000, 2),
            },
        }
