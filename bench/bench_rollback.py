"""A rollback flip vs a plain Redis round trip, in one run.

    python bench/bench_rollback.py [--flips 200] [--pings 1000]

Starts a private redis-server (no persistence) and, in this process, a producer-side `FleetRouter` with a
10-minute route-cache TTL, so only the pub/sub invalidation can make it see a change. Two releases are announced
warm through the real registry (no model is loaded: a flip never touches a worker). Measured:
- ping: one `PING` round trip, the floor of anything done over Redis;
- flip: `fleetstate.rollout.rollback` (route read, warm check, WATCH/MULTI/EXEC that writes the route, its history
  entry and the pub/sub notice) until the producer's router has applied the invalidation and its next lookup
  returns the new release: the moment new jobs go to the new queue;
- lookup: one route lookup on the send path, from the cache, vs the same read from Redis.
Target: a flip under 50 ms (operators roll back in milliseconds, with no reload).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _results import entry, machine, merge_results, today, write_section  # noqa: E402

from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES  # noqa: E402
from fleetstate.registry import WarmRegistry, WorkerState  # noqa: E402
from fleetstate.rollout import rollback  # noqa: E402
from fleetstate.routes import RouteTable  # noqa: E402
from tasks.router import FleetRouter  # noqa: E402
from tests.support import RedisServer  # noqa: E402

FLIP_TARGET_MS = 50.0


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("redis", "celery", "kombu"))


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def measure_pings(client, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        client.ping()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure_flips(client, router: FleetRouter, count: int) -> list[float]:
    out = []
    for _ in range(count):
        before = RouteTable(client).get(DEMO_MODEL)
        expected = before.previous
        seen = router.cache.generation
        t0 = time.perf_counter()
        rollback(client, DEMO_MODEL, actor="bench")
        if not router.cache.wait_generation(seen, timeout=10):
            raise SystemExit("a flip never reached the producer's router; no figures recorded")
        active = router.active(DEMO_MODEL)
        out.append((time.perf_counter() - t0) * 1000)
        if active != expected:
            raise SystemExit(f"router says {active} after rolling back to {expected}; no figures recorded")
        # a rollback only goes back down the route stack: put the abandoned release back on top (not timed)
        seen = router.cache.generation
        RouteTable(client).set_active(before.active, actor="bench")
        router.cache.wait_generation(seen, timeout=10)
    return out


def measure_lookups(client, router: FleetRouter, count: int) -> tuple[list[float], list[float]]:
    table = RouteTable(client)
    cached, direct = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        router.route(DEMO_MODEL)
        t1 = time.perf_counter()
        table.get(DEMO_MODEL)
        t2 = time.perf_counter()
        cached.append((t1 - t0) * 1e6)
        direct.append((t2 - t1) * 1e6)
    return cached, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--pings", type=int, default=1000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    old, new = DEMO_RELEASES
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as work:
        server = RedisServer(Path(work) / "redis", appendonly=False).start()
        try:
            client = server.client()
            registry = WarmRegistry(client, ttl=3600)
            for i, release in enumerate((old, new)):
                registry.publish(WorkerState(worker=f"bench-{i}@bench", node="bench", pid=0, state="warm",
                                             releases=[release], loads=1))
            table = RouteTable(client)
            table.set_active(old, actor="bench")
            table.set_active(new, actor="bench")
            router = FleetRouter(server.url, DEMO_MODEL, ttl=600)
            router.route(DEMO_MODEL)
            if not router.cache.wait_listening(10):
                raise SystemExit("the router's subscriber never subscribed")
            measure_flips(client, router, 10)  # warm-up: connections, script and code paths
            pings = measure_pings(client, args.pings)
            flips = measure_flips(client, router, args.flips)
            cached, direct = measure_lookups(client, router, 2000)
            router.cache.close()
        finally:
            server.stop()
    report(pings, flips, cached, direct, load)


def report(pings: list[float], flips: list[float], cached: list[float], direct: list[float], load: float) -> None:
    ping_ms, flip_ms = statistics.median(pings), statistics.median(flips)
    ratio = flip_ms / ping_ms
    ok = flip_ms < FLIP_TARGET_MS
    merge_results([
        entry("rollback_flip_ms", round(flip_ms, 3), "ms", f"< {FLIP_TARGET_MS:g}"),
        entry("rollback_flip_p95_ms", round(p(flips, 95), 3), "ms"),
        entry("rollback_redis_ping_ms", round(ping_ms, 3), "ms"),
        entry("rollback_flip_vs_ping", round(ratio, 1), "x"),
        entry("route_lookup_cached_us", round(statistics.median(cached), 2), "us"),
        entry("route_lookup_redis_us", round(statistics.median(direct), 1), "us"),
    ])
    write_section("rollback", f"""
## Rollback flip vs a Redis round trip (`bench/bench_rollback.py`)

{today()} · {machine()} · {versions()} · 1-minute load average at start: {load:.1f}

A flip = `fleetstate.rollout.rollback` (route read, warm-registry check, one WATCH/MULTI/EXEC writing the route, its
history entry and the pub/sub notice) until the producer's route cache (TTL 10 min, so only pub/sub can
refresh it) has been invalidated and its next lookup returns the new release. Producer and operator share this
process; Redis runs on loopback.

| measure | median | p95 |
|---|---|---|
| Redis `PING` round trip, {len(pings)}× | {ping_ms:.3f} ms | {p(pings, 95):.3f} ms |
| rollback flip reaching the producer, {len(flips)}× | {flip_ms:.3f} ms | {p(flips, 95):.3f} ms |
| flip ÷ ping | **{ratio:.1f}×** | |
| route lookup on the send path, cached | {statistics.median(cached):.2f} µs | {p(cached, 95):.2f} µs |
| the same read from Redis | {statistics.median(direct):.1f} µs | {p(direct, 95):.1f} µs |

Flip under {FLIP_TARGET_MS:g} ms: **{'meets' if ok else 'MISSES'}** ({flip_ms:.2f} ms). No worker loads or restarts for a
flip: it costs a handful of Redis round trips (read, SCAN of the warm keys, WATCH, EXEC, the pub/sub hop and
the producer's re-read), so it scales with the round trip, not with model size.
""")
    print(f"ping {ping_ms:.3f} ms, flip {flip_ms:.3f} ms (p95 {p(flips, 95):.3f}), ratio {ratio:.1f}x; "
          f"lookup cached {statistics.median(cached):.2f} us vs redis {statistics.median(direct):.1f} us")


if __name__ == "__main__":
    main()
