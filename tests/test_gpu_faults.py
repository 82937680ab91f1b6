"""A GPU worker that tells the truth, with its device faults injected at the pipeline call of real worker processes
(tests/device_fault_worker.py): out of memory is freed, tried once more on the same worker, then refused with one
line while the worker stays warm; a persistent device error makes the worker sick (out of the registry, health
failing, consumers cancelled) and its jobs go to a healthy peer; device memory reaches status and /metrics."""

from __future__ import annotations

import json
import time

import pytest
import redis

from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.dead import DeadLetters
from fleetstate.registry import WarmRegistry

from .support import run_cli, start_worker, wait_warm

pytestmark = pytest.mark.integration

RELEASE = DEMO_RELEASES[-1]
OOM_ABOVE = 256
OOM_ONCE = "this prompt runs out of memory the first time"
GIB = 2**30
MEMORY = (3 * GIB, 4 * GIB, 80 * GIB)


@pytest.fixture(scope="module")
def settings(fleet_settings):
    return fleet_settings.model_copy(update={"failure_breaker": 3, "job_max_retries": 3, "job_retry_backoff": 0.5})


@pytest.fixture(scope="module")
def fleet(settings, producer, tmp_path_factory):
    """Two workers on one release, both on the faulty device; `sick` loses its device when the test says so."""
    import tasks

    tasks.configure(settings)
    logs = tmp_path_factory.mktemp("logs")
    env = {"WARMFLEET_TEST_OOM_ABOVE": str(OOM_ABOVE), "WARMFLEET_TEST_OOM_ONCE": OOM_ONCE,
           "WARMFLEET_TEST_MEMORY": ",".join(map(str, MEMORY))}
    workers = {name: start_worker(settings, [RELEASE], name, logs, wait=False, entry="tests.device_fault_worker",
                                  WARMFLEET_TEST_DEVICE_LOST=str(logs / f"{name}.lost"), **env)
               for name in ("sick", "ok")}
    try:
        for w in workers.values():
            wait_warm(settings, w)
        yield {"workers": workers, "logs": logs}
    finally:
        for w in workers.values():
            w.stop()


def full(settings, name: str) -> str:
    return f"{name}@{settings.node_name}"


def exported(client: redis.Redis) -> dict[tuple[str, frozenset], float]:
    """What /metrics serves, as (sample name, labels) → value."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from fleetctl.metrics import FleetCollector

    registry = CollectorRegistry()
    registry.register(FleetCollector(client))
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}


def test_out_of_memory_once_is_freed_and_retried_on_the_same_worker(settings, producer, fleet):
    result = producer.generate.delay(OOM_ONCE, seed=1, release=RELEASE, steps=2).get(timeout=120)
    assert result["image_uri"]
    worker = fleet["workers"][result["worker"].split("@")[0]]
    assert worker.log_text().count("test: freed device memory on cpu") == 1


def test_out_of_memory_at_the_size_asked_is_refused_in_one_line_and_the_worker_stays_warm(settings, producer, fleet):
    r = producer.generate.delay("too big for this device", seed=2, release=RELEASE, steps=2, width=512, height=512)
    with pytest.raises(producer.JobRefused) as refused:
        r.get(timeout=120)
    message = str(refused.value)
    assert "\n" not in message and "512x512" in message and "at most 2048x2048" in message
    assert "out of device memory" in message and RELEASE in message
    assert DeadLetters(redis.Redis.from_url(settings.broker_url)).list(100) == []  # refused, not buried
    warm = WarmRegistry(redis.Redis.from_url(settings.broker_url)).warm_workers(RELEASE)[RELEASE]
    assert warm == sorted(full(settings, n) for n in fleet["workers"])
    freed = sum(w.log_text().count("test: freed device memory") for w in fleet["workers"].values())
    assert freed == 1 + 2  # the earlier test's one, then this job's two tries
    cli = run_cli(settings, "generate", "too big", "--release", RELEASE, "--width", "512", "--height", "512",
                  "--steps", "2")
    assert cli.exit_code == 1
    assert cli.output.count("\n") == 1 and "JobRefused: out of device memory for 512x512" in cli.output
    assert "Traceback" not in cli.output


def test_device_memory_reaches_status_and_metrics(settings, producer, fleet):
    producer.generate.delay("a memory sample", seed=3, release=RELEASE, steps=2).get(timeout=120)
    status = run_cli(settings, "status", "--json")
    assert status.exit_code == 0, status.output
    rows = {w["worker"]: w for w in json.loads(status.output)["workers"]}
    for name in fleet["workers"]:
        memory = rows[full(settings, name)]["memory"]
        assert (memory["mem_allocated"], memory["mem_reserved"], memory["mem_total"]) == MEMORY
        assert memory["l1_bytes"] > 0
    text = run_cli(settings, "status").output
    assert "3.0/4.0/4.0/80.0" in text
    metrics = exported(redis.Redis.from_url(settings.broker_url))
    worker, node = full(settings, "ok"), settings.node_name
    labels = {"worker": worker, "node": node, "device": "cpu"}
    assert metrics[("warmfleet_device_memory_bytes", frozenset({**labels, "kind": "total"}.items()))] == MEMORY[2]
    assert metrics[("warmfleet_device_memory_bytes", frozenset({**labels, "kind": "allocated"}.items()))] == MEMORY[0]
    by_release = ("warmfleet_release_device_memory_bytes", frozenset({"release": RELEASE, "kind": "reserved"}.items()))
    assert metrics[by_release] == 2 * MEMORY[1]
    assert metrics[("warmfleet_l1_resident_bytes", frozenset({"worker": worker, "node": node}.items()))] > 0


def test_a_persistent_device_error_makes_the_worker_sick_and_no_job_is_lost(settings, producer, fleet):
    client = redis.Redis.from_url(settings.broker_url)
    (fleet["logs"] / "sick.lost").touch()  # from now on every pipeline call of `sick` fails as a dead context would
    jobs = [producer.generate.delay(f"job {i}", seed=100 + i, release=RELEASE, steps=2) for i in range(12)]
    results = [r.get(timeout=180) for r in jobs]
    assert {r["worker"] for r in results} == {full(settings, "ok")}
    assert DeadLetters(client).list(100) == []

    registry = WarmRegistry(client)
    sick = {w.worker: w for w in registry.workers()}[full(settings, "sick")]
    assert sick.state == "sick" and "illegal memory access" in sick.error and "\n" not in sick.error
    assert registry.warm_workers(RELEASE)[RELEASE] == [full(settings, "ok")]
    assert fleet["workers"]["sick"].proc.poll() is None  # alive, for the orchestrator to restart

    health = run_cli(settings, "health", "--worker", full(settings, "sick"))
    assert health.exit_code == 1 and "sick" in health.output and "illegal memory access" in health.output
    assert run_cli(settings, "health", "--worker", full(settings, "ok")).exit_code == 0
    status = run_cli(settings, "status").output
    assert any(line.startswith(full(settings, "sick")) and " sick " in line and "reason: " in line
               for line in status.splitlines())

    # its consumers are cancelled: new jobs all go to the healthy peer, and the sick one runs nothing more
    calls_before = fleet["workers"]["sick"].log_text().count("illegal memory access")
    more = [producer.generate.delay(f"later {i}", seed=200 + i, release=RELEASE, steps=2) for i in range(4)]
    assert {r.get(timeout=120)["worker"] for r in more} == {full(settings, "ok")}
    time.sleep(1)
    assert fleet["workers"]["sick"].log_text().count("illegal memory access") == calls_before

    metrics = exported(client)
    sick_labels = {"worker": full(settings, "sick"), "node": settings.node_name}
    assert metrics[("warmfleet_worker_state", frozenset({**sick_labels, "state": "sick"}.items()))] == 1
    assert metrics[("warmfleet_worker_state", frozenset({**sick_labels, "state": "warm"}.items()))] == 0


def test_bad_requests_never_count_towards_the_breaker(settings, producer, fleet):
    """The healthy worker refuses many over-size jobs in a row (each its own fault) and stays warm."""
    refused = [producer.generate.delay(f"big {i}", seed=i, release=RELEASE, steps=2, width=512, height=512)
               for i in range(settings.failure_breaker + 2)]
    for r in refused:
        with pytest.raises(producer.JobRefused):
            r.get(timeout=120)
    client = redis.Redis.from_url(settings.broker_url)
    ok = {w.worker: w for w in WarmRegistry(client).workers()}[full(settings, "ok")]
    assert ok.state == "warm"
