"""Routing parts against a private redis-server, without workers: the route table, its history, the canary hash,
the pub/sub-invalidated route cache (fork included), queue depth and the queued-job move."""

from __future__ import annotations

import base64
import gc
import json
import multiprocessing
import threading
import uuid
from collections import Counter

import pytest
import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from cachemgr.names import queue_for
from fleetstate.keys import PRIORITY_SEP, QUEUE_PRIORITY_STEPS, ROUTE_CHANNEL, queue_lists
from fleetstate.queues import move_queued, queue_depth, queued_releases
from fleetstate.routes import Route, RouteError, RouteTable, canary_share
from tasks.requests import is_pinned
from tasks.router import FleetRouter
from tasks.settings import FleetSettings

from .support import fleet_settings_for

A = "nano-banana@base-v1.0.0+lora-v2.3.0"
B = "nano-banana@base-v1.1.0+lora-v2.3.1"
C = "nano-banana@base-v1.1.0+lora-v2.3.0"


@pytest.fixture(scope="module")
def fleet_settings(redis_server, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    """No archive and no workers here: the producer only publishes into queues nobody consumes."""
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    return c


def binomial_bounds(n: int, p: float, sigmas: float = 4.5) -> tuple[float, float]:
    sd = (n * p * (1 - p)) ** 0.5
    return n * p - sigmas * sd, n * p + sigmas * sd


# -- the canary hash ---------------------------------------------------------------------------------------


def test_canary_share_is_deterministic_and_uniform():
    ids = [str(uuid.uuid4()) for _ in range(20000)]
    shares = [canary_share(i) for i in ids]
    assert all(0 <= s < 100 for s in shares)
    assert [canary_share(i) for i in ids[:100]] == shares[:100]  # a retry with the same id lands the same way
    buckets = Counter(int(s // 10) for s in shares)
    expected = len(ids) / 10
    chi2 = sum((buckets[b] - expected) ** 2 / expected for b in range(10))
    assert chi2 < 35, buckets  # 9 degrees of freedom: p < 1e-4 for a uniform hash


def test_router_decisions_over_1000_task_ids_follow_the_weight():
    route = Route("nano-banana", active=A, canary=B, canary_weight=10)
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    to_canary = {i for i in ids if route.release_for(i) == B}
    assert all(route.release_for(i) == A for i in set(ids) - to_canary)
    low, high = binomial_bounds(1000, 0.10)
    assert low <= len(to_canary) <= high
    wider = Route("nano-banana", active=A, canary=B, canary_weight=30)
    assert to_canary <= {i for i in ids if wider.release_for(i) == B}  # ramping up never moves a job back
    assert {Route("nano-banana", A, canary=B, canary_weight=100).release_for(i) for i in ids} == {B}
    assert {Route("nano-banana", A).release_for(i) for i in ids} == {A}


# -- the route table ---------------------------------------------------------------------------------------


def test_set_active_keeps_the_previous_release_and_history_says_who(client):
    table = RouteTable(client)
    assert table.get("nano-banana").active is None
    table.set_active(A, actor="alice")
    route = table.set_active(B, actor="bob", reason="promote")
    assert (route.active, route.previous) == (B, A)
    assert table.get("nano-banana") == route
    again = table.set_active(B, actor="bob")
    assert again.previous == A  # re-promoting the active release does not lose the way back
    history = table.history("nano-banana")
    assert [(h["actor"], h["from"], h["to"]) for h in history] == [("bob", B, B), ("bob", A, B), ("alice", "", A)]
    assert table.models() == ["nano-banana"]


def test_canary_needs_an_active_release_and_a_sane_weight(client):
    table = RouteTable(client)
    with pytest.raises(RouteError, match="no active release"):
        table.set_canary(B, 10)
    table.set_active(A)
    with pytest.raises(RouteError, match="already the active release"):
        table.set_canary(A, 10)
    for weight in (0, -5, 101):
        with pytest.raises(RouteError, match="percentage"):
            table.set_canary(B, weight)
    route = table.set_canary(B, 12.5, actor="carol")
    assert (route.active, route.canary, route.canary_weight) == (A, B, 12.5)
    assert table.history("nano-banana")[0]["canary"] == f"{B} 12.5%"
    done = table.set_active(B, actor="carol")
    assert (done.active, done.previous, done.canary, done.canary_weight) == (B, A, None, 0.0)


def test_every_change_is_announced_on_the_channel(client, redis_server):
    listener = redis_server.client().pubsub()
    listener.subscribe(ROUTE_CHANNEL)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    table = RouteTable(client)
    table.set_active(A)
    table.set_canary(B, 5)
    table.clear_canary("nano-banana")
    messages = [listener.get_message(timeout=5) for _ in range(3)]
    assert [m["data"] for m in messages] == [b"nano-banana"] * 3
    listener.close()


def test_history_filters_by_model_across_pages(client):
    table = RouteTable(client)
    table.set_active(A, actor="first")
    for i in range(700):  # other models' changes push ours past the first page of the stream
        table.set_active(f"other-{i % 3}@base-v{i}", actor="noise")
    table.set_active(B, actor="last")
    ours = table.history("nano-banana")
    assert [h["actor"] for h in ours] == ["last", "first"]
    assert len(table.history(None, count=50)) == 50


def test_concurrent_changes_lose_nothing(client, redis_server):
    def flip(release: str) -> None:
        table = RouteTable(redis_server.client())
        for _ in range(40):
            table.set_active(release, actor=release)

    threads = [threading.Thread(target=flip, args=(r,)) for r in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = RouteTable(client).history("nano-banana", count=1000)
    assert len(history) == 80
    for newer, older in zip(history, history[1:], strict=False):
        assert newer["from"] == older["to"]  # each change saw the one before it (WATCH/MULTI)


# -- the producer's route cache ----------------------------------------------------------------------------


def _router(redis_server, ttl: float) -> FleetRouter:
    router = FleetRouter(redis_server.url, "nano-banana", ttl=ttl)
    router.route("nano-banana")
    assert router.cache.wait_listening(10)
    return router


def test_cache_serves_from_memory_until_pub_sub_says_the_route_changed(client, redis_server):
    table = RouteTable(client)
    table.set_active(A)
    router = _router(redis_server, ttl=600)
    try:
        assert router.active("nano-banana") == A
        # a write that is not announced is not seen: proof that reads come from the cache
        client.hset("fleet:route:nano-banana", "active", C)
        assert router.active("nano-banana") == A
        seen = router.cache.generation
        table.set_active(B)
        assert router.cache.wait_generation(seen, timeout=10)
        assert router.active("nano-banana") == B
    finally:
        router.cache.close()


def test_ttl_is_the_backstop_for_a_lost_message(client, redis_server):
    RouteTable(client).set_active(A)
    router = _router(redis_server, ttl=0.3)
    try:
        assert router.active("nano-banana") == A
        client.hset("fleet:route:nano-banana", "active", B)  # as if the pub/sub message were lost
        _eventually(lambda: router.active("nano-banana") == B)
    finally:
        router.cache.close()


def test_a_dropped_subscription_forgets_the_cache(client, redis_server):
    """Messages published while the subscriber reconnects are lost; it must not trust what it cached before."""
    table = RouteTable(client)
    table.set_active(A)
    router = _router(redis_server, ttl=600)
    try:
        assert router.active("nano-banana") == A
        subscriptions = router.cache.subscriptions
        client.client_kill_filter(_type="pubsub")
        client.hset("fleet:route:nano-banana", "active", B)  # unannounced, during the outage
        assert router.cache.wait_listening(10, after=subscriptions)
        assert router.active("nano-banana") == B
    finally:
        router.cache.close()


def test_a_dropped_router_stops_its_subscriber(redis_server):
    """`tasks.configure` builds a new router each time; the old one's thread must not live on."""

    router = _router(redis_server, ttl=600)
    thread = router.cache._state.thread
    assert thread is not None and thread.is_alive()
    del router
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def _forked_child(conn) -> None:
    """In a forked child: the router it inherited (cache warm, subscriber thread not) must not serve stale routes."""
    router = _ROUTER_FOR_FORK
    conn.recv()  # the parent flipped the route after the fork; this process never heard of it
    conn.send(("first read", router.active("nano-banana")))
    assert router.cache.wait_listening(10)
    conn.send(("listening", router.active("nano-banana")))
    conn.recv()  # flipped again: now the child's own subscriber must carry the news
    _eventually(lambda: router.active("nano-banana") == A)
    conn.send(("after", router.active("nano-banana")))


_ROUTER_FOR_FORK: FleetRouter | None = None


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_the_cache_is_fork_safe(client, redis_server):
    global _ROUTER_FOR_FORK
    table = RouteTable(client)
    table.set_active(A)
    _ROUTER_FOR_FORK = router = _router(redis_server, ttl=600)
    try:
        assert router.active("nano-banana") == A  # the parent's cache is warm when it forks
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_forked_child, args=(child_end,))
        child.start()
        for flip_to, expected in ((B, [("first read", B), ("listening", B)]), (A, [("after", A)])):
            seen = router.cache.generation
            table.set_active(flip_to)
            assert router.cache.wait_generation(seen, timeout=10)
            parent_end.send("flipped")
            for message in expected:
                assert parent_end.poll(20), "the child said nothing"
                assert parent_end.recv() == message
        child.join(10)
        assert child.exitcode == 0
    finally:
        router.cache.close()
        _ROUTER_FOR_FORK = None


def _eventually(check, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- queues: depth and moving ------------------------------------------------------------------------------


def test_queue_lists_are_kombus():
    assert Channel.sep == PRIORITY_SEP
    assert list(QUEUE_PRIORITY_STEPS) == list(PRIORITY_STEPS)
    assert queue_lists("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]


def _queued(client: redis.Redis, release: str) -> list[dict]:
    """The messages waiting for a release, next-served first, with their priority list and decoded kwargs."""
    out = []
    for name in queue_lists(queue_for(release)):
        for raw in reversed(client.lrange(name, 0, -1)):
            message = json.loads(raw)
            body = json.loads(base64.b64decode(message["body"]))
            out.append({"id": message["headers"]["id"], "list": name, "kwargs": body[1],
                        "routing_key": message["properties"]["delivery_info"]["routing_key"]})
    return out


def test_queue_depth_counts_every_priority_list(client, producer):
    RouteTable(client).set_active(A)
    for i in range(3):
        producer.generate.delay(f"p{i}")
    producer.generate.apply_async(args=["urgent"], priority=5)
    producer.generate.apply_async(args=["later"], priority=9)
    assert client.llen(queue_for(A)) == 3  # a plain LLEN misses the priority lists
    assert queue_depth(client, queue_for(A)) == 5
    assert queued_releases(client, "nano-banana") == [A]


def test_move_queued_keeps_ids_and_order_rewrites_the_queue_and_leaves_pinned_jobs(client, producer):
    RouteTable(client).set_active(A)
    sent = [producer.generate.delay(f"job {i}", seed=i).id for i in range(6)]
    urgent = producer.generate.apply_async(args=["urgent"], priority=5).id
    pinned = [producer.generate.delay("pinned", release=A).id, producer.generate.apply_async(args=["p"], kwargs={
        "release": A}).id]
    already_there = producer.generate.delay("for B", release=B).id

    report = move_queued(client, A, B, is_pinned)

    assert sorted(report.moved) == sorted(sent + [urgent])
    assert sorted(report.pinned) == sorted(pinned)
    assert (report.unreadable, report.taken_meanwhile) == (0, 0)
    left = _queued(client, A)
    assert sorted(m["id"] for m in left) == sorted(pinned)
    moved = _queued(client, B)
    assert [m["id"] for m in moved] == sent + [already_there, urgent]  # moved jobs first, oldest first
    assert {m["routing_key"] for m in moved} == {queue_for(B)}
    assert moved[-1]["list"] == queue_for(B) + PRIORITY_SEP + "3"  # the priority list is kept
    assert queue_depth(client, queue_for(A)) == 2 and queue_depth(client, queue_for(B)) == 8


def test_move_queued_leaves_what_it_cannot_read(client):
    client.lpush(queue_for(A), b"not json at all")
    report = move_queued(client, A, B, is_pinned)
    assert (report.moved, report.unreadable) == ([], 1)
    assert client.lrange(queue_for(A), 0, -1) == [b"not json at all"]


def test_move_queued_races_a_consumer_without_loss_or_duplicate(client, producer, redis_server):
    """A worker keeps taking jobs from the abandoned queue while they are moved: each job ends up exactly once."""
    RouteTable(client).set_active(A)
    ids = {producer.generate.delay(f"race {i}").id for i in range(300)}
    taken: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        c = redis_server.client()
        while not stop.is_set():
            raw = c.rpop(queue_for(A))
            if raw is None:
                if stop.wait(0.001):
                    return
                continue
            taken.append(json.loads(raw)["headers"]["id"])

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        report = move_queued(client, A, B, is_pinned)
    finally:
        stop.set()
        consumer.join()
    moved_ids = [m["id"] for m in _queued(client, B)]
    assert len(moved_ids) == len(set(moved_ids)) == len(report.moved)
    assert not set(moved_ids) & set(taken)
    assert set(moved_ids) | set(taken) | {m["id"] for m in _queued(client, A)} == ids
    assert len(moved_ids) + len(taken) + queue_depth(client, queue_for(A)) == 300


def test_the_router_sends_canary_jobs_by_task_id_and_pinned_jobs_where_pinned(client, producer):
    """Through Celery's own send path: the queue each job lands in is the one its task id hashes to."""
    RouteTable(client).set_active(A)
    RouteTable(client).set_canary(B, 50)
    results = [producer.generate.delay(f"c{i}") for i in range(100)]
    where = {m["id"]: m["routing_key"] for r in (A, B) for m in _queued(client, r)}
    route = RouteTable(client).get("nano-banana")
    assert {r.id: where[r.id] for r in results} == {r.id: queue_for(route.release_for(r.id)) for r in results}
    assert {queue_for(A), queue_for(B)} == set(where.values())
    fixed_id = str(uuid.uuid4())
    producer.generate.apply_async(args=["same id"], task_id=fixed_id)
    producer.generate.apply_async(args=["same id again"], task_id=fixed_id)
    assert [m["routing_key"] for r in (A, B) for m in _queued(client, r) if m["id"] == fixed_id] == [
        queue_for(route.release_for(fixed_id))] * 2
    pinned = producer.generate.delay("pinned", release=C)
    assert [m["id"] for m in _queued(client, C)] == [pinned.id]
