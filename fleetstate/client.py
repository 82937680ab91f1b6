"""The one place a Redis client for the broker's server is made: a plain `redis://` URL or Redis Sentinel.

A Sentinel URL names every sentinel, `;`-separated, as kombu's broker URL does:
`sentinel://[:password@]host:port;sentinel://host2:port/db`. The client then asks the sentinels for the current
primary of `master_name` (the setting FLEET_SENTINEL_MASTER) on every (re)connection, so after a failover the fleet
state follows the promoted replica as the broker and result backend do. The password, when given, is the data
servers' password (as kombu uses it); sentinels themselves are reached without one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

DEFAULT_SENTINEL_MASTER = "mymaster"
SENTINEL_SCHEME = "sentinel"


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.split(";", 1)[0].strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """The sentinels of a Sentinel URL, its database number and its password."""
    hosts, db, password = [], 0, None
    for chunk in filter(None, (c.strip() for c in url.split(";"))):
        parts = urlsplit(chunk)
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"not a sentinel URL: {chunk!r} (write sentinel://host:port;sentinel://host2:port/db)")
        hosts.append((parts.hostname, parts.port or 26379))
        if parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return hosts, db, password


def redis_client(url: str, master_name: str | None = None, **transport: Any) -> redis.Redis:
    """A client for `url`: `redis://…` as redis-py reads it, or the current primary behind Sentinel."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **transport)
    hosts, db, password = sentinel_hosts(url)
    sentinel_options = {k: v for k, v in transport.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options or None)
    return sentinel.master_for(master_name or DEFAULT_SENTINEL_MASTER, db=db, password=password, **transport)
