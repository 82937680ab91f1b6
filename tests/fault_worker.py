"""A real `warmfleet worker` process with one fault injected by wrapping its runtime, never by a hook in production
code: every job whose prompt equals $WARMFLEET_TEST_POISON_PROMPT fails as a pipeline call that always raises would;
every job whose prompt equals $WARMFLEET_TEST_HANG_PROMPT hangs as a pipeline call that never returns would.

Run as `python -m tests.fault_worker worker --release R …` (the same arguments as `warmfleet worker`)."""

from __future__ import annotations

import os

POISON_ENV = "WARMFLEET_TEST_POISON_PROMPT"
HANG_ENV = "WARMFLEET_TEST_HANG_PROMPT"
FAULT_ENVS = (POISON_ENV, HANG_ENV)


class InjectedFault(RuntimeError):
    """What the poisoned jobs fail with (retries and dead letters then take over, as for any failing job)."""


def poison_runtime(prompt: str) -> None:
    from workers.runtime import WorkerRuntime

    serve = WorkerRuntime.serve

    def serve_or_fail(self, request, **kwargs):  # noqa: ANN001, ANN202 - WorkerRuntime.serve's signature
        if request.prompt == prompt:
            raise InjectedFault("injected by the test worker: this job's pipeline call always fails")
        return serve(self, request, **kwargs)

    WorkerRuntime.serve = serve_or_fail


def hang_runtime(prompt: str) -> None:
    import threading

    from workers.runtime import WorkerRuntime

    serve = WorkerRuntime.serve

    def serve_or_hang(self, request, **kwargs):  # noqa: ANN001, ANN202 - WorkerRuntime.serve's signature
        if request.prompt == prompt:
            threading.Event().wait()  # a pipeline call that never returns
        return serve(self, request, **kwargs)

    WorkerRuntime.serve = serve_or_hang


if __name__ == "__main__":
    if os.environ.get(POISON_ENV):
        poison_runtime(os.environ[POISON_ENV])
    if os.environ.get(HANG_ENV):
        hang_runtime(os.environ[HANG_ENV])
    from fleetctl.cli import main

    main()
