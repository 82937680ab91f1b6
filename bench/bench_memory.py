"""Memory: a warm worker's RSS over 1000 jobs — does a resident pipeline leak?

    python bench/bench_memory.py [--jobs 1000] [--warmup 50]

One warm worker (real process, 1 torch thread). After `warmup` jobs (allocator pools and caches filled), its
RSS is the baseline; then `jobs` more run through the fleet (16 in flight, so the worker never idles), RSS
sampled with psutil every 25 jobs. Drift = (RSS at the end − baseline) ÷ baseline. Jobs vary prompt and seed at
one size (32×32, 2 steps), as a production worker sees one shape per release most of the time.
Target: drift < 2 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _fleet import RELEASE, fleet  # noqa: E402
from _plots import image_line, save_plot  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

TARGET = 0.02
PARAMS = {"width": 32, "height": 32, "steps": 2}
IN_FLIGHT = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import psutil

    samples: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, fleet(Path(tmp), {"w": {}}) as f:
        worker = psutil.Process(f.workers["w"].pid)
        f.run(args.warmup, **PARAMS)
        rss = lambda: worker.memory_info().rss / 2**20  # noqa: E731
        samples.append((0, rss()))
        window: deque = deque()
        done = 0
        for i in range(args.jobs):
            window.append(f.tasks.generate.delay(f"memory job {i}", seed=i, release=RELEASE, **PARAMS))
            if len(window) >= IN_FLIGHT:
                window.popleft().get(timeout=300)
                done += 1
                if done % 25 == 0:
                    samples.append((done, rss()))
        while window:
            window.popleft().get(timeout=300)
            done += 1
        samples.append((done, rss()))
        peak = max(mb for _, mb in samples)

    base, end = samples[0][1], samples[-1][1]
    drift = (end - base) / base
    print(f"worker RSS after {args.warmup} warm-up jobs {base:.1f} MiB, after {args.jobs} more {end:.1f} MiB "
          f"(peak {peak:.1f}); drift {drift:+.2%} ({verdict(abs(drift) < TARGET)} < {TARGET:.0%})")
    if args.no_write:
        return

    def draw(ax) -> None:
        ax.plot([n for n, _ in samples], [mb for _, mb in samples], marker=".", color="#4c72b0")
        ax.axhline(base * (1 + TARGET), color="#c44e52", linestyle="--", label="baseline + 2 %")
        ax.set_xlabel("jobs after warm-up")
        ax.set_ylabel("worker RSS, MiB")
        ax.set_title("Worker RSS over jobs")
        ax.legend()

    plot = save_plot("memory_rss", draw)
    merge_results([
        entry("memory.rss_drift", round(drift, 4), "ratio", f"< {TARGET}"),
        entry("memory.rss_after_warmup_mib", round(base, 1), "MiB"),
        entry("memory.rss_end_mib", round(end, 1), "MiB"),
    ])
    write_section("memory", f"""
## Memory: worker RSS over {args.jobs} jobs (`bench/bench_memory.py`)

{stamp()} · CPU, 1 worker, 1 torch thread

| RSS after {args.warmup} warm-up jobs | after {args.jobs} more | peak | drift (target < {TARGET:.0%}) |
|---|---|---|---|
| {base:.1f} MiB | {end:.1f} MiB | {peak:.1f} MiB | **{drift:+.2%}** ({verdict(abs(drift) < TARGET)}) |

RSS sampled with psutil every 25 jobs; 16 jobs in flight so the worker never idles. The tiny model makes the
resident part small, so any per-job leak would show up large here; on a GPU, device memory needs its own check
(`torch.cuda.memory_allocated`) — pending a task with a GPU.

{image_line(plot, "worker RSS over jobs")}
""")


if __name__ == "__main__":
    main()
