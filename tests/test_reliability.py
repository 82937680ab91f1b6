"""Faults injected for real into a live fleet (real redis-server, real worker processes, real pipelines), and nothing
lost: a worker killed mid-generation, a job longer than the visibility timeout, duplicate deliveries, poison jobs.

Two workers are warm on the same release. Timings come from the settings below (see docs/reliability.md): a killed
worker's job comes back VISIBILITY_TIMEOUT after its last refresh, found by a peer's restore sweep within
RESTORE_INTERVAL. Tests measure, record (WARMFLEET_RELIABILITY_RESULTS) and assert outcomes, never durations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.dead import DeadLetters
from fleetstate.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX
from fleetstate.leases import effective_lease_seconds, job_record
from tasks.settings import FleetSettings

from .support import (
    PNG_MAGIC,
    REPO,
    VISIBILITY_TIMEOUT,
    Calibration,
    Pool,
    child_env,
    fleet_settings_for,
    meta,
    record_result,
    start_worker,
    trial_count,
    wait_for,
    wait_warm,
)

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
RESTORE_INTERVAL = 5  # tasks/app.py: unacked_restore_interval (throttle 0: every sweep scans)
MAX_RETRIES = 2
POISON = "poison pill: this prompt always crashes the pipeline"


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, demo_archive_dir,
                              visibility_timeout=VISIBILITY_TIMEOUT, job_max_retries=MAX_RETRIES,
                              job_retry_backoff=1.0)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis_server.client()


@pytest.fixture(scope="module")
def pool(fleet_settings, producer, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with Pool.running(fleet_settings, NEW, logs, WARMFLEET_TEST_POISON_PROMPT=POISON) as workers:
        yield workers


@pytest.fixture(scope="module")
def calibration(producer, pool) -> Calibration:
    return Calibration(producer)


def wait_started(producer, task_id: str, other_than: str | None = None, timeout: float = 300) -> str:
    """The worker that reported the job STARTED (task_track_started), other than `other_than` if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = meta(producer, task_id)
        info = m.get("result") if isinstance(m.get("result"), dict) else {}
        host = info.get("hostname") if m.get("status") == "STARTED" else None
        if host and host != other_than:
            return host
        if m.get("status") == "SUCCESS" and other_than is not None:
            return m.get("worker") or "?"
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} not started (by a worker other than {other_than}) within {timeout}s")


def unacked_entry(client: redis.Redis, task_id: str) -> tuple[bytes, bytes] | None:
    """(delivery tag, kombu's stored [payload, exchange, routing key]) of a job's unacknowledged message."""
    for tag, raw in client.hgetall(KOMBU_UNACKED).items():
        if json.loads(raw)[0]["headers"]["id"] == task_id:
            return tag, raw
    return None


def restore_like_kombu(client: redis.Redis, tag: bytes, raw: bytes) -> None:
    """What kombu's restore sweep does to a message it thinks abandoned: out of the unacked set, back in its queue."""
    payload, _exchange, routing_key = json.loads(raw)
    payload["headers"]["redelivered"] = True
    payload["properties"]["delivery_info"]["redelivered"] = True
    with client.pipeline() as pipe:
        pipe.zrem(KOMBU_UNACKED_INDEX, tag)
        pipe.hdel(KOMBU_UNACKED, tag)
        pipe.rpush(routing_key, json.dumps(payload))
        pipe.execute()


def images_of(settings: FleetSettings, task_id: str) -> list[Path]:
    return sorted((settings.home / "outputs").glob(f"*{task_id}*"))


def acknowledged(client: redis.Redis, task_id: str):
    """A predicate: no copy of the job waits in its queue or unacknowledged."""
    return lambda: not client.llen(queue_for(NEW)) and unacked_entry(client, task_id) is None


def duplicates(client: redis.Redis, task_id: str, count: int):
    return lambda: job_record(client, task_id).get("duplicates") == str(count)


def test_kill_9_mid_generation_redelivers_the_job_to_a_warm_peer(fleet_settings, producer, pool, calibration,
                                                                  client):
    """Given two warm workers, when the one generating a job is killed with SIGKILL, then a peer runs the job and the
    producer's get() returns its one image; a fresh worker replaces the dead one before the next trial."""
    trials, recoveries, totals = trial_count(2), [], []
    lease = effective_lease_seconds(fleet_settings.job_lease_seconds, VISIBILITY_TIMEOUT)
    for trial in range(trials):
        job = calibration.job(8.0)
        r = producer.generate.delay(f"killed mid-generation {trial}", seed=100 + trial, release=NEW, **job)
        victim = wait_started(producer, r.id)
        time.sleep(1.0)  # well inside the generation: dozens of denoising steps still to go
        assert meta(producer, r.id)["status"] == "STARTED", "the job finished before it could be interrupted"
        killed_at = time.monotonic()
        pool.kill(victim)
        replacement = pool.start(wait=False)  # boots while the job finds its way to the survivor
        survivor = wait_started(producer, r.id, other_than=victim)
        recoveries.append(time.monotonic() - killed_at)
        result = r.get(timeout=300)
        totals.append(time.monotonic() - killed_at)
        calibration.learn(result)

        assert survivor != victim and result["worker"] == survivor
        assert images_of(fleet_settings, r.id) == [fleet_settings.home / "outputs" / f"{r.id}.png"]
        assert (fleet_settings.home / "outputs" / f"{r.id}.png").read_bytes().startswith(PNG_MAGIC)
        record = job_record(client, r.id)
        assert (record["runs"], record["completed"], record.get("duplicates", "0")) == ("2", "1", "0"), record
        wait_for(acknowledged(client, r.id), what="the redelivered job's ack")
        wait_warm(fleet_settings, replacement)
    record_result("kill -9 mid-generation", trials=trials, sent=trials, completed=trials, lost=0, duplicated=0,
                  recovery_s=recoveries, bound_s=VISIBILITY_TIMEOUT + RESTORE_INTERVAL + lease / 3,
                  notes="recovery = kill → the peer starts the job; kill → result: "
                        + ", ".join(f"{t:.1f}" for t in totals) + " s")


def test_a_job_longer_than_the_visibility_timeout_runs_once(fleet_settings, producer, pool, calibration, client):
    """A job that runs well past visibility_timeout, with an idle peer sweeping for abandoned messages: its message
    is kept fresh while it runs, so it is never redelivered and runs exactly once."""
    trials, needed = trial_count(1), VISIBILITY_TIMEOUT + RESTORE_INTERVAL + 2
    for trial in range(trials):
        for attempt in range(3):  # the machine is shared: a job that turned out too short is sent again, longer
            r = producer.generate.delay(f"longer than the visibility timeout {trial}.{attempt}", seed=200 + trial,
                                        release=NEW, **calibration.job(needed * 1.5))
            wait_started(producer, r.id)
            oldest = 0.0
            while meta(producer, r.id)["status"] != "SUCCESS":
                entry = unacked_entry(client, r.id)
                score = client.zscore(KOMBU_UNACKED_INDEX, entry[0]) if entry else None
                if score is not None:
                    oldest = max(oldest, time.time() - score)
                time.sleep(0.25)
            result = r.get(timeout=60)
            calibration.learn(result)
            ran = result["timings"]["inference_ms"] / 1000
            if ran > needed:
                break
        assert ran > needed, f"precondition: the job ran {ran:.1f}s, not past the visibility timeout"
        assert oldest < VISIBILITY_TIMEOUT, f"the running job's message went {oldest:.1f}s without a refresh"
        record = job_record(client, r.id)
        assert (record["runs"], record["completed"], record.get("duplicates", "0")) == ("1", "1", "0"), record
    record_result("job longer than visibility_timeout", trials=trials, sent=trials, completed=trials, lost=0,
                  duplicated=0, notes=f"jobs ran > {needed} s with visibility_timeout {VISIBILITY_TIMEOUT} s")


def test_a_duplicate_delivery_is_detected_and_never_runs_the_pipeline_again(fleet_settings, producer, pool,
                                                                            calibration, client):
    """The message of a running job is put back in its queue exactly as kombu's restore sweep would (a worker that
    lost Redis, a refresh that came too late): the peer that receives it waits for the holder and returns the
    holder's result. Delivered once more after the job finished, it returns the stored result at once."""
    trials = trial_count(1)
    for trial in range(trials):
        r = producer.generate.delay(f"delivered three times {trial}", seed=300 + trial, release=NEW,
                                    **calibration.job(6.0))
        holder = wait_started(producer, r.id)
        wait_for(lambda task_id=r.id: unacked_entry(client, task_id) is not None, what="the job's unacked message")
        tag, raw = unacked_entry(client, r.id)
        restore_like_kombu(client, tag, raw)  # while the holder still runs
        result = r.get(timeout=300)
        wait_for(duplicates(client, r.id, 1), what="the first duplicate to finish")
        image = fleet_settings.home / "outputs" / f"{r.id}.png"
        written = image.stat().st_mtime_ns

        restore_like_kombu(client, tag, raw)  # after it finished
        wait_for(duplicates(client, r.id, 2), what="the second duplicate")
        wait_for(acknowledged(client, r.id), what="the duplicates to be acknowledged")

        record = job_record(client, r.id)
        assert (record["runs"], record["completed"]) == ("1", "1"), record
        assert result["worker"] == holder and meta(producer, r.id)["result"] == result
        assert image.stat().st_mtime_ns == written and images_of(fleet_settings, r.id) == [image]
        assert f"DUPLICATE delivery of job {r.id}" in pool.logs_text()
    record_result("duplicate delivery (restored message)", trials=trials, sent=trials, completed=trials, lost=0,
                  duplicated=0, notes="each job delivered 3 times (once while running, once after): 1 pipeline run")


def test_a_poison_job_is_retried_with_backoff_then_dead_and_the_workers_go_on(fleet_settings, producer, pool,
                                                                           client):
    """Jobs whose pipeline call always raises are retried MAX_RETRIES times, then recorded as dead with their reason
    and arguments; good jobs sent meanwhile complete on the same workers; a bad request is not retried at all."""
    pids = {name: w.pid for name, w in pool.workers.items()}
    # rounds of 6 good jobs then 3 poison ones: each worker's first job of a round succeeds, so no worker sees more
    # different jobs failing in a row than failure_breaker (5), which would make it sick on purpose
    # (workers/breaker.py: another scenario, where the job goes back whole and the try is not counted as a retry)
    poison, good = [], []
    bad = producer.app.send_task("warmfleet.generate", args=["x"], kwargs={"steps": 0}, queue=queue_for(NEW))
    for round_ in range(-(-trial_count(3) // 3)):
        served = [producer.generate.delay(f"good job {round_}.{i}", seed=i, release=NEW, steps=2) for i in range(6)]
        batch = [producer.generate.delay(POISON, seed=10 * round_ + i, release=NEW, steps=2) for i in range(3)]
        assert all(g.get(timeout=600)["image_uri"] for g in served)
        for p in batch:
            with pytest.raises(Exception) as failed:
                p.get(timeout=600)
            assert type(failed.value).__name__ == "JobFailed" and "InjectedFault: injected" in str(failed.value)
            assert job_record(client, p.id)["runs"] == str(1 + MAX_RETRIES)
            assert images_of(fleet_settings, p.id) == []
        poison += batch
        good += served
    with pytest.raises(Exception) as refused:
        bad.get(timeout=120)
    assert type(refused.value).__name__ == "BadRequest"
    assert job_record(client, bad.id) == {}  # refused before any run: never retried

    dead = {d.task_id: d for d in DeadLetters(client).list(1000)}
    assert set(dead) == {p.id for p in poison}
    for d in dead.values():
        assert "InjectedFault" in d.reason and d.kwargs["prompt"] == POISON and d.retries == MAX_RETRIES
        assert d.queue == queue_for(NEW)
    listing = subprocess.run([sys.executable, "-m", "fleetctl.cli", "dead"], env=child_env(fleet_settings), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith(f"{len(poison)} dead job(s)")
    assert all(p.id in listing.stdout for p in poison) and "reason InjectedFault" in listing.stdout
    assert {name: w.pid for name, w in pool.workers.items()} == pids
    assert all(w.proc.poll() is None for w in pool.workers.values())
    record_result("poison job", trials=len(poison), sent=len(poison) + len(good), completed=len(good),
                  dead=len(poison), lost=0, duplicated=0,
                  notes=f"each poison job ran 1 + {MAX_RETRIES} times, then was recorded dead; good jobs all served")


def test_a_batching_worker_runs_each_job_once_even_when_its_message_arrives_twice(fleet_settings, producer, client,
                                                                                  tmp_path_factory):
    """Batching (FLEET_BATCH_MAX > 1) sits in front of the task body, the lease and record inside it: each job's
    message queued twice (as a restore would) lands in one buffer with its copy; the job runs once, the copy
    returns the stored result, and each job keeps its own image."""
    settings = fleet_settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 300.0})
    worker = start_worker(settings, [OLD], "r-batch", tmp_path_factory.mktemp("logs"), timeout=600)
    hostname, queue = f"r-batch@{settings.node_name}", queue_for(OLD)
    control = producer.app.control
    served = 0
    try:
        for trial in range(trial_count(1)):
            assert control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=30)
            time.sleep(3.0)  # a pop the consumer had in flight (kombu's BRPOP times out after 1 s) ends first
            jobs = [producer.generate.delay(f"batched twice {trial}.{i}", seed=500 + i, release=OLD, steps=2,
                                            width=32, height=32) for i in range(2)]
            for raw in client.lrange(queue, 0, -1):
                client.lpush(queue, raw)  # each message twice, copies first in line
            assert client.llen(queue) == 4
            assert control.add_consumer(queue, destination=[hostname], reply=True, timeout=30)
            results = [j.get(timeout=300) for j in jobs]
            wait_for(lambda js=jobs: all(job_record(client, j.id).get("duplicates") == "1" for j in js),
                     what="both copies")
            wait_for(lambda: not client.llen(queue) and not client.hlen(KOMBU_UNACKED), what="every copy acknowledged")
            for job, result in zip(jobs, results, strict=True):
                record = job_record(client, job.id)
                assert (record["runs"], record["completed"]) == ("1", "1"), record
                assert result["image_key"] == f"{job.id}.png" and images_of(fleet_settings, job.id)
            assert results[0]["batch_size"] >= 2 and results[0]["batch_id"] == results[1]["batch_id"]  # one call
            served += len(jobs)
    finally:
        worker.stop()
    record_result("duplicate delivery to a batching worker", trials=served // 2, sent=served, completed=served,
                  lost=0, duplicated=0, notes="each trial: two jobs, each message queued twice into one batch: one "
                                              "run per job")
