"""The outbox (fleetstate/outbox.py) with real workers on a real redis-server: a sent job whose pop was lost is sent
again and served once; a queued job is left alone; a normal job leaves nothing behind; a re-send whose original is
running does not run it twice.

The lost pop is made at the narrowest boundary: while every worker is busy (prefetch 1: a busy worker pops nothing),
the test takes the job's message off its queue list with its own Redis client and drops it, as a BRPOP whose reply
never arrived leaves it. WARMFLEET_RELIABILITY_TRIALS sets the trials of that scenario (1 by default; the report
runs 10).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate import outbox
from fleetstate.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, OUTBOX_AT_KEY, OUTBOX_KEY, STATS_KEY
from fleetstate.leases import job_record
from tasks.settings import FleetSettings

from .support import Pool, fleet_settings_for, meta, record_result, wait_for

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
TRIALS = int(os.environ.get("WARMFLEET_RELIABILITY_TRIALS", "1"))
GRACE_S = 3.0
LOAD_TIMEOUT = 600  # a shared, loaded machine: generous waits, never part of what is asserted


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, demo_archive_dir,
                              outbox_grace_seconds=GRACE_S)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis_server.client()


@pytest.fixture(scope="module")
def pool(fleet_settings, producer, tmp_path_factory):
    with Pool.running(fleet_settings, NEW, tmp_path_factory.mktemp("logs"), timeout=LOAD_TIMEOUT) as workers:
        yield workers


@pytest.fixture(scope="module")
def long_job(producer, pool) -> dict[str, int]:
    """Steps at 128 px for a job of about 8 s on this (shared) machine now."""
    size = {"width": 128, "height": 128}
    for _ in range(2):  # the second call runs warm
        result = producer.generate.delay("calibrate", seed=1, release=NEW, steps=8, **size).get(timeout=LOAD_TIMEOUT)
    per_step = max(0.002, result["timings"]["inference_ms"] / 1000 / result["steps"])
    return {"steps": min(1000, max(8, math.ceil(8.0 / per_step))), **size}


def started_on(producer, task_id: str, timeout: float = LOAD_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = meta(producer, task_id)
        info = m.get("result") if isinstance(m.get("result"), dict) else {}
        if m.get("status") == "STARTED" and info.get("hostname"):
            return info["hostname"]
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} not started within {timeout}s")


def outbox_empty(client: redis.Redis):
    return lambda: client.hlen(OUTBOX_KEY) == 0 and client.zcard(OUTBOX_AT_KEY) == 0


def resent_count(client: redis.Redis) -> int:
    return int(client.hget(STATS_KEY, "outbox_resent") or 0)


def test_normal_jobs_leave_no_outbox_entry(producer, pool, client):
    """Given warm workers, jobs sent and served leave the outbox empty: each worker's claim took its entry out."""
    results = [producer.generate.delay(f"plain {i}", seed=i, release=NEW, steps=2, width=64, height=64)
               for i in range(4)]
    for r in results:
        r.get(timeout=LOAD_TIMEOUT)
    assert client.hlen(OUTBOX_KEY) == 0 and client.zcard(OUTBOX_AT_KEY) == 0
    for r in results:
        assert job_record(client, r.id)["runs"] == "1"


def test_a_queued_job_is_recorded_and_never_resent_while_it_waits(producer, pool, client):
    """A job queued for a release no worker serves is in the outbox (task id, list, the exact queued message) and
    stays queued once past the grace period: the sweep only re-dates it."""
    before = resent_count(client)
    r = producer.generate.delay("waits for a worker of the old release", seed=3, release=OLD, steps=2)
    queued = client.lrange(queue_for(OLD), 0, -1)
    assert len(queued) == 1
    entries = outbox.pending(client)
    assert [(e.task_id, e.list, e.message.encode()) for e in entries] == [(r.id, queue_for(OLD), queued[0])]
    sent_at = client.zscore(OUTBOX_AT_KEY, entries[0].tag)
    wait_for(lambda: client.zscore(OUTBOX_AT_KEY, entries[0].tag) != sent_at, timeout=LOAD_TIMEOUT,
             what="the sweep re-dating the queued job's entry")
    assert client.lrange(queue_for(OLD), 0, -1) == queued
    assert resent_count(client) == before
    client.hdel(OUTBOX_KEY, entries[0].tag)  # the entry first: a queue without it is a lost send to the sweep
    client.zrem(OUTBOX_AT_KEY, entries[0].tag)
    client.delete(queue_for(OLD))


def test_a_lost_pop_is_sent_again_by_the_outbox_and_served_once(fleet_settings, producer, pool, long_job, client):
    """Given every worker busy, when a job's message is taken off its queue and dropped (a pop whose reply was lost),
    then past the grace period the outbox sweep sends it again, a worker serves it, and its pipeline ran once."""
    recoveries = []
    for trial in range(TRIALS):
        before = resent_count(client)
        busy = [producer.generate.delay(f"keeps a worker busy {trial}-{i}", seed=10 + i, release=NEW, **long_job)
                for i in range(len(pool.workers))]
        assert len({started_on(producer, b.id) for b in busy}) == len(pool.workers)
        r = producer.generate.delay(f"popped and lost {trial}", seed=50 + trial, release=NEW, steps=2, width=64,
                                    height=64)
        popped = client.rpop(queue_for(NEW))  # the pop whose reply never arrived
        lost_at = time.monotonic()
        assert popped is not None and json.loads(popped)["headers"]["id"] == r.id
        assert client.llen(queue_for(NEW)) == 0 and not client.hexists(KOMBU_UNACKED,
                                                                       json.loads(popped)["properties"]["delivery_tag"])
        assert [e.task_id for e in outbox.pending(client)] == [r.id]

        result = r.get(timeout=LOAD_TIMEOUT)
        recoveries.append(time.monotonic() - lost_at)
        for b in busy:
            b.get(timeout=LOAD_TIMEOUT)
        record = job_record(client, r.id)
        assert (record["runs"], record["completed"], record.get("duplicates", "0")) == ("1", "1", "0"), record
        assert result["task_id"] == r.id
        assert resent_count(client) == before + 1
        wait_for(outbox_empty(client), timeout=LOAD_TIMEOUT, what="an empty outbox")
        assert f"job {r.id} is in no queue and in no worker's hands" in pool.logs_text()
    record_result("lost pop (outbox re-send)", trials=TRIALS, sent=TRIALS, completed=TRIALS, lost=0, duplicated=0,
                  recovery_s=recoveries, bound_s=GRACE_S + outbox.sweep_period(GRACE_S),
                  notes=f"message taken off its queue while both workers were busy; outbox grace {GRACE_S:g} s "
                        f"(default {outbox.DEFAULT_GRACE_SECONDS:g} s); recovery = drop → result, includes waiting "
                        "for a busy worker; 1 pipeline run per job")


def test_a_resend_of_a_running_job_does_not_run_it_twice(fleet_settings, producer, pool, long_job, client):
    """Given a job running on one worker, when the outbox holds a stale entry for it and its message is not in the
    unacked hash (a worker that popped it but had not recorded it yet), the sweep sends it again; the copy reaches
    the peer, which waits on the running holder's lease and returns its result: one pipeline run, one duplicate."""
    for trial in range(TRIALS):
        r = producer.generate.delay(f"running while it is sent again {trial}", seed=77 + trial, release=NEW, **long_job)
        holder = started_on(producer, r.id)
        tag = raw = None
        for t, v in client.hgetall(KOMBU_UNACKED).items():
            if json.loads(v)[0]["headers"]["id"] == r.id:
                tag, raw = t, v
        assert tag is not None, "the running job's message is not unacknowledged"
        payload = json.loads(raw)[0]
        entry = outbox.Entry(tag.decode(), r.id, queue_for(NEW), json.dumps(payload))
        before = resent_count(client)
        with client.pipeline() as pipe:  # the state a worker stalled between its pop and its unacked record leaves
            pipe.hdel(KOMBU_UNACKED, tag)
            pipe.zrem(KOMBU_UNACKED_INDEX, tag)
            pipe.hset(OUTBOX_KEY, entry.tag, entry.to_json())
            pipe.zadd(OUTBOX_AT_KEY, {entry.tag: 0})
            pipe.execute()
        wait_for(lambda n=before: resent_count(client) == n + 1, timeout=LOAD_TIMEOUT, what="the outbox re-send")
        result = r.get(timeout=LOAD_TIMEOUT)
        assert result["worker"] == holder
        wait_for(lambda t=r.id: job_record(client, t).get("duplicates") == "1", timeout=LOAD_TIMEOUT,
                 what="the re-sent copy answered from the job record")
        record = job_record(client, r.id)
        assert (record["runs"], record["completed"]) == ("1", "1"), record
        assert f"DUPLICATE delivery of job {r.id}" in pool.logs_text()
        wait_for(outbox_empty(client), timeout=LOAD_TIMEOUT, what="an empty outbox")
        assert len(sorted((fleet_settings.home / "outputs").rglob(f"*{r.id}*"))) == 1
    record_result("outbox re-send of a running job", trials=TRIALS, sent=TRIALS, completed=TRIALS, lost=0,
                  duplicated=0,
                  notes="the copy waited on the holder's lease and returned its result: 1 pipeline run, 1 duplicate")
