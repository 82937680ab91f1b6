"""Job time limits with real workers on a real redis-server: a job that hangs past its limit is given back for a
peer, its worker recycled (the test plays the supervisor that starts a fresh one), and the job completes on the
healthy peer; a job that times out on every try ends dead-lettered with "ran past its time limit of N s".

The hang is injected by the test worker entry (tests/fault_worker.py, $WARMFLEET_TEST_HANG_PROMPT): production code
has no hook for it. WARMFLEET_RELIABILITY_TRIALS sets the trials per scenario (1 by default; the report runs 10).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.dead import DeadLetters
from fleetstate.leases import job_record
from fleetstate.timelimits import set_release_time_limit, time_limit_for
from tasks.settings import FleetSettings
from workers.watchdog import TIMED_OUT_EXIT

from .fault_worker import HANG_ENV
from .support import WorkerProc, record_result, start_worker, wait_warm

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
TRIALS = int(os.environ.get("WARMFLEET_RELIABILITY_TRIALS", "1"))
HANG = "a pipeline call that never returns"
LIMIT_S = 8.0


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return FleetSettings(home=tmp_path_factory.mktemp("home"), broker_url=redis_server.url,
                         archive_url=demo_archive_dir.as_uri(), torch_threads=1, heartbeat_seconds=1.0,
                         warm_ttl_seconds=4.0, route_cache_ttl=0.0, node_name="limitnode", job_time_limit_s=LIMIT_S,
                         job_max_retries=1, job_retry_backoff=0.2)


@pytest.fixture
def client(redis_server) -> redis.Redis:
    return redis_server.client()


class Fleet:
    """`hanger` hangs on the HANG prompt (and serves every other job); `peer` is healthy. The test restarts the
    hanger whenever it exits, as a supervisor would."""

    def __init__(self, settings: FleetSettings, logs: Path, producer) -> None:
        self.settings, self.logs, self.producer = settings, logs, producer
        self.generation = 0
        self.hanger = self._start_hanger(wait=False)
        self.peer = start_worker(settings, [NEW], "peer", logs, wait=False)
        wait_warm(settings, self.hanger)
        wait_warm(settings, self.peer)

    def _start_hanger(self, wait: bool = True) -> WorkerProc:
        self.generation += 1
        return start_worker(self.settings, [NEW], f"hanger{self.generation}", self.logs, wait=wait,
                            **{HANG_ENV: HANG})

    def hostname(self, worker: WorkerProc) -> str:
        return f"{worker.name}@{self.settings.node_name}"

    def pause_peer(self, paused: bool) -> None:
        control = self.producer.app.control
        call = control.cancel_consumer if paused else control.add_consumer
        assert call(queue_for(NEW), destination=[self.hostname(self.peer)], reply=True, timeout=10)

    def wait_hanger_recycled(self, timeout: float = 120) -> int:
        """The hung worker's exit status; then a fresh hanger, warm."""
        self.hanger.proc.wait(timeout=timeout)
        code = self.hanger.proc.returncode
        self.hanger = self._start_hanger()
        return code

    def stop(self) -> None:
        for worker in (self.hanger, self.peer):
            worker.stop()


@pytest.fixture(scope="module")
def fleet(fleet_settings, producer, tmp_path_factory):
    f = Fleet(fleet_settings, tmp_path_factory.mktemp("logs"), producer)
    try:
        yield f
    finally:
        f.stop()


def started_on(producer, task_id: str, timeout: float = 120, on: str | None = None) -> str:
    """The worker a job is running on; with `on`, wait for a start there (a recycled worker's STARTED record of the
    previous try stays in the backend until the next try starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = producer.app.backend.get_task_meta(task_id)
        if meta.get("status") == "STARTED" and (on is None or meta["result"]["hostname"] == on):
            return meta["result"]["hostname"]
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} never started{f' on {on}' if on else ''}")


def test_a_hung_job_is_retried_on_the_healthy_peer_and_its_worker_recycled(fleet, producer, client):
    """Given a worker whose pipeline call hangs and a healthy peer, a job that hangs is given back past the time
    limit, its worker exits to be restarted, the job completes on the peer (it ran twice: once hung, once to the
    end), and a job queued behind it does not wait for the hung worker."""
    recoveries = []
    for trial in range(TRIALS):
        fleet.pause_peer(True)
        hung = producer.generate.delay(HANG, seed=trial, release=NEW)
        assert started_on(producer, hung.id) == fleet.hostname(fleet.hanger)
        behind = producer.generate.delay(f"queued behind the hung job {trial}", seed=trial, release=NEW)
        fleet.pause_peer(False)
        assert behind.get(timeout=600)["worker"] == fleet.hostname(fleet.peer)
        started = time.monotonic()
        result = hung.get(timeout=LIMIT_S + 120)
        recoveries.append(time.monotonic() - started)
        assert result["worker"] == fleet.hostname(fleet.peer)
        assert fleet.wait_hanger_recycled() == TIMED_OUT_EXIT
        record = job_record(client, hung.id)
        assert (record["runs"], record["completed"], record["timeouts"]) == ("2", "1", "1"), record
        assert record.get("duplicates", "0") == "0" and "dead" not in record
    assert "ran past its time limit of 8 s" in fleet.logs.joinpath("hanger1.log").read_text()
    record_result("job past its time limit (retried on a peer)", trials=TRIALS, sent=2 * TRIALS,
                  completed=2 * TRIALS, lost=0, duplicated=0, recovery_s=recoveries, bound_s=LIMIT_S,
                  notes=f"time limit {LIMIT_S:g} s (shortened from the 600 s default so a trial takes seconds); "
                        "recovery = the peer is free → the hung job's result; the hung worker exits "
                        f"{TIMED_OUT_EXIT} and is restarted")


def test_a_job_that_times_out_on_every_try_is_dead_lettered_with_its_reason(fleet, producer, client):
    """Given a release whose metadata sets a 3 s limit and a job that hangs on every try (max retries 1: two tries,
    the peer paused), the second timeout records it dead; the next delivery fails it with the one-line reason."""
    set_release_time_limit(client, NEW, 3)
    try:
        assert time_limit_for(client, NEW, LIMIT_S) == 3.0
        for trial in range(TRIALS):
            fleet.pause_peer(True)
            r = producer.generate.delay(HANG, seed=100 + trial, release=NEW)
            for _ in range(2):  # both tries on the hanging worker, restarted in between
                hanger = fleet.hostname(fleet.hanger)
                assert started_on(producer, r.id, on=hanger) == hanger
                assert fleet.wait_hanger_recycled() == TIMED_OUT_EXIT
            fleet.pause_peer(False)
            with pytest.raises(Exception, match="ran past its time limit of 3 s"):
                r.get(timeout=600)
            record = job_record(client, r.id)
            assert (record["runs"], record["timeouts"], record["dead"]) == ("2", "2", "ran past its time limit of 3 s")
            assert "completed" not in record
            dead = [d for d in DeadLetters(client).list() if d.task_id == r.id]
            assert [d.reason for d in dead] == ["ran past its time limit of 3 s"]
    finally:
        set_release_time_limit(client, NEW, None)
    record_result("job past its time limit on every try (dead-lettered)", trials=TRIALS, sent=TRIALS, completed=0,
                  dead=TRIALS, lost=0, duplicated=0, bound_s=3.0,
                  notes="release metadata job_time_limit_s 3 s over the 8 s setting; max retries 1: two tries")
