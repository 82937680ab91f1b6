"""The one place a Redis client for the broker's server is made: a plain `redis://` URL or Redis Sentinel.

A Sentinel URL names every sentinel, `;`-separated, as kombu's broker URL does:
`sentinel://[:password@]host:port;sentinel://host2:port/db`. The client then asks the sentinels for the current
primary of `master_name` (the setting FLEET_SENTINEL_MASTER) on every (re)connection, so after a failover the fleet
state follows the promoted replica as the broker and result backend do. The password, when given, is the data
servers' login (user name and password, as kombu uses them); sentinels themselves are reached without one.

A primary demoted by a failover while it is still alive (`SENTINEL FAILOVER`, a partition) keeps accepting writes on
the connections clients already hold until the sentinels reconfigure it — about 10 s — and those writes are dropped
when it resyncs from the promoted replica. The data servers therefore run with `min-replicas-to-write 1`: the old
primary refuses writes (NOREPLICAS) as soon as its replica leaves, and `FailoverAwareConnection` turns that refusal
into a ConnectionError after dropping the socket, so every client (fleet state, broker, result backend) retries
through the sentinels instead of failing or writing to a dead branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, ResponseError
from redis.sentinel import Sentinel, SentinelManagedConnection

DEFAULT_SENTINEL_MASTER = "mymaster"
SENTINEL_SCHEME = "sentinel"


class FailoverAwareConnection(SentinelManagedConnection):
    """A connection to the sentinels' primary that treats NOREPLICAS as "this primary may be stale": disconnect, so the
    next attempt asks the sentinels again, and raise a ConnectionError, which every client here retries."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if self.connection_pool.is_master and refused_without_replica(exc):
                self.disconnect()
                raise RedisConnectionError(f"the primary refused a write without an in-sync replica: {exc}") from exc
            raise


def refused_without_replica(exc: ResponseError) -> bool:
    """A write refused by a primary under `min-replicas-to-write` without its replica: NOREPLICAS, or, for a MULTI
    whose EXEC is refused so (kombu binds a queue in one), EXECABORT naming NOREPLICAS as its cause."""
    text = str(exc)
    return text.startswith("NOREPLICAS") or (isinstance(exc, ExecAbortError) and "NOREPLICAS" in text)


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and url.split(";", 1)[0].strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], int, str | None, str | None]:
    """The sentinels of a Sentinel URL, its database number, and the data servers' user name and password (an ACL
    role's login, `sentinel://fleet-worker:secret@host:port;…`; no user name: Redis's default user)."""
    hosts, db, username, password = [], 0, None, None
    for chunk in filter(None, (c.strip() for c in url.split(";"))):
        parts = urlsplit(chunk)
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"not a sentinel URL: {chunk!r} (write sentinel://host:port;sentinel://host2:port/db)")
        hosts.append((parts.hostname, parts.port or 26379))
        if parts.username:
            username = unquote(parts.username)
        if parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return hosts, db, username, password


def redis_client(url: str, master_name: str | None = None, **transport: Any) -> redis.Redis:
    """A client for `url`: `redis://…` as redis-py reads it, or the current primary behind Sentinel."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **transport)
    hosts, db, username, password = sentinel_hosts(url)
    sentinel_options = {k: v for k, v in transport.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_options or None)
    return sentinel.master_for(master_name or DEFAULT_SENTINEL_MASTER, db=db, username=username, password=password,
                               connection_class=FailoverAwareConnection, **transport)


REPLICATED_WAIT_MS = 1000
"""How long a push waits for the replica's acknowledgement before it counts as not stored."""


def push_replicated(client: redis.Redis, key: str, *values: Any, wait_ms: int = REPLICATED_WAIT_MS,
                    then: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> int:
    """LPUSH, then WAIT 1 on the same connection: returns only once a replica holds the values, else raises a
    ConnectionError (the caller retries; the values may or may not be stored, so a retry may deliver twice).
    `then`: more commands (name, arguments) sent between the two, in the same round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(key, *values)
        for name, args in then:
            getattr(pipe, name)(*args)
        pipe.execute_command("WAIT", 1, wait_ms)
        answers = pipe.execute()
    if int(answers[-1]) < 1:
        raise RedisConnectionError(f"no replica acknowledged the push to {key!r} within {wait_ms} ms")
    return int(answers[0])
