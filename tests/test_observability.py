"""What the fleet shows: Prometheus metrics, the L3 miss-rate alert, Flower, the cache event log."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from cachemgr import EventLog
from cachemgr.events import render
from fleetctl.localfleet import free_port, wait_port
from fleetctl.metrics import MissRateAlert
from fleetstate.stats import FleetStats, cache_status, render_cache_status

from .support import REPO, child_env

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Hook.received
    server.shutdown()


@pytest.fixture
def exporter(fleet_settings, webhook, tmp_path):
    port = free_port()
    settings = fleet_settings.model_copy(update={
        "alert_window_seconds": 1.0, "alert_eval_seconds": 0.1, "alert_webhook_url": webhook[0],
        "alert_l3_miss_ratio": 0.01})
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "metrics", "--port", str(port)],
                            env=child_env(settings), cwd=REPO, stdout=open(tmp_path / "metrics.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port)
    yield port, settings
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


def test_metrics_show_warm_workers_loads_jobs_and_queue_depth_of_unconsumed_queues(fleet_settings, producer,
                                                                                   two_workers, exporter):
    port, _ = exporter
    old, new = two_workers["releases"]
    producer.generate.delay("counted", seed=1).get(timeout=120)
    nobody = "nano-banana@base-v1.0.0+lora-v2.3.1"  # archived (a producer may pin it), served by no worker
    for i in range(3):
        producer.generate.delay(f"waiting {i}", release=nobody)
    for i in range(2):
        producer.generate.apply_async(args=[f"urgent {i}"], kwargs={"release": nobody}, priority=6)
    client = redis.Redis.from_url(fleet_settings.broker_url)
    assert client.llen(f"release.{nobody}") == 3  # the plain list alone would undercount
    text = scrape(port)
    assert metric(text, "warmfleet_queue_depth", release=nobody) == 5
    assert metric(text, "warmfleet_queue_depth", release=new) == 0
    assert metric(text, "warmfleet_warm_workers", release=old) == 1
    assert metric(text, "warmfleet_warm_workers", release=new) == 1
    assert metric(text, "warmfleet_model_loads_total") == 2
    assert metric(text, "warmfleet_worker_loads", worker="w-new@testnode", state="warm") == 1
    assert metric(text, "warmfleet_cache_hits_total", tier="l1") >= 1
    assert metric(text, "warmfleet_cache_bytes_total", source="l3_fetched") > 0
    client.delete(f"release.{nobody}", f"release.{nobody}\x06\x166")


def test_the_alert_fires_when_l3_misses_stay_high_and_resolves_after(fleet_settings, exporter, webhook):
    port, settings = exporter
    events = EventLog(settings.event_log_path, "testnode", sinks=[FleetStats(redis.Redis.from_url(settings.broker_url)).sink])
    deadline = time.monotonic() + 30
    while not any(h["state"] == "FIRING" for h in webhook[1]) and time.monotonic() < deadline:
        events.emit("L2_SYNC", outcome="UPDATED", model="m", component="base", version="v9",
                    bytes_fetched=5000, bytes_reused=100)
        time.sleep(0.1)
    firing = [h for h in webhook[1] if h["state"] == "FIRING"]
    assert firing and firing[0]["alert"] == "l3_miss_rate" and firing[0]["l3_miss_ratio"] > 0.01
    assert metric(scrape(port), "warmfleet_alert_firing", alert="l3_miss_rate") == 1
    deadline = time.monotonic() + 30
    while not any(h["state"] == "RESOLVED" for h in webhook[1]) and time.monotonic() < deadline:
        events.emit("L2_SYNC", outcome="UNCHANGED", model="m", component="base", version="v9",
                    bytes_fetched=0, bytes_reused=10**9)
        time.sleep(0.1)
    assert any(h["state"] == "RESOLVED" for h in webhook[1])
    assert metric(scrape(port), "warmfleet_alert_firing", alert="l3_miss_rate") == 0
    logged = [e["outcome"] for e in EventLog(settings.event_log_path).read() if e["event"] == "ALERT"]
    assert logged[:2] == ["FIRING", "RESOLVED"]


def test_flower_binds_to_loopback_asks_for_credentials_and_shows_the_workers(fleet_settings, two_workers, tmp_path):
    port = free_port()
    settings = fleet_settings.model_copy(update={"flower_password": "s3cret"})
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", "--address=127.0.0.1", f"--port={port}",
            f"--basic-auth={settings.flower_user}:{settings.flower_password}"]
    proc = subprocess.Popen(argv, env=child_env(settings), cwd=REPO, stdout=open(tmp_path / "flower.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, timeout=30)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=10)
        assert denied.value.code == 401
        token = base64.b64encode(b"admin:s3cret").decode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                                         headers={"Authorization": f"Basic {token}"})
        deadline = time.monotonic() + 60
        workers = {}
        while time.monotonic() < deadline and not {"w-old@testnode", "w-new@testnode"} <= set(workers):
            with urllib.request.urlopen(request, timeout=30) as r:
                workers = json.loads(r.read())
            time.sleep(0.5)
        assert {"w-old@testnode", "w-new@testnode"} <= set(workers)
        queues = {q["name"] for q in workers["w-new@testnode"]["active_queues"]}
        assert queues == {f"release.{two_workers['releases'][1]}"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=10) as r:
            assert r.read() == b"OK"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


def test_the_cache_log_reads_at_a_glance(fleet_settings, two_workers):
    env = child_env(fleet_settings)
    out = subprocess.run([sys.executable, "-m", "fleetctl.cli", "cache", "log", "-n", "200"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"L2_SYNC model=nano-banana component=base version=v1\.1\.0 bytes_fetched=\S+ "
                     r"bytes_reused=\S+ from_peers=\S+ from_l3=\S+ seconds=\S+ → (UPDATED|UNCHANGED)", out.stdout), out.stdout
    assert re.search(r"L1_LOAD release=nano-banana@base-v1\.1\.0\+lora-v2\.3\.1 .*device=cpu .*bytes=\S+MB", out.stdout)
    assert "L2_WARMUP release=" in out.stdout
    raw = subprocess.run([sys.executable, "-m", "fleetctl.cli", "cache", "log", "--json"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert all(json.loads(line)["event"] for line in raw.stdout.splitlines())


def test_cache_status_line():
    status = cache_status({"l1_hits": 500, "l2_bytes_hit": 998, "l3_bytes_fetched": 2})
    assert render_cache_status(status) == "L1=HIT(100%) L2=HIT(99.8%) L3=MISS(0.2%)"
    assert render(
        {"ts": 0, "event": "L2_SYNC", "model": "m", "bytes_fetched": 12_100_000, "outcome": "UPDATED"}
    ).endswith("L2_SYNC model=m bytes_fetched=12.1MB → UPDATED")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_alert_needs_the_whole_window_above_the_threshold(redis_server, tmp_path):
    client = redis_server.client()
    client.delete("fleet:stats")
    stats = FleetStats(client)
    clock = Clock()
    alert = MissRateAlert(client, EventLog(tmp_path / "e.jsonl"), threshold=0.01, window=300, clock=clock)
    assert alert.evaluate() is None  # no traffic: no rate, no alert
    states = []
    for _ in range(30):  # 5 minutes at 2 % misses
        clock.now += 15
        stats.incr(l3_bytes_fetched=2, l2_bytes_hit=98)
        states.append(alert.evaluate())
    assert states.count("FIRING") == 1 and states.index("FIRING") >= 19  # pending ≥ 300 s before firing
    clock.now += 15
    stats.incr(l2_bytes_hit=10**6)
    assert alert.evaluate() == "RESOLVED"
    client.delete("fleet:stats")
