"""Fleet-wide maintenance that a failed node cannot block (fleetstate/fanout.py, `warmfleet sync|audit --fleet`),
with real maintenance worker processes, one per node, on a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.fanout import FanOutRuns
from fleetstate.nodes import NodeRegistry
from fleetstate.routes import RouteTable

from .support import REPO, child_env


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = redis_server.client()
    c.flushdb()
    return c


def test_a_run_in_progress_dedupes_a_finished_or_failed_one_does_not(client):
    runs = FanOutRuns(client)
    first = runs.begin("sync", ["n1", "n2"], window=600)
    assert not isinstance(first, str)
    assert "in progress" in runs.begin("sync", ["n1", "n2"], window=600)  # a beat that fires twice
    runs.mark("sync", first.run, "n1", "ok")
    assert "waiting for n2" in runs.begin("sync", ["n1", "n2"], window=600)
    runs.mark("sync", first.run, "n2", "failed", detail="OSError: disk gone")
    assert runs.current("sync").failed() == ["n2"]
    second = runs.begin("sync", ["n1", "n2"], window=600)  # the failed node does not block the next run
    assert not isinstance(second, str) and second.run != first.run
    runs.mark("sync", first.run, "n1", "ok")  # a late answer of the old run changes nothing
    assert runs.current("sync").nodes["n1"]["state"] == "sent"
    assert not isinstance(runs.begin("sync", ["n1"], window=0), str)  # a node that never answers: the window ends it


def start_maintenance(settings, node: str, cache_root, logdir) -> subprocess.Popen:
    node_settings = settings.model_copy(update={"cache_root": cache_root, "node_name": node})
    return subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "maintenance-worker", "--name", f"maint@{node}"],
                            stdout=open(logdir / f"maintenance-{node}.log", "ab"), stderr=subprocess.STDOUT,
                            env=child_env(node_settings), cwd=REPO, start_new_session=True)


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = child_env(settings)
    env.pop("FLEET_NODE_NAME", None)
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.integration
def test_a_failed_node_does_not_block_the_next_fleet_wide_sync(fleet_settings, client, tmp_path):
    """Node bad's L2 sits under a plain file, so its sync fails; `warmfleet sync --fleet` shows each node's outcome
    and fails; a second trigger at once runs again on every node instead of answering 'already sent'."""
    RouteTable(client).set_active(DEMO_RELEASES[1], actor="test")  # something for every node to sync
    (tmp_path / "not-a-dir").write_text("a file where bad's L2 should be")
    procs = [start_maintenance(fleet_settings, "good", tmp_path / "good-l2", tmp_path),
             start_maintenance(fleet_settings, "bad", tmp_path / "not-a-dir" / "l2", tmp_path)]
    try:
        deadline = time.monotonic() + 120
        while not {"good", "bad"} <= set(NodeRegistry(client).nodes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        runs = []
        for _ in range(2):
            out = cli(fleet_settings, "sync", "--fleet", "--timeout", "240")
            assert out.returncode == 1, out.stdout + out.stderr
            assert "not sent again" not in out.stdout
            assert "bad: failed" in out.stdout and "good: ok" in out.stdout, out.stdout
            assert "sync: 1 node(s) ok, 1 failed (bad)" in out.stdout
            runs.append(FanOutRuns(client).current("sync"))
        assert runs[0].run != runs[1].run
        assert all(r.nodes["good"]["state"] == "ok" and r.nodes["bad"]["state"] == "failed" for r in runs)
        assert "Error" in runs[1].nodes["bad"]["detail"]

        audit = cli(fleet_settings, "audit", "--fleet", "--dry-run", "--timeout", "240")
        assert "good: ok" in audit.stdout and "audit run" in audit.stdout, audit.stdout + audit.stderr
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
