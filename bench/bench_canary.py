"""The automatic canary analysis' reaction time, and `warmfleet review`'s throughput against plain jobs, in one run.

    python bench/bench_canary.py [--rate 4] [--prompts 4] [--seeds 2] [--rounds 2]

A private redis-server, the demo archive and three real workers: one on the active release, one on the canary
release whose pipeline call always fails (tests/fault_worker.py: the narrowest stand-in) and later a healthy one on
the canary release for the review. Measured:
- canary.rollback_s_after_fault: jobs go out at a steady rate with the canary at 10 % under DEFAULT analysis settings
  (FLEET_CANARY_*: tick 5 s, 5 jobs, +2 points); the analysis tick runs every FLEET_CANARY_TICK_S, as beat sends it.
  Time from the canary's first failed job (its failure counter leaving 0) to the rollback's entry in routes history.
- review.jobs_per_s_over_plain: `fleetctl.review` (pinned review jobs on both releases, then figures, PNG sheet and
  HTML page) vs the same jobs sent plainly (pinned, no review header, results only); rounds alternate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _results import entry, machine, merge_results, today, write_section  # noqa: E402

from tasks.settings import FleetSettings, offline_environment  # noqa: E402

offline_environment()

from fleetctl.demo.builders import DEMO_RELEASES, RANDOM_DEMO_VERSIONS, publish_demo  # noqa: E402

OLD, NEW = DEMO_RELEASES
MODEL = OLD.split("@")[0]
DOOMED = "a red circle on the left"


def measure_rollback(settings: FleetSettings, tasks, client, rate: float) -> tuple[float, int, str]:
    from fleetstate import canary, jobstats
    from fleetstate.routes import RouteTable
    from tasks.canary import run_tick

    table = RouteTable(client)
    table.set_active(OLD, actor="bench")
    table.set_canary(NEW, 10, actor="bench")
    canary.start(client, MODEL, NEW, canary.Bounds.of(settings))
    stop = threading.Event()

    def beat() -> None:  # what beat does: send the tick every canary_tick_s
        while not stop.wait(settings.canary_tick_s):
            run_tick(settings, client)

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    first_failure, sent, i = None, [], 0
    deadline = time.time() + 600
    try:
        while canary.read(client, MODEL)["state"] == "running" and time.time() < deadline:
            sent.append(tasks.generate.delay(DOOMED, seed=i, steps=2))
            i += 1
            t_end = time.time() + 1 / rate
            while time.time() < t_end:
                if first_failure is None and jobstats.read(client, NEW).failures:
                    first_failure = time.time()
                time.sleep(0.01)
    finally:
        stop.set()
        ticker.join()
    entry_ = table.history(MODEL, count=1)[0]
    if first_failure is None or entry_["actor"] != "canary-analysis":
        raise SystemExit(f"bench_canary: no automatic rollback seen ({canary.read(client, MODEL)})")
    for r in sent:
        try:
            r.get(timeout=120)
        except Exception:  # noqa: BLE001 - the canary's failed jobs
            pass
    return entry_["ts"] - first_failure, len(sent), entry_["reason"]


def measure_review(settings: FleetSettings, tasks, prompts: list[str], seeds: list[int], out: Path,
                   rounds: int) -> tuple[list[float], list[float]]:
    from fleetctl.demo.sheet import read_image
    from fleetctl.review import evaluate, send_review, write_html, write_sheet

    plain, review = [], []
    jobs = 2 * len(prompts) * len(seeds)
    for _ in range(rounds):
        t0 = time.perf_counter()
        pending = [tasks.generate.delay(p, seed=s, release=r) for p in prompts for s in seeds for r in (OLD, NEW)]
        for r in pending:
            r.get(timeout=300)
        plain.append(jobs / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pairs, seconds = send_review(tasks.generate, OLD, NEW, prompts, seeds)
        evaluate(pairs, lambda result: read_image(result, settings.resolved_output_url))
        write_sheet(pairs, out / "review.png")
        write_html(pairs, out / "review.html", seconds)
        review.append(jobs / (time.perf_counter() - t0))
    return plain, review


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=4.0, help="jobs per second sent while the canary runs")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import redis

    from cachemgr import LocalArchive
    from fleetctl.review import DEMO_PROMPTS
    from tests.support import RedisServer, start_worker

    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    publish_demo(LocalArchive(work / "archive"), work / "build", versions=RANDOM_DEMO_VERSIONS, log=lambda *_: None)
    server = RedisServer(work / "redis", appendonly=False).start()
    workers = []
    try:
        settings = FleetSettings(home=work / "home", broker_url=server.url, archive_url=(work / "archive").as_uri(),
                                 torch_threads=1, route_cache_ttl=2.0, node_name="benchnode")
        import tasks

        tasks.configure(settings)
        client = redis.Redis.from_url(server.url)
        env = {"FLEET_JOB_MAX_RETRIES": "0"}
        workers += [start_worker(settings, [OLD], "b-old", work / "logs", **env),
                    start_worker(settings, [NEW], "b-bad", work / "logs", WARMFLEET_TEST_POISON_PROMPT=DOOMED, **env)]
        rollback_s, sent, reason = measure_rollback(settings, tasks, client, args.rate)
        workers.pop().stop()
        workers.append(start_worker(settings, [NEW], "b-good", work / "logs"))
        prompts = list(DEMO_PROMPTS)[: args.prompts]
        plain, review = measure_review(settings, tasks, prompts, list(range(1000, 1000 + args.seeds)), work / "review",
                                       args.rounds)
    finally:
        for w in workers:
            w.stop()
        tasks.app.pool.force_close_all()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ratio = statistics.median(review) / statistics.median(plain)
    merge_results([
        entry("canary.rollback_s_after_fault", round(rollback_s, 2), "s"),
        entry("review.jobs_per_s_over_plain", round(ratio, 3), "x"),
    ])
    defaults = FleetSettings()
    write_section("canary", f"""
## Canary analysis reaction and review throughput (`bench/bench_canary.py`)

{today()} · {machine()} · 1-minute load average at start: {load:.1f}

Default analysis settings (tick {defaults.canary_tick_s:g} s, window {defaults.canary_window_s:g} s, at least
{defaults.canary_min_jobs} canary jobs, failure rate at most +{defaults.canary_max_failure_delta:.0%} over the active
release's); canary at 10 %, {args.rate:g} jobs/s sent, the canary's pipeline call always failing.

| measure | value |
|---|---|
| canary.rollback_s_after_fault (first failed canary job → automatic rollback in routes history) | {rollback_s:.2f} s ({sent} jobs sent) |
| review jobs/s (whole review: pinned review jobs, figures, sheet, page), median of {args.rounds} | {statistics.median(review):.2f} |
| the same jobs sent plainly, jobs/s | {statistics.median(plain):.2f} |
| review.jobs_per_s_over_plain | {ratio:.3f} |

Rollback reason recorded: `{reason}`
""")
    print(f"canary.rollback_s_after_fault {rollback_s:.2f} s; review.jobs_per_s_over_plain {ratio:.3f}")


if __name__ == "__main__":
    main()
