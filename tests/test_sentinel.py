"""Redis Sentinel: broker, result backend and fleet state through `sentinel://` URLs, with real workers, a real
primary + replica + 3 sentinels on loopback, and `SENTINEL FAILOVER` forced while producers keep sending.

Every job a producer's send returned for is accounted: it completes, exactly once. (A send that raised was never
acknowledged: the producer knows, and it is counted apart.) WARMFLEET_RELIABILITY_TRIALS sets the failovers
(1 by default; the report runs 10).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest

from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.client import redis_client
from fleetstate.leases import job_record
from fleetstate.routes import RouteTable
from tasks.sentinel import BACKEND as FLEET_SENTINEL_BACKEND
from tasks.sentinel import TRANSPORT as FLEET_SENTINEL_TRANSPORT
from tasks.settings import FleetSettings

from .sentinels import MASTER, SentinelSet
from .support import record_result, start_worker, wait_warm

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
TRIALS = int(os.environ.get("WARMFLEET_RELIABILITY_TRIALS", "1"))
PRODUCERS = 3


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory):
    s = SentinelSet(tmp_path_factory.mktemp("sentinel")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fleet_settings(sentinels, demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return FleetSettings(home=tmp_path_factory.mktemp("home"), broker_url=sentinels.url,
                         archive_url=demo_archive_dir.as_uri(), torch_threads=1, heartbeat_seconds=1.0,
                         warm_ttl_seconds=4.0, route_cache_ttl=0.0, node_name="sentinelnode",
                         sentinel_master=MASTER)


@pytest.fixture(scope="module")
def workers(fleet_settings, producer, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    procs = [start_worker(fleet_settings, [NEW], f"s{i}", logs, wait=False) for i in range(2)]
    try:
        for w in procs:
            wait_warm(fleet_settings, w)
        RouteTable(fleet_settings.state_client()).set_active(NEW, actor="test")
        yield procs
    finally:
        for w in procs:
            w.stop()


def test_the_app_and_the_fleet_state_reach_the_primary_through_the_sentinels(fleet_settings, sentinels, producer):
    conf = producer.app.conf
    assert conf.broker_url.startswith("sentinel://") and conf.broker_transport == FLEET_SENTINEL_TRANSPORT
    assert conf.result_backend == f"{FLEET_SENTINEL_BACKEND}+{conf.broker_url}"  # celery's "class+URL" form
    assert conf.broker_transport_options["master_name"] == MASTER
    assert conf.result_backend_transport_options["master_name"] == MASTER
    client = redis_client(sentinels.url, MASTER)
    assert client.connection_pool.connection_kwargs.get("port") is None  # asked of the sentinels, not configured
    client.set("fleet:test:sentinel", "1")
    assert int(client.info("server")["tcp_port"]) == sentinels.primary_port()


def test_a_role_logs_in_to_the_primary_through_the_sentinels_with_its_own_user(sentinels):
    """A role's Sentinel URL carries its ACL user (`sentinel://fleet-worker:secret@…`): the fleet state's client logs
    in as that user, not as Redis's default one with the role's password."""
    from fleetstate.client import sentinel_hosts

    admin = redis_client(sentinels.url, MASTER)
    admin.execute_command("ACL", "SETUSER", "fleet-probe", "on", ">probe-secret", "~fleet:probe:*", "+@all")
    try:
        auth = sentinels.url.replace("sentinel://", "sentinel://fleet-probe:probe-secret@", 1)
        assert sentinel_hosts(auth)[2:] == ("fleet-probe", "probe-secret")
        client = redis_client(auth, MASTER)
        assert client.acl_whoami() == "fleet-probe"
        client.set("fleet:probe:1", "1")
    finally:
        admin.execute_command("ACL", "DELUSER", "fleet-probe")


@pytest.mark.timeout(600 + 120 * TRIALS)  # a failover and its settling take a minute or two on a loaded machine
def test_a_failover_under_load_loses_no_acknowledged_job(fleet_settings, sentinels, producer, workers):
    """Given producers sending without pause to two workers through Sentinel, when the primary fails over (the
    replica promoted, the old primary demoted), every job whose send returned completes, and none runs twice."""
    client = fleet_settings.state_client()
    sent, refused, failovers = [], [], []
    stop = threading.Event()
    lock = threading.Lock()

    def produce(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = producer.generate.delay(f"through sentinel {n}-{i}", seed=i,
                                            **({"release": NEW} if i % 2 else {}))
                with lock:
                    sent.append(r)
            except Exception as exc:  # a send that raised was not acknowledged: the producer knows
                with lock:
                    refused.append(repr(exc))
            time.sleep(0.3)

    threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in range(PRODUCERS)]
    for t in threads:
        t.start()
    try:
        for _ in range(TRIALS):
            time.sleep(4)
            started = time.monotonic()
            failovers.append((*sentinels.failover(), time.monotonic() - started))
            time.sleep(4)
            sentinels.wait_ready()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    # The stored outcome of each job, read with GET (a producer's `r.get()` waits on pub/sub instead: see
    # docs/reliability.md for what a failover does to a subscription held on the demoted primary).
    pending = {r.id for r in sent}
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            try:
                if producer.app.backend.get_task_meta(task_id).get("status") == "SUCCESS":
                    pending.discard(task_id)
            except Exception:
                pass
        time.sleep(1.0)
    lost = sorted(pending)
    completed = len(sent) - len(lost)
    duplicated = sum(int(job_record(client, r.id).get("completed", "1")) > 1 for r in sent)
    record_result("Sentinel failover under load", trials=TRIALS, sent=len(sent), completed=completed,
                  lost=len(lost), duplicated=duplicated, recovery_s=[f[2] for f in failovers],
                  notes=f"{PRODUCERS} producers, 2 workers; {len(refused)} sends raised (never acknowledged); "
                        "recovery = SENTINEL FAILOVER → all sentinels name the new primary")
    ids = [r.id for r in sent]
    sent.clear()  # drop the results' subscriptions while the sentinels still answer
    gc.collect()
    assert all(old != new for old, new, _ in failovers)
    assert lost == [] and duplicated == 0, (lost, refused)
    assert len(ids) >= 10 * TRIALS
