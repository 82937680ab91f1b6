"""Dynamic batching: throughput of a batching worker vs a plain one at queue depth 8 and 32, in one run.

    python bench/bench_batching.py [--repeats 3] [--batch-max 8]

Two warm workers on the same release, one with batch_max N (batching) and one with batch_max 1 (today's
worker), both one torch thread. Both are paused (Celery remote control); `depth` jobs are queued; one worker
resumes and serves them all; the time from its resume to the last result gives its throughput. The two workers
alternate (plain first on even repeats), so drift on this shared machine hits both; the ratio is taken per
pair, then the median. The same jobs (prompt, seed) run on both, so each batched image is compared with its
unbatched twin: the max abs pixel difference is reported.
Target: batching ≥ 1.5× the plain worker's throughput on the CPU tiny model.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _fleet import fleet, median  # noqa: E402
from _plots import image_line, save_plot  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

TARGET = 1.5
SHAPES = {"32x32, 2 steps": {"width": 32, "height": 32, "steps": 2},
          "64x64, 4 steps": {"width": 64, "height": 64, "steps": 4}}


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def serve(f, name: str, depth: int, params: dict) -> tuple[float, list[dict]]:
    """Queue `depth` jobs while every worker is paused, resume `name`, time until the last result."""
    pending = f.submit(depth, **params)
    started = time.perf_counter()
    f.resume(name)
    results = [r.get(timeout=600) for r in pending]
    seconds = time.perf_counter() - started
    f.pause(name)
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-max", type=int, default=8)
    parser.add_argument("--wait-ms", type=float, default=50.0)
    parser.add_argument("--depths", default="8,32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    from workers.outputs import read_uri

    workers = {"plain": {"batch_max": 1}, "batched": {"batch_max": args.batch_max, "batch_wait_ms": args.wait_ms}}
    rows, entries, ratios_for_plot = [], [], {}
    max_pixel_diff = 0
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp, fleet(Path(tmp), workers) as f:
        f.pause("plain", "batched")
        for params in SHAPES.values():  # warm-up: first calls at a new size allocate
            for name in workers:
                serve(f, name, 2 * args.batch_max, params)
        for label, params in SHAPES.items():
            for depth in depths:
                rates = {"plain": [], "batched": []}
                sizes: list[int] = []
                for rep in range(args.repeats):
                    order = ["plain", "batched"] if rep % 2 == 0 else ["batched", "plain"]
                    images = {}
                    for name in order:
                        seconds, results = serve(f, name, depth, params)
                        rates[name].append(depth / seconds)
                        images[name] = [read_uri(r["image_uri"]) for r in results]
                        if name == "batched":
                            sizes += [r["batch_size"] for r in results]
                    for a, b in zip(images["plain"], images["batched"], strict=True):
                        max_pixel_diff = max(max_pixel_diff, int(abs(pixels(a) - pixels(b)).max()))
                ratios = [b / p for b, p in zip(rates["batched"], rates["plain"], strict=True)]
                ratio = median(ratios)
                ratios_for_plot[f"{label}\ndepth {depth}"] = ratio
                key = f"{params['width']}px_{params['steps']}steps_depth{depth}"
                entries += [
                    entry(f"batching.ratio.{key}", round(ratio, 3), "x", f">= {TARGET}"),
                    entry(f"batching.plain_jobs_per_s.{key}", round(median(rates["plain"]), 2), "jobs/s"),
                    entry(f"batching.batched_jobs_per_s.{key}", round(median(rates["batched"]), 2), "jobs/s"),
                ]
                mean_batch = sum(sizes) / len(sizes)
                rows.append(f"| {label} | {depth} | {median(rates['plain']):.2f} | {median(rates['batched']):.2f} | "
                            f"{mean_batch:.1f} | **{ratio:.2f}×** ({verdict(ratio >= TARGET)}) | "
                            f"{', '.join(f'{r:.2f}' for r in ratios)} |")
                print(rows[-1])
    entries.append(entry("batching.max_pixel_diff_vs_unbatched", max_pixel_diff, "levels of 255", "<= 3"))
    print(f"max abs pixel difference, batched vs unbatched twin: {max_pixel_diff}")
    if args.no_write:
        return

    def draw(ax) -> None:
        labels = list(ratios_for_plot)
        ax.bar(range(len(labels)), [ratios_for_plot[k] for k in labels], color="#4c72b0")
        ax.axhline(TARGET, color="#c44e52", linestyle="--", label=f"target {TARGET}×")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("batched ÷ plain throughput")
        ax.set_title(f"Dynamic batching (batch_max {args.batch_max}) on the CPU tiny model")
        ax.legend()

    plot = save_plot("batching", draw)
    merge_results(entries)
    write_section("batching", f"""
## Dynamic batching: batching worker vs plain worker (`bench/bench_batching.py`)

{stamp()} · CPU, 1 torch thread per worker

Two warm workers on `nano-banana@base-v1.1.0+lora-v2.3.1` (tiny SDXL + LoRA): one with batch_max
{args.batch_max} and batch_wait_ms {args.wait_ms:g}, one with batch_max 1. Both paused; `depth` jobs queued; one
resumes and serves them all (time from resume to the last result). Alternating, {args.repeats} pairs per cell;
ratio = median of per-pair ratios.

| shape | queue depth | plain jobs/s | batched jobs/s | mean batch | batched ÷ plain (target ≥ {TARGET}×) | per pair |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Each batched image against its unbatched twin (same prompt, seed, size, steps, same thread count): max abs pixel
difference **{max_pixel_diff}** of 255 (tolerance in `workers/batching.py`: 3). Not byte-identical: batched
convolutions and matmuls take other CPU kernel paths, so some pixels move by one level.
The gain is largest where a pipeline call is small (32×32): batching amortises the per-call and per-step
overhead (Python, scheduler, text encoders); at 64×64 the tiny UNet's compute grows with the batch and the gain
shrinks. On a GPU, where one image leaves the device mostly idle, batching is expected to gain more — GPU figures
are pending a task with a GPU.

{image_line(plot, "batching ratio per shape and depth")}
""")


if __name__ == "__main__":
    main()
