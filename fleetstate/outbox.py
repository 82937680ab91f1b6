"""The outbox: a sent job is kept in Redis until a worker claims it, and sent again if it was lost on its way.

kombu's Redis transport takes a message off its queue (BRPOP) and records it as unacknowledged in a second command.
A pop whose reply is lost (Redis restarted, the connection cut) or a worker killed between the two commands loses
the message: it is in no queue, not in the `unacked` hash, and no worker holds it. The outbox closes that window:

1. The producer pushes a `generate` message and records it in `fleet:outbox` (delivery tag → task id, list,
   message) and `fleet:outbox:at` (delivery tag → server time) in one script, one round trip (fleetstate/lua/outbox_enqueue.lua, called by
   the transport in tasks/transport.py): a message is never in a queue without its outbox entry.
2. The worker's claim script (fleetstate/leases.py) removes the entry of the delivery it claims, in the same round
   trip as the claim; from then on the delivery index and the orphan sweep (orphans.py) answer for the message.
   An orphan restore (orphans.py, the time-limit watchdog) records the message it puts back again.
3. The sweep (every live worker's and the maintenance worker's sweeper thread, one of them per period under a run
   lock) looks at entries older than the grace period (`outbox_grace_seconds`). An entry whose message is still in
   its list, or in a worker's hands (in `unacked`), is only re-dated; an entry of a finished or dead job (its job
   record, or Celery's result) is dropped; any other entry is lost: its message is pushed back at the consuming end
   of its list under a fresh delivery tag, atomically with the check (fleetstate/lua/outbox_resend.lua).

A re-send never runs a job twice: the copy is a second delivery of the same task id, which the execution lease and
the job record (leases.py) turn into a wait for the live holder or the stored result. After `MAX_RESENDS` re-sends
of one job the sweep gives up, logs it and counts `outbox_gave_up` (a message that keeps vanishing is not a lost
pop reply).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .keys import CELERY_META_KEY, JOB_KEY, KOMBU_UNACKED, OUTBOX_AT_KEY, OUTBOX_KEY, OUTBOX_QUEUES_KEY, STATS_KEY
from .locks import run_lock
from .scripts import OUTBOX_ENQUEUE, OUTBOX_RESEND

log = logging.getLogger("warmfleet.outbox")

DEFAULT_GRACE_SECONDS = 60.0
MAX_RESENDS = 5
SWEEP_BATCH = 200
"""Entries looked at per sweep at most (the oldest first)."""

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


@dataclass(frozen=True)
class Entry:
    """One sent message not yet claimed by a worker."""

    tag: str
    task_id: str
    list: str
    message: str
    resends: int = 0

    def to_json(self) -> str:
        return json.dumps({"task_id": self.task_id, "list": self.list, "message": self.message,
                           "resends": self.resends})

    @classmethod
    def from_json(cls, tag: str, raw: bytes | str) -> Entry:
        data = json.loads(raw)
        return cls(tag, str(data["task_id"]), str(data["list"]), str(data["message"]), int(data.get("resends", 0)))


def entry_for(tag: str, list_key: str, message: str, task_id: str, resends: int = 0) -> Entry:
    return Entry(tag, task_id, list_key, message, resends)


def enqueue_args(entry: Entry) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of the enqueue script for one message."""
    return [OUTBOX_KEY, OUTBOX_AT_KEY, entry.list, OUTBOX_QUEUES_KEY], [entry.tag, entry.to_json(), entry.message]


def enqueue_command(entry: Entry) -> tuple[str, tuple[Any, ...]]:
    """The enqueue as one command (name, arguments) for a caller that queues its own commands (a pipeline, kombu's
    publish batch): EVAL with the script's text, so nothing else has to reach the server first."""
    return "eval", OUTBOX_ENQUEUE.eval_args(*enqueue_args(entry))


def enqueue(client: redis.Redis, entry: Entry, replicated: bool = False,
            then: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> int:
    """Push the message on its list and record it in the outbox, atomically, in one round trip; `then`: more
    commands (name, arguments) sent in the same round trip (kombu's expiry of an expiring queue's lists);
    `replicated`: then WAIT 1 on the same connection, as `fleetstate.client.push_replicated` does (behind Sentinel)."""
    from .client import REPLICATED_WAIT_MS

    keys, args = enqueue_args(entry)
    if not replicated and not then:
        return int(OUTBOX_ENQUEUE(client, keys, args))
    with client.pipeline(transaction=False) as pipe:
        name, command = enqueue_command(entry)
        getattr(pipe, name)(*command)
        for name, command in then:
            getattr(pipe, name)(*command)
        if replicated:
            pipe.execute_command("WAIT", 1, REPLICATED_WAIT_MS)
        answers = pipe.execute()
    if replicated and int(answers[-1]) < 1:
        raise redis.exceptions.ConnectionError(
            f"no replica acknowledged the push to {entry.list!r} within {REPLICATED_WAIT_MS} ms")
    return int(answers[0])


def pending(client: redis.Redis) -> list[Entry]:
    """Every entry: messages sent (or put back) that no worker has claimed yet."""
    out = []
    for tag, raw in client.hgetall(OUTBOX_KEY).items():
        try:
            out.append(Entry.from_json(_text(tag), raw))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _fresh_copy(entry: Entry) -> tuple[str, str]:
    """The message under a new delivery tag, marked redelivered: (tag, message)."""
    message = json.loads(entry.message)
    tag = str(uuid.uuid4())
    props = message.setdefault("properties", {})
    props["delivery_tag"] = tag
    props.setdefault("delivery_info", {})["redelivered"] = True
    message.setdefault("headers", {})["redelivered"] = True
    return tag, json.dumps(message)


def _finished_by_celery(client: redis.Redis, task_id: str) -> bool:
    """Celery stored a final state (a job refused before any claim, a revoked one): nothing left to deliver."""
    try:
        raw = client.get(CELERY_META_KEY.format(task_id=task_id))
        return bool(raw) and json.loads(raw).get("status") in READY_STATES
    except (redis.RedisError, ValueError, AttributeError):
        return False


def sweep(client: redis.Redis, grace_seconds: float = DEFAULT_GRACE_SECONDS, max_resends: int = MAX_RESENDS) -> list[Entry]:
    """Re-send every entry older than `grace_seconds` whose message is nowhere (see the module text); returns them."""
    seconds, micros = client.time()
    cutoff = seconds + micros / 1e6 - grace_seconds
    tags = [_text(t) for t in client.zrangebyscore(OUTBOX_AT_KEY, "-inf", cutoff, start=0, num=SWEEP_BATCH)]
    if not tags:
        return []
    resent = []
    for tag, raw in zip(tags, client.hmget(OUTBOX_KEY, tags), strict=True):
        if raw is None:
            client.zrem(OUTBOX_AT_KEY, tag)
            continue
        try:
            entry = Entry.from_json(tag, raw)
        except (ValueError, KeyError, TypeError):
            log.error("outbox entry %s is unreadable; dropped", tag)
            client.hdel(OUTBOX_KEY, tag)
            client.zrem(OUTBOX_AT_KEY, tag)
            continue
        if _finished_by_celery(client, entry.task_id):
            client.hdel(OUTBOX_KEY, tag)
            client.zrem(OUTBOX_AT_KEY, tag)
            continue
        new_tag, message = _fresh_copy(entry)
        allowed = entry.resends < max_resends
        new_entry = entry_for(new_tag, entry.list, message, entry.task_id, entry.resends + 1)
        keys = [OUTBOX_KEY, OUTBOX_AT_KEY, KOMBU_UNACKED, entry.list, JOB_KEY.format(task_id=entry.task_id)]
        args = [tag, entry.message, new_tag, new_entry.to_json(), message, "1" if allowed else "0"]
        answer = int(OUTBOX_RESEND(client, keys, args))
        if answer == 1:
            log.warning("job %s is in no queue and in no worker's hands %g s after it was sent, and not finished: "
                        "sent again (re-send %d)", entry.task_id, grace_seconds, entry.resends + 1)
            client.hincrby(STATS_KEY, "outbox_resent", 1)
            resent.append(entry)
        elif answer == 3:
            log.error("job %s vanished from its queue %d times after being sent; the outbox gives up on it",
                      entry.task_id, entry.resends + 1)
            client.hincrby(STATS_KEY, "outbox_gave_up", 1)
    return resent


def sweep_once(client: redis.Redis, grace_seconds: float, period: float) -> list[Entry]:
    """One sweep by whoever takes this period's lock: at most one outbox sweep per period fleet-wide."""
    with run_lock(client, "outbox-sweep", period, release=False) as held:
        return sweep(client, grace_seconds) if held else []


def sweep_period(grace_seconds: float) -> float:
    """How often to look: a quarter of the grace period, between 1 and 15 s."""
    return min(15.0, max(1.0, grace_seconds / 4))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
