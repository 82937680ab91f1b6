"""Acknowledged writes lost across a Redis Sentinel failover: no guard, `min-replicas-to-write 1`, and that plus WAIT.

A primary, one replica and three sentinels on loopback (tests/sentinels.py); WRITERS threads push numbered items
through the project's client (fleetstate.client.redis_client: Sentinel, FailoverAwareConnection), as the broker's
producers and the result backend do, while `SENTINEL FAILOVER` demotes the live primary. Lost = items whose LPUSH
returned but which the promoted primary does not hold once the set is back in sync. Also measured: the longest time
no write was acknowledged (the price of the guard: the promoted primary refuses writes until the demoted one is
back as its replica). `python bench/bench_sentinel.py [--trials N]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _results import entry, merge_results, stamp, write_section  # noqa: E402

WRITERS = 4


def trial(guarded: bool, wait: bool) -> tuple[int, int, float]:
    """One failover under write load: (acknowledged, lost, longest gap between acknowledged writes in seconds)."""
    import redis

    from fleetstate.client import push_replicated, redis_client
    from tests.sentinels import SentinelSet

    with tempfile.TemporaryDirectory() as tmp:
        s = SentinelSet(Path(tmp), **({} if guarded else {"write_guard": []})).start()
        try:
            acked: list[tuple[float, str]] = []
            lock, stop = threading.Lock(), threading.Event()

            def write(n: int) -> None:
                client, i = redis_client(s.url, s.master), 0
                while not stop.is_set():
                    i += 1
                    item = f"{n}-{i}"
                    try:
                        if wait:  # acknowledged only once the replica holds it (fleetstate.client.push_replicated)
                            push_replicated(client, "bench:sentinel", item)
                        else:
                            client.lpush("bench:sentinel", item)
                        with lock:
                            acked.append((time.monotonic(), item))
                    except redis.RedisError:
                        pass  # refused: the writer knows it was not stored
                    time.sleep(0.005)

            threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(WRITERS)]
            for t in threads:
                t.start()
            time.sleep(2)
            s.failover()
            time.sleep(15)  # past the sentinels' reconfiguration of the demoted primary (~10 s)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            s.wait_ready()
            held = set(redis.Redis(port=s.primary_port(), decode_responses=True).lrange("bench:sentinel", 0, -1))
            times = sorted(t for t, _ in acked)
            gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
            return len(acked), sum(item not in held for _, item in acked), gap
        finally:
            s.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    rows, totals = [], {}
    for guarded, wait in ((False, False), (True, False), (True, True)):
        runs = [trial(guarded, wait) for _ in range(args.trials)]
        acked, lost, gap = sum(r[0] for r in runs), sum(r[1] for r in runs), max(r[2] for r in runs)
        totals[guarded, wait] = (acked, lost, gap)
        label = {(False, False): "no guard", (True, False): "min-replicas-to-write 1",
                 (True, True): "min-replicas-to-write 1 + WAIT 1 after each push (the project's setting)"}[guarded, wait]
        rows.append(f"| {label} | {args.trials} | {acked} | {lost} | {gap:.1f} |")
        print(rows[-1], flush=True)
    merge_results([
        entry("sentinel.failover_lost", totals[True, True][1], "acknowledged writes", "0"),
        entry("sentinel.failover_lost_guard_only", totals[True, False][1], "acknowledged writes"),
        entry("sentinel.failover_lost_unguarded", totals[False, False][1], "acknowledged writes"),
        entry("sentinel.failover_write_gap_s", round(totals[True, True][2], 2), "s"),
    ])
    write_section("sentinel", f"""
## Sentinel failover (`bench/bench_sentinel.py`)

`SENTINEL FAILOVER` of a live primary while {WRITERS} writers push through the project's Sentinel client; lost =
writes whose LPUSH returned but which the promoted primary does not hold once the set is back in sync.

| data servers | failovers | acknowledged | lost | longest gap without an acknowledged write (s) |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

{stamp()}
""")
    return 0 if totals[True, True][1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
