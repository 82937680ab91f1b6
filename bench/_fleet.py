"""A small real fleet for benchmarks: a private redis-server, the demo release in a local archive, warm workers.

The same parts as the integration tests (tests/support.py): real processes, nothing mocked. Workers run one torch
thread each, as in production one process per GPU.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.settings import FleetSettings, offline_environment  # noqa: E402

offline_environment()

from fleetctl.demo.builders import (  # noqa: E402
    DEMO_MODEL,
    DEMO_RELEASES,
    LARGE_DEMO_MODEL,
    LARGE_DEMO_RELEASE,
    LARGE_DEMO_VERSIONS,
    RANDOM_DEMO_VERSIONS,
)

RELEASE = DEMO_RELEASES[1]  # nano-banana@base-v1.1.0+lora-v2.3.1: tiny SDXL + LoRA
RELEASE_VERSIONS = [v for v in RANDOM_DEMO_VERSIONS if v.model == DEMO_MODEL and v.version in ("v1.1.0", "v2.3.1")]


@dataclass(frozen=True)
class BenchModel:
    """A release the byte-bound benchmarks (cold start, L2 load) can measure, by `--size`."""

    model: str
    release: str
    versions: tuple[Any, ...]
    suffix: str  # appended to result names and section names, so each size keeps its own entries


SIZES = {
    "tiny": BenchModel(DEMO_MODEL, RELEASE, tuple(RELEASE_VERSIONS), ""),  # 7 MB: what the tests and fleet use
    "large": BenchModel(LARGE_DEMO_MODEL, LARGE_DEMO_RELEASE, LARGE_DEMO_VERSIONS, "_large"),  # ~0.6 GB
}


def publish_release(archive: Any, workdir: Path, size: str = "tiny") -> None:
    """Build the benchmark release's models offline (seeded) and publish them into `archive`."""
    from fleetctl.demo.builders import publish_demo

    publish_demo(archive, workdir, versions=SIZES[size].versions, log=lambda *_: None)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): no interpolation, so p99 of 1000 samples is a real sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Fleet:
    settings: FleetSettings
    tasks: Any
    workers: dict[str, Any] = field(default_factory=dict)  # short name → tests.support.WorkerProc
    release: str = RELEASE  # what the workers serve and the helpers below send to

    def full_name(self, name: str) -> str:
        return f"{name}@{self.settings.node_name}"

    def pause(self, *names: str) -> None:
        """The worker stops consuming the release's queue (Celery remote control), so jobs can pile up."""
        from cachemgr.names import queue_for

        for name in names:
            self.tasks.app.control.cancel_consumer(queue_for(self.release), destination=[self.full_name(name)],
                                                   reply=True, timeout=10)

    def resume(self, *names: str) -> None:
        from cachemgr.names import queue_for

        for name in names:
            self.tasks.app.control.add_consumer(queue_for(self.release), destination=[self.full_name(name)],
                                                reply=True, timeout=10)

    def queue_depth(self) -> int:
        import redis

        from cachemgr.names import queue_for

        return int(redis.Redis.from_url(self.settings.broker_url).llen(queue_for(self.release)))

    def submit(self, count: int, **params: Any) -> list[Any]:
        return [self.tasks.generate.delay(f"bench job {i}", seed=i, release=self.release, **params)
                for i in range(count)]

    def run(self, count: int, timeout: float = 600, **params: Any) -> tuple[float, list[dict[str, Any]]]:
        """Queue `count` jobs at once and wait for all; returns (seconds from first send to last result, results)."""
        started = time.perf_counter()
        pending = self.submit(count, **params)
        results = [r.get(timeout=timeout) for r in pending]
        return time.perf_counter() - started, results


@contextmanager
def fleet(workdir: Path, workers: dict[str, dict[str, Any]], archive_dir: Path | None = None,
          release: str = RELEASE, entry: str | None = None,
          env: dict[str, str] | None = None) -> Iterator[Fleet]:
    """Start redis and the named workers (each with its own settings overrides), all warm on `release`; `entry` and
    `env`: another module to run them with (`python -m entry worker …`) and extra environment."""
    from cachemgr import LocalArchive
    from tests.support import RedisServer, start_worker, wait_warm

    workdir.mkdir(parents=True, exist_ok=True)
    if archive_dir is None:
        archive_dir = workdir / "archive"
        publish_release(LocalArchive(archive_dir), workdir / "build")
    server = RedisServer(workdir / "redis", appendonly=False).start()
    procs = []
    try:
        settings = FleetSettings(home=workdir / "home", broker_url=server.url, archive_url=archive_dir.as_uri(),
                                 torch_threads=1, heartbeat_seconds=2.0, warm_ttl_seconds=8.0, route_cache_ttl=0.0,
                                 node_name="benchnode")
        import tasks

        tasks.configure(settings)
        for name, overrides in workers.items():
            procs.append((name, start_worker(settings.model_copy(update=overrides), [release], name,
                                             workdir / "logs", wait=False, entry=entry, **(env or {}))))
        for _, proc in procs:
            wait_warm(settings, proc, timeout=300)
        yield Fleet(settings, tasks, dict(procs), release)
    finally:
        for _, proc in procs:
            proc.stop()
        try:
            import tasks

            tasks.app.pool.force_close_all()
        except Exception:
            pass
        server.stop()
