"""Nodes with an L2: each node's maintenance worker registers here, so fleet-wide maintenance reaches
every node's own disk through its own queue (a message waits there while a node is down)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from .keys import NODES_KEY, PEERS_KEY

FORGET_AFTER = 7 * 24 * 3600
"""A node unseen for a week is assumed gone and gets no more maintenance messages."""
PEER_STALE_AFTER = 300
"""A peer server not re-announced for this long is not asked (its node re-announces every minute)."""


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
        self.redis.hdel(PEERS_KEY, node)

    def announce_peer(self, node: str, address: str, served: dict[str, int] | None = None) -> None:
        """Where this node's peer piece server listens (`host:port`), for the other nodes of the site; `served`:
        the server's own counters (bytes_served, requests_served, requests_refused), shown by `status`."""
        self.redis.hset(PEERS_KEY, node, json.dumps({"address": address, "ts": time.time(), **(served or {})}))

    def withdraw_peer(self, node: str) -> None:
        self.redis.hdel(PEERS_KEY, node)

    def peers(self, exclude: str | None = None, now: float | None = None) -> dict[str, str]:
        """node → peer server address, for the nodes that announced one recently (but `exclude`)."""
        now = time.time() if now is None else now
        out = {}
        for node, raw in self.redis.hgetall(PEERS_KEY).items():
            try:
                info = json.loads(raw)
                address, ts = str(info["address"]), float(info["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if node.decode() != exclude and now - ts < PEER_STALE_AFTER:
                out[node.decode()] = address
        return dict(sorted(out.items()))

    def peer_servers(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """node → its last announcement (address, ts, and the server's counters when it sent them), recent ones."""
        now = time.time() if now is None else now
        out = {}
        for node, raw in self.redis.hgetall(PEERS_KEY).items():
            try:
                info = json.loads(raw)
                if now - float(info["ts"]) < PEER_STALE_AFTER:
                    out[node.decode()] = info
            except (ValueError, KeyError, TypeError):
                continue
        return dict(sorted(out.items()))
