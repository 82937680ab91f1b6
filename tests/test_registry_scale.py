"""The control plane's reads stay flat as the fleet grows: `status`, the warm registry and the queue listing read Redis
in the same number of round trips at 5 workers as at 300, and never walk the keyspace (where a day of job records
lives). Round trips are counted on the client's own connections (a connection class given to redis-py's pool),
commands by the server's `INFO commandstats`; a private redis-server, no worker process."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis

from cachemgr.names import queue_for
from fleetstate.keys import JOB_KEY, WARM_INDEX, WORKERS_INDEX, priority_list
from fleetstate.outbox import Entry, enqueue
from fleetstate.queues import move_queued, queued_releases
from fleetstate.registry import WarmRegistry, WorkerState
from fleetstate.routes import RouteTable
from fleetstate.status import fleet_status

MODEL = "nano-banana"
A = f"{MODEL}@base-v1.0.0+lora-v2.3.0"
B = f"{MODEL}@base-v1.0.0+lora-v2.3.1"
C = f"{MODEL}@base-v1.1.0+lora-v2.3.1"


class CountingConnection(redis.Connection):
    """A redis-py connection that counts what it sends: one call per round trip (a pipeline sends once)."""

    sent = 0

    def send_packed_command(self, command, check_health=True):  # noqa: ANN001, ANN201 - redis-py's signature
        CountingConnection.sent += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    admin = redis_server.client()
    admin.flushdb()  # our own private server: a clean fleet per test
    return admin


@pytest.fixture
def counted(redis_server) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


def round_trips(fn) -> int:  # noqa: ANN001
    before = CountingConnection.sent
    fn()
    return CountingConnection.sent - before


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def register(client: redis.Redis, first: int, count: int) -> None:
    registry = WarmRegistry(client)
    for i in range(first, first + count):
        release = (A, B)[i % 2]
        registry.publish(WorkerState(worker=f"w{i:04d}@node-{i // 8}", node=f"node-{i // 8}", pid=i, state="warm",
                                     releases=[release]))


def send(client: redis.Redis, release: str, priority: int = 0) -> str:
    """A job pushed as the fleet's transport pushes it: through the outbox script."""
    task_id, tag = uuid.uuid4().hex, uuid.uuid4().hex
    body = base64.b64encode(json.dumps([["a jacket"], {}, {}]).encode()).decode()
    message = json.dumps({"headers": {"id": task_id, "fleet_sent_at": time.time()}, "body": body,
                          "properties": {"delivery_tag": tag, "priority": priority, "body_encoding": "base64",
                                         "delivery_info": {"routing_key": queue_for(release)}}})
    enqueue(client, Entry(tag, task_id, priority_list(queue_for(release), priority), message))
    return task_id


def pad_keyspace(client: redis.Redis, records: int) -> None:
    """Job records as a busy day leaves them: most of a real fleet's keys."""
    with client.pipeline(transaction=False) as pipe:
        for i in range(records):
            pipe.hset(JOB_KEY.format(task_id=f"old-{i}"), mapping={"runs": 1, "completed": 1})
        pipe.execute()


def test_status_reads_the_same_round_trips_at_5_and_300_workers_and_never_scans(client, counted):
    table = RouteTable(client)
    table.set_active(A, forced=True)
    table.set_active(B, forced=True)
    send(client, C)  # a queue nothing serves: stranded
    register(client, 0, 5)
    assert len(fleet_status(counted)["workers"]) == 5  # the connection is made here, not counted below
    small = round_trips(lambda: fleet_status(counted))

    register(client, 5, 295)
    pad_keyspace(client, 20_000)
    scans = calls(client, "scan") + calls(client, "keys")
    large = round_trips(lambda: fleet_status(counted))
    status = fleet_status(counted)

    assert large == small, f"status took {small} round trips at 5 workers and {large} at 300"
    assert calls(client, "scan") + calls(client, "keys") == scans, "status walked the keyspace"
    assert len(status["workers"]) == 300
    releases = {r["release"]: r for r in status["models"][MODEL]["releases"]}
    assert len(releases[A]["workers"]) == 150 and len(releases[B]["workers"]) == 150
    assert [s["release"] for s in status["stranded"]] == [C]


def test_the_registry_lists_live_workers_only_and_heartbeats_prune_what_expired_long_ago(client):
    registry = WarmRegistry(client, ttl=0.3)
    alive = WorkerState(worker="alive@n", node="n", pid=1, state="warm", releases=[A])
    lapsed = WorkerState(worker="lapsed@n", node="n", pid=2, state="warm", releases=[A, B])
    failed = WorkerState(worker="failed@n", node="n", pid=3, state="failed", releases=[C], error="OOM at load")
    for state in (lapsed, failed):
        registry.publish(state)
    time.sleep(0.5)  # the lapsed worker's keys expire; its index members stay until pruned
    WarmRegistry(client, ttl=15).publish(alive)

    assert registry.warm_workers() == {A: ["alive@n"]}
    assert registry.warm_workers(B) == {}
    assert {w.worker: w.error for w in registry.workers()} == {"alive@n": "", "failed@n": "OOM at load"}
    assert client.zscore(WORKERS_INDEX, "lapsed@n") is not None  # within the clock slack: kept, keys decide

    long_ago = int(time.time() * 1000) - 120_000
    client.zadd(WORKERS_INDEX, {"lapsed@n": long_ago})
    client.zadd(WARM_INDEX, {f"{A}:lapsed@n": long_ago, f"{B}:lapsed@n": long_ago})
    assert registry.prune() == 3
    assert client.zscore(WORKERS_INDEX, "lapsed@n") is None and client.zscore(WORKERS_INDEX, "alive@n")

    WarmRegistry(client, ttl=15).withdraw(alive)
    assert registry.warm_workers() == {} and client.zscore(WARM_INDEX, f"{A}:alive@n") is None


def test_queued_releases_are_the_non_empty_lists_sends_and_moves_pushed_onto(client):
    send(client, A)
    send(client, B, priority=6)
    assert queued_releases(client) == [A, B]
    assert queued_releases(client, MODEL) == [A, B] and queued_releases(client, "other-model") == []

    report = move_queued(client, A, C, is_pinned=lambda args, kwargs: False)
    assert len(report.moved) == 1
    assert queued_releases(client) == [B, C]  # A's list is empty now, C's was pushed onto by the move
    client.delete(priority_list(queue_for(B), 6))
    assert queued_releases(client) == [C]
