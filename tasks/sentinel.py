"""Celery's broker transport and result backend for `sentinel://` URLs, on connections that follow a failover.

kombu's SentinelChannel and celery's SentinelBackend ask the sentinels for the primary only when a connection is
made; a demoted primary that is still alive keeps the ones they hold. With the data servers' `min-replicas-to-write 1`
that primary refuses writes, and fleetstate.client.FailoverAwareConnection turns the refusal into a reconnection
through the sentinels (see docs/reliability.md, "Redis Sentinel"); and a send waits for the replica (WAIT 1).
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import SentinelBackend
from kombu.transport.redis import SentinelChannel, SentinelTransport
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from fleetstate.client import FailoverAwareConnection, push_replicated

from .results import FleetResults
from .transport import OutboxPut


class FleetSentinelChannel(OutboxPut, SentinelChannel):
    connection_class = FailoverAwareConnection
    replicated = True  # a generate send records its outbox entry and waits for the replica (OutboxPut)

    def _plain_put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """A send returns only once the replica holds the message (WAIT 1): a message pushed to a primary just before
        its demotion is otherwise acknowledged and gone. A failed WAIT raises a ConnectionError, so Celery's publish
        retry sends it again (at worst twice; the job record answers the second delivery)."""
        if kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            return SentinelChannel._put(self, queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            push_replicated(client, key, dumps(message))


    def _queue_bind(self, *args: Any, **kwargs: Any) -> Any:
        """kombu binds a queue in a MULTI pipeline, whose NOREPLICAS comes back inside EXEC's reply rather than
        through the connection (FailoverAwareConnection never sees it): turn it into the ConnectionError it means,
        so the send's publish retry waits out the failover instead of failing the send."""
        try:
            return super()._queue_bind(*args, **kwargs)
        except ResponseError as exc:
            if "NOREPLICAS" not in str(exc):
                raise
            raise RedisConnectionError(f"the primary refused a write without an in-sync replica: {exc}") from exc


class FleetSentinelTransport(SentinelTransport):
    Channel = FleetSentinelChannel


class FleetSentinelBackend(FleetResults, SentinelBackend):
    def _get_sentinel_instance(self, **params: Any) -> Any:
        params.setdefault("connection_class", FailoverAwareConnection)
        return super()._get_sentinel_instance(**params)


TRANSPORT = f"{__name__}:FleetSentinelTransport"
BACKEND = f"{__name__}:FleetSentinelBackend"
