"""The producer-side router: Celery's `task_routes` entry that sends `generate` to its release's queue."""

from __future__ import annotations

import uuid
from typing import Any

from cachemgr.names import InvalidName, Release, queue_for
from fleetstate.catalog import Catalog, Known, describe_missing
from fleetstate.keys import CATALOG_CHANNEL, ROUTE_CHANNEL
from fleetstate.routecache import RouteCache
from fleetstate.routes import Route, RouteTable

from .errors import JobRefused
from .requests import BadRequest

GENERATE_TASK = "warmfleet.generate"
ROUTE_KEY_HEADER = "fleet_route_key"
"""Message header carrying the task id to the router: Celery passes the router its options, never the task id."""


class NoRoute(LookupError):
    """No active release for a model: nothing would serve the job, so it is not sent."""


class FleetNotConfigured(RuntimeError):
    pass


class FleetRouter:
    """Celery `task_routes` entry: sends `generate` to the queue of the release that should serve it.

    An explicit `release=` on the job wins, once the catalog of what the archive holds (fleetstate/catalog.py) says
    its components exist (else `JobRefused`, before anything is queued); otherwise the route of the job's model. Both
    are read through caches that pub/sub invalidates, so a send costs no Redis round trip in the common case and
    never an archive listing. Canary jobs are picked by a hash of the task id (`GenerateTask.apply_async` passes it
    in a header: Celery never shows the router the id).
    """

    def __init__(self, redis_url: str | None, default_model: str, ttl: float = 2.0,
                 master_name: str | None = None) -> None:
        self.redis_url = redis_url
        self.default_model = default_model
        self.ttl = ttl
        self.cache = RouteCache(redis_url, lambda client, model: RouteTable(client).get(model), ttl, ROUTE_CHANNEL,
                                master_name)
        self.catalog = RouteCache(redis_url, lambda client, model: Catalog(client).known(model), ttl, CATALOG_CHANNEL,
                                  master_name)

    def invalidate(self, model: str | None = None) -> None:
        self.cache.invalidate(model)
        self.catalog.invalidate(model)

    def known(self, model: str) -> Known:
        """What the archive holds of `model`, as the catalog says (cached like the routes)."""
        if self.redis_url is None:
            return Known(model, False, frozenset())
        return self.catalog.get(model)

    def route(self, model: str) -> Route:
        if self.redis_url is None:
            raise FleetNotConfigured(
                "no broker configured: set FLEET_BROKER_URL (e.g. redis://host:6379/0) or start a local fleet "
                "with `warmfleet up`"
            )
        return self.cache.get(model)

    def active(self, model: str) -> str | None:
        return self.route(model).active

    def release_for_job(self, kwargs: dict[str, Any], key: str | None = None) -> str:
        """The release a job goes to; `key` (the task id) picks canary jobs, a random one is used without it."""
        release = kwargs.get("release")
        if release:
            try:
                rel = Release.parse(release)
            except InvalidName as exc:
                raise BadRequest(f"bad generate request: release: {exc}") from None
            missing = self.known(rel.model).missing(rel)
            if missing:
                raise JobRefused(f"refused: no worker can ever serve {rel}: {describe_missing(rel, missing)}")
            return str(rel)
        model = kwargs.get("model") or self.default_model
        chosen = self.route(model).release_for(key or uuid.uuid4().hex)
        if not chosen:
            raise NoRoute(
                f"no active release for model {model!r}: promote one with `warmfleet promote {model} <release>`"
            )
        return chosen

    def queue_for_job(self, kwargs: dict[str, Any], key: str | None = None) -> str:
        return queue_for(self.release_for_job(kwargs, key))

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        if name != GENERATE_TASK:
            return None
        if options.get("queue"):
            return None  # an explicit queue wins, as in Celery
        key = (options.get("headers") or {}).get(ROUTE_KEY_HEADER)
        return {"queue": self.queue_for_job(kwargs or {}, key)}
