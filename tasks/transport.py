"""Celery's broker transport for `redis://` URLs: kombu's, with every `generate` send recorded in the outbox.

`OutboxPut._put` replaces kombu's LPUSH of a `generate` message by one script that pushes it and records it in the
outbox (fleetstate/outbox.py) in the same round trip, so a message is never queued without the entry that lets the
outbox sweep send it again if a worker's pop of it is lost. Other messages (maintenance, prewarm) are pushed as
kombu pushes them.
"""

from __future__ import annotations

from typing import Any

from kombu.transport.redis import Channel, Transport
from kombu.utils.json import dumps

from fleetstate.outbox import ENQUEUE, Entry, enqueue, enqueue_args

from .router import GENERATE_TASK


class OutboxPut:
    """Mixed into a kombu Redis channel: `generate` sends go through the outbox."""

    replicated = False
    """Behind Sentinel: wait for the replica (WAIT 1) before the send counts as done."""

    def _outbox_entry(self, queue: str, message: dict[str, Any]) -> Entry | None:
        headers = message.get("headers") or {}
        tag = (message.get("properties") or {}).get("delivery_tag")
        if headers.get("task") != GENERATE_TASK or not tag or not headers.get("id"):
            return None
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))  # type: ignore[attr-defined]
        return Entry(str(tag), str(headers["id"]), key, dumps(message))

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        expires = getattr(self, "_expires", None)
        entry = None if expires and queue in expires else self._outbox_entry(queue, message)
        if entry is None:
            return self._plain_put(queue, message, **kwargs)
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            keys, args = enqueue_args(entry)
            batch.add("eval", ENQUEUE, len(keys), *keys, *args)
            return None
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            enqueue(client, entry, replicated=self.replicated)
        return None

    def _plain_put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        return super()._put(queue, message, **kwargs)  # type: ignore[misc]


class FleetRedisChannel(OutboxPut, Channel):
    pass


class FleetRedisTransport(Transport):
    Channel = FleetRedisChannel


TRANSPORT = f"{__name__}:FleetRedisTransport"
