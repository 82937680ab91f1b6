"""Per-release job counters the workers keep in Redis: jobs served, jobs failed by reason, and latency histograms
(queued, inference, total), one hash per release. The exporter (fleetctl/metrics_jobs.py) reads them at each scrape;
the canary analysis (fleetstate/canary.py) compares two releases' deltas over a window.

Review jobs (`warmfleet review`) are never counted: they would skew a canary's figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

JOBSTATS_KEY = "fleet:jobstats:{release}"  # hash: served, failed:<reason>, b:<kind>:<i>, sum:<kind>
JOBSTATS_RELEASES = "fleet:jobstats:releases"  # set of releases with counters

BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
"""Upper bounds (seconds) of the latency histogram buckets; the last is +Inf."""
KINDS = ("queued", "inference", "total")
REASONS = ("bad_request", "out_of_memory", "time_limit", "other")
REVIEW_HEADER = "fleet_review"
"""A Celery header on review jobs: a worker that sees it counts nothing for the job's release."""


def bucket_index(seconds: float) -> int:
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS) - 1


def record_served(client: redis.Redis, release: str, timings: dict[str, Any]) -> None:
    """Count one served job of `release` with its timings (the result's `timings`, in ms)."""
    key = JOBSTATS_KEY.format(release=release)
    with client.pipeline(transaction=False) as pipe:
        pipe.sadd(JOBSTATS_RELEASES, release)
        pipe.hincrby(key, "served", 1)
        for kind in KINDS:
            ms = timings.get(f"{kind}_ms")
            if ms is None:
                continue
            seconds = max(0.0, float(ms) / 1000)
            pipe.hincrby(key, f"b:{kind}:{bucket_index(seconds)}", 1)
            pipe.hincrbyfloat(key, f"sum:{kind}", seconds)
        pipe.execute()


def record_failed(client: redis.Redis, release: str, reason: str) -> None:
    """Count one failed job of `release`; `reason` one of REASONS (anything else counts as "other")."""
    reason = reason if reason in REASONS else "other"
    with client.pipeline(transaction=False) as pipe:
        pipe.sadd(JOBSTATS_RELEASES, release)
        pipe.hincrby(JOBSTATS_KEY.format(release=release), f"failed:{reason}", 1)
        pipe.execute()


@dataclass
class ReleaseStats:
    """One release's counters at one moment; subtract two to get a window."""

    release: str
    served: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)  # kind → count per bucket (not cumulative)
    sums: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    @property
    def jobs(self) -> int:
        return self.served + self.failures

    @property
    def failure_rate(self) -> float | None:
        return self.failures / self.jobs if self.jobs else None

    def minus(self, before: ReleaseStats) -> ReleaseStats:
        return ReleaseStats(
            self.release, self.served - before.served,
            {r: n - before.failed.get(r, 0) for r, n in self.failed.items()},
            {k: [a - b for a, b in zip(v, before.buckets.get(k, [0] * len(v)), strict=True)]
             for k, v in self.buckets.items()},
            {k: v - before.sums.get(k, 0.0) for k, v in self.sums.items()},
        )

    def quantile(self, q: float, kind: str = "total") -> float | None:
        """Prometheus' histogram_quantile over the buckets (linear within a bucket); None with no observation."""
        counts = self.buckets.get(kind) or []
        total = sum(counts)
        if not total:
            return None
        rank, seen, lower = q * total, 0, 0.0
        for bound, n in zip(BUCKETS, counts, strict=True):
            if n and seen + n >= rank:
                if bound == float("inf"):
                    return lower
                return lower + (bound - lower) * (rank - seen) / n
            seen += n
            lower = bound if bound != float("inf") else lower
        return lower

    def to_json(self) -> dict[str, Any]:
        return {"release": self.release, "served": self.served, "failed": self.failed, "buckets": self.buckets,
                "sums": self.sums}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReleaseStats:
        return cls(data["release"], data["served"], data["failed"], data["buckets"], data["sums"])


def read(client: redis.Redis, release: str) -> ReleaseStats:
    return _from_hash(release, client.hgetall(JOBSTATS_KEY.format(release=release)))


def read_many(client: redis.Redis, releases: list[str]) -> dict[str, ReleaseStats]:
    """Several releases' counters in one round trip (the exporter reads every known release at each scrape)."""
    with client.pipeline(transaction=False) as pipe:
        for release in releases:
            pipe.hgetall(JOBSTATS_KEY.format(release=release))
        found = pipe.execute()
    return {release: _from_hash(release, raw) for release, raw in zip(releases, found, strict=True)}


def _from_hash(release: str, found: dict[bytes, bytes]) -> ReleaseStats:
    raw = {k.decode(): v.decode() for k, v in found.items()}
    return ReleaseStats(release, int(raw.get("served", 0)),
                        {r: int(raw.get(f"failed:{r}", 0)) for r in REASONS},
                        {k: [int(raw.get(f"b:{k}:{i}", 0)) for i in range(len(BUCKETS))] for k in KINDS},
                        {k: float(raw.get(f"sum:{k}", 0.0)) for k in KINDS})


def counted_releases(client: redis.Redis) -> set[str]:
    return {raw.decode() for raw in client.smembers(JOBSTATS_RELEASES)}
