"""Redis restarted under load: queued and running jobs survive (append-only file, fsync always), and workers, beat
and producers reconnect on their own. Real redis-server, real worker processes and a real beat."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.leases import job_record
from fleetstate.registry import WarmRegistry
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
    trial_count,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.integration

NEW = DEMO_RELEASES[1]

BEAT_QUEUE = "reliability.beat"
BEAT_SCRIPT = f"""
import sys, tasks
from tasks.app import app
app.conf.beat_schedule = {{"tick": {{"task": "reliability.tick", "schedule": 0.5, "options": {{"queue": "{BEAT_QUEUE}"}}}}}}
app.Beat(schedule=sys.argv[1], loglevel="INFO", max_interval=0.5).run()
"""
"""Beat with one half-second entry whose messages nobody consumes: its queue grows only while beat can publish."""


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, demo_archive_dir,
                              visibility_timeout=VISIBILITY_TIMEOUT)


@pytest.fixture(scope="module")
def pool(fleet_settings, producer, tmp_path_factory):
    with Pool.running(fleet_settings, NEW, tmp_path_factory.mktemp("logs")) as workers:
        yield workers


@pytest.fixture(scope="module")
def beat(fleet_settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("beat")
    proc = subprocess.Popen([sys.executable, "-c", BEAT_SCRIPT, str(folder / "schedule")], env=child_env(fleet_settings),
                            cwd=REPO, stdout=open(folder / "beat.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    yield proc
    proc.terminate()
    proc.wait(timeout=20)


def done_at(m: dict) -> float:
    """The result backend's date_done (UTC) as a timestamp."""
    d = m["date_done"]
    d = datetime.fromisoformat(d) if isinstance(d, str) else d
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


def test_redis_restarted_with_jobs_queued_and_running_loses_none(fleet_settings, redis_server, producer, pool, beat):
    """Given six jobs per trial (two running, four queued), when redis-server is restarted, then every job completes
    with its image, the workers and beat carry on, and this producer sends and waits as before, untouched."""
    client = redis_server.client()
    calibration = Calibration(producer)
    wait_for(lambda: client.llen(BEAT_QUEUE) > 2, what="beat's first ticks")
    registry = WarmRegistry(client)
    trials, sent, done, duplicated, recoveries = trial_count(2), 0, 0, 0, []
    for trial in range(trials):
        jobs = [producer.generate.delay(f"redis restart {trial}-{i}", seed=400 + 10 * trial + i, release=NEW,
                                        **calibration.job(2.5)) for i in range(6)]
        waiting: dict[str, object] = {}
        waiter = threading.Thread(target=lambda job=jobs[-1], out=waiting: out.update(result=job.get(timeout=600)),
                                  daemon=True)
        waiter.start()  # a producer blocked in get() across the restart
        wait_for(lambda js=jobs: any(meta(producer, j.id)["status"] == "STARTED" for j in js), what="a running job")
        queued = client.llen(queue_for(NEW))
        assert queued >= 2, "the restart must find jobs still queued"

        redis_server.restart()
        wait_port(redis_server.port)
        up_at = time.time()
        ticks_after_restart = client.llen(BEAT_QUEUE)
        late = producer.generate.delay(f"sent after restart {trial}", seed=499, release=NEW, steps=2)
        results = [j.get(timeout=600) for j in [*jobs, late]]
        waiter.join(timeout=600)

        assert waiting.get("result") == results[len(jobs) - 1]
        for j, result in zip([*jobs, late], results, strict=True):
            image = fleet_settings.home / "outputs" / f"{j.id}.png"
            assert result["task_id"] == j.id and image.read_bytes().startswith(PNG_MAGIC)
            duplicated += max(0, int(job_record(client, j.id).get("completed", "1")) - 1)
        finished = [done_at(meta(producer, j.id)) for j in jobs]
        recoveries.append(min(t for t in finished if t >= up_at) - up_at)
        wait_for(lambda n=ticks_after_restart: client.llen(BEAT_QUEUE) > n + 2, what="beat ticking after the restart")
        wait_for(lambda: len(registry.warm_workers(NEW).get(NEW, [])) == 2, what="both workers warm again")
        sent += len(jobs) + 1
        done += len(results)
    assert duplicated == 0
    assert all(w.proc.poll() is None for w in pool.workers.values()) and beat.poll() is None
    record_result("redis restart", trials=trials, sent=sent, completed=done, lost=sent - done, duplicated=duplicated,
                  recovery_s=recoveries, notes="recovery = redis back up → first job finished after it")
