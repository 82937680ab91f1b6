"""Release queues as kombu's Redis transport stores them: depth, and moving queued jobs between releases.

A kombu message in Redis is JSON: `headers` (task name, id), `properties.delivery_info` (exchange, routing key)
and a `body` (base64 JSON `[args, kwargs, embed]`). The worker takes its queue, and so the pipeline that serves the
job, from `delivery_info.routing_key`; a moved message must say its new queue there.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr.names import QUEUE_PREFIX, InvalidName, queue_for, release_of_queue, validate_name

from .keys import OUTBOX_KEY, OUTBOX_QUEUES_KEY, PRIORITY_SEP, queue_lists
from .scripts import QUEUE_MOVE


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Jobs waiting in a queue: the sum over its priority lists (not counting jobs a worker has taken)."""
    return sum(queue_depths(client, [queue]).values())


def queue_depths(client: redis.Redis, queues: list[str]) -> dict[str, int]:
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.llen(name)
        sizes = pipe.execute()
    steps = len(queue_lists("q"))
    return {queue: sum(sizes[i * steps:(i + 1) * steps]) for i, queue in enumerate(queues)}


def oldest_waiting(client: redis.Redis, queues: list[str], now: float | None = None) -> dict[str, float | None]:
    """How long the oldest job waiting in each queue has waited, in seconds (from the send stamp the producer puts
    in its headers, `fleet_sent_at`); None for an empty queue or one whose oldest messages carry no stamp. kombu
    pushes on the left and pops on the right, so each list's oldest message is its last element."""
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in queue_lists(queue):
                pipe.lindex(name, -1)
        tails = pipe.execute()
    steps = len(queue_lists("q"))
    out: dict[str, float | None] = {}
    for i, queue in enumerate(queues):
        stamps = [s for s in (_sent_at(raw) for raw in tails[i * steps:(i + 1) * steps] if raw) if s is not None]
        out[queue] = round(max(0.0, now - min(stamps)), 1) if stamps else None
    return out


def _sent_at(raw: bytes) -> float | None:
    message = _decode(raw)
    try:
        return float(message["headers"]["fleet_sent_at"]) if message else None
    except (KeyError, TypeError, ValueError):
        return None


def queued_releases(client: redis.Redis, model: str | None = None) -> list[str]:
    """Releases (of a model, or of every model) with jobs waiting: of the queue lists any send or move pushed onto
    (`fleet:outbox:queues`, written by the same scripts that push), those not empty. Two round trips whatever the
    size of the keyspace (a day of job records is most of it); a list that only a sender outside the fleet's
    transport pushed onto is not seen."""
    prefix = f"{QUEUE_PREFIX}{validate_name(model, 'model')}@" if model else QUEUE_PREFIX
    lists = sorted(name for name in (raw.decode(errors="replace") for raw in client.smembers(OUTBOX_QUEUES_KEY))
                   if name.startswith(prefix))
    if not lists:
        return []
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.exists(name)
        present = pipe.execute()
    found = set()
    for name, there in zip(lists, present, strict=True):
        if not there:
            continue
        try:
            release = release_of_queue(name.split(PRIORITY_SEP, 1)[0])
        except InvalidName:
            continue  # not a queue of ours
        if release is not None:
            found.add(str(release))
    return sorted(found)


@dataclass
class MoveReport:
    """What `move_queued` did: task ids moved, pinned ones left in place, and ones a worker took meanwhile."""

    source: str
    target: str
    moved: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    unreadable: int = 0
    taken_meanwhile: int = 0
    moved_unacked: list[str] = field(default_factory=list)  # held unacked by dead workers, moved too
    repinned: list[str] = field(default_factory=list)  # pinned jobs moved with their pin rewritten (on request)


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
        return message if isinstance(message, dict) and isinstance(message.get("properties"), dict) else None
    except ValueError:
        return None


def _job_kwargs(message: dict[str, Any]) -> tuple[list[Any], dict[str, Any]] | None:
    """The job's args and kwargs, or None when the body is not base64 JSON (another encoding, compression)."""
    try:
        if message["properties"].get("body_encoding") == "base64":
            body = json.loads(base64.b64decode(message["body"]))
        elif message.get("content-type") == "application/json":
            body = json.loads(message["body"])
        else:
            return None
        args, kwargs = body[0], body[1]
        return (list(args), dict(kwargs)) if isinstance(args, list) and isinstance(kwargs, dict) else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


PinnedTest = Callable[[list[Any], dict[str, Any]], bool]
"""Whether a job's (args, kwargs) name its release: such a job is served by that release only and never moved.
The request model owns the parameter order, so callers pass `tasks.requests.is_pinned`."""

Repin = Callable[[list[Any], dict[str, Any], str], tuple[list[Any], dict[str, Any]]]
"""(args, kwargs, new release) → the args and kwargs of the same job pinned to the new release
(`tasks.requests.repinned`)."""


def readdress(message: dict[str, Any], source_queue: str, target_queue: str) -> dict[str, Any]:
    """The same message (same task id, same delivery tag) addressed to `target_queue`."""
    delivery = dict(message["properties"].get("delivery_info") or {})
    delivery["routing_key"] = target_queue
    if delivery.get("exchange") == source_queue:
        delivery["exchange"] = target_queue
    return {**message, "properties": {**message["properties"], "delivery_info": delivery}}


def move_queued(client: redis.Redis, source_release: str, target_release: str, is_pinned: PinnedTest,
                max_passes: int = 5, repin: Repin | None = None) -> MoveReport:
    """Move the unpinned jobs waiting for `source_release` onto the queue of `target_release`, oldest served first,
    and the unpinned jobs of the source queue that dead workers hold unacknowledged (fleetstate/orphans.py).

    Each list moves in one atomic walk (fleetstate/lua/queue_move.lua), so consumers may keep running. Passes repeat while they
    find something, to catch jobs sent by producers whose cached route had not flipped yet. With `repin`, pinned
    jobs move too, their pin rewritten to the target (`repin(args, kwargs, target)` gives the new args and kwargs);
    they are counted in `repinned` as well as `moved`.
    """
    source, target = queue_for(source_release), queue_for(target_release)
    if source == target:
        raise ValueError(f"cannot move the jobs of {source_release} onto its own queue")
    report = MoveReport(source_release, target_release)
    left_alone: set[bytes] = set()
    for _ in range(max_passes):
        moved_before = len(report.moved)
        for src_list, dst_list in zip(queue_lists(source), queue_lists(target), strict=True):
            # newest first (kombu pushes on the left, pops on the right): RPUSH in this order lands the oldest moved
            # job nearest the consuming end, so moved jobs are served in their original order.
            pairs, ids = [], []
            for raw in client.lrange(src_list, 0, -1):
                if raw in left_alone:
                    continue
                picked = _classify(report, left_alone, raw, is_pinned, repin, target_release)
                if picked is not None:
                    task_id, message = picked
                    pairs += [raw, json.dumps(readdress(message, source, target))]
                    ids.append(task_id)
            if pairs:
                moved = int(QUEUE_MOVE(client, [src_list, dst_list, OUTBOX_KEY, OUTBOX_QUEUES_KEY], pairs))
                report.moved += ids[:moved] if moved == len(ids) else _moved_ids(client, dst_list, ids)
                report.taken_meanwhile += len(ids) - moved
        report.moved += _move_orphans(client, source, target, is_pinned, report)
        if len(report.moved) == moved_before:
            break
    return report


def _moved_ids(client: redis.Redis, dst_list: str, ids: list[str]) -> list[str]:
    """Which of `ids` arrived on the destination (some were taken by a worker before the walk)."""
    there = {str(json.loads(raw).get("headers", {}).get("id")) for raw in client.lrange(dst_list, 0, -1)}
    return [i for i in ids if i in there]


def _classify(report: MoveReport, left_alone: set[bytes], raw: bytes, is_pinned: PinnedTest,
              repin: Repin | None = None, target_release: str = "") -> tuple[str, dict[str, Any]] | None:
    """The task id and message of a job to move, or None (pinned or unreadable: counted and left alone)."""
    message = _decode(raw)
    job = _job_kwargs(message) if message else None
    if message is None or job is None:
        report.unreadable += 1
        left_alone.add(raw)
        return None
    task_id = str(message.get("headers", {}).get("id", "?"))
    if is_pinned(*job):
        if repin is None:
            report.pinned.append(task_id)
            left_alone.add(raw)
            return None
        report.repinned.append(task_id)
        return task_id, _with_body(message, *repin(*job, target_release))
    return task_id, message


def _with_body(message: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same message carrying other args and kwargs, in its body's encoding (base64 JSON or plain JSON)."""
    if message["properties"].get("body_encoding") == "base64":
        body = json.loads(base64.b64decode(message["body"]))
        text = json.dumps([args, kwargs, *body[2:]])
        return {**message, "body": base64.b64encode(text.encode()).decode()}
    body = json.loads(message["body"])
    return {**message, "body": json.dumps([args, kwargs, *body[2:]])}


def _move_orphans(client: redis.Redis, source: str, target: str, is_pinned: PinnedTest, report: MoveReport) -> list[str]:
    """Unacked jobs of the source queue whose holder's heartbeat is gone: onto the target queue, not back."""
    from .keys import KOMBU_UNACKED, WORKER_KEY
    from .orphans import deliveries, restore, routing_key_of

    moved = []
    for d in deliveries(client):
        raw = client.hget(KOMBU_UNACKED, d.tag)
        if raw is None or routing_key_of(raw) != source or client.exists(WORKER_KEY.format(worker=d.worker)):
            continue
        payload = json.loads(raw)[0]
        job = _job_kwargs(payload) if isinstance(payload, dict) else None
        if job is None or is_pinned(*job):
            continue  # pinned or unreadable: the orphan sweep puts it back on its own queue
        if restore(client, d.tag, raw, d.worker, queue=target) == 1:
            moved.append(d.task_id)
            report.moved_unacked.append(d.task_id)
    return moved
