"""Dispatch overhead: `generate.delay(...).get()` through the fleet vs the resident pipeline called in-process.

    python bench/bench_dispatch.py [--jobs 200] [--cpu-jobs 100] [--profile]

One warm worker (a real process, real redis-server) and, in this process, the same release loaded from the same
archive as a ResidentPipeline. Each pair runs the same job both ways, one right after the other (the order
alternates): through the fleet (validate, route, send, queue, worker, store, result backend, get) and directly
(`ResidentPipeline.generate` + writing the PNG to a local output store, so storing is on both sides). The
overhead of a pair is fleet − direct; p50/p95 of those are reported. Both run 1 torch thread, 32×32, 1 step, so
inference is short and the overhead is not lost in its noise.
Target: p50 overhead ≤ 5 ms, and ≤ 1.5 × Celery's own no-op round trip (p50, same run): what the fleet adds
to Celery (validation, routing, the execution lease and its record, the delivery index, counters) must stay small
beside what Celery itself costs, Celery's own STARTED and SUCCESS records included on both sides.

CPU (less noisy than wall time on a shared machine): the worker process's user+sys time (all its threads, from
/proc) over `--cpu-jobs` jobs back to back, per job, minus what the same pipeline call + PNG store costs in this
process (thread CPU time); beside it the worker's CPU per Celery no-op. `--profile` reruns the jobs with the worker
under cProfile (bench/_profiled_worker.py) and reports where its time goes and how many Redis round trips a job makes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _fleet import RELEASE, fleet, median, percentile  # noqa: E402
from _plots import image_line, save_plot  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

TARGET_MS = 5.0
TARGET_RATIO = 1.5
PROFILE_PHASES = [  # (label, file fragment, function): cumulative time in the worker process
    ("a job, as Celery's trace runs it", "celery/app/trace.py", "trace_task"),
    ("the fleet's part: `JobRunner.run`", "workers/jobs.py", "run"),
    ("request validation (`request_of_job`)", "tasks/requests.py", "request_of_job"),
    ("Celery's result stores (its own STARTED and SUCCESS)", "celery/backends/base.py", "store_result"),
    ("lease claim: one script (index, outbox entry, record, lease, time limit)", "fleetstate/leases.py", "claim"),
    ("serve: pipeline call, PNG, store", "workers/runtime.py", "serve"),
    ("pipeline call + PNG encode (`ResidentPipeline.generate`)", "workers/resident.py", "generate"),
    ("PNG write + fsync + rename", "workers/outputs/__init__.py", "put"),
    ("lease completion: one script (record, release, unindex, counters)", "fleetstate/leases.py", "complete"),
    ("lease exit (nothing left to do after completion)", "fleetstate/leases.py", "__exit__"),
    ("the fleet's Redis scripts (calls)", "fleetstate/scripts.py", "__call__"),
    ("every Redis round trip in the process (calls)", "redis/connection.py", "send_packed_command"),
]


def process_cpu_seconds(pid: int) -> float:
    """user + sys of a process, all its threads (from /proc/<pid>/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
PARAMS = {"width": 32, "height": 32, "steps": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--cpu-jobs", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="also profile the worker (a second, slower run)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from cachemgr import Cache, LocalArchive, Release
    from cachemgr.names import queue_for
    from cachemgr.sync import sync_release
    from fleetctl.demo.builders import DEMO_MODEL
    from tasks.requests import GenerateRequest
    from workers.models import StableDiffusionXL
    from workers.outputs import LocalOutputStore

    torch.set_num_threads(1)
    fleet_ms, direct_ms, overhead_ms, outside_ms, noop_ms, direct_cpu = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp, fleet(Path(tmp), {"w": {}}) as f:
        cache = Cache.at(Path(tmp) / "l2-direct")
        sync_release(LocalArchive(Path(tmp) / "archive"), cache.store, Release.parse(RELEASE))
        resident = StableDiffusionXL.builder(DEMO_MODEL, RELEASE).with_cache(cache).on("cpu").build()
        outputs = LocalOutputStore(Path(tmp) / "direct-out")

        def through_fleet(i: int) -> tuple[float, float]:
            """(wall seconds, inference seconds as the worker measured them)"""
            started = time.perf_counter()
            result = f.tasks.generate.delay(f"job {i}", seed=i, release=RELEASE, **PARAMS).get(timeout=120)
            return time.perf_counter() - started, result["timings"]["inference_ms"] / 1000

        def noop() -> float:
            """Celery's floor on this machine: a built-in no-op task through the same queue and worker."""
            started = time.perf_counter()
            f.tasks.app.send_task("celery.accumulate", args=[1], queue=queue_for(RELEASE)).get(timeout=120)
            return time.perf_counter() - started

        def direct(i: int) -> tuple[float, float]:
            started, cpu = time.perf_counter(), time.thread_time()
            png, _, inference = resident.generate(GenerateRequest(prompt=f"job {i}", seed=i, **PARAMS))
            outputs.put(f"direct-{i}.png", png, "image/png")
            direct_cpu.append(time.thread_time() - cpu)
            return time.perf_counter() - started, inference

        for i in range(10):  # warm-up both paths
            through_fleet(i), direct(i)
        for i in range(args.jobs):
            if i % 2:
                (d, d_inf), (fl, fl_inf) = direct(i), through_fleet(i)
            else:
                (fl, fl_inf), (d, d_inf) = through_fleet(i), direct(i)
            fleet_ms.append(fl * 1000)
            direct_ms.append(d * 1000)
            overhead_ms.append((fl - d) * 1000)
            outside_ms.append(((fl - fl_inf) - (d - d_inf)) * 1000)
            noop_ms.append(noop() * 1000)

        pid = f.workers["w"].pid  # the worker's CPU: jobs back to back, then as many no-ops
        cpu_start = process_cpu_seconds(pid)
        for i in range(args.cpu_jobs):
            through_fleet(10_000 + i)
        cpu_jobs = process_cpu_seconds(pid)
        for _ in range(args.cpu_jobs):
            noop()
        cpu_noops = process_cpu_seconds(pid)
    worker_cpu_job = (cpu_jobs - cpu_start) / args.cpu_jobs * 1000
    worker_cpu_noop = (cpu_noops - cpu_jobs) / args.cpu_jobs * 1000
    pipeline_cpu = sum(direct_cpu) / len(direct_cpu) * 1000
    cpu_outside = worker_cpu_job - pipeline_cpu
    profile_md = profile_worker(args.cpu_jobs) if args.profile else ""
    p50, p95 = median(overhead_ms), percentile(overhead_ms, 95)
    ratio = p50 / median(noop_ms)
    out50, out95 = median(outside_ms), percentile(outside_ms, 95)
    print(f"fleet p50 {median(fleet_ms):.1f} ms, direct p50 {median(direct_ms):.1f} ms; "
          f"overhead p50 {p50:.2f} ms, p95 {p95:.2f} ms ({verdict(p50 <= TARGET_MS)} ≤ {TARGET_MS} ms p50); "
          f"outside inference p50 {out50:.2f} ms, p95 {out95:.2f} ms; celery no-op round trip p50 "
          f"{median(noop_ms):.2f} ms; overhead ÷ no-op {ratio:.2f} ({verdict(ratio <= TARGET_RATIO)} ≤ {TARGET_RATIO}); "
          f"worker CPU per job {worker_cpu_job:.2f} ms, pipeline call + store {pipeline_cpu:.2f} ms, outside "
          f"{cpu_outside:.2f} ms; worker CPU per Celery no-op {worker_cpu_noop:.2f} ms")
    if args.no_write:
        return

    def draw(ax) -> None:
        ax.hist(overhead_ms, bins=40, color="#4c72b0")
        ax.axvline(TARGET_MS, color="#c44e52", linestyle="--", label=f"target p50 ≤ {TARGET_MS:g} ms")
        ax.axvline(p50, color="black", label=f"p50 {p50:.1f} ms")
        ax.set_xlabel("fleet − direct, ms per job")
        ax.set_ylabel("jobs")
        ax.set_title("Dispatch overhead per job (paired)")
        ax.legend()

    plot = save_plot("dispatch_overhead", draw)
    merge_results([
        entry("dispatch.overhead_p50_ms", round(p50, 2), "ms", f"<= {TARGET_MS:g}"),
        entry("dispatch.overhead_p95_ms", round(p95, 2), "ms"),
        entry("dispatch.overhead_outside_inference_p50_ms", round(out50, 2), "ms", f"<= {TARGET_MS:g}"),
        entry("dispatch.overhead_outside_inference_p95_ms", round(out95, 2), "ms"),
        entry("dispatch.celery_noop_round_trip_p50_ms", round(median(noop_ms), 2), "ms"),
        entry("dispatch.overhead_over_celery_noop", round(ratio, 3), "x", f"<= {TARGET_RATIO:g}"),
        entry("dispatch.worker_cpu_ms_per_job", round(worker_cpu_job, 3), "ms"),
        entry("dispatch.pipeline_cpu_ms_per_call", round(pipeline_cpu, 3), "ms"),
        entry("dispatch.worker_cpu_ms_per_job_outside_inference", round(cpu_outside, 3), "ms"),
        entry("dispatch.worker_cpu_ms_per_celery_noop", round(worker_cpu_noop, 3), "ms"),
        entry("dispatch.fleet_p50_ms", round(median(fleet_ms), 2), "ms"),
        entry("dispatch.direct_p50_ms", round(median(direct_ms), 2), "ms"),
    ])
    write_section("dispatch", f"""
## Dispatch overhead: fleet round trip vs the resident pipeline in-process (`bench/bench_dispatch.py`)

{stamp()} · CPU, 1 torch thread on both sides

{args.jobs} paired jobs (32×32, 1 step, order alternating): `generate.delay(...).get()` through a real redis-server
and a warm worker process, vs `ResidentPipeline.generate` + writing the PNG to a local store in this process.

| | p50 | p95 |
|---|---|---|
| through the fleet | {median(fleet_ms):.1f} ms | {percentile(fleet_ms, 95):.1f} ms |
| direct | {median(direct_ms):.1f} ms | {percentile(direct_ms, 95):.1f} ms |
| **overhead (fleet − direct), paired** | **{p50:.2f} ms** ({verdict(p50 <= TARGET_MS)} ≤ {TARGET_MS:g} ms) | {p95:.2f} ms |
| overhead outside inference, paired: (fleet − its inference) − (direct − its inference) | {out50:.2f} ms ({verdict(out50 <= TARGET_MS)}) | {out95:.2f} ms |
| Celery's floor, a built-in no-op task (`celery.accumulate`) through the same queue and worker | {median(noop_ms):.2f} ms | {percentile(noop_ms, 95):.2f} ms |
| **overhead p50 ÷ Celery no-op p50** | **{ratio:.2f}** ({verdict(ratio <= TARGET_RATIO)} ≤ {TARGET_RATIO:g}) | |

Worker CPU (user+sys of the worker process, all threads, {args.cpu_jobs} jobs back to back, then {args.cpu_jobs} no-ops):

| | ms per job |
|---|---|
| worker process, per `generate` job | {worker_cpu_job:.2f} |
| the same pipeline call + PNG store in this process (thread CPU) | {pipeline_cpu:.2f} |
| **worker CPU per job outside inference** (the difference) | **{cpu_outside:.2f}** |
| worker process, per Celery no-op (the floor) | {worker_cpu_noop:.2f} |

The second overhead row takes out the inference time each side measured itself, so a pipeline call that is a few
ms slower in the worker process (another allocator state, the other process's cache) is not counted as dispatch.
What the fleet adds to Celery's own round trip: producer-side validation and routing (the job names its release,
so no route read), the worker's request validation, one Redis script to claim the job (delivery index, outbox entry,
job record, lease, the release's time limit) and one to complete it (result record, lease release, unindexing, the
served-jobs counter and the worker's job count in the registry), and a larger result. Celery writes a job's STARTED
and SUCCESS records itself (`task_track_started`), as it does the no-op's, each a GET (so nothing overwrites a
SUCCESS) then a SET + PUBLISH: the fleet's own Redis work per job is its two round trips, on top of the four that
Celery's records cost on both sides. Lease renewal and the time limit are alarms on one thread per
process each (`fleetstate/alarms.py`): no thread started or woken per job. Registry heartbeats and device-memory
samples run on the heartbeat thread, not per job. The worker and this process share the machine's cores, so the
load average above moves every wall figure; the CPU figures move much less. What bounds the overhead now: Celery's
own path (send, its event messages, the ack, the result's pub/sub delivery) and the wake-ups after a pipeline
call: the first Redis round trip after ~20 ms of inference, and the producer's after as long a wait, each cost a
few hundred µs more than the same call in a tight no-op loop; the profile below shows the fleet's scripts as a small
share of the worker's time.

{image_line(plot, "dispatch overhead histogram")}

{profile_md}
""")


def profile_worker(jobs: int) -> str:
    """The same jobs with the worker under cProfile (all its threads): where a job's time goes in the worker."""
    import pstats

    from _fleet import fleet as start_fleet
    from _profile import report

    from bench._profiled_worker import PROFILE_ENV

    with tempfile.TemporaryDirectory(prefix="bench-dispatch-profile-") as tmp:
        out = Path(tmp) / "worker.pstats"
        with start_fleet(Path(tmp), {"w": {}}, entry="bench._profiled_worker", env={PROFILE_ENV: str(out)}) as f:
            for i in range(10):
                f.tasks.generate.delay(f"warm {i}", seed=i, release=RELEASE, **PARAMS).get(timeout=120)
            started = time.perf_counter()
            for i in range(jobs):
                f.tasks.generate.delay(f"job {i}", seed=i, release=RELEASE, **PARAMS).get(timeout=120)
            wall = time.perf_counter() - started
        stats = pstats.Stats(str(out))
    text = report(f"The worker process under cProfile: {jobs} jobs after 10 warm-ups (its boot and warm-ups are in "
                  "the totals too; calls ÷ jobs ≈ per job)", stats, PROFILE_PHASES, wall)
    print(text)
    return text


if __name__ == "__main__":
    main()
