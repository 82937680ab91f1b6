"""Per-release job counters (fleetstate/jobstats.py), their export on /metrics, and image provenance chunks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest

from fleetctl.metrics import FleetCollector
from fleetstate import jobstats
from fleetstate.routes import RouteTable
from workers.provenance import provenance, with_text

OLD, NEW = "nano-banana@base-v1.0.0+lora-v2.3.0", "nano-banana@base-v1.0.0+lora-v2.3.1"


def test_counters_windows_and_quantiles(redis_server):
    client = redis_server.client()
    client.flushall()
    before = jobstats.read(client, NEW)
    for ms in (30, 40, 200, 800):
        jobstats.record_served(client, NEW, {"queued_ms": 1, "inference_ms": ms / 2, "total_ms": ms})
    jobstats.record_failed(client, NEW, "bad_request")
    jobstats.record_failed(client, NEW, "weird")
    window = jobstats.read(client, NEW).minus(before)
    assert window.served == 4 and window.failures == 2 and window.failed["other"] == 1
    assert window.failure_rate == 2 / 6
    p95 = window.quantile(0.95)
    assert 0.5 < p95 <= 1.0  # the slowest job sits in the (0.5, 1] bucket
    assert window.quantile(0.5) <= 0.25
    assert jobstats.ReleaseStats.from_json(window.to_json()) == window


def test_metrics_export_per_release_and_only_known_releases(redis_server):
    client = redis_server.client()
    client.flushall()
    table = RouteTable(client)
    table.set_active(OLD, actor="test")
    table.set_canary(NEW, 10, actor="test")
    jobstats.record_served(client, OLD, {"queued_ms": 5, "inference_ms": 100, "total_ms": 120})
    jobstats.record_failed(client, NEW, "time_limit")
    jobstats.record_served(client, "nano-banana@base-v9.0.0", {"total_ms": 1})  # no route, no worker, no queue
    registry = CollectorRegistry()
    registry.register(FleetCollector(client))
    text = generate_latest(registry).decode()
    assert f'warmfleet_jobs_served_total{{model="nano-banana",release="{OLD}"}} 1.0' in text
    assert f'warmfleet_jobs_failed_total{{model="nano-banana",reason="time_limit",release="{NEW}"}} 1.0' in text
    assert f'warmfleet_job_total_seconds_bucket{{le="0.25",model="nano-banana",release="{OLD}"}} 1.0' in text
    assert f'warmfleet_job_total_seconds_bucket{{le="0.1",model="nano-banana",release="{OLD}"}} 0.0' in text
    assert "base-v9.0.0" not in text


def test_png_provenance_reads_back_with_pillow():
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
    params = {"seed": 7, "steps": 4, "guidance": 5.0, "width": 8, "height": 8}
    png = with_text(buf.getvalue(), provenance("a red ☂ circle", params, NEW))
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.text["warmfleet:release"] == NEW
    assert image.text["warmfleet:prompt"] == "a red ☂ circle"
    assert image.text["warmfleet:seed"] == "7" and image.text["warmfleet:steps"] == "4"
    assert image.text["parameters"].startswith("a red ☂ circle\nSteps: 4, CFG scale: 5.0, Seed: 7, Size: 8x8")
    assert np.array_equal(np.asarray(image), np.full((8, 8, 3), 200, np.uint8))
