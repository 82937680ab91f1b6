"""Pins, and everything retention must keep in every tier: routed, warm and pinned versions."""

from __future__ import annotations

import redis

from cachemgr.names import ComponentRef, Release

from .keys import PIN_KEY
from .registry import WarmRegistry
from .routes import RouteTable


class Pins:
    """Component versions an operator pinned: retention keeps them in every tier."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def add(self, ref: ComponentRef) -> None:
        self.redis.sadd(PIN_KEY, ref.key)

    def remove(self, ref: ComponentRef) -> None:
        self.redis.srem(PIN_KEY, ref.key)

    def all(self) -> list[ComponentRef]:
        refs = []
        for raw in self.redis.smembers(PIN_KEY):
            model, component, version = raw.decode().split("/")
            refs.append(ComponentRef(model, component, version))
        return sorted(refs)


def protected_refs(client: redis.Redis | None, extra_releases: list[str] = ()) -> dict[ComponentRef, str]:
    """Everything retention must keep, with the reason: routed (active, previous, canary), declared prewarm, warm,
    pinned."""
    reasons: dict[ComponentRef, str] = {}

    def protect(release: str, why: str) -> None:
        for ref in Release.parse(release).refs():
            reasons.setdefault(ref, why)

    for r in extra_releases:
        protect(r, "configured on a worker")
    if client is None:
        return reasons
    table = RouteTable(client)
    for model in table.models():
        route = table.get(model)
        for role, release in route.referenced():
            protect(release, f"routed ({role})")
    for release in table.prewarms():
        protect(release, "declared prewarm")
    for release in WarmRegistry(client).warm_workers():
        protect(release, "warm on a worker")
    for ref in Pins(client).all():
        reasons.setdefault(ref, "pinned")
    return reasons
