"""Release queues as kombu's Redis transport stores them: depth, and moving queued jobs between releases.

A kombu message in Redis is JSON: `headers` (task name, id), `properties.delivery_info` (exchange, routing key)
and a `body` (base64 JSON `[args, kwargs, embed]`). The worker takes its queue, and so the pipeline that serves the
job, from `delivery_info.routing_key`; a moved message must say its new queue there.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr.names import QUEUE_PREFIX, InvalidName, queue_for, release_of_queue, validate_name

from .keys import OUTBOX_KEY, PRIORITY_SEP, queue_lists
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


def queued_releases(client: redis.Redis, model: str) -> list[str]:
    """Releases of a model with jobs waiting, found by the names of their queue lists (empty lists do not exist)."""
    found = set()
    for key in client.scan_iter(match=f"{QUEUE_PREFIX}{validate_name(model, 'model')}@*", count=500):
        queue = key.decode(errors="replace").split(PRIORITY_SEP, 1)[0]
        try:
            release = release_of_queue(queue)
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


def readdress(message: dict[str, Any], source_queue: str, target_queue: str) -> dict[str, Any]:
    """The same message (same task id, same delivery tag) addressed to `target_queue`."""
    delivery = dict(message["properties"].get("delivery_info") or {})
    delivery["routing_key"] = target_queue
    if delivery.get("exchange") == source_queue:
        delivery["exchange"] = target_queue
    return {**message, "properties": {**message["properties"], "delivery_info": delivery}}


def move_queued(client: redis.Redis, source_release: str, target_release: str, is_pinned: PinnedTest,
                max_passes: int = 5) -> MoveReport:
    """Move the unpinned jobs waiting for `source_release` onto the queue of `target_release`, oldest served first,
    and the unpinned jobs of the source queue that dead workers hold unacknowledged (fleetstate/orphans.py).

    Each list moves in one atomic walk (fleetstate/lua/queue_move.lua), so consumers may keep running. Passes repeat while they
    find something, to catch jobs sent by producers whose cached route had not flipped yet.
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
                task_id = _classify(report, left_alone, raw, is_pinned)
                if task_id is not None:
                    pairs += [raw, json.dumps(readdress(json.loads(raw), source, target))]
                    ids.append(task_id)
            if pairs:
                moved = int(QUEUE_MOVE(client, [src_list, dst_list, OUTBOX_KEY], pairs))
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


def _classify(report: MoveReport, left_alone: set[bytes], raw: bytes, is_pinned: PinnedTest) -> str | None:
    """The task id of a message to move, or None (pinned or unreadable: counted and left alone)."""
    message = _decode(raw)
    job = _job_kwargs(message) if message else None
    if message is None or job is None:
        report.unreadable += 1
        left_alone.add(raw)
        return None
    task_id = str(message.get("headers", {}).get("id", "?"))
    if is_pinned(*job):
        report.pinned.append(task_id)
        left_alone.add(raw)
        return None
    return task_id


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
