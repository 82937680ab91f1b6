"""One origin pull per site: a short lease per blob in Redis names the node pulling it from L3 now.

The holder renews it while it works (cachemgr.peersync.PeerSource.turn); if it dies, the lease expires and the next
node that asks takes over. Only the holder's token renews or releases it."""

from __future__ import annotations

import uuid

import redis

from .keys import ORIGIN_LEASE_KEY
from .scripts import extend_token, release_token


class RedisOriginGate:
    """cachemgr.peersync.OriginGate on Redis: SET NX PX, with this node's name in the token."""

    def __init__(self, client: redis.Redis, node: str, lease_seconds: float = 30.0) -> None:
        self.redis = client
        self.node = node
        self.ttl_ms = max(1, int(lease_seconds * 1000))
        self.tokens: dict[str, str] = {}

    def _key(self, key: str) -> str:
        return ORIGIN_LEASE_KEY.format(key=key)

    def acquire(self, key: str) -> bool:
        token = f"{self.node}:{uuid.uuid4().hex}"
        try:
            if self.redis.set(self._key(key), token, nx=True, px=self.ttl_ms):
                self.tokens[key] = token
                return True
            return False
        except redis.RedisError:
            return True  # no broker, no coordination: pulling from L3 is always correct

    def renew(self, key: str) -> bool:
        token = self.tokens.get(key)
        return bool(token) and bool(extend_token(self.redis, self._key(key), token, self.ttl_ms))

    def release(self, key: str) -> None:
        token = self.tokens.pop(key, None)
        if token:
            try:
                release_token(self.redis, self._key(key), token)
            except redis.RedisError:
                pass  # it expires on its own

    def holder(self, key: str) -> str | None:
        """The node holding the lease on `key` now (None when nobody does)."""
        raw = self.redis.get(self._key(key))
        return raw.decode().rsplit(":", 1)[0] if raw else None
