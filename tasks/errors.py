"""What a producer's `r.get()` raises when a worker could not make its image: our own types, each with the worker's
one-line reason, never a remote traceback (Celery rebuilds them on the producer from their module and message)."""

from __future__ import annotations

from .requests import BadRequest


class JobRefused(BadRequest):
    """The worker refused the job as asked: over its release's limits, or too large for its device memory even after
    the memory was freed and the job tried again. Asking for less succeeds; the same request never will."""


class JobFailed(RuntimeError):
    """The job failed on every try for a reason that is not its parameters (it is in the dead letters)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters: what logs and producers are shown."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
