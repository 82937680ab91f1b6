"""Switching between resident LoRA adapters vs reloading the pipeline and its adapter from L2, in one run.

    python bench/bench_adapter_switch.py [--switches 200] [--reloads 7] [--device cpu]

Builds the tiny demo models offline into a temp archive and syncs nano-banana base v1.1.0 with LoRA v2.3.0 and
v2.3.1 into a temp L2. Then, in one process:
- switch: one pipeline holds both adapters; `ResidentPipeline.activate` alternates the releases (set_adapters);
- reload: a fresh build of one release from L2 (base + its adapter, to the device) — what serving the other
  LoRA would cost a worker that does not hold it. L2 files are in the page cache, so this is a warm reload.
Medians are reported, and the ratio reload / switch. Before timing, one image per release is checked to be
byte-identical to a single-adapter pipeline's, so the switch being timed is a correct one.
Target: a switch at least 10× cheaper than a reload. The demo base is ~12 MB, so its reload is mostly fixed
overhead; a production SDXL base (~7 GB) reloads in seconds, so the ratio here is a lower bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _results import entry, machine, merge_results, today, write_section  # noqa: E402

from tasks.settings import offline_environment  # noqa: E402

offline_environment()

import torch  # noqa: E402

from cachemgr import Cache, LocalArchive, Release  # noqa: E402
from cachemgr.sync import sync_release  # noqa: E402
from fleetctl.demo.builders import DEMO_MODEL, RANDOM_DEMO_VERSIONS, SHARED_BASE_RELEASES, publish_demo  # noqa: E402
from tasks.requests import GenerateRequest  # noqa: E402
from workers.models import StableDiffusionXL  # noqa: E402

TARGET_RATIO = 10.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(cache: Cache, device: str, release: str, *shared: str):
    return StableDiffusionXL.builder(DEMO_MODEL, release).also_serving(*shared).with_cache(cache).on(device).build()


def prepare(workdir: Path) -> Cache:
    archive = LocalArchive(workdir / "archive")
    versions = [v for v in RANDOM_DEMO_VERSIONS if v.model == DEMO_MODEL and v.version in ("v1.1.0", "v2.3.0", "v2.3.1")]
    publish_demo(archive, workdir / "build", versions=versions, log=lambda *_: None)
    cache = Cache.at(workdir / "l2")
    for text in SHARED_BASE_RELEASES:
        sync_release(archive, cache.store, Release.parse(text))
    return cache


def check_switch_is_exact(shared, cache: Cache, device: str) -> None:
    request = GenerateRequest(prompt="Leather Jacket", seed=5)
    for release in SHARED_BASE_RELEASES:
        alone = build(cache, device, release)
        if shared.generate(request, release)[0] != alone.generate(request)[0]:
            raise SystemExit(f"switched adapter of {release} does not reproduce the single-adapter image")


def time_switches(shared, device: str, count: int) -> list[float]:
    samples = []
    releases = list(SHARED_BASE_RELEASES)
    for i in range(count):
        target = releases[i % 2]
        started = time.perf_counter()
        shared.activate(target)
        sync(device)
        samples.append(time.perf_counter() - started)
    return samples


def time_reloads(cache: Cache, device: str, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        pipe = build(cache, device, SHARED_BASE_RELEASES[i % 2])
        sync(device)
        samples.append(time.perf_counter() - started)
        del pipe
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--reloads", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a worker pins them")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-adapter-switch-") as tmp:
        cache = prepare(Path(tmp))
        shared = build(cache, args.device, *SHARED_BASE_RELEASES)
        check_switch_is_exact(shared, cache, args.device)
        time_switches(shared, args.device, 10)  # warm-up
        switches = time_switches(shared, args.device, args.switches)
        build(cache, args.device, SHARED_BASE_RELEASES[0])  # warm-up
        reloads = time_reloads(cache, args.device, args.reloads)

    switch_ms = statistics.median(switches) * 1000
    switch_p90 = sorted(switches)[int(0.9 * (len(switches) - 1))] * 1000
    reload_ms = statistics.median(reloads) * 1000
    ratio = reload_ms / switch_ms
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    results = [
        entry(f"adapter_switch_ms{suffix}", round(switch_ms, 3), "ms", "<= 10"),
        entry(f"adapter_reload_ms{suffix}", round(reload_ms, 1), "ms"),
        entry(f"adapter_switch_vs_reload{suffix}", round(ratio, 1), "x", f">= {TARGET_RATIO:g}"),
    ]
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"switch: median {switch_ms:.3f} ms, p90 {switch_p90:.3f} ms over {len(switches)}")
    print(f"reload: median {reload_ms:.1f} ms over {len(reloads)} (base + adapter from L2, warm page cache)")
    print(f"ratio reload/switch: {ratio:.1f}x ({verdict} the >= {TARGET_RATIO:g}x target)")
    if args.no_write:
        return
    merge_results(results)
    write_section("adapter_switch", f"""
## LoRA adapter switch vs reload (`bench/bench_adapter_switch.py`)

{today()} · {machine()} · device `{args.device}`, {args.threads} torch thread(s)

One SDXL pipeline (the tiny demo base v1.1.0) holds LoRA v2.3.0 and v2.3.1 as named adapters; a job's release
is activated with `set_adapters` (never fused). A reload is a fresh build of one release from L2 (base + adapter).
Both switched releases were first checked to give the single-adapter pipeline's exact PNG bytes.

| measure | value |
|---|---|
| switch, median of {len(switches)} | {switch_ms:.3f} ms (p90 {switch_p90:.3f} ms) |
| reload from L2, median of {len(reloads)} | {reload_ms:.1f} ms |
| reload / switch | **{ratio:.1f}×** (target ≥ {TARGET_RATIO:g}×: {verdict}) |

The demo base is ~12 MB, so its reload is mostly fixed overhead (config parsing, module construction, peft
injection); a production SDXL base (~7 GB) takes seconds to reload, so this ratio is a lower bound.
""")


if __name__ == "__main__":
    main()
