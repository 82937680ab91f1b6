"""Metric families about worker processes and their devices: state (warm, sick, …), device memory per worker and
per release, the L1 bytes each holds, and which releases are routed (for the "routed but nobody warm" alert).
On CPU workers the memory figures are 0: the series exist, so dashboards and alerts read the same everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from fleetstate.registry import WorkerState
from fleetstate.routes import RouteTable

MEMORY_KINDS = {"allocated": "mem_allocated", "reserved": "mem_reserved", "total": "mem_total", "peak": "mem_peak"}
WORKER_STATES = ("loading", "warm", "sick", "failed", "stopping")


def worker_families(table: RouteTable, states: list[WorkerState]) -> Iterator[Any]:
    """`states`: the registry's workers, as the scrape read them (once per scrape)."""
    state = GaugeMetricFamily("warmfleet_worker_state", "1 for the state each live worker process is in "
                              "(sick: its jobs kept failing; it stopped consuming)", labels=["worker", "node", "state"])
    for w in states:
        for name in sorted({*WORKER_STATES, w.state}):
            state.add_metric([w.worker, w.node, name], 1.0 if w.state == name else 0.0)
    yield state
    memory = GaugeMetricFamily("warmfleet_device_memory_bytes", "Device memory of each worker's device, as its "
                               "allocator sees it (peak: since the worker started)",
                               labels=["worker", "node", "device", "kind"])
    per_release: dict[tuple[str, str], int] = {}
    for w in states:
        for kind, attr in MEMORY_KINDS.items():
            memory.add_metric([w.worker, w.node, w.device, kind], float(getattr(w, attr)))
            for release in w.releases:
                per_release[(release, kind)] = per_release.get((release, kind), 0) + getattr(w, attr)
    yield memory
    by_release = GaugeMetricFamily("warmfleet_release_device_memory_bytes", "Device memory summed over the workers "
                                   "serving each release", labels=["release", "kind"])
    for (release, kind), value in sorted(per_release.items()):
        by_release.add_metric([release, kind], float(value))
    yield by_release
    resident = GaugeMetricFamily("warmfleet_l1_resident_bytes", "Bytes held by each worker's loaded pipelines "
                                 "(parameters and buffers)", labels=["worker", "node"])
    for w in states:
        resident.add_metric([w.worker, w.node], float(w.l1_bytes))
    yield resident
    routed = GaugeMetricFamily("warmfleet_routed_release", "1 for each release a route sends jobs to",
                               labels=["model", "release", "role"])
    for model in table.models():
        for role, release in table.get(model).referenced():
            routed.add_metric([model, release, role], 1.0)
    yield routed
