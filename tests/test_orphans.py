"""The orphan sweep (fleetstate/orphans.py) against a real redis-server, one rule per test, in milliseconds: a dead
holder's message goes back to its queue once, a live holder's stays, an acknowledged one is only unindexed.
The kill -9 test in test_reliability_prod.py shows it at work between real workers."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from fleetstate.keys import DELIVERIES_KEY, KOMBU_UNACKED, KOMBU_UNACKED_INDEX, WORKER_KEY
from fleetstate.orphans import index_delivery, restore, sweep, sweep_once

QUEUE = "release.m@base-v1+lora-v1"


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    return c


def hold(client: redis.Redis, tag: str, worker: str, task_id: str, priority: int = 0) -> bytes:
    """What kombu and the worker leave while `worker` runs a job: the unacked entry, its score, the index entry."""
    body = base64.b64encode(json.dumps([["x"], {}, {}]).encode()).decode()
    payload = {"body": body, "headers": {"id": task_id}, "content-type": "application/json",
               "properties": {"delivery_tag": tag, "body_encoding": "base64", "priority": priority,
                              "delivery_info": {"exchange": "", "routing_key": QUEUE}}}
    raw = json.dumps([payload, "", QUEUE]).encode()
    client.hset(KOMBU_UNACKED, tag, raw)
    client.zadd(KOMBU_UNACKED_INDEX, {tag: 1.0})
    index_delivery(client, tag, worker, task_id)
    return raw


def heartbeat(client: redis.Redis, worker: str) -> None:
    client.hset(WORKER_KEY.format(worker=worker), "state", "warm")


def test_a_dead_holders_message_goes_back_to_its_queue_marked_redelivered(client):
    hold(client, "t1", "dead@n", "job-1")
    assert [d.task_id for d in sweep(client)] == ["job-1"]
    (pushed,) = client.lrange(QUEUE, 0, -1)
    message = json.loads(pushed)
    assert message["headers"]["id"] == "job-1" and message["headers"]["redelivered"] is True
    assert message["properties"]["delivery_info"]["redelivered"] is True
    assert not client.hexists(KOMBU_UNACKED, "t1") and client.zscore(KOMBU_UNACKED_INDEX, "t1") is None
    assert not client.hexists(DELIVERIES_KEY, "t1")
    assert sweep(client) == [] and client.llen(QUEUE) == 1  # once only


def test_a_live_holders_message_stays_where_it_is(client):
    hold(client, "t1", "alive@n", "job-1")
    heartbeat(client, "alive@n")
    assert sweep(client) == []
    assert client.llen(QUEUE) == 0 and client.hexists(KOMBU_UNACKED, "t1") and client.hexists(DELIVERIES_KEY, "t1")


def test_an_acknowledged_message_is_only_unindexed(client):
    hold(client, "t1", "dead@n", "job-1")
    client.hdel(KOMBU_UNACKED, "t1")  # the worker acked, then died before it unindexed
    assert sweep(client) == []
    assert client.llen(QUEUE) == 0 and not client.hexists(DELIVERIES_KEY, "t1")


def test_the_restore_is_a_no_op_when_the_holder_comes_back_or_the_message_changed(client):
    raw = hold(client, "t1", "w@n", "job-1")
    heartbeat(client, "w@n")
    assert restore(client, "t1", raw, "w@n") == -1  # alive after all: nothing moves
    client.delete(WORKER_KEY.format(worker="w@n"))
    assert restore(client, "t1", raw + b" ", "w@n") == 0  # not the message the sweeper read
    assert restore(client, "t1", raw, "w@n") == 1 and client.llen(QUEUE) == 1


def test_a_prioritised_message_goes_back_to_its_priority_list(client):
    hold(client, "t1", "dead@n", "job-1", priority=6)
    sweep(client)
    assert client.llen(QUEUE) == 0 and client.llen(f"{QUEUE}\x06\x166") == 1


def test_one_sweep_per_period_fleet_wide(client):
    hold(client, "t1", "dead@n", "job-1")
    client.set("fleet:lock:orphan-sweep", "someone else")  # another worker swept in this period
    assert sweep_once(client, period=5) == [] and client.llen(QUEUE) == 0
    client.delete("fleet:lock:orphan-sweep")
    assert len(sweep_once(client, period=5)) == 1
