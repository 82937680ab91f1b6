"""No job waits unseen, and none is accepted that nothing could serve: the catalog of archive versions, the producer's
refusal of a release the archive lacks, stranded queues with their age, moving jobs (pinned ones re-pinned on
request), and the local Redis's readiness. Real redis-servers and the real producer; no worker process."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from cachemgr import LocalArchive, Release
from cachemgr.names import ComponentRef, queue_for
from fleetctl.localfleet import free_port, wait_port
from fleetctl.localredis import RedisNotReady, wait_redis
from fleetstate.catalog import Catalog, unarchived
from fleetstate.keys import CATALOG_LISTED, OUTBOX_KEY, queue_lists
from fleetstate.queues import move_queued, oldest_waiting
from fleetstate.registry import WarmRegistry, WorkerState
from fleetstate.status import fleet_status, stranded_queues
from tasks.errors import JobRefused
from tasks.requests import is_pinned, repinned

MODEL = "nano-banana"
COLD = f"{MODEL}@base-v1.0.0+lora-v2.3.1"  # in the archive, no worker
OTHER = f"{MODEL}@base-v1.1.0+lora-v2.3.0"
MISSING = f"{MODEL}@base-v1.0.0+lora-v2.3.9"  # a typo: no such LoRA version


@pytest.fixture(scope="module")
def client(redis_server) -> redis.Redis:
    return redis_server.client()


@pytest.fixture(scope="module")
def listed(client, demo_archive_dir) -> dict:
    """The catalog as a worker's boot leaves it: the whole demo archive listed."""
    return Catalog(client).refresh(LocalArchive(demo_archive_dir))


def queued_ids(client: redis.Redis, release: str) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for name in queue_lists(queue_for(release))
            for raw in client.lrange(name, 0, -1)]


def drain(client: redis.Redis, *releases: str) -> None:
    for release in releases:
        client.delete(*queue_lists(queue_for(release)))


def test_refresh_lists_the_archive_and_record_forget_follow_publish_and_prune(client, demo_archive_dir, listed):
    assert listed[MODEL] == {"base/v1.0.0", "base/v1.1.0", "lora/v2.3.0", "lora/v2.3.1"}
    catalog = Catalog(client)
    known = catalog.known(MODEL)
    assert known.listed and known.missing(Release.parse(COLD)) == []
    assert [str(r) for r in known.missing(Release.parse(MISSING))] == [f"{MODEL}/lora/v2.3.9"]
    new = ComponentRef(MODEL, "lora", "v2.3.9")
    catalog.record([new])
    assert catalog.known(MODEL).missing(Release.parse(MISSING)) == []
    catalog.forget([new])
    assert catalog.known(MODEL).missing(Release.parse(MISSING)) == [new]
    assert "pixel-sd" in catalog.models()


def test_a_catalog_never_listed_refuses_nothing_until_an_archive_answer_lists_it(client, demo_archive_dir, listed):
    catalog = Catalog(client)
    saved = client.get(CATALOG_LISTED)
    client.delete(CATALOG_LISTED)
    try:
        assert catalog.known(MODEL).missing(Release.parse(MISSING)) == []  # partial knowledge: cannot tell
        missing = unarchived(client, MISSING, LocalArchive(demo_archive_dir))  # asked of the archive itself
        assert [str(r) for r in missing] == [f"{MODEL}/lora/v2.3.9"]
        assert catalog.listed_at() is not None  # … which listed it: the catalog can refuse from now on
        assert catalog.known(MODEL).missing(Release.parse(MISSING))
    finally:
        if saved:
            client.set(CATALOG_LISTED, saved)


def test_a_producer_pinning_a_release_the_archive_lacks_is_refused_before_anything_is_queued(client, producer,
                                                                                           listed):
    outbox_before = client.hlen(OUTBOX_KEY)
    with pytest.raises(JobRefused) as refused:
        producer.generate.delay("a red circle", release=MISSING)
    line = str(refused.value)
    assert "\n" not in line and f"no worker can ever serve {MISSING}" in line
    assert f"the archive has no {MODEL}/lora/v2.3.9" in line and f"warmfleet versions {MODEL}" in line
    assert not any(client.exists(name) for name in queue_lists(queue_for(MISSING)))
    assert client.hlen(OUTBOX_KEY) == outbox_before
    # a release it holds is accepted, warm or not: `status` then shows the job waiting
    accepted = producer.generate.delay("a red circle", release=COLD)
    assert queued_ids(client, COLD) == [accepted.id]
    drain(client, COLD)


def test_jobs_on_a_queue_no_worker_serves_are_listed_with_their_age(client, producer, listed):
    drain(client, COLD, OTHER)
    sent = [producer.generate.delay(f"stranded {i}", release=COLD) for i in range(3)]
    served = WorkerState(worker="sim@n", node="n", pid=1, state="warm", releases=[OTHER])
    registry = WarmRegistry(client, ttl=600)
    registry.publish(served)
    producer.generate.delay("waiting, but served", release=OTHER)
    try:
        later = time.time() + 90
        ages = oldest_waiting(client, [queue_for(COLD), queue_for("nano-banana@base-v9+lora-v9")], now=later)
        assert 89 <= ages[queue_for(COLD)] <= 100 and ages[queue_for("nano-banana@base-v9+lora-v9")] is None
        stranded = stranded_queues(client, now=later)
        assert [(s.release, s.queued) for s in stranded] == [(COLD, 3)]  # OTHER has a warm worker: not stranded
        assert f"3 job(s) waiting up to {stranded[0].oldest_s:.0f}s on {COLD}: no warm worker, routed by nothing" \
            in stranded[0].line() and f"warmfleet move-queued {COLD}" in stranded[0].line()
        report = fleet_status(client)
        assert [s["release"] for s in report["stranded"]] == [COLD]
        row = next(r for r in report["models"][MODEL]["releases"] if r["release"] == COLD)
        assert row["queued"] == 3 and row["oldest_s"] is not None and row["workers"] == []
        assert sorted(queued_ids(client, COLD)) == sorted(r.id for r in sent)
    finally:
        registry.withdraw(served)
        drain(client, COLD, OTHER)


def test_the_exporter_serves_the_age_of_stranded_jobs_for_the_alert(client, producer, listed):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from fleetctl.metrics import FleetCollector

    drain(client, COLD, OTHER)
    served = WorkerState(worker="sim@n", node="n", pid=1, state="warm", releases=[OTHER])
    registry = WarmRegistry(client, ttl=600)
    registry.publish(served)
    try:
        for release in (COLD, OTHER):
            producer.generate.delay("waiting", release=release)
        time.sleep(1.2)  # ages are read from the send stamps, to the tenth of a second
        exported = CollectorRegistry()
        exported.register(FleetCollector(client))
        samples = {(s.name, s.labels["release"]): s.value
                   for family in text_string_to_metric_families(generate_latest(exported).decode())
                   for s in family.samples if s.name.endswith("oldest_age_seconds")}
        assert samples[("warmfleet_unserved_queue_oldest_age_seconds", COLD)] >= 1.0
        assert samples[("warmfleet_unserved_queue_oldest_age_seconds", OTHER)] == 0.0  # a warm worker serves it
        assert samples[("warmfleet_queue_oldest_age_seconds", OTHER)] >= 1.0
    finally:
        registry.withdraw(served)
        drain(client, COLD, OTHER)


def test_move_keeps_task_ids_and_order_and_re_pins_pinned_jobs_only_on_request(client, producer, listed):
    drain(client, COLD, OTHER)
    sent = [producer.generate.delay(f"pinned {i}", release=COLD, seed=i) for i in range(3)]
    left = move_queued(client, COLD, OTHER, is_pinned)
    assert left.moved == [] and sorted(left.pinned) == sorted(r.id for r in sent)
    moved = move_queued(client, COLD, OTHER, is_pinned, repin=repinned)
    assert sorted(moved.moved) == sorted(moved.repinned) == sorted(r.id for r in sent)
    assert queued_ids(client, OTHER)[::-1] == [r.id for r in sent]  # oldest still served first
    for raw in client.lrange(queue_for(OTHER), 0, -1):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs["release"] == OTHER and kwargs["prompt"].startswith("pinned") and args == []
        assert message["properties"]["delivery_info"]["routing_key"] == queue_for(OTHER)
    drain(client, OTHER)


def test_repinned_names_the_new_release_whatever_the_call_looked_like():
    assert repinned(["a prompt"], {"release": COLD, "seed": 3}, OTHER) == (
        [], {"prompt": "a prompt", "release": OTHER, "seed": 3})
    assert repinned([], {"prompt": "p", "model": "pixel-sd", "release": COLD}, OTHER)[1] == {
        "prompt": "p", "release": OTHER}


# -- the local fleet's Redis: ready means answering, not listening ------------------------------------------------


def _redis_server(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(folder), "--save", "", "--appendonly", "yes", *extra],
                            stdout=open(folder / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_wait_redis_waits_out_loading_the_data_set(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = _redis_server(tmp_path, port)
    try:
        wait_port(port)
        first = redis.Redis.from_url(url)
        with first.pipeline(transaction=False) as pipe:
            for i in range(20000):
                pipe.set(f"job:{i}", "x" * 32)
            pipe.execute()
        first.close()
    finally:
        server.terminate()
        server.wait(30)
    # each key now takes 200 µs to load: about 4 s of LOADING after the port opens
    server = _redis_server(tmp_path, port, "--key-load-delay", "200")
    try:
        wait_port(port)
        early = redis.Redis.from_url(url)
        with pytest.raises(redis.BusyLoadingError):
            early.ping()  # what `up` met: listening, not ready
        early.close()
        wait_redis(url, timeout=120)
        ready = redis.Redis.from_url(url)
        assert ready.ping() and ready.dbsize() == 20000
        ready.close()
    finally:
        server.terminate()
        server.wait(30)


def test_wait_redis_gives_up_in_one_line_when_nothing_answers():
    with pytest.raises(RedisNotReady, match=r"^redis-server not ready after 1s \(.*\); see its log$"):
        wait_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
