"""Nodes with an L2: each node's maintenance worker registers here, so fleet-wide maintenance reaches
every node's own disk through its own queue (a message waits there while a node is down)."""

from __future__ import annotations

import time

import redis

from .keys import NODES_KEY

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
