"""The fleet's Prometheus exporter and its alert. One per fleet; it reads Redis at each scrape, so it
sees every node's counters, every worker's heartbeat and every release queue, consumed or not."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cachemgr import EventLog
from cachemgr.names import Release, queue_for
from fleetstate.keys import ALERTS_KEY
from fleetstate.queues import oldest_waiting, queue_depths, queued_releases
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable
from fleetstate.stats import FleetStats, cache_status, node_sync_bytes
from tasks.settings import FleetSettings

from .metrics_gpu import worker_families
from .metrics_jobs import job_families
from .metrics_peers import peer_families

log = logging.getLogger("warmfleet.metrics")


def known_releases(client: redis.Redis) -> set[str]:
    """Every release with a route, a warm worker or jobs waiting (queues nobody consumes included)."""
    table = RouteTable(client)
    releases: set[str] = set(WarmRegistry(client).warm_workers())
    for model in table.models():
        route = table.get(model)
        releases.update(release for _, release in route.referenced())
    releases.update(queued_releases(client))  # every model's, routed or not
    return releases


class FleetCollector(Collector):
    def __init__(self, client: redis.Redis, alert: MissRateAlert | None = None) -> None:
        self.redis = client
        self.alert = alert

    def collect(self) -> Iterator[Any]:
        stats = FleetStats(self.redis).snapshot()
        status = cache_status(stats)

        hits = CounterMetricFamily("warmfleet_cache_hits", "Cache hits per tier (L1: jobs served by a resident "
                                   "pipeline; L2: versions already on a node's disk)", labels=["tier"])
        hits.add_metric(["l1"], stats.get("l1_hits", 0))
        hits.add_metric(["l2"], stats.get("l2_lookups_hit", 0))
        yield hits
        misses = CounterMetricFamily("warmfleet_cache_misses", "Cache misses per tier (L1: a job that needed a "
                                     "load — never by design; L2: versions fetched from L3)", labels=["tier"])
        misses.add_metric(["l1"], stats.get("l1_misses", 0))
        misses.add_metric(["l2"], stats.get("l2_lookups_miss", 0))
        yield misses
        moved = CounterMetricFamily("warmfleet_cache_bytes", "Bytes nodes needed, by where they came from",
                                    labels=["source"])
        moved.add_metric(["l2_reused"], stats.get("l2_bytes_hit", 0))
        moved.add_metric(["l3_fetched"], stats.get("l3_bytes_fetched", 0))
        moved.add_metric(["peers_fetched"], stats.get("peer_bytes_fetched", 0))
        yield moved
        per_node = CounterMetricFamily("warmfleet_node_sync_bytes", "Bytes each node's syncs fetched, from its "
                                       "peers or from L3", labels=["node", "source"])
        for node, sources in node_sync_bytes(stats).items():
            for source, value in sources.items():
                per_node.add_metric([node, source], value)
        yield per_node
        yield from peer_families(self.redis)
        ratio = GaugeMetricFamily("warmfleet_cache_hit_ratio", "Share of bytes or jobs served by each tier",
                                  labels=["tier"])
        for tier, key in (("l1", "l1_hit_ratio"), ("l2", "l2_hit_ratio")):
            if status[key] is not None:
                ratio.add_metric([tier], status[key])
        yield ratio

        loads = CounterMetricFamily("warmfleet_model_loads", "Pipelines loaded into device memory (L1 loads)")
        loads.add_metric([], stats.get("l1_loads", 0))
        yield loads
        failures = CounterMetricFamily("warmfleet_model_load_failures", "Workers whose model failed to load")
        failures.add_metric([], stats.get("l1_load_failures", 0))
        yield failures
        rejected = CounterMetricFamily("warmfleet_l2_verify_rejected", "Downloads refused by the sha256 check")
        rejected.add_metric([], stats.get("l2_verify_rejected", 0))
        yield rejected

        for kind in ("sync", "audit"):
            runs = CounterMetricFamily(f"warmfleet_{kind}_runs", f"{kind.title()} runs by outcome", labels=["outcome"])
            for key, value in stats.items():
                if key.startswith(f"{kind}_runs_"):
                    runs.add_metric([key.removeprefix(f"{kind}_runs_")], value)
            yield runs
            last = GaugeMetricFamily(f"warmfleet_{kind}_last_duration_seconds", f"Duration of the last {kind}")
            last.add_metric([], stats.get(f"{kind}_last_seconds", 0))
            yield last
            at = GaugeMetricFamily(f"warmfleet_{kind}_last_timestamp_seconds", f"When the last {kind} ran")
            at.add_metric([], stats.get(f"{kind}_last_at", 0))
            yield at

        registry = WarmRegistry(self.redis)
        warm = registry.warm_workers()
        releases = known_releases(self.redis)
        warm_gauge = GaugeMetricFamily("warmfleet_warm_workers", "Workers warm on each release", labels=["release"])
        for release in sorted(releases | set(warm)):
            warm_gauge.add_metric([release], len(warm.get(release, [])))
        yield warm_gauge
        per_worker = GaugeMetricFamily("warmfleet_worker_loads", "Pipelines each live worker process has loaded",
                                       labels=["worker", "state"])
        states = registry.workers()
        for state in states:
            per_worker.add_metric([state.worker, state.state], state.loads)
        yield per_worker

        yield from worker_families(RouteTable(self.redis), states)
        yield from job_families(self.redis, releases)

        queues = {queue_for(r): r for r in releases}
        depths = queue_depths(self.redis, sorted(queues))
        depth = GaugeMetricFamily("warmfleet_queue_depth", "Jobs waiting in a release queue, summed over its "
                                  "priority lists (consumed or not)", labels=["queue", "release", "model"])
        for queue, n in depths.items():
            depth.add_metric([queue, queues[queue], Release.parse(queues[queue]).model], n)
        yield depth
        yield from _waiting_families(self.redis, queues, depths, warm)

        if self.alert is not None:
            firing = GaugeMetricFamily("warmfleet_alert_firing", "1 while an alert fires", labels=["alert"])
            firing.add_metric([self.alert.name], 1.0 if self.alert.firing_since else 0.0)
            yield firing
            window = GaugeMetricFamily("warmfleet_l3_miss_ratio_window", "Share of needed bytes fetched from L3 "
                                       "over the alert window")
            if self.alert.last_ratio is not None:
                window.add_metric([], self.alert.last_ratio)
            yield window


def _waiting_families(client: redis.Redis, queues: dict[str, str], depths: dict[str, int],
                      warm: dict[str, list[str]]) -> Iterator[Any]:
    """How long each release queue's oldest job has waited (0 when empty); and the same for queues no warm worker
    consumes (0 for a served or empty one): stranded jobs, on which WarmfleetJobsStranded
    (docker/prometheus/rules.yml) fires."""
    ages = oldest_waiting(client, sorted(q for q, n in depths.items() if n))
    labels = ["queue", "release", "model"]
    oldest = GaugeMetricFamily("warmfleet_queue_oldest_age_seconds", "How long the oldest job waiting in a release "
                               "queue has waited (0: none waits)", labels=labels)
    unserved = GaugeMetricFamily("warmfleet_unserved_queue_oldest_age_seconds", "How long the oldest job has "
                                 "waited in a release queue that no warm worker consumes (stranded jobs; 0: none)",
                                 labels=labels)
    for queue in sorted(depths):
        release = queues[queue]
        age = ages.get(queue) or 0.0
        row = [queue, release, Release.parse(release).model]
        oldest.add_metric(row, age)
        unserved.add_metric(row, 0.0 if warm.get(release) else age)
    yield oldest
    yield unserved


class MissRateAlert:
    """Fires when the share of needed bytes fetched from L3, over a trailing window, has stayed above the
    threshold for the whole window (like a Prometheus rule with `for:`). Resolves when it drops below."""

    name = "l3_miss_rate"

    def __init__(self, client: redis.Redis, events: EventLog, threshold: float, window: float,
                 webhook: str | None = None, clock: Any = time.time) -> None:
        self.redis = client
        self.events = events
        self.threshold = threshold
        self.window = window
        self.webhook = webhook
        self.clock = clock
        self.samples: deque[tuple[float, float, float]] = deque()
        self.pending_since: float | None = None
        self.firing_since: float | None = None
        self.last_ratio: float | None = None

    def evaluate(self) -> str | None:
        """Take a sample and update the state; returns "FIRING"/"RESOLVED" when the state changes."""
        now = self.clock()
        stats = FleetStats(self.redis).snapshot()
        self.samples.append((now, stats.get("l3_bytes_fetched", 0.0),
                             stats.get("l2_bytes_hit", 0.0) + stats.get("peer_bytes_fetched", 0.0)))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        t0, fetched0, reused0 = self.samples[0]
        fetched, reused = self.samples[-1][1] - fetched0, self.samples[-1][2] - reused0
        self.last_ratio = fetched / (fetched + reused) if fetched + reused > 0 else None
        above = self.last_ratio is not None and self.last_ratio > self.threshold
        if not above:
            self.pending_since = None
            if self.firing_since is not None:
                self.firing_since = None
                self._notify("RESOLVED", now)
                return "RESOLVED"
            return None
        if self.pending_since is None:
            self.pending_since = now
        if self.firing_since is None and now - self.pending_since >= self.window:
            self.firing_since = now
            self._notify("FIRING", now)
            return "FIRING"
        return None

    def _notify(self, state: str, now: float) -> None:
        body = {"alert": self.name, "state": state, "l3_miss_ratio": self.last_ratio, "threshold": self.threshold,
                "window_seconds": self.window, "at": now}
        self.events.emit("ALERT", outcome=state, alert=self.name, l3_miss_ratio=round(self.last_ratio or 0, 5),
                         threshold=self.threshold, window_seconds=self.window)
        try:
            if state == "FIRING":
                self.redis.hset(ALERTS_KEY, self.name, json.dumps(body))
            else:
                self.redis.hdel(ALERTS_KEY, self.name)
        except redis.RedisError:
            pass
        if self.webhook:
            request = urllib.request.Request(self.webhook, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=5).close()
            except OSError as exc:
                log.warning("alert webhook %s failed: %s", self.webhook, exc)


def serve_metrics(settings: FleetSettings, port: int | None = None, stop: threading.Event | None = None) -> None:
    """Expose /metrics on 127.0.0.1 (set FLEET_METRICS_ADDRESS to bind elsewhere) and evaluate the alert."""
    from prometheus_client import CollectorRegistry, start_http_server

    client = settings.state_client()
    events = EventLog(settings.event_log_path, settings.node_name, sinks=[FleetStats(client).sink])
    alert = MissRateAlert(client, events, settings.alert_l3_miss_ratio, settings.alert_window_seconds,
                          settings.alert_webhook_url)
    registry = CollectorRegistry()
    registry.register(FleetCollector(client, alert))
    server, thread = start_http_server(port or settings.metrics_port, addr=settings.metrics_address,
                                       registry=registry)
    stop = stop or threading.Event()
    try:
        while not stop.wait(settings.alert_eval_seconds):
            try:
                alert.evaluate()
            except redis.RedisError as exc:
                log.warning("alert evaluation skipped: %s", exc)
    finally:
        server.shutdown()
