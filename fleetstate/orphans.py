"""Jobs of dead workers back in their queue within seconds of the heartbeat's expiry, not `visibility_timeout`.

While a delivery is in a worker's hands (its task body runs, under the execution lease), the worker indexes it in
`fleet:deliveries` (delivery tag → holder, task id). A live worker renews its heartbeat key
(`fleet:worker:<name>`, TTL `warm_ttl_seconds`); a killed one stops. The sweep (every live worker's sweeper thread
and the maintenance worker, one of them per second under a short run lock) finds deliveries whose holder's heartbeat
is gone and moves each message from kombu's `unacked` hash back to its queue in one Lua script
(fleetstate/lua/orphan_restore.lua), exactly as kombu's own restore does, but only if the message is still unacked
and the holder still silent. The lease rules stay: a copy that reaches a peer while the holder still held a live
lease waits for it, a finished job's copy returns its stored result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from .keys import (
    DELIVERIES_KEY,
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    OUTBOX_AT_KEY,
    OUTBOX_KEY,
    WORKER_KEY,
    priority_list,
)
from .locks import run_lock
from .scripts import ORPHAN_RESTORE

log = logging.getLogger("warmfleet.orphans")

SWEEP_SECONDS = 1.0
"""How often the fleet looks for deliveries of dead workers (one sweeper per period, whoever gets the lock)."""

@dataclass(frozen=True)
class Delivery:
    """One message in a worker's hands, as the worker indexed it."""

    tag: str
    worker: str
    task_id: str


def index_delivery(client: redis.Redis, tag: str, worker: str, task_id: str) -> None:
    client.hset(DELIVERIES_KEY, tag, json.dumps({"worker": worker, "task_id": task_id}))


def unindex_delivery(client: redis.Redis, tag: str) -> None:
    client.hdel(DELIVERIES_KEY, tag)


def deliveries(client: redis.Redis) -> list[Delivery]:
    out = []
    for tag, raw in client.hgetall(DELIVERIES_KEY).items():
        try:
            entry = json.loads(raw)
            out.append(Delivery(_text(tag), str(entry["worker"]), str(entry.get("task_id", "?"))))
        except (ValueError, KeyError, TypeError):
            client.hdel(DELIVERIES_KEY, tag)
    return out


def restored_payload(raw: bytes, queue: str | None = None) -> tuple[str, str]:
    """(list name, payload) for an `unacked` entry, as kombu's `_do_restore_message` writes it: marked redelivered,
    on the list of its priority step; addressed to `queue` when given (a move), else to its own routing key."""
    from .queues import readdress

    payload, _exchange, routing_key = json.loads(raw)
    if queue is not None and queue != routing_key:
        payload = readdress(payload, routing_key, queue)
        routing_key = queue
    payload.setdefault("headers", {})["redelivered"] = True
    payload.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return priority_list(routing_key, payload["properties"].get("priority") or 0), json.dumps(payload)


def routing_key_of(raw: bytes) -> str | None:
    try:
        return str(json.loads(raw)[2])
    except (ValueError, IndexError, TypeError):
        return None


def restore(client: redis.Redis, tag: str, raw: bytes, holder: str | None, queue: str | None = None) -> int:
    """Put one unacked message back (1), unless it was acknowledged or taken meanwhile (0) or its holder is alive
    after all (-1). `holder=None` restores whoever holds it (the holder itself, giving a job up)."""
    from .outbox import entry_for

    name, payload = restored_payload(raw, queue)
    guard = WORKER_KEY.format(worker=holder) if holder else ""
    task_id = (json.loads(payload).get("headers") or {}).get("id")
    entry = entry_for(tag, name, payload, str(task_id)).to_json() if task_id else ""
    keys = [KOMBU_UNACKED, KOMBU_UNACKED_INDEX, DELIVERIES_KEY, name, OUTBOX_KEY, OUTBOX_AT_KEY]
    return int(ORPHAN_RESTORE(client, keys, [tag, raw, payload, guard, entry]))


def sweep(client: redis.Redis, on_restore: Callable[[Delivery], None] | None = None,
          restore_now: bool = True) -> list[Delivery]:
    """Restore every indexed delivery whose holder's heartbeat has expired; returns what was put back.
    `restore_now=False` only tidies the index (a sweeper settling after it could not reach Redis)."""
    found = deliveries(client)
    if not found:
        return []
    with client.pipeline(transaction=False) as pipe:
        for d in found:
            pipe.exists(WORKER_KEY.format(worker=d.worker))
            pipe.hget(KOMBU_UNACKED, d.tag)
        answers = pipe.execute()
    restored = []
    for i, d in enumerate(found):
        alive, raw = answers[2 * i], answers[2 * i + 1]
        if alive or not restore_now:
            continue
        if raw is None:  # acknowledged already (the ack and the unindexing are not one step)
            unindex_delivery(client, d.tag)
            continue
        if restore(client, d.tag, raw, d.worker) == 1:
            log.warning("worker %s stopped heartbeating while holding job %s: its message is back in its queue",
                        d.worker, d.task_id)
            restored.append(d)
            if on_restore:
                on_restore(d)
    return restored


def sweep_once(client: redis.Redis, period: float = SWEEP_SECONDS, restore_now: bool = True) -> list[Delivery]:
    """One sweep by whoever takes this period's lock (the others skip): at most one sweep per period fleet-wide."""
    with run_lock(client, "orphan-sweep", period, release=False) as held:
        return sweep(client, restore_now=restore_now) if held else []


class Sweeper(threading.Thread):
    """Runs `sweep_once` every `period` seconds in a live worker (or the maintenance worker) until stopped, and the
    outbox sweep (outbox.py) every `outbox.sweep_period(outbox_grace)` seconds when `outbox_grace` is given.

    A sweeper that could not sweep for a while (Redis down or refusing writes: a restart, a failover) restores
    nothing for `settle` seconds once it can again, nor in its first `settle` seconds: during a fleet-wide outage
    every heartbeat lapses, live holders' too, and a live holder re-publishes its heartbeat within one heartbeat
    period of Redis taking writes again. Without the pause the first sweep after an outage would hand every running
    job to a peer."""

    def __init__(self, client: redis.Redis, period: float = SWEEP_SECONDS, outbox_grace: float | None = None,
                 settle: float = 0.0) -> None:
        super().__init__(name="warmfleet-orphan-sweep", daemon=True)
        self.client = client
        self.period = period
        self.outbox_grace = outbox_grace
        self.settle = settle
        self._stop_event = threading.Event()

    def run(self) -> None:
        from . import outbox

        outbox_period = outbox.sweep_period(self.outbox_grace) if self.outbox_grace is not None else None
        outbox_due = time.monotonic() + (outbox_period or 0)
        last_ok = time.monotonic()
        restore_from = last_ok + self.settle
        while not self._stop_event.wait(self.period):
            now = time.monotonic()
            if now - last_ok > 3 * self.period:  # this sweeper was cut off: let live holders speak up first
                restore_from = max(restore_from, now + self.settle)
            try:
                sweep_once(self.client, self.period, restore_now=now >= restore_from)
                last_ok = time.monotonic()
                if outbox_period is not None and time.monotonic() >= outbox_due:
                    outbox_due = time.monotonic() + outbox_period
                    outbox.sweep_once(self.client, self.outbox_grace, outbox_period)
            except redis.RedisError:
                continue  # Redis restarting: the next period tries again
            except Exception:  # never let a malformed entry stop the sweeps
                log.exception("orphan sweep failed")

    def stop(self) -> None:
        self._stop_event.set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
