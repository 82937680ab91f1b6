"""When a release's worker is gone: queued jobs moved by `rollback --move-queued`, and a SIGKILLed worker leaving
the warm registry within its TTL. Each test starts the worker processes it stops or kills."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.keys import WARM_KEY, WORKER_KEY
from fleetstate.queues import queue_depth
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable

from .support import run_cli, start_worker

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
KOMBU_UNACKED = "unacked"  # kombu's Redis transport: jobs delivered to a worker and not yet acknowledged




@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis_server.client()


def test_rollback_move_queued_serves_waiting_jobs_on_the_target_with_their_ids(
        fleet_settings, producer, client, tmp_path: Path):
    """Given a release whose only worker has stopped, with jobs piling up in its queue,
    when the operator rolls back with --move-queued,
    then every unpinned job is served once by the target, under its original task id; pinned jobs stay."""
    survivor = start_worker(fleet_settings, [OLD], "w-survivor", tmp_path)
    doomed = start_worker(fleet_settings, [NEW], "w-doomed", tmp_path)
    try:
        table = RouteTable(client)
        table.set_active(OLD, actor="test")
        table.set_active(NEW, actor="test")
        doomed.stop()  # a graceful stop: it withdraws from the registry
        assert not WarmRegistry(client).is_warm(NEW)

        queued = [producer.generate.delay(f"stranded {i}", seed=i) for i in range(8)]
        pinned = [producer.generate.delay("pinned to the stopped release", release=NEW) for _ in range(2)]
        assert queue_depth(client, queue_for(NEW)) == 10
        jobs_before = _jobs(client, "w-survivor@testnode")

        result = run_cli(fleet_settings, "rollback", "nano-banana", "--move-queued")

        assert result.exit_code == 0, result.output
        assert f"moved 8 queued job(s) from {NEW} to {OLD}; left 2 pinned" in result.output
        assert table.active("nano-banana") == OLD
        done = [r.get(timeout=300) for r in queued]
        assert [d["task_id"] for d in done] == [r.id for r in queued]
        assert {d["release"] for d in done} == {OLD} and {d["worker"] for d in done} == {"w-survivor@testnode"}
        outputs = Path(fleet_settings.resolved_output_url.removeprefix("file://"))
        assert all((outputs / f"{r.id}.png").is_file() for r in queued)
        # exactly once: nothing left queued or in flight for the target, and its worker served exactly 8 jobs
        _eventually(lambda: client.hlen(KOMBU_UNACKED) == 0)  # the last ack follows its result by a moment
        assert queue_depth(client, queue_for(OLD)) == 0
        assert _jobs(client, "w-survivor@testnode") == jobs_before + 8
        # pinned jobs were not moved: they still wait for their release
        assert queue_depth(client, queue_for(NEW)) == 2
        assert all(r.state == "PENDING" for r in pinned)
    finally:
        survivor.stop()
        doomed.stop()


def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check()


def _jobs(client: redis.Redis, worker: str) -> int:
    return {w.worker: w.jobs for w in WarmRegistry(client).workers()}[worker]


def test_a_killed_worker_leaves_the_warm_registry_within_its_ttl(fleet_settings, producer, client, tmp_path: Path):
    victim = start_worker(fleet_settings, [NEW], "w-victim", tmp_path)
    try:
        registry = WarmRegistry(client)
        assert registry.warm_workers(NEW) == {NEW: ["w-victim@testnode"]}
        warm_key = WARM_KEY.format(release=NEW, worker="w-victim@testnode")
        state_key = WORKER_KEY.format(worker="w-victim@testnode")

        victim.stop(signal.SIGKILL)  # no shutdown code runs: only the TTL can remove it
        assert victim.proc.returncode == -signal.SIGKILL
        left_ms = [client.pttl(warm_key), client.pttl(state_key)]
        ttl_ms = fleet_settings.warm_ttl_seconds * 1000
        assert all(0 < ms <= ttl_ms for ms in left_ms), left_ms  # still announced, but only until its TTL runs out

        deadline = time.monotonic() + max(left_ms) / 1000 + 1.0
        while registry.is_warm(NEW) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not registry.is_warm(NEW)
        assert "w-victim@testnode" not in {w.worker for w in registry.workers()}

        refused = run_cli(fleet_settings, "promote", "nano-banana", NEW)
        assert refused.exit_code == 1 and "no warm worker" in refused.output
    finally:
        victim.stop()
