"""The route table in Redis: model → active release, previous release, canary, and the history of every change."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from cachemgr.names import Release, validate_name

from .keys import PREWARM_KEY, ROUTE_CHANNEL, ROUTE_HISTORY, ROUTE_KEY, ROUTE_MODELS, ROUTE_STACK_KEY

STACK_DEPTH = 50
"""Releases a model's route stack keeps (the newest); rollback can go back this far."""


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


@dataclass(frozen=True)
class StackEntry:
    """One release a model was routed to: who routed it, when, why (promote, rollback, initial route)."""

    release: str
    actor: str = "?"
    at: float = 0.0
    reason: str = ""
    forced: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> StackEntry:
        data = json.loads(raw)
        return cls(str(data["release"]), str(data.get("actor", "?")), float(data.get("at", 0.0)),
                   str(data.get("reason", "")), bool(data.get("forced", False)))


class RouteTable:
    """The routes in Redis. Every change is one MULTI/EXEC that writes the hash, the model's route stack, appends to
    the history stream and publishes the model on the change channel, so readers see the change, its record and its
    notice together.

    The stack holds the releases the model was routed to, oldest first, the active one last: a promote pushes, a
    rollback rewinds to an earlier entry (dropping the ones above it), so a second rollback goes further back and
    never forward. `previous` in the hash is the entry below the active one."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, model: str) -> Route:
        data = self.redis.hgetall(ROUTE_KEY.format(model=validate_name(model, "model")))
        return _route_from_hash(model, {k.decode(): v.decode() for k, v in data.items()})

    def active(self, model: str) -> str | None:
        return self.get(model).active

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(ROUTE_MODELS))

    def stack(self, model: str) -> list[StackEntry]:
        """The model's route stack, oldest first (the active release last)."""
        return self._stack(self.redis, model, self.get(model))

    @staticmethod
    def _stack(reader: Any, model: str, route: Route) -> list[StackEntry]:
        raw = reader.lrange(ROUTE_STACK_KEY.format(model=validate_name(model, "model")), 0, -1)
        if raw:
            return [StackEntry.from_json(item) for item in raw]
        # a route written before stacks existed: its previous and active release, as far as it knows
        return [StackEntry(r, "?", route.updated_at, "initial route") for r in (route.previous, route.active) if r]

    def set_active(self, release: str | Release, actor: str = "cli", reason: str = "promote",
                   forced: bool = False) -> Route:
        """All new jobs of the model go to `release` (pushed on its stack). Ends any canary: the route is now exactly
        one release."""
        rel = str(Release.parse(str(release)))

        def change(current: Route, stack: list[StackEntry]) -> tuple[dict[str, str], list[StackEntry] | None]:
            new = stack if stack and stack[-1].release == rel else \
                [*stack, StackEntry(rel, actor, time.time(), reason, forced)]
            return _active_mapping(new), (None if new is stack else new)

        return self._change(Release.parse(rel).model, change, actor, reason, forced)

    def rewind(self, release: str | Release, actor: str = "cli", reason: str = "rollback",
               forced: bool = False) -> Route:
        """Roll back to `release`: the stack is cut back to its newest entry below the top naming it (what was routed
        after it is dropped), or, when no earlier entry names it, the top is replaced by it. Ends any canary."""
        rel = str(Release.parse(str(release)))

        def change(current: Route, stack: list[StackEntry]) -> tuple[dict[str, str], list[StackEntry] | None]:
            below = [i for i, entry in enumerate(stack[:-1]) if entry.release == rel]
            new = stack[:below[-1] + 1] if below else [*stack[:-1], StackEntry(rel, actor, time.time(), reason, forced)]
            return _active_mapping(new), new

        return self._change(Release.parse(rel).model, change, actor, reason, forced)

    def set_canary(self, release: str | Release, weight: float, actor: str = "cli", reason: str = "canary",
                   forced: bool = False) -> Route:
        """Send `weight` % of new jobs to `release`, the rest to the active release."""
        rel = str(Release.parse(str(release)))
        if not 0 < weight <= 100:
            raise RouteError(f"canary weight must be a percentage above 0 and at most 100, got {weight}")

        def change(current: Route, stack: list[StackEntry]) -> tuple[dict[str, str], None]:
            if not current.active:
                raise RouteError(f"{current.model} has no active release to share jobs with; promote one first")
            if current.active == rel:
                raise RouteError(f"{rel} is already the active release of {current.model}")
            return {"canary": rel, "canary_weight": _fmt_weight(weight)}, None

        return self._change(Release.parse(rel).model, change, actor, reason, forced)

    def clear_canary(self, model: str, actor: str = "cli", reason: str = "canary-off") -> Route:
        return self._change(model, lambda current, stack: ({"canary": "", "canary_weight": "0"}, None), actor,
                            reason, False)

    def _change(self, model: str, change: Any, actor: str, reason: str, forced: bool) -> Route:
        key = ROUTE_KEY.format(model=validate_name(model, "model"))
        stack_key = ROUTE_STACK_KEY.format(model=model)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, stack_key)
                    current = _route_from_hash(model, {k.decode(): v.decode() for k, v in pipe.hgetall(key).items()})
                    mapping, stack = change(current, self._stack(pipe, model, current))
                    mapping = {**mapping, "updated_at": repr(time.time())}
                    after = _route_from_hash(model, {**_route_to_hash(current), **mapping})
                    pipe.multi()
                    pipe.hset(key, mapping=mapping)
                    if stack is not None:
                        pipe.delete(stack_key)
                        if stack:
                            pipe.rpush(stack_key, *[entry.to_json() for entry in stack[-STACK_DEPTH:]])
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


def _active_mapping(stack: list[StackEntry]) -> dict[str, str]:
    """The hash fields of a route whose stack is `stack`: its top active, the entry below previous, no canary."""
    return {"active": stack[-1].release, "previous": stack[-2].release if len(stack) > 1 else "", "canary": "",
            "canary_weight": "0"}


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
