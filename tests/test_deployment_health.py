"""`warmfleet health`, the check the images and the Kubernetes probes rely on: tried against a real redis-server
and a real worker process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from fleetctl.cli import main
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.registry import WarmRegistry, WorkerState

from . import support
from .support import REPO, RedisServer


@pytest.fixture(scope="module")
def health_redis(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("health-redis")).start()
    yield server
    server.stop()


def health(redis_url: str, *args: str, node: str = "pod-a") -> tuple[int, str]:
    result = CliRunner().invoke(main, ["health", *args],
                                env={"FLEET_BROKER_URL": redis_url, "FLEET_NODE_NAME": node})
    return result.exit_code, result.output


def announce(server: RedisServer, worker: str, node: str, state: str, releases: list[str]) -> WorkerState:
    registry = WarmRegistry(server.client(), ttl=30)
    ws = WorkerState(worker=worker, node=node, pid=1, state=state, releases=releases)
    registry.publish(ws)
    return ws


def test_health_passes_only_once_this_hosts_worker_is_warm(health_redis):
    health_redis.client().flushdb()
    old, new = DEMO_RELEASES
    code, out = health(health_redis.url)
    assert code == 1 and "no record" in out
    announce(health_redis, "gpu@pod-a", "pod-a", "loading", [new])
    code, out = health(health_redis.url)
    assert code == 1 and "loading" in out
    announce(health_redis, "gpu@pod-b", "pod-b", "warm", [new])  # another pod's worker does not count
    code, _ = health(health_redis.url)
    assert code == 1
    announce(health_redis, "gpu@pod-a", "pod-a", "warm", [new])
    assert health(health_redis.url) == (0, "warm: every worker on pod-a\n")
    assert health(health_redis.url, "--worker", "gpu")[0] == 0  # short names take this node, like the worker's
    assert health(health_redis.url, "--worker", "gpu@pod-a", "--release", new)[0] == 0
    code, out = health(health_redis.url, "--release", old)
    assert code == 1 and old in out
    assert health(health_redis.url, "--worker", "other")[0] == 1


def test_health_reports_a_failed_load(health_redis):
    health_redis.client().flushdb()
    ws = announce(health_redis, "gpu@pod-a", "pod-a", "warm", [DEMO_RELEASES[1]])
    ws.state, ws.error = "failed", "LoadError: no snapshot"
    WarmRegistry(health_redis.client()).publish(ws)
    code, out = health(health_redis.url)
    assert code == 1 and "failed: LoadError: no snapshot" in out


def test_health_with_the_broker_down(tmp_path):
    from fleetctl.localfleet import free_port

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    code, out = health(unreachable)
    assert code == 1 and "cannot reach the broker" in out
    code, out = health(unreachable, "--broker-down-ok")
    assert code == 0 and "--broker-down-ok" in out


@pytest.mark.integration
def test_health_of_a_real_worker_process(fleet_settings, tmp_path):
    """A real worker: unhealthy before it starts, healthy once warm, unhealthy again after it stops."""
    release = DEMO_RELEASES[0]
    argv = [sys.executable, "-m", "fleetctl.cli", "health", "--worker", "probe-me", "--release", release]
    env = support.child_env(fleet_settings)

    def probe() -> int:
        return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=60).returncode

    assert probe() == 1
    worker = support.start_worker(fleet_settings, [release], "probe-me", tmp_path)
    try:
        assert probe() == 0
    finally:
        worker.stop()
    assert probe() == 1
