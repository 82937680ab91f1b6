"""Per-release job metrics for `warmfleet metrics`: jobs served, jobs failed by reason and latency histograms (queued,
inference, total), labelled by model and release. Read from the counters the workers keep (fleetstate/jobstats.py);
only releases the route table, the warm registry or a queue knows are exported, so the label set stays bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from cachemgr.names import Release
from fleetstate import jobstats


def job_families(client: redis.Redis, releases: set[str]) -> Iterator[Any]:
    labels = ["model", "release"]
    served = CounterMetricFamily("warmfleet_jobs_served", "Jobs served per release (review jobs not counted)",
                                 labels=labels)
    failed = CounterMetricFamily("warmfleet_jobs_failed", "Jobs failed per release, by reason (bad_request, "
                                 "out_of_memory, time_limit, other)", labels=[*labels, "reason"])
    histograms = {kind: HistogramMetricFamily(f"warmfleet_job_{kind}_seconds", f"Per-release {kind} time of served "
                                              "jobs", labels=labels) for kind in jobstats.KINDS}
    counted = sorted(jobstats.counted_releases(client) & releases)
    for release, stats in jobstats.read_many(client, counted).items():
        row = [Release.parse(release).model, release]
        served.add_metric(row, stats.served)
        for reason in jobstats.REASONS:
            failed.add_metric([*row, reason], stats.failed.get(reason, 0))
        for kind, family in histograms.items():
            cumulative, buckets = 0, []
            for bound, n in zip(jobstats.BUCKETS, stats.buckets[kind], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            family.add_metric(row, buckets, stats.sums[kind])
    yield served
    yield failed
    yield from histograms.values()
