"""Celery's STARTED and SUCCESS records written by the worker's own claim and completion scripts (tasks/results.py,
fleetstate/leases.py), against a real redis-server and Celery's real Redis backend: the same bytes Celery writes,
published on the same channel, never a STARTED over a finished job, and Celery's own store of them skipped once.
The fleet tests (test_fleet.py) show the records a real worker writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context

from fleetstate.leases import JobLease
from tasks.app import configure
from tasks.results import FleetRedisBackend, writes_celery_records, written_by_fleet
from tasks.router import GENERATE_TASK

from .support import fleet_settings_for

RESULT = {"image_uri": "file:///out/job.png", "release": "m@base-v1.0.0", "timings": {"inference_ms": 12.5}}


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    return c


@pytest.fixture
def app(redis_server, tmp_path: Path) -> Celery:
    return configure(fleet_settings_for(tmp_path, redis_server.url), Celery("records-test"))


def request(task_id: str) -> Context:
    return Context(id=task_id, task=GENERATE_TASK, args=[], kwargs={"prompt": "a lighthouse", "seed": 3},
                   hostname="w@node", retries=0, delivery_info={"routing_key": "fleet.m@base-v1.0.0"})


def stored(client: redis.Redis, app: Celery, task_id: str) -> dict:
    raw = client.get(app.backend.get_key_for_task(task_id))
    assert raw is not None, f"no record for {task_id}"
    return json.loads(raw)


def without_ids(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("task_id", "date_done")}


def test_the_records_the_scripts_write_are_the_ones_celery_writes(client, app):
    assert isinstance(app.backend, FleetRedisBackend) and writes_celery_records(app)
    for state, result in ((states.STARTED, {"pid": 7, "hostname": "w@node"}), (states.SUCCESS, RESULT)):
        app.backend.store_result(f"celery-{state}", result, state, request=request(f"celery-{state}"))
        key, value, ttl = app.backend.fleet_record(f"fleet-{state}", result, state, request(f"fleet-{state}"))
        assert key == app.backend.get_key_for_task(f"fleet-{state}")
        theirs, ours = stored(client, app, f"celery-{state}"), json.loads(value)
        assert without_ids(ours) == without_ids(theirs)
        assert ours["task_id"] == f"fleet-{state}" and (ours["date_done"] is None) == (state == states.STARTED)
        assert ours["name"] == GENERATE_TASK and ours["worker"] == "w@node" and ours["queue"] == "fleet.m@base-v1.0.0"
        assert ttl == app.backend.expires == 24 * 3600
        assert 0 < client.ttl(app.backend.get_key_for_task(f"celery-{state}")) <= ttl


def test_a_result_server_apart_from_the_fleets_keeps_celerys_own_stores(redis_server, tmp_path: Path):
    other = configure(fleet_settings_for(tmp_path, redis_server.url, result_url=redis_server.url.rsplit("/", 1)[0] + "/1"),
                      Celery("records-apart"))
    assert not writes_celery_records(other)


def test_claim_and_completion_write_and_publish_celerys_records(client, app):
    backend, task_id = app.backend, "job-1"
    channel = client.pubsub()
    channel.subscribe(backend.get_key_for_task(task_id))
    channel.get_message(timeout=1)  # the subscription's confirmation
    with JobLease(client, task_id, "w@node", 5.0, poll_seconds=0.02) as lease:
        assert lease.claim(backend.fleet_started(task_id, request(task_id))).run
        assert stored(client, app, task_id)["status"] == states.STARTED
        assert stored(client, app, task_id)["result"]["hostname"] == "w@node"
        assert lease.complete(RESULT, succeeded=backend.fleet_record(task_id, RESULT, states.SUCCESS, request(task_id)))
    published = []
    deadline = time.monotonic() + 5
    while len(published) < 2 and time.monotonic() < deadline:
        message = channel.get_message(timeout=0.5)
        if message and message["type"] == "message":
            published.append(json.loads(message["data"])["status"])
    assert published == [states.STARTED, states.SUCCESS]
    meta = backend.get_task_meta(task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == RESULT
    assert 0 < client.ttl(backend.get_key_for_task(task_id)) <= backend.expires

    # a later delivery of the finished job: its stored result, and no STARTED written over the SUCCESS record
    with JobLease(client, task_id, "w2@node", 5.0, poll_seconds=0.02) as again:
        claim = again.claim(backend.fleet_started(task_id, request(task_id)))
    assert not claim.run and claim.result == RESULT
    assert stored(client, app, task_id)["status"] == states.SUCCESS


def test_celerys_own_store_is_skipped_once_after_the_completion_wrote_the_record(client, app):
    written_by_fleet("job-2")
    app.backend.store_result("job-2", RESULT, states.SUCCESS, request=request("job-2"))
    assert client.get(app.backend.get_key_for_task("job-2")) is None  # skipped: the script wrote it (not here)
    app.backend.store_result("job-2", RESULT, states.SUCCESS, request=request("job-2"))
    assert stored(client, app, "job-2")["result"] == RESULT  # only once
    app.backend.store_result("job-3", "boom", states.FAILURE, request=request("job-3"))
    assert stored(client, app, "job-3")["status"] == states.FAILURE  # other states: Celery's own store
