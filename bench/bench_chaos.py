"""The chaos soak: `python -m bench chaos --minutes N`.

Ten producers keep sending while a fault is injected every 20–40 s at random: a worker killed with SIGKILL or
stopped with SIGTERM (a supervisor loop here starts a fresh one, as systemd or Kubernetes would), the Redis server
restarted (append-only file, fsync always), or a job that hangs past its time limit (the test worker entry hangs on
one prompt; such jobs time out on every try and are dead-lettered on purpose). Then every job is accounted:
sent = completed + dead on purpose + lost; duplicated = jobs whose body ran to completion twice (the job record's
`completed`). A send that raised (Redis down at that instant) was never acknowledged and is counted apart.

Timing settings are the operator defaults except the job time limit (20 s, so a hung job costs a soak seconds, not
the default 600 s) and one retry of a timed-out job.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _fleet import RELEASE, publish_release
from _results import entry, merge_results, write_section

HANG_PROMPT = "chaos: a pipeline call that never returns"
WORKERS = 3
PRODUCERS = 10
TIME_LIMIT_S = 20.0


class Supervisor:
    """Keeps WORKERS workers running: one that exits (killed, stopped, recycled) is replaced by a fresh one."""

    def __init__(self, settings, logs: Path) -> None:  # noqa: ANN001 - FleetSettings
        from tests.fault_worker import HANG_ENV

        self.settings, self.logs, self.env = settings, logs, {HANG_ENV: HANG_PROMPT}
        self.generation, self.slots, self.restarts = 0, [], 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def _start(self):  # noqa: ANN202 - tests.support.WorkerProc
        from tests.support import start_worker

        self.generation += 1
        return start_worker(self.settings, [RELEASE], f"chaos{self.generation}", self.logs, wait=False, **self.env)

    def start(self) -> None:
        from tests.support import wait_warm

        self.slots = [self._start() for _ in range(WORKERS)]
        for w in self.slots:
            wait_warm(self.settings, w, timeout=600)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stop_event.wait(1.0):
            with self.lock:
                for i, w in enumerate(self.slots):
                    if w.proc.poll() is not None:
                        self.slots[i] = self._start()
                        self.restarts += 1

    def victim(self):  # noqa: ANN201
        with self.lock:
            running = [w for w in self.slots if w.proc.poll() is None]
            return random.choice(running) if running else None

    def stop(self) -> None:
        self.stop_event.set()
        with self.lock:
            for w in self.slots:
                w.stop()


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--minutes", type=float, default=20.0)
    args.add_argument("--seed", type=int, default=None)
    args.add_argument("--workdir", type=Path, default=None)
    opts = args.parse_args(argv)
    rng = random.Random(opts.seed)
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="warmfleet-chaos-"))

    import redis

    from cachemgr import LocalArchive
    from fleetstate.leases import job_record
    from tasks.settings import FleetSettings
    from tests.support import RedisServer

    publish_release(LocalArchive(workdir / "archive"), workdir / "build")
    server = RedisServer(workdir / "redis", appendonly=True).start()
    settings = FleetSettings(home=workdir / "home", broker_url=server.url, archive_url=(workdir / "archive").as_uri(),
                             torch_threads=1, node_name="chaosnode", job_time_limit_s=TIME_LIMIT_S,
                             job_max_retries=1)
    import tasks

    tasks.configure(settings)
    supervisor = Supervisor(settings, workdir / "logs")
    supervisor.start()
    sent, refused, faults = [], Counter(), Counter()
    hung: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def produce(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = tasks.generate.delay(f"chaos {n}-{i}", seed=i, release=RELEASE, steps=2, width=64, height=64)
                with lock:
                    sent.append(r)
            except Exception as exc:
                refused[type(exc).__name__] += 1
            stop.wait(rng.uniform(3.0, 7.0))

    def fault() -> str:
        kind = rng.choice(["kill9", "sigterm", "redis_restart", "hang"])
        if kind in ("kill9", "sigterm"):
            w = supervisor.victim()
            if w is None:
                return "none"
            w.stop(signal.SIGKILL if kind == "kill9" else signal.SIGTERM, timeout=60)
        elif kind == "redis_restart":
            server.restart()
        else:
            r = tasks.generate.delay(HANG_PROMPT, seed=rng.randrange(1 << 30), release=RELEASE)
            with lock:
                sent.append(r)
                hung.add(r.id)
        return kind

    threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in range(PRODUCERS)]
    for t in threads:
        t.start()
    started = time.monotonic()
    end = started + opts.minutes * 60
    try:
        while time.monotonic() < end:
            time.sleep(min(rng.uniform(20, 40), max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            kind = fault()
            faults[kind] += 1
            print(f"[{time.monotonic() - started:7.1f} s] fault {kind}; sent {len(sent)}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    completed = dead = 0
    lost, failed_other, duplicated, reruns = [], [], 0, 0
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 900
    for r in sent:
        try:
            r.get(timeout=max(1.0, deadline - time.monotonic()))
            completed += 1
        except Exception as exc:
            if r.id in hung and "ran past its time limit" in str(exc):
                dead += 1
            elif r.state == "FAILURE":
                failed_other.append(f"{r.id}: {exc!r}")
            else:
                lost.append(r.id)
            continue
        record = job_record(client, r.id)
        duplicated += int(record.get("completed", "1")) > 1
        reruns += int(record.get("runs", "1")) > 1
    supervisor.stop()
    server.stop()
    lost_total = len(lost) + len(failed_other)
    minutes = (time.monotonic() - started) / 60
    print(f"chaos: {len(sent)} jobs, {sum(faults.values())} faults {dict(faults)}, completed {completed}, dead on "
          f"purpose {dead}, lost {lost_total}, duplicated {duplicated}, re-run after a fault {reruns}, sends refused "
          f"{dict(refused)}, worker restarts {supervisor.restarts}", flush=True)
    for line in (lost + failed_other)[:20]:
        print("  lost/failed:", line)
    merge_results([
        entry("chaos.jobs", len(sent), "jobs"), entry("chaos.faults", sum(faults.values()), "faults"),
        entry("chaos.lost", lost_total, "jobs", "0"), entry("chaos.duplicated", duplicated, "jobs", "0"),
        entry("chaos.minutes", round(minutes, 1), "min", ">= 20"),
    ])
    write_section("chaos", "\n".join([
        "## Chaos soak (bench/bench_chaos.py)",
        f"{PRODUCERS} producers, {WORKERS} workers (restarted by a supervisor loop), {minutes:.1f} min of a fault every"
        " 20–40 s at random. Operator defaults except a 20 s job time limit and one retry of a timed-out job.",
        "",
        "| jobs sent | faults | completed | dead on purpose (hung) | lost | duplicated | re-run after a fault |"
        " sends refused (never acknowledged) | worker restarts |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(sent)} | {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}) |"
        f" {completed} | {dead} | {lost_total} | {duplicated} | {reruns} | {sum(refused.values())} |"
        f" {supervisor.restarts} |",
    ]))
    return 0 if lost_total == 0 and duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
