"""A local fleet goes down and up with thousands of jobs queued, as an operator runs it (`warmfleet up` / `down` in
subprocesses): every job's result arrives, each job completed once; `down` compacts Redis's AOF first and `up` waits
until Redis has loaded it; a Redis restarted by hand is followed, one already gone is not reported as stopped.

Cost: 5,000 of the smallest jobs the fleet serves (the active demo release, 16×16 px, one step: ~40 ms each on this
2-core machine) through two workers of one release, about two to three minutes in all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import FleetState, alive, free_port
from fleetstate.leases import job_record
from fleetstate.queues import queue_depth
from tasks.settings import FleetSettings

from .support import REPO, wait_for

pytestmark = pytest.mark.integration

RELEASE = DEMO_RELEASES[1]
JOBS, LEFT_AT_DOWN = 5000, 1000
SMALLEST = {"width": 16, "height": 16, "steps": 1}  # the release's smallest job: one step on a 2×2 latent


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def env(home: Path, demo_archive_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(home), FLEET_ARCHIVE_URL=demo_archive_dir.as_uri(), FLEET_METRICS_PORT=str(free_port()),
               FLEET_TORCH_THREADS="1", FLEET_HEARTBEAT_SECONDS="1", FLEET_WARM_TTL_SECONDS="4",
               FLEET_NODE_NAME="testnode", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return env


def warmfleet(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=env["FLEET_HOME"], timeout=timeout)


def up(env: dict[str, str]) -> FleetState:
    started = warmfleet(env, "up", "--release", RELEASE, "--release", RELEASE, "--no-flower", "--no-beat")
    assert started.returncode == 0, started.stdout + started.stderr
    return state_of(env)


def state_of(env: dict[str, str]) -> FleetState:
    state = FleetState.load(Path(env["FLEET_HOME"]) / "state" / "fleet.json")
    assert state is not None
    return state


def settings_of(env: dict[str, str]) -> FleetSettings:
    """What a producer on this machine reads: the broker of the running local fleet, from its state file."""
    return FleetSettings(home=Path(env["FLEET_HOME"]), archive_url=env["FLEET_ARCHIVE_URL"], route_cache_ttl=0.0)


def incr_aof_bytes(home: Path) -> int:
    folder = home / "state" / "redis" / "appendonlydir"
    return sum(p.stat().st_size for p in folder.glob("*.incr.aof"))


def test_5000_jobs_survive_down_and_up_with_1000_still_queued(env, home):
    import tasks

    first = up(env)
    settings = settings_of(env)
    tasks.configure(settings)
    try:
        ids = [tasks.generate.delay(f"job {i}", seed=i, **SMALLEST).id for i in range(JOBS)]
        client = redis.Redis.from_url(settings.resolved_broker_url)
        wait_for(lambda: queue_depth(client, queue_for(RELEASE)) <= LEFT_AT_DOWN, timeout=900,
                 what=f"the queue to drain to {LEFT_AT_DOWN}")
        queued_at_down = queue_depth(client, queue_for(RELEASE))
        client.close()
        tasks.app.pool.force_close_all()
        down = warmfleet(env, "down")
        downed_at = time.time()
        assert down.returncode == 0 and "stopped:" in down.stdout and "redis" in down.stdout, down.stdout + down.stderr
        assert not any(alive(p.pid) for p in first.procs)
        assert incr_aof_bytes(home) < 64 * 1024  # rewritten at down: the data is in the compact base file

        second = up(env)
        assert second.broker_url != first.broker_url
        settings = settings_of(env)
        tasks.configure(settings)
        backend = tasks.app.backend
        wait_for(lambda: all(backend.get_task_meta(i)["status"] == "SUCCESS" for i in ids[-50:]), timeout=900,
                 what="the last jobs sent to finish after up")
        metas = {i: backend.get_task_meta(i) for i in ids}
        not_done = [i for i, m in metas.items() if m["status"] != "SUCCESS"]
        assert not not_done, f"{len(not_done)} jobs without a result, e.g. {metas[not_done[0]]}"
        assert {m["result"]["task_id"] for m in metas.values()} == set(ids)
        client = redis.Redis.from_url(settings.resolved_broker_url)
        records = [job_record(client, i) for i in ids]
        # each job ran its pipeline once and completed once; a message delivered again after `down` (its ack lost
        # with the stopping worker) is answered from the job record without running — counted as a duplicate
        # delivery, never a second execution
        assert all(r.get("completed") == "1" and r.get("runs") == "1" for r in records), \
            next(r for r in records if r.get("completed") != "1" or r.get("runs") != "1")
        after_restart = sum(1 for m in metas.values() if _timestamp(m["date_done"]) > downed_at)
        assert queued_at_down > 0 and after_restart >= 1  # jobs queued at down were served by the new fleet
        outputs = {Path(m["result"]["image_uri"].removeprefix("file://")) for m in metas.values()}
        assert len(outputs) == JOBS and all(p.is_file() for p in outputs)
        client.close()
    finally:
        tasks.app.pool.force_close_all()


def test_down_follows_a_redis_restarted_by_hand(env, home):
    state = state_of(env) if (home / "state" / "fleet.json").exists() else up(env)
    redis_proc = next(p for p in state.procs if p.name == "redis")
    os.kill(redis_proc.pid, signal.SIGTERM)  # the operator stops Redis …
    wait_for(lambda: not alive(redis_proc.pid), timeout=60, what="redis to stop")
    conf = home / "state" / "redis" / "redis.conf"
    by_hand = subprocess.Popen([shutil.which("redis-server"), str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # … and starts it again by hand, in its own shell's group
    try:
        wait_for(lambda: _pings(state.broker_url), timeout=120, what="redis restarted by hand")
        recorded = next(p for p in json.loads((home / "state" / "fleet.json").read_text())["procs"]
                        if p["name"] == "redis")
        assert recorded["pid"] == redis_proc.pid != by_hand.pid  # the state file still names the old server
        down = warmfleet(env, "down")
        assert down.returncode == 0 and "redis" in down.stdout.split("stopped:")[1], down.stdout + down.stderr
        assert "already gone" not in down.stdout
        assert by_hand.wait(timeout=60) == 0  # the server that ran was stopped cleanly, not a stale pid
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
            by_hand.wait(10)


def test_down_does_not_report_a_redis_already_gone_as_stopped(env, home):
    state = up(env)
    redis_proc = next(p for p in state.procs if p.name == "redis")
    os.kill(redis_proc.pid, signal.SIGTERM)
    wait_for(lambda: not alive(redis_proc.pid), timeout=60, what="redis to stop")
    down = warmfleet(env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    stopped = down.stdout.split("stopped:")[1].splitlines()[0]
    assert "redis" not in stopped and "worker-0" in stopped
    assert "already gone (not signalled): redis" in down.stdout
    assert not any(alive(p.pid) for p in state.procs)


def _timestamp(done: object) -> float:
    """Celery's date_done (UTC; a datetime or its ISO text, by version) as a Unix time."""
    when = done if isinstance(done, datetime) else datetime.fromisoformat(str(done))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False
