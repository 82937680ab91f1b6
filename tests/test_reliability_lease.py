"""The execution lease and job record (fleetstate/leases.py) against a real redis-server, one rule per test: the fleet
tests show them at work inside workers; these pin each rule down in milliseconds."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from fleetstate.keys import KOMBU_UNACKED_INDEX, LEASE_KEY, STATS_KEY
from fleetstate.leases import JobLease, effective_lease_seconds, job_record


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    return c


def lease(client: redis.Redis, worker: str, seconds: float = 1.0, tag: str | None = None, **kw) -> JobLease:
    return JobLease(client, "job-1", worker, seconds, delivery_tag=tag, poll_seconds=0.02, **kw)


def test_the_lease_expires_before_a_dead_holders_message_comes_back():
    assert effective_lease_seconds(30, 300) == 30
    assert effective_lease_seconds(30, 10) == 5
    assert effective_lease_seconds(30, 1) == 1  # never below a second


def test_the_first_delivery_runs_and_a_later_one_returns_its_stored_result(client):
    with lease(client, "w1") as first:
        assert first.claim().run
        first.complete({"image_uri": "file:///x.png"})
    with lease(client, "w2") as again:
        claim = again.claim()
    assert not claim.run and claim.result == {"image_uri": "file:///x.png"}
    record = job_record(client, "job-1")
    assert (record["runs"], record["completed"], record["duplicates"]) == ("1", "1", "1")
    assert client.hget(STATS_KEY, "duplicate_deliveries") == b"1"


def test_a_delivery_waits_for_a_live_holder_and_runs_nothing(client):
    got = {}
    with lease(client, "w1") as holder:
        assert holder.claim().run
        waiter = threading.Thread(target=lambda: got.update(claim=_claim(client, "w2")))
        waiter.start()
        time.sleep(1.5)  # longer than the lease: only the holder's renewals keep it
        assert waiter.is_alive(), "the second delivery did not wait for the live holder"
        holder.complete({"ok": 1})
    waiter.join(timeout=10)
    assert got["claim"].result == {"ok": 1} and job_record(client, "job-1")["runs"] == "1"


def _claim(client: redis.Redis, worker: str):
    with lease(client, worker) as second:
        return second.claim()


def test_a_dead_holders_lease_expires_and_the_next_delivery_runs_the_job(client):
    dead = lease(client, "w1")  # claims without its keepalive thread: as if killed right after
    assert dead.claim().run
    assert client.get(LEASE_KEY.format(task_id="job-1")) == dead.token.encode()
    with lease(client, "w2") as heir:
        assert heir.claim().run
    record = job_record(client, "job-1")
    assert (record["runs"], record["holder"], record.get("duplicates")) == ("2", "w2", None)


def test_only_the_holder_releases_its_lease(client):
    with lease(client, "w1") as holder:
        assert holder.claim().run
        impostor = lease(client, "w2")
        impostor.held = True  # a stale belief that it holds the lease
        impostor.release()
        assert client.get(LEASE_KEY.format(task_id="job-1")) == holder.token.encode()
    assert client.get(LEASE_KEY.format(task_id="job-1")) is None


def test_a_dead_job_stays_dead(client):
    with lease(client, "w1") as holder:
        assert holder.claim().run
        holder.bury("InjectedFault: always fails")
    with lease(client, "w2") as again:
        claim = again.claim()
    assert not claim.run and claim.dead == "InjectedFault: always fails"


def test_a_running_job_keeps_its_message_fresh_and_never_resurrects_an_acked_one(client):
    client.zadd(KOMBU_UNACKED_INDEX, {"tag-1": time.time() - 1000})
    started = time.time()
    with lease(client, "w1", seconds=0.3, tag="tag-1") as running:
        assert running.claim().run
        time.sleep(0.5)
        assert client.zscore(KOMBU_UNACKED_INDEX, "tag-1") >= started  # refreshed while running, not left stale
        client.zrem(KOMBU_UNACKED_INDEX, "tag-1")  # acknowledged (or restored) meanwhile
        time.sleep(0.3)
        assert client.zscore(KOMBU_UNACKED_INDEX, "tag-1") is None  # ZADD XX: never re-added


def test_a_job_costs_two_redis_round_trips_and_completion_cleans_up_after_it(client):
    """Claim (delivery index, record, lease) and completion (record, release, unindex, counters) are one script each."""
    from fleetstate.keys import DELIVERIES_KEY, WORKER_KEY

    client.hset(WORKER_KEY.format(worker="w1"), mapping={"worker": "w1", "jobs": "4"})  # its registry hash, alive
    calls = []
    real = client.execute_command

    def counted(*args, **options):
        calls.append(args[0])
        return real(*args, **options)

    client.execute_command = counted
    with lease(client, "w1", tag="tag-1") as running:
        assert running.claim().run
        assert client.hexists(DELIVERIES_KEY, "tag-1")  # in this worker's hands while it runs
        calls.clear()
        running.complete({"image_uri": "file:///x.png"}, {"jobs": 5})
        assert len(calls) == 1, calls
    assert len(calls) == 1, calls  # leaving after completion costs nothing more
    client.execute_command = real
    assert not client.hexists(DELIVERIES_KEY, "tag-1")
    assert client.get(LEASE_KEY.format(task_id="job-1")) is None
    assert client.hget(STATS_KEY, "l1_hits") == b"1"
    assert client.hget(WORKER_KEY.format(worker="w1"), "jobs") == b"5"
    assert job_record(client, "job-1")["completed"] == "1"


def test_a_completion_sent_again_after_its_reply_was_lost_counts_once(client):
    """The server ran the completion script but its reply never came back (a link down past the client's timeout):
    the retry stores the same result and counts neither the job nor the served-jobs counter twice."""
    real = client.execute_command
    lost = []

    def reply_lost_once(*args, **options):
        answer = real(*args, **options)
        if args[0] == "EVALSHA" and not lost and running.held:
            lost.append(args[0])
            raise redis.ConnectionError("the reply was lost on its way back")
        return answer

    with lease(client, "w1") as running:
        assert running.claim().run
        client.execute_command = reply_lost_once
        assert running.complete({"image_uri": "file:///x.png"})
        client.execute_command = real
    assert lost, "precondition: the first completion's reply was lost"
    record = job_record(client, "job-1")
    assert (record["runs"], record["completed"]) == ("1", "1"), record
    assert client.hget(STATS_KEY, "l1_hits") == b"1"


def test_completion_never_revives_a_lapsed_registry_entry(client):
    from fleetstate.keys import WORKER_KEY

    with lease(client, "w-gone") as running:
        assert running.claim().run
        running.complete({"ok": 1}, {"jobs": 1})
    assert not client.exists(WORKER_KEY.format(worker="w-gone"))  # the heartbeat writes it back, with its TTL


def test_a_failed_delivery_leaves_no_lease_and_no_index_entry(client):
    from fleetstate.keys import DELIVERIES_KEY

    with lease(client, "w1", tag="tag-2") as running:
        assert running.claim().run
    assert not client.hexists(DELIVERIES_KEY, "tag-2")
    assert client.get(LEASE_KEY.format(task_id="job-1")) is None
    assert job_record(client, "job-1").get("completed") is None
