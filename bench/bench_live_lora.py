"""A new LoRA version going live on a running worker (`warmfleet warm`) vs a new worker started on it, in one run.

    python bench/bench_live_lora.py [--size tiny|large|all] [--repeats 3] [--jobs 60]

A real fleet (bench/_fleet.py: private redis-server, worker `w-live` warm on the size's release: tiny nano-banana
base v1.1.0 + LoRA v2.3.1, or the ~0.6 GB SDXL-shaped nano-banana-large base v1.0.0 + LoRA v1.0.0) and a new LoRA
version for that base published into its archive. While a backlog of jobs keeps the worker busy:
- warm: `fleetctl.live.warm` (what `warmfleet warm --on w-live` runs): the control command, the verified L2 sync,
  the adapter load between two jobs, the new queue consumed, the worker announced warm — timed from the command to
  the announcement; then `retire --force`, and again (`--repeats` times);
- the serving gap: each job's finish time (its send time + its total time); the longest gap between two finishes
  while a warm was in flight, divided by the median gap outside them (one job's time). Target ≤ 2: the pause is at
  most one adapter load;
- base reloads: the worker's `loads` counter after the warms minus before. Target 0;
- cold: a new worker process started on the new release (spawn → warm), what a release cost before this;
- images: one image (seed 7) from the live-warmed adapter, the same request from the new worker: equal bytes.
Entries are named `live_lora.<metric>` for tiny and `live_lora.<metric>_large` for large (each size its own section).
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

from _fleet import SIZES, fleet, publish_release  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

NEW_LORA = {"tiny": ("v2.3.1", "v2.4.0", 2400), "large": ("v1.0.0", "v1.1.0", 6200)}  # size → (old, new, seed)
GAP_TARGET = 2.0


def new_release(size: str) -> str:
    old, new, _ = NEW_LORA[size]
    return SIZES[size].release.replace(f"lora-{old}", f"lora-{new}")


def publish_new_lora(archive_dir: Path, work: Path, size: str) -> int:
    """The size's release, and a new LoRA version trained on its base; returns the new adapter's bytes."""
    from cachemgr import LocalArchive
    from cachemgr.names import ComponentRef, Release
    from fleetctl.demo.builders import build_lora

    archive = LocalArchive(archive_dir)
    publish_release(archive, work / "build", size=size)
    model = SIZES[size].model
    base_version = dict(Release.parse(SIZES[size].release).components)["base"]
    base = work / "build" / f"{model}-base-{base_version}"  # where publish_demo built it
    _, version, seed = NEW_LORA[size]
    ref = ComponentRef(model, "lora", version)
    archive.publish(ref, build_lora(base, "sdxl", work / "lora", seed), meta={"family": "sdxl"})
    return archive.read_manifest(ref).total_size


def measure(size: str, repeats: int, jobs: int) -> dict:
    import redis

    from fleetctl.live import retire, warm
    from fleetstate.registry import WarmRegistry
    from tests.support import start_worker
    from workers.outputs import read_uri

    release, new = SIZES[size].release, new_release(size)
    with tempfile.TemporaryDirectory(prefix=f"bench-live-lora-{size}-") as tmp:
        work = Path(tmp)
        adapter_bytes = publish_new_lora(work / "archive", work, size)
        with fleet(work, {"w-live": {}}, archive_dir=work / "archive", release=release) as f:
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
                while not feeding.is_set() and i < jobs * 4:
                    while not feeding.is_set() and f.queue_depth() > 3:
                        time.sleep(0.01)
                    sent.append((time.time(), f.tasks.generate.delay("bench job", seed=i, release=release)))
                    i += 1

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            time.sleep(3.0)
            windows, warm_s = [], []
            for _ in range(repeats):
                began = time.time()
                outcome = warm(f.tasks.app, client, archive, new, on=["w-live"])
                windows.append((began, time.time()))
                if name not in outcome.done:
                    raise SystemExit(f"warm failed: {outcome.refused or outcome.failed}")
                warm_s.append(outcome.done[name])
                live_image = f.tasks.generate.delay("Leather Jacket", seed=7, release=new).get(timeout=600)
                time.sleep(2.0)
                retire(f.tasks.app, client, new, on=["w-live"], force=True)
                time.sleep(2.0)
            feeding.set()
            feeder.join()
            finishes = sorted(t0 + r.get(timeout=600)["timings"]["total_ms"] / 1000 for t0, r in sent)
            reloads = registry.worker(name).loads - loads_before
            gaps = [(a, b - a) for a, b in zip(finishes, finishes[1:], strict=False)]
            inside = [g for a, g in gaps if any(lo - 0.5 <= a <= hi for lo, hi in windows)]
            outside = [g for a, g in gaps if not any(lo - 0.5 <= a <= hi + 0.5 for lo, hi in windows)]

            started = time.perf_counter()
            cold = start_worker(f.settings, [new], "w-cold", work / "logs", wait=True, timeout=600)
            cold_s = time.perf_counter() - started
            live_result = live_image  # made by the live-loaded adapter, before the retire
            fresh_result = f.tasks.generate.delay("Leather Jacket", seed=7, release=new).get(timeout=600)
            cold.stop()
            same = read_uri(live_result["image_uri"]) == read_uri(fresh_result["image_uri"])
            if {live_result["worker"], fresh_result["worker"]} != {name, f.full_name("w-cold")}:
                raise SystemExit(f"image check: expected one image from each worker, got {live_result['worker']}, "
                                 f"{fresh_result['worker']}")
    job_s = statistics.median(outside)
    return {"release": release, "new": new, "adapter_bytes": adapter_bytes, "warm_s": warm_s, "cold_s": cold_s,
            "reloads": reloads, "job_s": job_s, "max_gap_s": max(inside), "jobs": len(sent), "repeats": repeats,
            "images_equal": same}


def report(size: str, m: dict) -> None:
    suffix = SIZES[size].suffix
    warm_ms, cold_ms = statistics.median(m["warm_s"]) * 1000, m["cold_s"] * 1000
    gap_ratio = m["max_gap_s"] / m["job_s"]
    merge_results([
        entry(f"live_lora.warm_ms{suffix}", round(warm_ms, 1), "ms"),
        entry(f"live_lora.cold_worker_ms{suffix}", round(cold_ms, 1), "ms"),
        entry(f"live_lora.cold_over_warm{suffix}", round(cold_ms / warm_ms, 2), "x"),
        entry(f"live_lora.base_reloads{suffix}", m["reloads"], "loads", target="0"),
        entry(f"live_lora.max_serving_gap_over_job{suffix}", round(gap_ratio, 2), "x", target=f"<= {GAP_TARGET:g}"),
        entry(f"live_lora.images_equal_to_fresh_worker{suffix}", int(m["images_equal"]), "bool", target="1"),
    ])
    write_section(f"live_lora{suffix}", f"""
## Live LoRA ({size}): a new version warmed on a running worker vs a new worker (`bench_live_lora.py --size {size}`)

{stamp()}

{m['new']} (adapter {m['adapter_bytes'] / 1e6:.1f} MB) warmed on a worker serving {m['release']}, {m['repeats']}
warms under a constant backlog ({m['jobs']} jobs served meanwhile, none lost).

| | value |
|---|---|
| `warmfleet warm` → warm on the running worker (median of {m['repeats']}) | {warm_ms:.0f} ms ({', '.join(f'{s * 1000:.0f}' for s in m['warm_s'])}) |
| a new worker process started on the same release (spawn → warm) | {cold_ms:.0f} ms ({cold_ms / warm_ms:.1f}× the warm) |
| base loads during the warms | {m['reloads']} ({verdict(m['reloads'] == 0)} target 0) |
| one job (median gap between finishes outside the warms) | {m['job_s'] * 1000:.0f} ms |
| longest gap between two jobs while a warm was in flight | {m['max_gap_s'] * 1000:.0f} ms = {gap_ratio:.2f}× one job ({verdict(gap_ratio <= GAP_TARGET)} target ≤ {GAP_TARGET:g}) |
| same seed: the live-warmed worker's PNG vs the new worker's, byte for byte | {'equal' if m['images_equal'] else 'DIFFERENT'} ({verdict(m['images_equal'])}) |

A busy worker reads the warm command between two jobs and loads the adapter between the next two, so on a worker
with a backlog the warm takes about two jobs plus the load; the pause in serving is one load.
""")
    print(f"{size}: warm {warm_ms:.0f} ms, cold worker {cold_ms:.0f} ms, base reloads {m['reloads']}, "
          f"max gap {gap_ratio:.2f}x one job ({m['job_s'] * 1000:.0f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=60, help="backlog size: enough to outlast the warms")
    args = parser.parse_args()
    for size in SIZES if args.size == "all" else [args.size]:
        report(size, measure(size, args.repeats, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
