"""A new LoRA version going live on a running worker (`warmfleet warm`) vs a new worker started on it, in one run.

    python bench/bench_live_lora.py [--repeats 3] [--jobs 60]

A real fleet (bench/_fleet.py: private redis-server, worker `w-live` warm on nano-banana base v1.1.0 + LoRA v2.3.1)
and a new LoRA version v2.4.0 published into its archive. While a backlog of jobs keeps the worker busy:
- warm: `fleetctl.live.warm` (what `warmfleet warm --on w-live` runs): the control command, the verified L2 sync,
  the adapter load between two jobs, the new queue consumed, the worker announced warm — timed from the command to
  the announcement; then `retire --force`, and again (`--repeats` times);
- the serving gap: each job's finish time (its send time + its total time); the longest gap between two finishes
  while a warm was in flight, divided by the median gap outside them (one job's time). Target ≤ 2: the pause is at
  most one adapter load;
- base reloads: the worker's `loads` counter after the warms minus before. Target 0;
- cold: a new worker process started on the new release (spawn → warm), what a release cost before this.
Only the tiny demo adapter is measured here (`large` is pending: it needs the bench fleet on the large release).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _fleet import RELEASE, fleet, publish_release  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

NEW = RELEASE.replace("lora-v2.3.1", "lora-v2.4.0")
GAP_TARGET = 2.0


def publish_new_lora(archive_dir: Path, work: Path) -> None:
    from cachemgr import LocalArchive
    from cachemgr.names import ComponentRef
    from fleetctl.demo.builders import DEMO_MODEL, build_lora, build_sdxl

    archive = LocalArchive(archive_dir)
    publish_release(archive, work / "build")
    base = build_sdxl(work / "base", 1100)
    archive.publish(ComponentRef(DEMO_MODEL, "lora", "v2.4.0"), build_lora(base, "sdxl", work / "lora", 2400),
                    meta={"family": "sdxl"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=60, help="backlog size: enough to outlast the warms")
    args = parser.parse_args()
    import redis

    from fleetctl.live import retire, warm
    from fleetstate.registry import WarmRegistry
    from tests.support import start_worker

    with tempfile.TemporaryDirectory(prefix="bench-live-lora-") as tmp:
        work = Path(tmp)
        publish_new_lora(work / "archive", work)
        with fleet(work, {"w-live": {}}, archive_dir=work / "archive") as f:
            client = redis.Redis.from_url(f.settings.broker_url)
            registry = WarmRegistry(client)
            archive = f.settings.open_archive()
            name = f.full_name("w-live")
            f.run(3)  # warm-up: the first images after boot are slower
            loads_before = registry.worker(name).loads
            sent: list[tuple[float, object]] = []
            feeding = threading.Event()

            def feed() -> None:  # keep the queue full: the worker is never idle during the warms
                i = 0
                while not feeding.is_set() and i < args.jobs * 4:
                    while not feeding.is_set() and f.queue_depth() > 3:
                        time.sleep(0.01)
                    sent.append((time.time(), f.tasks.generate.delay("bench job", seed=i, release=RELEASE)))
                    i += 1

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            time.sleep(3.0)
            windows, warm_s = [], []
            for _ in range(args.repeats):
                began = time.time()
                outcome = warm(f.tasks.app, client, archive, NEW, on=["w-live"])
                windows.append((began, time.time()))
                if name not in outcome.done:
                    raise SystemExit(f"warm failed: {outcome.refused or outcome.failed}")
                warm_s.append(outcome.done[name])
                time.sleep(2.0)
                retire(f.tasks.app, client, NEW, on=["w-live"], force=True)
                time.sleep(2.0)
            feeding.set()
            feeder.join()
            finishes = sorted(t0 + r.get(timeout=300)["timings"]["total_ms"] / 1000 for t0, r in sent)
            reloads = registry.worker(name).loads - loads_before
            gaps = [(a, b - a) for a, b in zip(finishes, finishes[1:], strict=False)]
            inside = [g for a, g in gaps if any(lo - 0.5 <= a <= hi for lo, hi in windows)]
            outside = [g for a, g in gaps if not any(lo - 0.5 <= a <= hi + 0.5 for lo, hi in windows)]
            job_s = statistics.median(outside)
            gap_ratio = max(inside) / job_s

            started = time.perf_counter()
            cold = start_worker(f.settings, [NEW], "w-cold", work / "logs", wait=True, timeout=300)
            cold_s = time.perf_counter() - started
            cold.stop()

    warm_ms = statistics.median(warm_s) * 1000
    merge_results([
        entry("live_lora.warm_ms", round(warm_ms, 1), "ms"),
        entry("live_lora.cold_worker_ms", round(cold_s * 1000, 1), "ms"),
        entry("live_lora.cold_over_warm", round(cold_s * 1000 / warm_ms, 2), "x"),
        entry("live_lora.base_reloads", reloads, "loads", target="0"),
        entry("live_lora.max_serving_gap_over_job", round(gap_ratio, 2), "x", target=f"<= {GAP_TARGET:g}"),
    ])
    write_section("live_lora", f"""
## Live LoRA: a new version warmed on a running worker vs a new worker (`bench_live_lora.py`)

{stamp()}

Tiny demo adapter (nano-banana LoRA v2.4.0 on base v1.1.0), {args.repeats} warms under a constant backlog
({len(sent)} jobs served meanwhile, none lost).

| | value |
|---|---|
| `warmfleet warm` → warm on the running worker (median of {args.repeats}) | {warm_ms:.0f} ms ({', '.join(f'{s * 1000:.0f}' for s in warm_s)}) |
| a new worker process started on the same release (spawn → warm) | {cold_s * 1000:.0f} ms ({cold_s * 1000 / warm_ms:.1f}× the warm) |
| base loads during the warms | {reloads} ({verdict(reloads == 0)} target 0) |
| one job (median gap between finishes outside the warms) | {job_s * 1000:.0f} ms |
| longest gap between two jobs while a warm was in flight | {max(inside) * 1000:.0f} ms = {gap_ratio:.2f}× one job ({verdict(gap_ratio <= GAP_TARGET)} target ≤ {GAP_TARGET:g}) |

The large adapter is not measured yet (the bench fleet serves the tiny release only).
""")
    print(f"warm {warm_ms:.0f} ms, cold worker {cold_s * 1000:.0f} ms, base reloads {reloads}, "
          f"max gap {gap_ratio:.2f}x one job ({job_s * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
