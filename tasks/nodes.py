"""Nodes with an L2: each node's maintenance worker registers here, so fleet-wide maintenance reaches
every node's own disk through its own queue (a message waits there while a node is down)."""

from __future__ import annotations

import time

import redis

from cachemgr.names import ComponentRef, Release

from .keys import NODES_KEY, PIN_KEY
from .registry import WarmRegistry
from .routing import RouteTable

FORGET_AFTER = 7 * 24 * 3600
"""A node unseen for a week is assumed gone and gets no more maintenance messages."""


class NodeRegistry:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def seen(self, node: str) -> None:
        self.redis.hset(NODES_KEY, node, str(time.time()))

    def nodes(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        out = []
        for node, ts in self.redis.hgetall(NODES_KEY).items():
            if now - float(ts) < FORGET_AFTER:
                out.append(node.decode())
        return sorted(out)

    def forget(self, node: str) -> None:
        self.redis.hdel(NODES_KEY, node)


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
    """Everything retention must keep, with the reason: routed (active, previous, canary), warm, pinned."""
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
        for name in ("active", "previous", "canary"):
            release = getattr(route, name, None)
            if release:
                protect(release, f"routed ({name})")
    for release in WarmRegistry(client).warm_workers():
        protect(release, "warm on a worker")
    for ref in Pins(client).all():
        reasons.setdefault(ref, "pinned")
    return reasons
