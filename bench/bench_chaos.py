"""The chaos soak: `python -m bench chaos --minutes N`.

Ten producers keep sending while a fault is injected every 20–40 s at random: a worker killed with SIGKILL or
stopped with SIGTERM (a supervisor loop here starts a fresh one, as systemd or Kubernetes would), a Redis data server
restarted (append-only file, fsync always), a Sentinel failover (`SENTINEL FAILOVER`: the replica becomes primary),
the OSS archive stopped in the middle of a `warmfleet sync` download, or a job that hangs past its time limit (the
test worker entry hangs on one prompt; such jobs time out on every try and are dead-lettered on purpose).

The broker, result backend and fleet state run behind Redis Sentinel (a primary, one replica, three sentinels on
loopback: tests/sentinels.py); `--broker plain` runs one redis-server instead (no failover fault then). `--netns`
(root) gives each worker slot its own network namespace and address (tests/netns.py), with Redis, the archive and
the producers in another, and adds partitions: a worker's node loses its link for 3–6 s (shorter than the warm TTL
and the execution lease at the defaults, whose promise docs/reliability.md states) and gets it back. Each sync
runs into a fresh L2 of its own over a 32 Mbit/s emulated line (a 32 MiB version: about 8 s), the archive is stopped
once the download is under way and started again 5–15 s later; the sync either retries through it or fails with one
line, and a second sync must then resume and verify. Workers serve from their own L2 meanwhile.

Then every job is accounted: sent = completed + dead on purpose + lost; duplicated = jobs whose body ran to
completion twice (the job record's `completed`). A send that raised (Redis down at that instant) was never
acknowledged and is counted apart.

Timing settings are the operator defaults (outbox grace 60 s included) except the job time limit (20 s, so a hung
job costs a soak seconds, not the default 600 s) and one retry of a timed-out job.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from _fleet import RELEASE, publish_release
from _results import entry, merge_results, write_section

HANG_PROMPT = "chaos: a pipeline call that never returns"
WORKERS = 3
PRODUCERS = 10
TIME_LIMIT_S = 20.0
SYNC_BYTES = 32 << 20
SYNC_LINE_BPS = 32e6
OSS_KEY_ID, OSS_SECRET, OSS_BUCKET = "LTAIchaos0000001", "chaos-secret-never-logged", "models"
SYNC_RELEASE = "chaosbig@base-v1"


class Broker:
    """The soak's Redis: behind Sentinel (primary, replica, three sentinels) or one plain redis-server."""

    def __init__(self, workdir: Path, sentinel: bool, host: str = "127.0.0.1") -> None:
        from tests.sentinels import SentinelSet
        from tests.support import RedisServer

        self.sentinel = sentinel
        self.set = SentinelSet(workdir / "sentinel", host=host).start() if sentinel else None
        self.server = None if sentinel else RedisServer(workdir / "redis", appendonly=True).start()
        self.failovers_failed = 0

    @property
    def url(self) -> str:
        return self.set.url if self.set else self.server.url

    def client(self):  # noqa: ANN201 - redis.Redis
        from fleetstate.client import redis_client

        return redis_client(self.url, self.set.master if self.set else None)

    def restart(self) -> None:
        """The primary's redis-server stopped and started again (a failover may follow if it is down > 1 s)."""
        if self.set is None:
            self.server.restart()
            return
        self.set.restart_data(self.set.primary_port())

    def failover(self) -> bool:
        try:
            self.set.wait_ready(timeout=120)
            self.set.failover(timeout=120)
            return True
        except Exception as exc:  # counted and printed: a failover that did not happen is no fault injected
            self.failovers_failed += 1
            print(f"  failover did not complete: {exc!r}", flush=True)
            return False

    def stop(self) -> None:
        if self.set:
            self.set.stop()
        else:
            self.server.stop()


class OssSyncs:
    """The OSS archive (the project's server, as its own process), and `warmfleet sync` runs that it walks out on in
    the middle of their download."""

    def __init__(self, workdir: Path) -> None:
        import numpy as np
        from safetensors.numpy import save_file

        from cachemgr.archive.oss import OssArchive
        from cachemgr.names import Release
        from fleetctl.localfleet import free_port

        self.workdir, self.root = workdir, workdir / "oss"
        self.port = free_port()
        self.proc = self._serve()
        folder = workdir / "syncsrc"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": np.random.default_rng(11).integers(0, 256, SYNC_BYTES - 128, dtype=np.uint8)},
                  str(folder / "weights.safetensors"))
        (folder / "model_index.json").write_text('{"_class_name": "ChaosBig"}')
        archive = OssArchive(OSS_BUCKET, "", endpoint=self.endpoint, access_key_id=OSS_KEY_ID,
                             access_key_secret=OSS_SECRET)
        archive.publish(Release.parse(SYNC_RELEASE).base, folder)
        self.runs = 0
        self.outcomes: Counter = Counter()
        self.busy = threading.Lock()

    def _serve(self):  # noqa: ANN202 - subprocess.Popen
        import os
        import subprocess

        from fleetctl.localfleet import wait_port

        env = {**os.environ, "OSS_SERVER_ACCESS_KEY_SECRET": OSS_SECRET}
        proc = subprocess.Popen([sys.executable, "-m", "ossserver", "--root", str(self.root), "--port", str(self.port),
                                 "--access-key-id", OSS_KEY_ID, "--bucket", OSS_BUCKET,
                                 "--link-rate", f"{int(SYNC_LINE_BPS / 1e6)}mbit"],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "oss.log", "ab"),
                                start_new_session=True)
        wait_port(self.port, timeout=120)
        return proc

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self, n: int) -> dict[str, str]:
        import os

        from tests.support import REPO

        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_HOME=str(self.workdir / "synchome"), FLEET_CACHE_ROOT=str(self.workdir / f"sync-l2-{n}"),
                   FLEET_ARCHIVE_URL=f"oss://{OSS_BUCKET}", FLEET_OSS_ENDPOINT=self.endpoint,
                   FLEET_OSS_ACCESS_KEY_ID=OSS_KEY_ID, FLEET_OSS_ACCESS_KEY_SECRET=OSS_SECRET,
                   PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        return env

    def outage(self, seconds: float) -> None:
        """One sync into a fresh L2; the archive stopped once its download is under way, for `seconds`; then the
        sync's outcome, and a second sync that must finish and verify."""
        import shutil
        import subprocess

        from tests.support import REPO

        with self.busy:
            self.runs += 1
            n, env = self.runs, self._env(self.runs)
            l2 = Path(env["FLEET_CACHE_ROOT"])
            argv = [sys.executable, "-m", "fleetctl.cli", "sync", "--release", SYNC_RELEASE]
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                partial = [p for p in (l2 / "tmp").glob("*.partial")] if (l2 / "tmp").is_dir() else []
                if any(p.stat().st_size > 0 for p in partial):
                    break
                time.sleep(0.1)
            during = proc.poll() is None
            self.proc.kill()  # the archive gone at once, connections and all
            self.proc.wait(timeout=60)
            time.sleep(seconds)
            self.proc = self._serve()
            try:
                _, err = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            lines = [line for line in err.replace("\r", "\n").splitlines()
                     if line.strip() and not line.startswith("sync:")]  # the progress bar aside
            if not during:
                outcome = "sync done before the outage"
            elif proc.returncode == 0:
                outcome = "retried through"
            elif proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err:
                outcome = "failed with one line"
            else:
                outcome = "failed badly"
                print(f"  sync {n} failed badly (exit {proc.returncode}): {err[-1500:]}", flush=True)
            self.outcomes[outcome] += 1
            again = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
            self.outcomes["resumed and verified" if again.returncode == 0 else "resume failed"] += 1
            if again.returncode:
                print(f"  sync {n} did not resume: {again.stderr[-1500:]}", flush=True)
            shutil.rmtree(l2, ignore_errors=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Supervisor:
    """Keeps WORKERS workers running: one that exits (killed, stopped, recycled) is replaced by a fresh one."""

    def __init__(self, settings, logs: Path, lab=None) -> None:  # noqa: ANN001 - FleetSettings, tests.netns.Lab
        from tests.fault_worker import HANG_ENV

        self.settings, self.logs, self.env = settings, logs, {HANG_ENV: HANG_PROMPT}
        self.lab = lab  # with a lab, slot i's workers run in its member `node<i>`
        self.generation, self.slots, self.restarts = 0, [], 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def _start(self, slot: int):  # noqa: ANN202 - tests.support.WorkerProc
        from contextlib import nullcontext

        from tests.support import start_worker

        self.generation += 1
        with self.lab.entered(f"node{slot}") if self.lab else nullcontext():  # the worker starts in the node's namespace
            return start_worker(self.settings, [RELEASE], f"chaos{self.generation}", self.logs, wait=False, **self.env)

    def start(self) -> None:
        from tests.support import wait_warm

        self.slots = [self._start(i) for i in range(WORKERS)]
        for w in self.slots:
            wait_warm(self.settings, w, timeout=600)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stop_event.wait(1.0):
            with self.lock:
                for i, w in enumerate(self.slots):
                    if w.proc.poll() is not None:
                        self.slots[i] = self._start(i)
                        self.restarts += 1

    def victim(self):  # noqa: ANN201
        with self.lock:
            running = [w for w in self.slots if w.proc.poll() is None]
            return random.choice(running) if running else None

    def partition(self, seconds: float) -> None:
        """A random slot's node loses its link for `seconds`; its worker keeps running, cut from everything."""
        node = f"node{random.randrange(len(self.slots))}"
        self.lab.cut(node)
        try:
            time.sleep(seconds)
        finally:
            self.lab.heal(node)

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
    args.add_argument("--broker", choices=("sentinel", "plain"), default="sentinel",
                      help="Redis behind Sentinel (default; adds the failover fault) or one plain redis-server")
    args.add_argument("--faults", default=None, help="only these faults, comma-separated (a short check of one)")
    args.add_argument("--netns", action="store_true",
                      help="each worker slot in its own network namespace (root): adds the partition fault")
    opts = args.parse_args(argv)
    lab = None
    if opts.netns:
        from tests.netns import Lab, unavailable

        why = unavailable()
        if why or opts.broker != "sentinel":
            print(why or "--netns runs behind Sentinel: leave --broker at its default", file=sys.stderr)
            return 1
        lab = Lab().start()
        for member in ("site", *(f"node{i}" for i in range(WORKERS))):
            lab.add(member)
        site = lab.entered("site")  # Redis, the archive and the producers: this thread and what it starts
        site.__enter__()
    rng = random.Random(opts.seed)
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="warmfleet-chaos-"))

    from cachemgr import LocalArchive
    from fleetstate.leases import job_record
    from tasks.settings import FleetSettings
    from tests.sentinels import MASTER

    publish_release(LocalArchive(workdir / "archive"), workdir / "build")
    server = Broker(workdir, sentinel=opts.broker == "sentinel", host=lab.address("site") if lab else "127.0.0.1")
    oss = OssSyncs(workdir)
    settings = FleetSettings(home=workdir / "home", broker_url=server.url, archive_url=(workdir / "archive").as_uri(),
                             torch_threads=1, node_name="chaosnode", job_time_limit_s=TIME_LIMIT_S,
                             job_max_retries=1, sentinel_master=MASTER)
    import tasks

    tasks.configure(settings)
    supervisor = Supervisor(settings, workdir / "logs", lab)
    supervisor.start()
    sent, refused, faults = [], Counter(), Counter()
    examples: dict[str, str] = {}
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
                with lock:
                    refused[type(exc).__name__] += 1
                    if type(exc).__name__ not in examples:
                        examples[type(exc).__name__] = "".join(traceback.format_exception(exc))[-3000:]
            stop.wait(rng.uniform(3.0, 7.0))

    kinds = ["kill9", "sigterm", "redis_restart", "oss_outage", "hang"]
    if server.sentinel:
        kinds.append("sentinel_failover")
    if lab:
        kinds.append("partition")
    if opts.faults:
        kinds = [k for k in opts.faults.split(",") if k in kinds] or kinds

    def fault() -> str:
        kind = rng.choice(kinds)
        if kind == "oss_outage" and oss.busy.locked():
            kind = rng.choice([k for k in kinds if k != "oss_outage"])
        if kind in ("kill9", "sigterm"):
            w = supervisor.victim()
            if w is None:
                return "none"
            w.stop(signal.SIGKILL if kind == "kill9" else signal.SIGTERM, timeout=60)
        elif kind == "redis_restart":
            server.restart()
        elif kind == "sentinel_failover":
            if not server.failover():
                return "failover_failed"
        elif kind == "oss_outage":
            threading.Thread(target=oss.outage, args=(rng.uniform(5, 15),), daemon=True).start()
        elif kind == "partition":
            supervisor.partition(rng.uniform(3, 6))
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
    client = server.client()
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
    with oss.busy:  # the last outage's syncs finish
        oss.stop()
    outbox_resent = int(client.hget("fleet:stats", "outbox_resent") or 0)
    supervisor.stop()
    server.stop()
    if lab:
        lab.stop()
    sync_bad = oss.outcomes["failed badly"] + oss.outcomes["resume failed"]
    lost_total = len(lost) + len(failed_other)
    minutes = (time.monotonic() - started) / 60
    print(f"chaos: {len(sent)} jobs, {sum(faults.values())} faults {dict(faults)}, completed {completed}, dead on "
          f"purpose {dead}, lost {lost_total}, duplicated {duplicated}, re-run after a fault {reruns}, sends refused "
          f"{dict(refused)}, worker restarts {supervisor.restarts}, outbox re-sends {outbox_resent}, syncs "
          f"{dict(oss.outcomes)}", flush=True)
    for line in (lost + failed_other)[:20]:
        print("  lost/failed:", line)
    for name, text in examples.items():
        print(f"  first refused send ({name}):\n{text}")
    merge_results([
        entry("chaos.jobs", len(sent), "jobs"), entry("chaos.faults", sum(faults.values()), "faults"),
        entry("chaos.lost", lost_total, "jobs", "0"), entry("chaos.duplicated", duplicated, "jobs", "0"),
        entry("chaos.minutes", round(minutes, 1), "min", ">= 20"),
        entry("chaos.outbox_resent", outbox_resent, "jobs"),
        entry("chaos.sync_outages", oss.runs, "syncs"), entry("chaos.sync_bad", sync_bad, "syncs", "0"),
    ])
    write_section("chaos", "\n".join([
        "## Chaos soak (bench/bench_chaos.py)",
        f"{PRODUCERS} producers, {WORKERS} workers (restarted by a supervisor loop), {minutes:.1f} min of a fault every"
        f" 20–40 s at random; broker, results and fleet state on {'Redis Sentinel (primary, replica, 3 sentinels)' if server.sentinel else 'one redis-server'}"
        f"{'; each worker slot in its own network namespace (partitions: a node link down 3–6 s)' if lab else ''}."
        " Operator defaults (outbox grace 60 s) except a 20 s job time limit and one retry of a timed-out job.",
        "",
        "| jobs sent | faults | completed | dead on purpose (hung) | lost | duplicated | re-run after a fault |"
        " sends refused (never acknowledged) | worker restarts |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(sent)} | {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}) |"
        f" {completed} | {dead} | {lost_total} | {duplicated} | {reruns} | {sum(refused.values())} |"
        f" {supervisor.restarts} |",
        "",
        f"Outbox re-sends (a lost pop sent again): {outbox_resent}. OSS outages during a sync: {oss.runs} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(oss.outcomes.items())) or 'none'}).",
    ]))
    return 0 if lost_total == 0 and duplicated == 0 and sync_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
