"""The route table (model → active release) in Redis, and the producer-side router that reads it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from cachemgr.names import InvalidName, Release, queue_for, validate_name

from .keys import ROUTE_CHANNEL, ROUTE_HISTORY, ROUTE_KEY, ROUTE_MODELS
from .requests import BadRequest

GENERATE_TASK = "warmfleet.generate"


class NoRoute(LookupError):
    """No active release for a model: nothing would serve the job, so it is not sent."""


class FleetNotConfigured(RuntimeError):
    pass


@dataclass(frozen=True)
class Route:
    model: str
    active: str | None
    previous: str | None = None
    updated_at: float = 0.0


class RouteTable:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, model: str) -> Route:
        data = self.redis.hgetall(ROUTE_KEY.format(model=validate_name(model, "model")))
        data = {k.decode(): v.decode() for k, v in data.items()}
        return Route(model, data.get("active"), data.get("previous"), float(data.get("updated_at", 0) or 0))

    def active(self, model: str) -> str | None:
        return self.get(model).active

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(ROUTE_MODELS))

    def set_active(self, release: str | Release, actor: str = "cli", reason: str = "promote") -> Route:
        release = Release.parse(str(release))
        model = release.model
        key = ROUTE_KEY.format(model=model)
        now = time.time()
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.hget(key, "active")
                    current = current.decode() if current else None
                    pipe.multi()
                    mapping = {"active": str(release), "updated_at": str(now)}
                    if current and current != str(release):
                        mapping["previous"] = current
                    pipe.hset(key, mapping=mapping)
                    pipe.sadd(ROUTE_MODELS, model)
                    pipe.xadd(
                        ROUTE_HISTORY,
                        {"model": model, "from": current or "", "to": str(release), "actor": actor, "reason": reason},
                        maxlen=10000,
                        approximate=True,
                    )
                    pipe.publish(ROUTE_CHANNEL, model)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self.get(model)

    def history(self, model: str | None = None, count: int = 100) -> list[dict[str, Any]]:
        entries = self.redis.xrevrange(ROUTE_HISTORY, count=count * (1 if model is None else 10))
        out = []
        for entry_id, fields in entries:
            item = {k.decode(): v.decode() for k, v in fields.items()}
            if model and item.get("model") != model:
                continue
            item["id"] = entry_id.decode()
            item["ts"] = int(item["id"].split("-")[0]) / 1000
            out.append(item)
        return out[:count]


class FleetRouter:
    """Celery `task_routes` entry: sends `generate` to the queue of the release that should serve it.

    An explicit `release=` on the job wins; otherwise the route table's active release for the job's model.
    Lookups are cached for `ttl` seconds so a send costs no Redis round trip in the common case.
    """

    def __init__(self, redis_url: str | None, default_model: str, ttl: float = 2.0) -> None:
        self.redis_url = redis_url
        self.default_model = default_model
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()
        self._table: RouteTable | None = None

    def table(self) -> RouteTable:
        if self.redis_url is None:
            raise FleetNotConfigured(
                "no broker configured: set FLEET_BROKER_URL (e.g. redis://host:6379/0) or start a local fleet "
                "with `warmfleet up`"
            )
        if self._table is None:
            self._table = RouteTable(redis.Redis.from_url(self.redis_url))
        return self._table

    def invalidate(self, model: str | None = None) -> None:
        with self._lock:
            if model is None:
                self._cache.clear()
            else:
                self._cache.pop(model, None)

    def active(self, model: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(model)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        release = self.table().active(model)
        with self._lock:
            self._cache[model] = (now, release)
        return release

    def queue_for_job(self, kwargs: dict[str, Any]) -> str:
        release = kwargs.get("release")
        if release:
            try:
                return queue_for(release)
            except InvalidName as exc:
                raise BadRequest(f"bad generate request: release: {exc}") from None
        model = kwargs.get("model") or self.default_model
        active = self.active(model)
        if not active:
            raise NoRoute(
                f"no active release for model {model!r}: promote one with `warmfleet promote {model} <release>`"
            )
        return queue_for(active)

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        if name != GENERATE_TASK:
            return None
        if options.get("queue"):
            return None  # an explicit queue wins, as in Celery
        return {"queue": self.queue_for_job(kwargs or {})}
