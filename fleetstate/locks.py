"""A run lock with expiry in Redis: overlapping maintenance runs are prevented, and a holder that dies
releases it by expiring. Only the holder's token can release it early."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import redis

from .keys import RUN_LOCK_KEY
from .scripts import release_token


@contextlib.contextmanager
def run_lock(client: redis.Redis | None, name: str, ttl_seconds: float, release: bool = True) -> Iterator[bool]:
    """Yields True when this caller holds the lock. With release=False the lock stays until it expires: a
    second trigger inside the window (a beat that fires twice) finds it taken and does nothing."""
    if client is None:
        yield True
        return
    key = RUN_LOCK_KEY.format(name=name)
    token = uuid.uuid4().hex
    held = bool(client.set(key, token, nx=True, px=max(1, int(ttl_seconds * 1000))))
    try:
        yield held
    finally:
        if held and release:
            try:
                release_token(client, key, token)
            except redis.RedisError:
                pass  # it expires on its own
