"""The seam between the `generate` task (imported by producers) and the resident pipelines that only a
GPU worker process holds. The worker installs its runtime at boot; producers never do."""

from __future__ import annotations

from typing import Any, Protocol

from .requests import GenerateRequest


class Runtime(Protocol):
    def serve(self, request: GenerateRequest, task_id: str, queue: str | None, sent_at: float | None) -> dict[str, Any]:
        ...


class NotServing(RuntimeError):
    """The process that received a generate job holds no pipeline: a routing or deployment mistake."""


_runtime: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise NotServing(
            "this process holds no resident pipeline; generate jobs must be consumed by `warmfleet worker` processes"
        )
    return _runtime
