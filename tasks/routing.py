"""The route table (model → active release, canary, history) in Redis, and the producer-side router that reads it."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from cachemgr.names import InvalidName, Release, queue_for, validate_name

from .keys import ROUTE_CHANNEL, ROUTE_HISTORY, ROUTE_KEY, ROUTE_MODELS
from .requests import BadRequest
from .routecache import RouteCache

GENERATE_TASK = "warmfleet.generate"
ROUTE_KEY_HEADER = "fleet_route_key"
"""Message header carrying the task id to the router: Celery passes the router its options, never the task id."""


class NoRoute(LookupError):
    """No active release for a model: nothing would serve the job, so it is not sent."""


class FleetNotConfigured(RuntimeError):
    pass


class RouteError(ValueError):
    """A route change that makes no sense (a canary without an active release, a rollback with no history)."""


def canary_share(key: str) -> float:
    """Where a job falls in [0, 100): a hash of its task id, so a re-send with the same id lands on the same release."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


@dataclass(frozen=True)
class Route:
    model: str
    active: str | None
    previous: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    updated_at: float = 0.0

    def release_for(self, key: str) -> str | None:
        """The release a job with this routing key goes to: the canary for `canary_weight` % of keys."""
        if self.canary and self.canary_weight > 0 and canary_share(key) < self.canary_weight:
            return self.canary
        return self.active


class RouteTable:
    """The routes in Redis. Every change is one MULTI/EXEC that writes the hash, appends to the history stream
    and publishes the model on the change channel, so readers see the change, its record and its notice together."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, model: str) -> Route:
        data = self.redis.hgetall(ROUTE_KEY.format(model=validate_name(model, "model")))
        return _route_from_hash(model, {k.decode(): v.decode() for k, v in data.items()})

    def active(self, model: str) -> str | None:
        return self.get(model).active

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(ROUTE_MODELS))

    def set_active(self, release: str | Release, actor: str = "cli", reason: str = "promote",
                   forced: bool = False) -> Route:
        """All new jobs of the model go to `release`. Ends any canary: the route is now exactly one release."""
        rel = str(Release.parse(str(release)))

        def change(current: Route) -> dict[str, str]:
            mapping = {"active": rel, "canary": "", "canary_weight": "0"}
            if current.active and current.active != rel:
                mapping["previous"] = current.active
            return mapping

        return self._change(Release.parse(rel).model, change, actor, reason, forced)

    def set_canary(self, release: str | Release, weight: float, actor: str = "cli", reason: str = "canary",
                   forced: bool = False) -> Route:
        """Send `weight` % of new jobs to `release`, the rest to the active release."""
        rel = str(Release.parse(str(release)))
        if not 0 < weight <= 100:
            raise RouteError(f"canary weight must be a percentage above 0 and at most 100, got {weight}")

        def change(current: Route) -> dict[str, str]:
            if not current.active:
                raise RouteError(f"{current.model} has no active release to share jobs with; promote one first")
            if current.active == rel:
                raise RouteError(f"{rel} is already the active release of {current.model}")
            return {"canary": rel, "canary_weight": _fmt_weight(weight)}

        return self._change(Release.parse(rel).model, change, actor, reason, forced)

    def clear_canary(self, model: str, actor: str = "cli", reason: str = "canary-off") -> Route:
        return self._change(model, lambda current: {"canary": "", "canary_weight": "0"}, actor, reason, False)

    def _change(self, model: str, change: Any, actor: str, reason: str, forced: bool) -> Route:
        key = ROUTE_KEY.format(model=validate_name(model, "model"))
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = _route_from_hash(model, {k.decode(): v.decode() for k, v in pipe.hgetall(key).items()})
                    mapping = {**change(current), "updated_at": repr(time.time())}
                    after = _route_from_hash(model, {**_route_to_hash(current), **mapping})
                    pipe.multi()
                    pipe.hset(key, mapping=mapping)
                    pipe.sadd(ROUTE_MODELS, model)
                    pipe.xadd(ROUTE_HISTORY, _history_entry(current, after, actor, reason, forced),
                              maxlen=10000, approximate=True)
                    pipe.publish(ROUTE_CHANNEL, model)
                    pipe.execute()
                    return after
                except redis.WatchError:
                    continue

    def history(self, model: str | None = None, count: int = 100) -> list[dict[str, Any]]:
        """Newest first: who changed which route, when, from what to what."""
        out: list[dict[str, Any]] = []
        last = "+"
        while len(out) < count:
            entries = self.redis.xrevrange(ROUTE_HISTORY, max=last, count=500)
            if last != "+":
                entries = entries[1:]  # `max` is inclusive: the first entry was the last one of the page before
            if not entries:
                break
            for entry_id, fields in entries:
                item = {k.decode(): v.decode() for k, v in fields.items()}
                if model is None or item.get("model") == model:
                    item["id"] = entry_id.decode()
                    item["ts"] = int(item["id"].split("-")[0]) / 1000
                    out.append(item)
            last = entries[-1][0].decode()
        return out[:count]


def _fmt_weight(weight: float) -> str:
    return f"{weight:g}"


def _route_from_hash(model: str, data: dict[str, str]) -> Route:
    return Route(
        model=model,
        active=data.get("active") or None,
        previous=data.get("previous") or None,
        canary=data.get("canary") or None,
        canary_weight=float(data.get("canary_weight") or 0),
        updated_at=float(data.get("updated_at") or 0),
    )


def _route_to_hash(route: Route) -> dict[str, str]:
    return {"active": route.active or "", "previous": route.previous or "", "canary": route.canary or "",
            "canary_weight": _fmt_weight(route.canary_weight), "updated_at": repr(route.updated_at)}


def _history_entry(before: Route, after: Route, actor: str, reason: str, forced: bool) -> dict[str, str]:
    return {
        "model": after.model, "from": before.active or "", "to": after.active or "",
        "from_canary": _canary_text(before), "canary": _canary_text(after),
        "actor": actor, "reason": reason, "forced": "yes" if forced else "",
    }


def _canary_text(route: Route) -> str:
    return f"{route.canary} {_fmt_weight(route.canary_weight)}%" if route.canary else ""


class FleetRouter:
    """Celery `task_routes` entry: sends `generate` to the queue of the release that should serve it.

    An explicit `release=` on the job wins; otherwise the route of the job's model, read through a cache that
    pub/sub invalidates, so a send costs no Redis round trip in the common case. Canary jobs are picked by a hash
    of the task id (`GenerateTask.apply_async` passes it in a header: Celery never shows the router the id).
    """

    def __init__(self, redis_url: str | None, default_model: str, ttl: float = 2.0) -> None:
        self.redis_url = redis_url
        self.default_model = default_model
        self.ttl = ttl
        self.cache = RouteCache(redis_url, lambda client, model: RouteTable(client).get(model), ttl, ROUTE_CHANNEL)

    def invalidate(self, model: str | None = None) -> None:
        self.cache.invalidate(model)

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
                return str(Release.parse(release))
            except InvalidName as exc:
                raise BadRequest(f"bad generate request: release: {exc}") from None
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
