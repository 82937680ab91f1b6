"""Celery's broker transport for `redis://` URLs: kombu's, with every `generate` send recorded in the outbox.

kombu has no public hook that pushes a message and records it somewhere else in the same round trip, so the channel
overrides kombu's `Channel._put` (the one departure from kombu's public API here; docs/internals.md, "Dispatch";
checked at boot by tasks/upstream.py). The override computes nothing of kombu's itself: it runs kombu's own `_put`
with a stand-in for kombu's publish batch (`KombuCommands`), which receives the Redis commands kombu would send — the
LPUSH of the message's exact text onto the list of its priority, and for an expiring queue its lists' PEXPIREs — and
then sends them with the LPUSH of a `generate` message replaced by one script that pushes it and records it in the
outbox (fleetstate/outbox.py). A message is so never queued without the entry that lets the outbox sweep send it
again if a worker's pop of it is lost. Other messages (maintenance, prewarm) go through kombu's `_put` unchanged.
"""

from __future__ import annotations

from typing import Any

from kombu.transport.redis import Channel, Transport

from fleetstate.client import push_replicated
from fleetstate.outbox import Entry, enqueue, enqueue_command

from .router import GENERATE_TASK

Command = tuple[str, tuple[Any, ...]]


class KombuCommands:
    """Stands in for kombu's publish batch (`kombu.transport.redis.PublishBatch.add(name, *args)`) while kombu's own
    `_put` routes one message: what it would send, in order, as (name, arguments)."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))

    def push(self) -> tuple[str, str]:
        """(list, text) of the message's push: kombu's first command, an LPUSH of one value (tasks/upstream.py checks
        at boot that kombu's `_put` still works this way)."""
        if not self.commands or self.commands[0][0] != "lpush" or len(self.commands[0][1]) != 2:
            raise RuntimeError(f"kombu's _put no longer starts with the LPUSH of one message: {self.commands[:1]!r}")
        key, text = self.commands[0][1]
        return str(key), text if isinstance(text, str) else text.decode()


def kombu_commands(put: Any, queue: str, message: dict[str, Any], **kwargs: Any) -> KombuCommands:
    """The Redis commands kombu's `_put` (`put`, bound to a channel) would send for `message` on `queue`."""
    recorded = KombuCommands()
    put(queue, message, _publish_batch=recorded, **kwargs)
    return recorded


def is_outbox_message(message: dict[str, Any]) -> bool:
    """A `generate` message with a task id and a delivery tag: its send is recorded in the outbox."""
    headers = message.get("headers") or {}
    return (headers.get("task") == GENERATE_TASK and bool(headers.get("id"))
            and bool((message.get("properties") or {}).get("delivery_tag")))


def outbox_entry(message: dict[str, Any], list_key: str, text: str) -> Entry:
    """The outbox entry of a `generate` message pushed as `text` onto `list_key`."""
    return Entry(str(message["properties"]["delivery_tag"]), str(message["headers"]["id"]), list_key, text)


class OutboxPut:
    """Mixed into a kombu Redis channel (before it): `generate` sends go through the outbox."""

    replicated = False
    """Behind Sentinel: every push waits for the replica (WAIT 1) before the send counts as done."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        outboxed = is_outbox_message(message)
        if not outboxed and not self.replicated:
            return super()._put(queue, message, **kwargs)  # type: ignore[misc]
        batch = kwargs.pop("_publish_batch", None)
        recorded = kombu_commands(super()._put, queue, message, **kwargs)  # type: ignore[misc]
        list_key, text = recorded.push()
        entry = outbox_entry(message, list_key, text) if outboxed else None
        rest = recorded.commands[1:]
        if batch is not None:  # kombu's batch: its commands, the push through the outbox (no WAIT in a batch)
            for name, args in [enqueue_command(entry) if entry else recorded.commands[0], *rest]:
                batch.add(name, *args)
            return None
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            if entry is not None:
                enqueue(client, entry, replicated=self.replicated, then=rest)
            else:
                push_replicated(client, list_key, text, then=rest)
        return None


class FleetRedisChannel(OutboxPut, Channel):
    pass


class FleetRedisTransport(Transport):
    Channel = FleetRedisChannel


TRANSPORT = f"{__name__}:FleetRedisTransport"
