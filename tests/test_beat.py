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
from tasks.settings import FleetSettings
from workers.demo import DEMO_RELEASES

from .support import REPO, child_env


def test_the_nightly_sync_is_due_at_two_in_the_configured_timezone():
    from celery import Celery

    from tasks.app import configure

    settings = FleetSettings(timezone="Asia/Shanghai")
    schedule = configure(settings, target=Celery("beat-test")).conf.beat_schedule
    assert schedule["nightly-l2-sync"]["task"] == "warmfleet.sync"
    assert schedule["l2-audit"]["task"] == "warmfleet.audit"
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
    assert out.stdout.split(maxsplit=1) == ["Europe/Berlin", "['l2-audit', 'nightly-l2-sync']\n"], out.stderr


@pytest.mark.integration
def test_maintenance_worker_runs_the_sync_and_the_audit(fleet_settings, producer, tmp_path):
    settings = fleet_settings.model_copy(update={"cache_root": tmp_path / "node-l2"})
    log = open(tmp_path / "maintenance.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "maintenance-worker", "--name", "maint@test"],
                            stdout=log, stderr=subprocess.STDOUT, env=child_env(settings), cwd=REPO,
                            start_new_session=True)
    try:
        import redis

        from tasks.routing import RouteTable

        RouteTable(redis.Redis.from_url(settings.broker_url)).set_active(DEMO_RELEASES[1], actor="test")
        result = producer.app.send_task("warmfleet.sync", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=180)
        store = Cache.at(tmp_path / "node-l2").store
        for ref in Release.parse(DEMO_RELEASES[1]).refs():
            assert store.has(ref), result
        assert result["bytes_fetched"] > 0
        again = producer.app.send_task("warmfleet.sync", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=180)
        assert again["bytes_fetched"] == 0

        victim = store.manifest(Release.parse(DEMO_RELEASES[1]).base).file("model_index.json")
        blob = store.blob_path(victim.sha256)
        os.chmod(blob, 0o644)
        blob.write_text("{}")
        audit = producer.app.send_task("warmfleet.audit", queue=beat_schedule.MAINTENANCE_QUEUE).get(timeout=180)
        assert audit["corrupt"] == [f"{Release.parse(DEMO_RELEASES[1]).base}/model_index.json: checksum mismatch"]
        assert audit["quarantined"] == [victim.sha256]
        assert not store.has(Release.parse(DEMO_RELEASES[1]).base)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
