"""Beat's schedule and the maintenance tasks it sends, run by a real maintenance worker process."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

import beat_schedule
from cachemgr import Cache, Release
from fleetctl.demo.builders import DEMO_RELEASES
from tasks.settings import FleetSettings

from .support import REPO, child_env


def test_the_nightly_sync_is_due_at_two_in_the_configured_timezone():
    from celery import Celery

    from tasks.app import configure

    settings = FleetSettings(timezone="Asia/Shanghai")
    schedule = configure(settings, target=Celery("beat-test")).conf.beat_schedule
    assert schedule["nightly-l2-sync"]["task"] == "warmfleet.sync_fleet"
    assert schedule["l2-audit"]["task"] == "warmfleet.audit_fleet"
    cron = schedule["nightly-l2-sync"]["schedule"]
    tz = ZoneInfo("Asia/Shanghai")
    cron.nowfun = lambda: datetime(2026, 11, 22, 2, 0, 30, tzinfo=tz)
    due, _ = cron.is_due(datetime(2026, 11, 21, 2, 0, 0, tzinfo=tz))
    assert due
    cron.nowfun = lambda: datetime(2026, 11, 22, 1, 59, 0, tzinfo=tz)
    due, next_in = cron.is_due(datetime(2026, 11, 21, 2, 0, 0, tzinfo=tz))
    assert not due and 0 < next_in <= 60


def test_schedule_times_come_from_settings():
    schedule = beat_schedule.build_schedule(FleetSettings(sync_hour=4, sync_minute=15, audit_hour=5))
    assert schedule["nightly-l2-sync"]["schedule"].hour == {4}
    assert schedule["nightly-l2-sync"]["schedule"].minute == {15}
    assert schedule["l2-audit"]["schedule"].hour == {5}


def test_the_celery_app_carries_the_schedule_and_its_timezone(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_TIMEZONE", "Europe/Berlin")
    code = "from tasks import app; print(app.conf.timezone, sorted(app.conf.beat_schedule))"
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.stdout.split(maxsplit=1) == ["Europe/Berlin", "['canary-analysis', 'l2-audit', 'nightly-l2-sync']\n"], out.stderr


def start_maintenance(settings, node: str, cache_root, logdir):
    node_settings = settings.model_copy(update={"cache_root": cache_root, "node_name": node})
    log = open(logdir / f"maintenance-{node}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "maintenance-worker", "--name", f"maint@{node}"],
                            stdout=log, stderr=subprocess.STDOUT, env=child_env(node_settings), cwd=REPO,
                            start_new_session=True)


@pytest.mark.integration
def test_the_nightly_sync_reaches_every_node_and_the_audit_repairs_each_disk(fleet_settings, producer, tmp_path):
    import time

    import redis
    from celery.result import AsyncResult

    from fleetstate.nodes import NodeRegistry
    from fleetstate.routes import RouteTable

    client = redis.Redis.from_url(fleet_settings.broker_url)
    RouteTable(client).set_active(DEMO_RELEASES[1], actor="test")
    procs = {node: start_maintenance(fleet_settings, node, tmp_path / f"{node}-l2", tmp_path) for node in ("n1", "n2")}
    try:
        deadline = time.monotonic() + 60
        while not {"n1", "n2"} <= set(NodeRegistry(client).nodes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        sent = producer.app.send_task("warmfleet.sync_fleet", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=120)
        assert set(sent) >= {"n1", "n2"}
        for node in ("n1", "n2"):
            result = AsyncResult(sent[node], app=producer.app).get(timeout=180)
            assert result["node"] == node and result["bytes_fetched"] > 0
            store = Cache.at(tmp_path / f"{node}-l2").store
            for ref in Release.parse(DEMO_RELEASES[1]).refs():
                assert store.has(ref), (node, result)

        # a second night with nothing new fetches nothing (the night's fan-out window has passed)
        client.delete("fleet:lock:fan-out:sync")
        sent = producer.app.send_task("warmfleet.sync_fleet", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=120)
        assert AsyncResult(sent["n1"], app=producer.app).get(timeout=180)["bytes_fetched"] == 0

        store = Cache.at(tmp_path / "n2-l2").store
        base = Release.parse(DEMO_RELEASES[1]).base
        victim = store.manifest(base).file("model_index.json")
        blob = store.blob_path(victim.sha256)
        os.chmod(blob, 0o644)
        blob.write_text("{}")
        stale = store.tmp / "deadbeef.1234.abcd.incomplete"
        stale.write_bytes(b"left by a killed download")
        os.utime(stale, (time.time() - 7 * 3600, time.time() - 7 * 3600))
        sent = producer.app.send_task("warmfleet.audit_fleet", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=120)
        n2 = AsyncResult(sent["n2"], app=producer.app).get(timeout=180)
        n1 = AsyncResult(sent["n1"], app=producer.app).get(timeout=180)
        assert n1["corrupt"] == []
        assert n2["corrupt"] == [f"{base}/model_index.json: checksum mismatch"]
        assert n2["quarantined"] == [victim.sha256]
        assert n2["refetched"] == [str(base)]
        assert n2["temp_files_removed"] == [stale.name]
        assert store.has(base) and all(c.ok for c in store.check(base))
        assert n2["cache_status"].startswith("L1=") and "L3=MISS(" in n2["cache_status"]
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


@pytest.mark.integration
def test_beat_at_020001_sends_the_sync_to_every_node_once_and_not_again_at_020030(fleet_settings, producer, tmp_path):
    """Drive the real beat scheduler with a fixed clock; a dispatcher maintenance worker fans the run out to
    the queues of the registered nodes (n1 and n2 run no worker here, so their messages stay countable)."""
    import time

    import redis
    from celery.beat import Scheduler

    from cachemgr.names import node_queue
    from fleetstate.nodes import NodeRegistry

    client = redis.Redis.from_url(fleet_settings.broker_url)
    client.delete("fleet:nodes", "fleet:lock:fan-out:sync", beat_schedule.MAINTENANCE_QUEUE,
                  node_queue("n1"), node_queue("n2"))
    for node in ("n1", "n2"):
        NodeRegistry(client).seen(node)

    clock = {"now": datetime(2026, 11, 21, 1, 59, 0, tzinfo=ZoneInfo("UTC"))}
    # the nightly entries; the canary analysis' tick (every few seconds, on the same queue) is left out so the
    # queue counts below are the sync's alone
    schedule = {name: entry for name, entry in beat_schedule.build_schedule(fleet_settings, producer.app).items()
                if entry["task"] != beat_schedule.CANARY_TICK_TASK}
    for entry in schedule.values():
        entry["schedule"].nowfun = lambda: clock["now"]
    producer.app.conf.beat_schedule = schedule
    scheduler = Scheduler(app=producer.app, lazy=False)

    def tick_at(hour: int, minute: int, second: int) -> None:
        clock["now"] = datetime(2026, 11, 21, hour, minute, second, tzinfo=ZoneInfo("UTC"))
        for _ in range(3):
            scheduler.tick()

    tick_at(1, 59, 30)
    assert client.llen(beat_schedule.MAINTENANCE_QUEUE) == 0
    tick_at(2, 0, 1)
    assert client.llen(beat_schedule.MAINTENANCE_QUEUE) == 1
    tick_at(2, 0, 30)
    assert client.llen(beat_schedule.MAINTENANCE_QUEUE) == 1

    proc = start_maintenance(fleet_settings, "dispatcher", tmp_path / "dispatcher-l2", tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (client.llen(node_queue("n1")) and client.llen(node_queue("n2"))):
            time.sleep(0.2)
        assert client.llen(node_queue("n1")) == 1 and client.llen(node_queue("n2")) == 1
        # a beat that fires twice: the second fan-out inside the window does nothing
        second = producer.app.send_task(beat_schedule.SYNC_FLEET_TASK, queue=beat_schedule.MAINTENANCE_QUEUE)
        assert "skipped" in second.get(timeout=120)
        assert client.llen(node_queue("n1")) == 1 and client.llen(node_queue("n2")) == 1
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        client.delete(node_queue("n1"), node_queue("n2"), "fleet:nodes")
        producer.app.conf.beat_schedule = beat_schedule.build_schedule(fleet_settings, producer.app)


def test_the_run_lock_excludes_overlaps_and_expires_when_its_holder_dies(redis_server):
    import time

    from fleetstate.locks import run_lock

    client = redis_server.client()
    with run_lock(client, "unit", 30) as first:
        with run_lock(client, "unit", 30) as second:
            assert first and not second
    with run_lock(client, "unit", 30) as again:
        assert again  # released by its holder
    with run_lock(client, "unit-expiring", 0.3, release=False) as held:
        assert held
    with run_lock(client, "unit-expiring", 0.3) as blocked:
        assert not blocked
    time.sleep(0.5)
    with run_lock(client, "unit-expiring", 0.3) as after_expiry:
        assert after_expiry


def test_the_schedule_pickles_for_beats_shelve_and_keeps_its_timezone_in_memory():
    import pickle

    from celery import Celery

    from tasks.app import configure

    app = configure(FleetSettings(timezone="Asia/Shanghai"), target=Celery("pickle-test"))
    for entry in app.conf.beat_schedule.values():
        restored = pickle.loads(pickle.dumps(entry["schedule"]))
        assert restored == entry["schedule"]
        assert str(entry["schedule"].tz) == "Asia/Shanghai"
