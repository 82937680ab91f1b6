"""`rollback --move-queued` at scale and for jobs dead workers hold (fleetstate/queues.py), on a real redis-server
with messages sent by the real producer: one walk per list (O(N), no per-message LREM), and an abandoned release's
unacked jobs of dead workers moved too, a live worker's left alone."""

from __future__ import annotations

import gc
import json

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate import outbox
from fleetstate.keys import KOMBU_UNACKED, WORKER_KEY
from fleetstate.orphans import index_delivery
from fleetstate.queues import move_queued
from fleetstate.routes import RouteTable
from tasks.requests import is_pinned
from tasks.settings import FleetSettings

A, B = DEMO_RELEASES


@pytest.fixture(scope="module")
def fleet_settings(redis_server, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    """No archive and no workers: the producer only publishes into queues nobody consumes."""
    return FleetSettings(home=tmp_path_factory.mktemp("home"), broker_url=redis_server.url, route_cache_ttl=0.0,
                         node_name="testnode")


@pytest.fixture(autouse=True)
def _collect_results_while_redis_is_up():
    yield
    gc.collect()


@pytest.fixture
def client(redis_server, producer) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    RouteTable(c).set_active(A)
    return c


def ids_in(client: redis.Redis, queue: str) -> list[str]:
    """Task ids in the order a worker will take them (kombu pops from the right)."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(queue, 0, -1))]


def calls(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def test_a_move_of_thousands_walks_each_list_once(client, producer):
    sent = [producer.generate.delay(f"job {i}", seed=i).id for i in range(3000)]
    client.config_resetstat()
    report = move_queued(client, A, B, is_pinned)
    used = calls(client)
    assert sorted(report.moved) == sorted(sent) and report.taken_meanwhile == 0
    assert ids_in(client, queue_for(B)) == sent and client.llen(queue_for(A)) == 0
    assert "lrem" not in used  # no per-message search of the list
    assert used.get("evalsha", 0) + used.get("eval", 0) <= 4  # one walk per non-empty list, per pass
    # each moved job's outbox entry follows it: the sweep finds it queued where it is now, word for word
    queued = set(client.lrange(queue_for(B), 0, -1))
    entries = outbox.pending(client)
    assert sorted(e.task_id for e in entries) == sorted(sent)
    assert all(e.list == queue_for(B) and e.message.encode() in queued for e in entries)


def take(client: redis.Redis, worker: str, tag: str, alive: bool) -> str:
    """What kombu and a worker do when the worker takes the next job: out of the queue, into `unacked`, indexed."""
    raw = client.rpop(queue_for(A))
    message = json.loads(raw)
    client.hset(KOMBU_UNACKED, tag, json.dumps([message, "", queue_for(A)]))
    index_delivery(client, tag, worker, message["headers"]["id"])
    if alive:
        client.hset(WORKER_KEY.format(worker=worker), "state", "warm")
    return message["headers"]["id"]


def test_unacked_jobs_of_dead_workers_move_with_the_queue_and_a_live_workers_stay(client, producer):
    producer.generate.delay("held by a dead worker")
    producer.generate.delay("held by a live worker")
    waiting = producer.generate.delay("waiting").id
    dead = take(client, "dead@n", "tag-dead", alive=False)
    live = take(client, "live@n", "tag-live", alive=True)

    report = move_queued(client, A, B, is_pinned)

    assert report.moved_unacked == [dead] and sorted(report.moved) == sorted([waiting, dead])
    assert set(ids_in(client, queue_for(B))) == {waiting, dead}
    moved = next(json.loads(r) for r in client.lrange(queue_for(B), 0, -1) if json.loads(r)["headers"]["id"] == dead)
    assert moved["properties"]["delivery_info"]["routing_key"] == queue_for(B)
    assert not client.hexists(KOMBU_UNACKED, "tag-dead")
    assert client.hexists(KOMBU_UNACKED, "tag-live") and live not in ids_in(client, queue_for(B))
