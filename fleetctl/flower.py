"""`python -m fleetctl.flower [Flower's options]`: Flower as `celery -A tasks.app flower` runs it, plus one thing Flower
cannot do by itself: a `generate` sent through its API with a bad request is answered HTTP 400 with the fleet's
one-line reason. Flower answers any exception of a task's `apply_async` with an empty HTTP 500 and keeps the reason
in its log.

The launch is Flower's own (its public `flower.command` steps: environment, command line and config file options,
settings, logging), then the handlers below are added with tornado's `Application.add_handlers`, which are matched
before Flower's own. Options and `FLOWER_*` variables are Flower's (`--address`, `--port`, `FLOWER_BASIC_AUTH`, …).
"""

from __future__ import annotations

import atexit
import signal
import sys
from typing import Any

from flower.api.tasks import TaskApply, TaskAsyncApply
from tornado import web

from tasks.router import GENERATE_TASK


def refusal(handler: Any) -> str | None:
    """Why the `generate` request in a Flower API call would be refused by the producer (its parameters, a release
    the archive lacks, no route): one line, or None when it would be sent."""
    from tasks.requests import BadRequest, GenerateRequest, params_of_call
    from tasks.router import FleetNotConfigured, NoRoute

    args, kwargs, _ = handler.get_task_args()
    try:
        params = params_of_call(args, kwargs)
        GenerateRequest.parse(**params)
        handler.capp.fleet_router.release_for_job(params)
    except (BadRequest, NoRoute, FleetNotConfigured) as exc:
        return str(exc).strip().splitlines()[0]
    return None


class RefusesBadGenerate:
    """Mixed in front of a Flower apply handler: a `generate` the producer would refuse is a 400 with the reason."""

    @web.authenticated
    async def post(self, taskname: str) -> None:
        reason = refusal(self)
        if reason:
            raise web.HTTPError(400, reason.replace("%", "%%"))
        await super().post(taskname)  # type: ignore[misc]


class GenerateAsyncApply(RefusesBadGenerate, TaskAsyncApply):
    pass


class GenerateApply(RefusesBadGenerate, TaskApply):
    pass


def fleet_handlers(url_prefix: str = "") -> list[tuple[str, type]]:
    prefix = "/" + url_prefix.strip("/") if url_prefix and url_prefix.strip("/") else ""
    task = GENERATE_TASK.replace(".", r"\.")
    return [(rf"{prefix}/api/task/async-apply/({task})", GenerateAsyncApply),
            (rf"{prefix}/api/task/apply/({task})", GenerateApply)]


def main(argv: list[str] | None = None) -> None:
    from flower.app import Flower
    from flower.command import apply_env_options, apply_options, extract_settings, setup_logging
    from flower.urls import settings
    from tornado.options import options

    from tasks import app

    apply_env_options()
    apply_options(sys.argv[0], list(sys.argv[1:] if argv is None else argv))
    extract_settings()
    setup_logging()
    flower = Flower(capp=app, options=options, **settings)
    flower.add_handlers(r".*", fleet_handlers(options.url_prefix))
    atexit.register(flower.stop)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    flower.start_http_server()
    try:
        flower.start()
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main()
