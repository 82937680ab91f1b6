"""The fleet end to end: real redis-server, real worker processes, real diffusers pipelines."""

from __future__ import annotations

import hashlib
import json

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.utils.uuid import uuid

from cachemgr.names import queue_for
from fleetstate.keys import queue_lists
from fleetstate.registry import WarmRegistry
from tasks.router import GENERATE_TASK
from workers.outputs import read_uri

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_two_releases_are_warm_at_once(fleet_settings, two_workers):
    registry = WarmRegistry(redis.Redis.from_url(fleet_settings.broker_url))
    warm = registry.warm_workers()
    old, new = two_workers["releases"]
    assert warm[old] == ["w-old@testnode"]
    assert warm[new] == ["w-new@testnode"]
    states = {w.worker: w for w in registry.workers()}
    assert states["w-old@testnode"].state == "warm" and states["w-new@testnode"].state == "warm"


def test_generate_delay_lands_on_the_active_release(producer, two_workers):
    result = producer.generate.delay("Leather Jacket").get(timeout=120)
    old, new = two_workers["releases"]
    assert result["release"] == new
    assert result["worker"] == "w-new@testnode"
    for key in ("image_uri", "release", "worker", "seed", "width", "height", "steps", "timings"):
        assert key in result
    assert set(result["timings"]) >= {"queued_ms", "inference_ms", "total_ms"}
    png = read_uri(result["image_uri"])
    assert png.startswith(PNG_MAGIC)
    assert result["image_uri"].endswith(f"{result['task_id']}.png")


def test_result_in_redis_carries_no_image_bytes(fleet_settings, producer, two_workers):
    r = producer.generate.delay("a lighthouse", seed=3)
    result = r.get(timeout=120)
    raw = redis.Redis.from_url(fleet_settings.broker_url).get(f"celery-task-meta-{r.id}")
    assert raw is not None and len(raw) < 4096
    assert PNG_MAGIC not in raw and b"iVBOR" not in raw  # neither raw nor base64 PNG
    assert json.loads(raw)["result"]["image_uri"] == result["image_uri"]


def test_celery_writes_its_own_started_and_success_records_for_a_job(fleet_settings, producer, two_workers):
    """Celery's result backend writes STARTED before the job's body and SUCCESS after it: both published in order on
    the result's channel, with the fields of any Celery task's records (a built-in task through the same worker)."""
    old, new = two_workers["releases"]
    client = redis.Redis.from_url(fleet_settings.broker_url)
    task_id = uuid()
    channel = client.pubsub()
    channel.subscribe(f"celery-task-meta-{task_id}")
    channel.get_message(timeout=1)
    result = producer.generate.apply_async(("a harbour at dawn",), task_id=task_id).get(timeout=120)
    published = []
    while len(published) < 2 and (message := channel.get_message(timeout=5)) is not None:
        if message["type"] == "message":
            published.append(json.loads(message["data"]))
    assert [m["status"] for m in published] == ["STARTED", "SUCCESS"]
    assert published[0]["result"]["hostname"] == "w-new@testnode" and published[1]["result"] == result
    meta = producer.app.backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"], meta["name"], meta["worker"], meta["queue"]) == (
        "SUCCESS", result, GENERATE_TASK, "w-new@testnode", queue_for(new))
    assert meta["kwargs"]["prompt"] == "a harbour at dawn" and meta["date_done"]
    assert 0 < client.ttl(f"celery-task-meta-{task_id}") <= 24 * 3600
    celerys = producer.app.send_task("celery.accumulate", args=[1], queue=queue_for(new))
    assert celerys.get(timeout=120) == [1]
    assert set(json.loads(client.get(f"celery-task-meta-{celerys.id}"))) == set(published[1])


def test_same_seed_gives_byte_identical_images(producer, two_workers):
    a = producer.generate.delay("Leather Jacket", seed=42).get(timeout=120)
    b = producer.generate.delay("Leather Jacket", seed=42).get(timeout=120)
    assert a["task_id"] != b["task_id"] and a["image_uri"] != b["image_uri"]
    assert sha(read_uri(a["image_uri"])) == sha(read_uri(b["image_uri"]))
    c = producer.generate.delay("Leather Jacket", seed=43).get(timeout=120)
    assert sha(read_uri(c["image_uri"])) != sha(read_uri(a["image_uri"]))


def test_the_two_releases_give_different_images(producer, two_workers):
    old, new = two_workers["releases"]
    a = producer.generate.delay("Leather Jacket", seed=7, release=old).get(timeout=120)
    b = producer.generate.delay("Leather Jacket", seed=7, release=new).get(timeout=120)
    assert (a["release"], b["release"]) == (old, new)
    assert (a["worker"], b["worker"]) == ("w-old@testnode", "w-new@testnode")
    assert sha(read_uri(a["image_uri"])) != sha(read_uri(b["image_uri"]))


def test_bad_request_is_refused_by_the_producer_before_it_is_queued(producer, two_workers):
    with pytest.raises(producer.BadRequest, match="width must be a multiple of 8"):
        producer.generate.delay("x", width=65)
    with pytest.raises(producer.BadRequest, match="guidance must be finite"):
        producer.generate.delay("x", guidance=float("nan"))


def test_bad_request_sent_raw_fails_alone_and_the_worker_keeps_serving(producer, two_workers):
    """A producer that skips validation (another language, a raw send) still gets a clear error."""
    old, new = two_workers["releases"]
    bad = producer.app.send_task("warmfleet.generate", args=["x"], kwargs={"steps": 0}, queue=queue_for(new))
    with pytest.raises(Exception) as info:
        bad.get(timeout=120)
    assert "steps must be between 1 and" in str(info.value)
    assert type(info.value).__name__ == "BadRequest"
    good = producer.generate.delay("still serving", seed=1).get(timeout=120)
    assert good["worker"] == "w-new@testnode"


def test_no_worker_loads_its_model_more_than_once_over_20_jobs(fleet_settings, producer, two_workers):
    old, new = two_workers["releases"]
    results = [producer.generate.delay(f"job {i}", seed=i, release=(old if i % 2 else new)) for i in range(20)]
    done = [r.get(timeout=180) for r in results]
    assert {d["release"] for d in done} == {old, new}
    registry = WarmRegistry(redis.Redis.from_url(fleet_settings.broker_url))
    states = {w.worker: w for w in registry.workers()}
    for name in ("w-old@testnode", "w-new@testnode"):
        assert states[name].loads == 1, states[name]
        assert states[name].jobs >= 10
    events = [json.loads(line) for line in fleet_settings.event_log_path.read_text().splitlines()]
    loads = [e for e in events if e["event"] == "L1_LOAD"]
    assert len(loads) == 2, loads


def test_a_release_with_no_route_and_no_worker_is_not_silently_queued(producer, two_workers):
    with pytest.raises(producer.NoRoute, match="no active release for model 'ghost'"):
        producer.generate.delay("x", model="ghost")


def test_result_waits_are_bounded(fleet_settings, producer, two_workers):
    """A job pinned to a release nobody serves stays queued; the producer's get() times out, nothing else."""
    nobody = "nano-banana@base-v1.0.0+lora-v2.3.1"  # archived, served by no worker here
    r = producer.generate.delay("nobody serves this", release=nobody)
    with pytest.raises(CeleryTimeout):
        r.get(timeout=2)
    r.revoke()
    client = redis.Redis.from_url(fleet_settings.broker_url)
    assert client.llen(queue_for(nobody)) == 1  # still queued: only the wait was bounded
    client.delete(*queue_lists(queue_for(nobody)))  # the fleet is shared (tests/layers.py): leave no job behind


def test_a_producer_re_pointed_at_the_same_broker_after_closing_its_pool_still_sends(fleet_settings, producer,
                                                                                     two_workers):
    """configure() drops kombu's process-wide pools: a pool closed earlier is not handed back for the same URL."""
    producer.app.pool.force_close_all()
    producer.configure(fleet_settings)
    result = producer.generate.delay("after re-pointing", seed=2).get(timeout=120)
    assert result["release"] == two_workers["releases"][1]
