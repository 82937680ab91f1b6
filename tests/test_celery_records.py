"""Celery writes its own result records for a `generate` job: what a producer reads is Celery's STARTED (before the
task body) and SUCCESS (after it), written and published by Celery's Redis backend, while the fleet's claim and
completion scripts (fleetstate/leases.py) keep only the fleet's job record and lease.

A real redis-server, the `tasks` app, and a Celery worker in this process (celery.contrib.testing) running the real
worker-side `JobRunner` around a stand-in runtime (no pipeline). The fleet tests (test_fleet.py) show the same records
from a real worker process."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import states
from celery.contrib.testing.worker import start_worker

from cachemgr.names import queue_for, release_of_queue
from fleetstate.keys import CELERY_META_KEY
from fleetstate.leases import JobLease, job_record
from tasks.router import GENERATE_TASK

from .support import fleet_settings_for, wait_for

RELEASE = "nano-banana@base-v1.0.0+lora-v1.0.0"
WORKER = "records@testnode"


class StandInRuntime:
    """What `JobRunner` asks of a worker's runtime: `serve` (here without a pipeline) and the worker's state."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(jobs=0)
        self.served: list[str] = []

    def serve(self, request: Any, task_id: str, queue: str | None, sent_at: float | None) -> dict[str, Any]:
        self.served.append(task_id)
        self.state.jobs += 1
        return {"image_uri": f"file:///out/{task_id}.png", "release": str(release_of_queue(queue)),
                "prompt": request.prompt, "seed": request.seed}


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory: pytest.TempPathFactory):
    """The `tasks` app on a private redis-server, consumed by an in-process Celery worker running `JobRunner`."""
    import tasks
    from workers.jobs import JobRunner

    settings = fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url)
    tasks.configure(settings)
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    runtime = StandInRuntime()
    previous = getattr(tasks.app, "fleet_runner", None)
    JobRunner(runtime, client, settings).attach(tasks.app)
    try:
        with start_worker(tasks.app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                          queues=[queue_for(RELEASE)], hostname=WORKER, shutdown_timeout=30):
            yield SimpleNamespace(tasks=tasks, client=client, runtime=runtime)
    finally:
        tasks.app.fleet_runner = previous
        tasks.app.pool.force_close_all()


def published(channel: Any, count: int, timeout: float = 10.0) -> list[dict]:
    """The next `count` records published on a subscribed result channel (fewer if none come within `timeout`)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        message = channel.get_message(timeout=0.2)
        if message and message["type"] == "message":
            out.append(json.loads(message["data"]))
    return out


def subscribed(client: redis.Redis, task_id: str) -> Any:
    channel = client.pubsub()
    channel.subscribe(CELERY_META_KEY.format(task_id=task_id))
    channel.get_message(timeout=1)  # the subscription's confirmation
    return channel


def test_a_producer_reads_celerys_own_started_and_success_records(fleet):
    task_id = "records-job-1"
    channel = subscribed(fleet.client, task_id)
    result = fleet.tasks.generate.apply_async(("a lighthouse",), {"seed": 3, "release": RELEASE},
                                              task_id=task_id).get(timeout=30)
    assert result["image_uri"] == f"file:///out/{task_id}.png" and result["release"] == RELEASE
    records = published(channel, 2)
    assert [r["status"] for r in records] == [states.STARTED, states.SUCCESS]
    started, success = records
    assert started["result"] == {"pid": os.getpid(), "hostname": WORKER}  # Celery's trace: this process's worker
    assert success["result"] == result and success["date_done"]

    meta = fleet.tasks.app.backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"], meta["name"], meta["queue"]) == (
        states.SUCCESS, result, GENERATE_TASK, queue_for(RELEASE))
    assert meta["kwargs"]["prompt"] == "a lighthouse" and meta["worker"]  # result_extended: Celery's own fields
    assert 0 < fleet.client.ttl(CELERY_META_KEY.format(task_id=task_id)) <= 24 * 3600

    record = job_record(fleet.client, task_id)  # the fleet's own record, beside Celery's
    assert (record["runs"], record["completed"], json.loads(record["result"])) == ("1", "1", result)


def test_a_later_delivery_of_a_finished_job_leaves_its_success_record(fleet):
    task_id = "records-job-2"
    first = fleet.tasks.generate.apply_async(("a harbour",), {"seed": 4, "release": RELEASE},
                                             task_id=task_id).get(timeout=30)
    channel = subscribed(fleet.client, task_id)
    fleet.tasks.generate.apply_async(("a harbour",), {"seed": 4, "release": RELEASE}, task_id=task_id)  # again
    wait_for(lambda: job_record(fleet.client, task_id).get("duplicates") == "1", timeout=15, what="the second delivery")
    assert published(channel, 1, timeout=1.0) == []  # Celery stores nothing over a SUCCESS: no STARTED, no SUCCESS
    meta = fleet.tasks.app.backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, first)
    assert fleet.runtime.served.count(task_id) == 1 and job_record(fleet.client, task_id)["runs"] == "1"


def test_the_fleets_scripts_write_no_celery_record(fleet):
    task_id = "records-lease-only"
    channel = subscribed(fleet.client, task_id)
    with JobLease(fleet.client, task_id, "w@node", 5.0, poll_seconds=0.02) as lease:
        assert lease.claim().run
        assert lease.complete({"image_uri": "file:///x.png"})
    assert fleet.client.get(CELERY_META_KEY.format(task_id=task_id)) is None
    assert published(channel, 1, timeout=0.5) == []
    assert job_record(fleet.client, task_id)["completed"] == "1"
