"""The route table in Redis: model → active release, previous release, canary, and the history of every change."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis

from cachemgr.names import Release, validate_name

from .keys import PREWARM_KEY, ROUTE_CHANNEL, ROUTE_HISTORY, ROUTE_KEY, ROUTE_MODELS


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

    def referenced(self) -> list[tuple[str, str]]:
        """The releases this route refers to, as (role, release): active, canary, previous, each when set.

        Routed releases are what rollback must find warm and what retention must keep: this is the one reading."""
        return [(role, release) for role, release in
                (("active", self.active), ("canary", self.canary), ("previous", self.previous)) if release]

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

    def prewarms(self, model: str | None = None) -> list[str]:
        """Releases declared "warm on their base": workers of that base load them before anyone promotes them."""
        releases = sorted(raw.decode() for raw in self.redis.smembers(PREWARM_KEY))
        return [r for r in releases if model is None or Release.parse(r).model == model]

    def set_prewarm(self, release: str | Release, on: bool = True, actor: str = "cli") -> bool:
        """Declare (or, with on=False, withdraw) a prewarm; recorded in the history. False if nothing changed."""
        rel = Release.parse(str(release))
        with self.redis.pipeline() as pipe:
            (pipe.sadd if on else pipe.srem)(PREWARM_KEY, str(rel))
            route = self.get(rel.model)
            entry = {**_history_entry(route, route, actor, "prewarm" if on else "prewarm-off", False),
                     "prewarm": str(rel)}
            pipe.xadd(ROUTE_HISTORY, entry, maxlen=10000, approximate=True)
            changed, _ = pipe.execute()
        return bool(changed)

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
