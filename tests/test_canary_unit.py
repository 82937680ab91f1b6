"""The canary analysis' judgement (fleetstate/canary.py) over the fleet's own counters, on a driven clock."""

from __future__ import annotations

import pytest

import beat_schedule
from fleetstate import canary, jobstats
from fleetstate.routes import RouteTable
from tasks.settings import FleetSettings

OLD, NEW = "nano-banana@base-v1.0.0+lora-v2.3.0", "nano-banana@base-v1.0.0+lora-v2.3.1"
BOUNDS = canary.Bounds(window_s=60, steps=(10, 50, 100), max_failure_delta=0.05, max_p95_ratio=1.5, p95_slack_s=0.05,
                       min_jobs=4)


@pytest.fixture
def client(redis_server):
    client = redis_server.client()
    client.flushall()
    table = RouteTable(client)
    table.set_active(OLD, actor="test")
    table.set_canary(NEW, 10, actor="test")
    return client


def serve(client, release: str, n: int, total_ms: float) -> None:
    for _ in range(n):
        jobstats.record_served(client, release, {"queued_ms": 1, "inference_ms": total_ms - 1, "total_ms": total_ms})


def test_steps_up_only_after_a_full_window_with_enough_jobs(client):
    canary.start(client, "nano-banana", NEW, BOUNDS, now=0)
    serve(client, OLD, 20, 200)
    serve(client, NEW, 3, 210)
    assert canary.tick(client, BOUNDS, now=61) == {"nano-banana": ""}  # 3 < min_jobs: the window goes on
    serve(client, NEW, 1, 210)
    assert canary.tick(client, BOUNDS, now=30) == {"nano-banana": ""}  # enough jobs, window not over
    assert canary.tick(client, BOUNDS, now=62) == {"nano-banana": "stepped to 50%"}
    assert RouteTable(client).get("nano-banana").canary_weight == 50
    serve(client, NEW, 4, 220)
    assert canary.tick(client, BOUNDS, now=100) == {"nano-banana": ""}  # a new window started at 62
    assert canary.tick(client, BOUNDS, now=123)["nano-banana"].startswith("promoted")
    assert RouteTable(client).get("nano-banana").active == NEW
    assert canary.tick(client, BOUNDS, now=200) == {}  # nothing runs any more


def test_slow_canary_is_rolled_back_with_the_reason_in_history(client):
    canary.start(client, "nano-banana", NEW, BOUNDS, now=0)
    serve(client, OLD, 20, 200)
    serve(client, NEW, 5, 2000)
    assert canary.tick(client, BOUNDS, now=61)["nano-banana"].startswith("rolled-back: p95 total latency")
    route = RouteTable(client).get("nano-banana")
    assert route.canary is None and route.active == OLD
    assert RouteTable(client).history("nano-banana", 1)[0]["reason"].startswith("canary-analysis rollback: p95")


def test_failing_canary_is_rolled_back_before_its_window_ends(client):
    canary.start(client, "nano-banana", NEW, BOUNDS, now=0)
    serve(client, OLD, 20, 200)
    jobstats.record_failed(client, OLD, "other")  # the active fails too, at 1/21
    serve(client, NEW, 2, 200)
    for _ in range(2):
        jobstats.record_failed(client, NEW, "out_of_memory")
    assert canary.tick(client, BOUNDS, now=5)["nano-banana"].startswith("rolled-back: failure rate")
    assert canary.read(client, "nano-banana")["state"] == "rolled-back"


def test_one_analysis_per_model_and_a_hand_change_ends_it(client):
    canary.start(client, "nano-banana", NEW, BOUNDS, now=0)
    with pytest.raises(canary.AnalysisError, match="already runs"):
        canary.start(client, "nano-banana", NEW, BOUNDS, now=1)
    RouteTable(client).clear_canary("nano-banana", actor="someone")
    assert canary.tick(client, BOUNDS, now=2)["nano-banana"] == "abandoned: the route was changed by hand"
    with pytest.raises(canary.AnalysisError, match="not the canary"):
        canary.start(client, "nano-banana", NEW, BOUNDS, now=3)


def test_bounds_come_from_settings_and_beat_runs_the_tick():
    settings = FleetSettings(canary_steps="5,20,100", canary_window_s=30, canary_min_jobs=9, canary_tick_s=2)
    bounds = canary.Bounds.of(settings)
    assert bounds.steps == (5, 20, 100) and bounds.window_s == 30 and bounds.min_jobs == 9
    entry = beat_schedule.build_schedule(settings)["canary-analysis"]
    assert entry["task"] == beat_schedule.CANARY_TICK_TASK and entry["schedule"].seconds == 2
