"""The control plane at 1,000 workers, simulated: route-flip propagation to 100 producers, `status` and the exporter's
scrape, Redis memory and CPU per worker, heartbeat traffic, at 100, 300 and 1,000 workers.

A simulated worker runs the fleet's own code: its state published in the warm registry and kept alive by the
registry's `Heartbeat` thread (with its node's L2 listing), the orphan/outbox `Sweeper` thread, and per job the
`JobRunner` a worker process attaches to Celery (execution lease claim and completion scripts, time-limit watchdog,
`WorkerRuntime.serve` with provenance and the output store, per-release job counters). Only the pipeline call is
replaced, at its boundary (`ResidentPipeline.pipeline`), by a timed no-op that returns an 8x8 image. Messages are not
carried by kombu here: a simulated worker's job arrives on its own schedule (BRPOP and the ack are kombu's, not the
fleet's). The workers run as threads in a few processes (`--procs`, at nice 10: they stand in for other machines, so
the measuring process and Redis get the CPU first), each worker with its own Redis client; 200 release
queues (20 models x 10 releases, each warm on `workers / 200` workers); 100 producers hold the route cache a
producer's router holds (`tasks.router.FleetRouter`), all in the bench's own process. One private redis-server per
size.

Measured per size, with the fleet idle (heartbeats and sweepers only) and then serving jobs:
- a route flip (`RouteTable.set_active`) until every producer's route cache has applied the invalidation (each read
  after it is then checked to give the new release), over `--flips` flips; p99 and max;
- `fleet_status` (what `warmfleet status` prints) and one scrape of the exporter's collector (`FleetCollector`
  through prometheus_client's `generate_latest`), medians;
- Redis `used_memory` after registration minus before, per worker; Redis CPU (`used_cpu_sys + used_cpu_user`) per
  second; commands per second while idle (`INFO commandstats`; the bench's own INFO/GET/PING excluded).
At the largest size also `status` and the scrape once 100,000 job records (`fleet:job:*`, as a day of jobs leaves)
sit in Redis: anything that walks the keyspace grows with them.

Run: .venv/bin/python bench/bench_scale.py [--sizes 100 300 1000] [--save FILE] [--before FILE]
(`--save` writes the raw figures as JSON; `--before` puts an earlier run's figures in the section beside these.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import entry, merge_results, stamp, today, verdict, write_section  # noqa: E402

MODELS = 20
RELEASES_PER_MODEL = 10
PRODUCERS = 100
WORKERS_PER_NODE = 8
JOBS_FLAG = "bench:scale:jobs"
JOB_RECORDS = 100_000
NOT_WORKERS = ("info", "get", "ping", "subscribe", "client|setname", "hello", "command|docs", "memory|usage")
"""Commands the bench itself and the producers' subscribers send while idle; the rest is the workers'."""
SWEEPER_COMMANDS = ("set", "hgetall", "zrangebyscore", "evalsha", "eval", "script|exists", "script|load")
"""What an idle worker's sweeper thread sends (its run lock, the deliveries index, the outbox); the rest of an idle
fleet's commands are its heartbeats (fleetstate/registry.py)."""


def releases() -> list[str]:
    return [f"m{m:02d}@base-v1.0.0+lora-v{r}.0.0" for m in range(MODELS) for r in range(RELEASES_PER_MODEL)]


def worker_of(i: int) -> tuple[str, str, str]:
    """(worker, node, release) of simulated worker `i`."""
    node = f"node-{i // WORKERS_PER_NODE:03d}"
    all_releases = releases()
    return f"sim{i:04d}@{node}", node, all_releases[i % len(all_releases)]


# -- the simulated workers (a child process: `--sim`)

class TimedNoop:
    """The pipeline call's stand-in: waits as long as a generation would, returns an 8x8 image."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, **kwargs: object) -> SimpleNamespace:
        from PIL import Image

        time.sleep(self.seconds)
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (200, 120, 40))])


def simulate(url: str, first: int, count: int, root: Path, job_seconds: float, job_every: float,
             heartbeat: float) -> None:
    import redis

    from cachemgr.store import SnapshotStore
    from fleetstate.orphans import SWEEP_SECONDS, Sweeper
    from fleetstate.registry import Heartbeat, WarmRegistry, WorkerState
    from tasks.requests import GenerateRequest
    from tasks.settings import FleetSettings
    from workers.jobs import JobRunner
    from workers.outputs import LocalOutputStore
    from workers.resident import ResidentPipeline
    from workers.runtime import WorkerRuntime

    os.nice(10)  # these threads stand in for other machines: the measuring process and Redis come first
    settings = FleetSettings(broker_url=url, heartbeat_seconds=heartbeat)
    outputs = LocalOutputStore(root / "outputs")
    stores: dict[str, SnapshotStore] = {}
    go = threading.Event()
    runners, threads = [], []
    for i in range(first, first + count):
        worker, node, release = worker_of(i)
        client = redis.Redis.from_url(url)
        registry = WarmRegistry(client, ttl=settings.warm_ttl_seconds)
        state = WorkerState(worker=worker, node=node, pid=os.getpid(), state="warm", releases=[release])
        registry.publish(state)
        store = stores.setdefault(node, SnapshotStore(root / "l2" / node))
        resident = ResidentPipeline(release, "sd", TimedNoop(job_seconds), "cpu", "float32",
                                    {"steps": 4, "guidance": 5.0, "width": 64, "height": 64})
        runtime = WorkerRuntime(worker, {release: resident}, outputs, state)
        runners.append((JobRunner(runtime, client, settings), worker, release))
        threads.append(Heartbeat(registry, state, settings.heartbeat_seconds, l2=store))
        threads.append(Sweeper(client, outbox_grace=settings.outbox_grace_seconds,
                               settle=settings.heartbeat_seconds + SWEEP_SECONDS))
    spread = heartbeat / max(1, count)
    for n in range(0, len(threads), 2):  # beats spread over one period, as workers started at different times are
        threads[n].start()
        threads[n + 1].start()
        time.sleep(spread)
    print("ready", flush=True)

    def serve(runner: JobRunner, worker: str, release: str) -> None:
        from cachemgr.names import queue_for

        rng = random.Random(worker)
        go.wait()
        time.sleep(rng.uniform(0, job_every))
        while True:
            task_id = uuid.uuid4().hex
            request = SimpleNamespace(
                id=task_id, hostname=worker, retries=0, kwargs={"prompt": "a jacket"}, fleet_sent_at=time.time(),
                delivery_info={"routing_key": queue_for(release)}, properties={"delivery_tag": uuid.uuid4().hex})
            try:
                runner.run(SimpleNamespace(request=request), GenerateRequest(prompt="a jacket", seed=1))
            except Exception as exc:  # a failed job is the fleet's to report; the bench counts it
                print(f"job failed on {worker}: {exc}", file=sys.stderr, flush=True)
            time.sleep(max(0.0, job_every - job_seconds) * rng.uniform(0.5, 1.5))

    for runner, worker, release in runners:
        threading.Thread(target=serve, args=(runner, worker, release), daemon=True).start()
    flag = redis.Redis.from_url(url)
    while not go.is_set():
        if flag.get(JOBS_FLAG):
            go.set()
        time.sleep(0.5)
    threading.Event().wait()  # until the bench ends this process


# -- the bench (its own process: producers, flips, status, scrape, Redis figures)

def redis_figures(client) -> dict:  # noqa: ANN001 - redis.Redis
    info = client.info("all")
    calls = {k[len("cmdstat_"):]: v["calls"] for k, v in info.items() if k.startswith("cmdstat_")}
    return {"used_memory": info["used_memory"], "clients_memory": info.get("mem_clients_normal", 0),
            "clients": info["connected_clients"], "cpu": info["used_cpu_sys"] + info["used_cpu_user"],
            "calls": calls, "at": time.monotonic()}


def ops_between(a: dict, b: dict) -> tuple[float, dict[str, float]]:
    seconds = b["at"] - a["at"]
    per = {name: (b["calls"].get(name, 0) - a["calls"].get(name, 0)) / seconds for name in b["calls"]}
    per = {name: rate for name, rate in per.items() if rate > 0 and name not in NOT_WORKERS}
    return sum(per.values()), dict(sorted(per.items(), key=lambda kv: -kv[1]))


def counting_client(url: str):  # noqa: ANN201 - (redis.Redis, its connection class)
    """A client whose connections count what they send: one call per round trip (a pipeline sends once)."""
    import redis

    class Counting(redis.Connection):
        sent = 0

        def send_packed_command(self, command, check_health=True):  # noqa: ANN001, ANN202
            Counting.sent += 1
            return super().send_packed_command(command, check_health)

    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, connection_class=Counting))
    client.ping()
    return client, Counting


def timed(fn, runs: int, counter=None) -> dict[str, list[float]]:  # noqa: ANN001
    """Wall ms, this thread's CPU ms (the work itself, less what other processes took from it) and round trips."""
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "trips": []}
    for _ in range(runs):
        sent = counter.sent if counter is not None else 0
        started, cpu = time.perf_counter(), time.thread_time()
        fn()
        out["wall"].append((time.perf_counter() - started) * 1000)
        out["cpu"].append((time.thread_time() - cpu) * 1000)
        out["trips"].append((counter.sent - sent) if counter is not None else 0)
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def scrape(client) -> bytes:  # noqa: ANN001
    from prometheus_client import CollectorRegistry, generate_latest

    from fleetctl.metrics import FleetCollector

    registry = CollectorRegistry()
    registry.register(FleetCollector(client))
    return generate_latest(registry)


def wait_registered(client, n: int, timeout: float) -> None:  # noqa: ANN001
    from fleetstate.registry import WarmRegistry

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(WarmRegistry(client).workers()) >= n:
            return
        time.sleep(0.5)
    raise TimeoutError(f"only {len(WarmRegistry(client).workers())} of {n} simulated workers registered")


def seed_job_records(client, n: int) -> None:  # noqa: ANN001
    """Records as finished jobs leave them (fleet:job:<id>, 24 h TTL), written in pipelined batches."""
    from fleetstate.keys import JOB_KEY

    result = json.dumps({"image_uri": "file:///out/x.png", "release": releases()[0], "worker": "sim0000@node-000"})
    for start in range(0, n, 5000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 5000)):
                key = JOB_KEY.format(task_id=f"seeded-{i:07d}")
                pipe.hset(key, mapping={"runs": 1, "completed": 1, "holder": "sim0000@node-000", "result": result,
                                        "finished_by": "sim0000@node-000"})
                pipe.expire(key, 86400)
            pipe.execute()


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    import redis

    from fleetstate.keys import STATS_KEY
    from fleetstate.routes import RouteTable
    from fleetstate.status import fleet_status
    from tasks.router import FleetRouter
    from tests.support import RedisServer

    server = RedisServer(tmp / f"redis-{n}", appendonly=False).start()
    sims: list[subprocess.Popen] = []
    routers: list[FleetRouter] = []
    try:
        admin = redis.Redis.from_url(server.url)
        table = RouteTable(admin)
        all_releases = releases()
        for m in range(MODELS):
            table.set_active(all_releases[m * RELEASES_PER_MODEL], actor="bench", reason="seed", forced=True)
        models = [f"m{m:02d}" for m in range(MODELS)]
        routers = [FleetRouter(server.url, default_model=models[0], ttl=2.0) for _ in range(PRODUCERS)]
        for router in routers:
            for model in models:
                router.route(model)
        for router in routers:
            assert router.cache.wait_listening(30), "a producer's route subscriber did not subscribe"
        time.sleep(3.0)  # idle clients' query buffers are trimmed by Redis's clients cron
        before = redis_figures(admin)

        per_proc = -(-n // args.procs)
        for p in range(args.procs):
            first, count = p * per_proc, min(per_proc, n - p * per_proc)
            if count <= 0:
                break
            sims.append(subprocess.Popen(
                [sys.executable, __file__, "--sim", server.url, str(first), str(count), str(tmp / f"sim-{n}-{p}"),
                 str(args.job_seconds), str(args.job_every), str(args.heartbeat)],
                stdout=subprocess.PIPE, text=True, start_new_session=True))
        for sim in sims:
            line = sim.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a simulation process did not start (exit {sim.poll()}): {line!r}")
        wait_registered(admin, n, 60)
        time.sleep(args.heartbeat)  # every heartbeat thread has beaten at least once

        idle_a = redis_figures(admin)
        time.sleep(args.idle)
        idle_b = redis_figures(admin)
        idle_ops, idle_by_command = ops_between(idle_a, idle_b)
        heartbeat_ops = sum(rate for name, rate in idle_by_command.items() if name not in SWEEPER_COMMANDS)
        idle_cpu = (idle_b["cpu"] - idle_a["cpu"]) / (idle_b["at"] - idle_a["at"])
        bytes_per_worker = (idle_b["used_memory"] - before["used_memory"]) / n
        client_bytes_per_worker = (idle_b["clients_memory"] - before["clients_memory"]) / n
        connections_per_worker = (idle_b["clients"] - before["clients"]) / n

        admin.set(JOBS_FLAG, "1")
        time.sleep(args.job_every + 1.0)  # every simulated worker has started serving
        served_a = int(admin.hget(STATS_KEY, "l1_hits") or 0)
        busy_a = redis_figures(admin)

        flip_ms, model = [], models[0]
        pair = (all_releases[0], all_releases[1])
        for i in range(args.flips):
            target = pair[(i + 1) % 2]
            generations = [router.cache.generation for router in routers]
            started = time.perf_counter()
            table.set_active(target, actor="bench", reason="flip", forced=True)
            for router, generation in zip(routers, generations, strict=True):
                if not router.cache.wait_generation(generation, 10):
                    raise TimeoutError("a producer's route cache never saw a flip")
            flip_ms.append((time.perf_counter() - started) * 1000)
            wrong = [r for r in routers if r.route(model).active != target]
            assert not wrong, f"{len(wrong)} producers still route {model} to the old release after the flip"
            time.sleep(args.flip_gap)

        reader, counter = counting_client(server.url)
        status_ms = timed(lambda: fleet_status(reader), args.reads, counter)
        scrape_ms = timed(lambda: scrape(reader), args.reads, counter)
        status = fleet_status(admin)
        busy_b = redis_figures(admin)
        served = int(admin.hget(STATS_KEY, "l1_hits") or 0) - served_a
        busy_seconds = busy_b["at"] - busy_a["at"]
        busy_cpu = (busy_b["cpu"] - busy_a["cpu"]) / busy_seconds
        busy_ops, busy_by_command = ops_between(busy_a, busy_b)
        assert len(status["workers"]) == n, f"status lists {len(status['workers'])} workers of {n}"

        out = {
            "workers": n, "flip_ms": flip_ms, "status_ms": status_ms, "scrape_ms": scrape_ms,
            "bytes_per_worker": bytes_per_worker, "idle_ops_per_s": idle_ops, "heartbeat_ops_per_s": heartbeat_ops,
            "client_bytes_per_worker": client_bytes_per_worker, "connections_per_worker": connections_per_worker,
            "idle_by_command": idle_by_command,
            "idle_cpu_per_s": idle_cpu, "busy_cpu_per_s": busy_cpu, "busy_ops_per_s": busy_ops,
            "busy_by_command": busy_by_command, "jobs_per_s": served / busy_seconds,
            "keys": admin.dbsize(),
        }
        if n == max(args.sizes) and args.job_records:
            seed_job_records(admin, args.job_records)
            out["records"] = args.job_records
            out["status_ms_records"] = timed(lambda: fleet_status(reader), args.reads, counter)
            out["scrape_ms_records"] = timed(lambda: scrape(reader), args.reads, counter)
        return out
    finally:
        for router in routers:
            router.cache.close()
            router.catalog.close()
        for sim in sims:  # our own simulation processes, by their group
            try:
                os.killpg(sim.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for sim in sims:
            try:
                sim.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)
                sim.wait()
        server.stop()


def reads(timings: dict[str, list[float]], what: str, suffix: str = "") -> dict:
    return {f"{what}_ms{suffix}": round(statistics.median(timings["wall"]), 1),
            f"{what}_cpu_ms{suffix}": round(statistics.median(timings["cpu"]), 1),
            f"{what}_round_trips{suffix}": max(timings["trips"])}


def summarise(r: dict) -> dict:
    return {
        "workers": r["workers"], "flip_p99_ms": round(p99(r["flip_ms"]), 2),
        "flip_p50_ms": round(statistics.median(r["flip_ms"]), 2), "flip_max_ms": round(max(r["flip_ms"]), 2),
        "flips": len(r["flip_ms"]), **reads(r["status_ms"], "status"), **reads(r["scrape_ms"], "scrape"),
        "dataset_bytes_per_worker": round(r["bytes_per_worker"] - r["client_bytes_per_worker"]),
        "bytes_per_worker": round(r["bytes_per_worker"]), "idle_ops_per_s": round(r["idle_ops_per_s"], 1),
        "heartbeat_ops_per_s": round(r["heartbeat_ops_per_s"], 1),
        "client_bytes_per_worker": round(r["client_bytes_per_worker"]),
        "connections_per_worker": round(r["connections_per_worker"], 2),
        "idle_cpu_per_s": round(r["idle_cpu_per_s"], 4), "busy_cpu_per_s": round(r["busy_cpu_per_s"], 4),
        "busy_ops_per_s": round(r["busy_ops_per_s"], 1), "jobs_per_s": round(r["jobs_per_s"], 1), "keys": r["keys"],
        "idle_top": {k: round(v, 1) for k, v in list(r["idle_by_command"].items())[:8]},
        "busy_top": {k: round(v, 1) for k, v in list(r["busy_by_command"].items())[:8]},
        **({"records": r["records"], **reads(r["status_ms_records"], "status", "_records"),
            **reads(r["scrape_ms_records"], "scrape", "_records")} if "records" in r else {}),
    }


def table(rows: list[dict]) -> str:
    lines = ["| workers | flip p50 / p99 / max ms | status ms: wall / CPU / round trips | scrape ms: wall / CPU / "
             "round trips | Redis B/worker: all (data) | heartbeat / idle cmds/s | Redis CPU s/s idle / serving | "
             "jobs/s | keys |", "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        data = s.get("dataset_bytes_per_worker", "?")
        lines.append(f"| {s['workers']} | {s['flip_p50_ms']} / {s['flip_p99_ms']} / {s['flip_max_ms']} | "
                     f"{s['status_ms']} / {s.get('status_cpu_ms', '?')} / {s.get('status_round_trips', '?')} | "
                     f"{s['scrape_ms']} / {s.get('scrape_cpu_ms', '?')} / {s.get('scrape_round_trips', '?')} | "
                     f"{s['bytes_per_worker']} ({data}) | {s.get('heartbeat_ops_per_s', '?')} / "
                     f"{s['idle_ops_per_s']} | {s['idle_cpu_per_s']} / {s['busy_cpu_per_s']} | {s['jobs_per_s']} | "
                     f"{s['keys']} |")
    return "\n".join(lines)


def records_line(r: dict) -> str:
    if "records" not in r:
        return ""
    return (f"with {r['records']:,} job records added (a day's `fleet:job:*` keys): status {r['status_ms_records']} ms "
            f"wall / {r.get('status_cpu_ms_records', '?')} ms CPU / {r.get('status_round_trips_records', '?')} round "
            f"trips, scrape {r['scrape_ms_records']} ms / {r.get('scrape_cpu_ms_records', '?')} ms / "
            f"{r.get('scrape_round_trips_records', '?')}")


def main() -> None:
    if sys.argv[1:2] == ["--sim"]:
        url, first, count, root, job_seconds, job_every, heartbeat = sys.argv[2:9]
        simulate(url, int(first), int(count), Path(root), float(job_seconds), float(job_every), float(heartbeat))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--procs", type=int, default=4, help="simulation processes (the workers are their threads)")
    parser.add_argument("--job-seconds", type=float, default=2.5, help="the timed no-op standing in for inference")
    parser.add_argument("--job-every", type=float, default=20.0, help="a simulated worker's mean seconds per job")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="FLEET_HEARTBEAT_SECONDS")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window")
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--flip-gap", type=float, default=0.02)
    parser.add_argument("--reads", type=int, default=5, help="status and scrape runs per size")
    parser.add_argument("--job-records", type=int, default=JOB_RECORDS)
    parser.add_argument("--save", type=Path, help="write the raw figures here (JSON)")
    parser.add_argument("--before", type=Path, help="an earlier run's --save file, shown beside this run")
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--note", default="")
    parser.add_argument("--from", dest="source", type=Path, help="write the results of a saved run (no new run)")
    args = parser.parse_args()
    for given in (args.before, args.source):
        if given is not None and not given.is_file():
            sys.exit(f"bench_scale: {given}: no such file; pass a file an earlier run wrote with --save")
    if args.source is not None:
        saved = json.loads(args.source.read_text())
        report(saved["rows"], args, saved.get("stamp") or f"{stamp()} (when written from a saved run)")
        return
    args.sizes = sorted(set(args.sizes))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        for n in args.sizes:
            print(f"== {n} simulated workers", flush=True)
            raw = run_size(n, args, Path(tmp_name))
            rows.append(summarise(raw))
            print(json.dumps(rows[-1]), flush=True)
    if args.save:
        args.save.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stamp": stamp(),
                                         "rows": rows}, indent=1))
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace, measured: str | None = None) -> None:
    small, large = rows[0], rows[-1]
    n_small, n_large = small["workers"], large["workers"]
    workers_ratio = n_large / n_small
    growth = (large["status_cpu_ms"] / small["status_cpu_ms"]) / workers_ratio
    scrape_growth = (large["scrape_cpu_ms"] / small["scrape_cpu_ms"]) / workers_ratio
    trips = large["status_round_trips"] / small["status_round_trips"]
    flip_growth = large["flip_p99_ms"] / small["flip_p99_ms"]
    suffix = f"_{n_large}_workers"
    entries = [
        entry(f"scale.flip_propagation_p99_ms{suffix}", large["flip_p99_ms"], "ms", "<= 100"),
        entry(f"scale.status_ms{suffix}", large["status_ms"], "ms", "<= 1000"),
        entry(f"scale.scrape_ms{suffix}", large["scrape_ms"], "ms", "<= 1000"),
        entry("scale.redis_bytes_per_worker", large["bytes_per_worker"], "B", None),
        entry("scale.redis_dataset_bytes_per_worker", large["dataset_bytes_per_worker"], "B", None),
        entry(f"scale.redis_cpu_per_s{suffix}", large["busy_cpu_per_s"], "CPU s/s", None),
        entry(f"scale.heartbeat_ops_per_s{suffix}", large["heartbeat_ops_per_s"], "commands/s", None),
        entry(f"scale.idle_ops_per_s{suffix}", large["idle_ops_per_s"], "commands/s", None),
        entry(f"scale.status_cpu_growth_per_worker_{n_large}_over_{n_small}", round(growth, 3), "ratio", "<= 1.5"),
        entry(f"scale.scrape_cpu_growth_per_worker_{n_large}_over_{n_small}", round(scrape_growth, 3), "ratio",
              "<= 1.5"),
        entry(f"scale.status_round_trips_{n_large}_over_{n_small}", round(trips, 3), "ratio", "<= 1"),
        entry(f"scale.flip_p99_{n_large}_over_{n_small}", round(flip_growth, 3), "ratio", "<= 2"),
    ]
    if "records" in large:
        entries.append(entry(f"scale.status_ms{suffix}_{large['records'] // 1000}k_job_records",
                             large["status_ms_records"], "ms", "<= 1000"))
    merge_results(entries)
    before = ""
    if args.before is not None:
        old = json.loads(args.before.read_text())["rows"]
        before = f"\n{args.before_label}:\n\n{table(old)}\n\n{records_line(old[-1])}\n"
    note = f"\n{args.note}\n" if args.note else ""
    write_section("scale", f"""
## The control plane at {n_large:,} simulated workers (bench/bench_scale.py, {today()})

{measured or stamp()}.{note}
Simulated workers run the fleet's own registry, heartbeat, sweeper and per-job code (`JobRunner`: claim and
completion scripts, watchdog, serve, job counters) with the pipeline call a timed no-op ({args.job_seconds:g} s,
one job per ~{args.job_every:g} s per worker); threads in {args.procs} processes at nice 10, a Redis client each;
{MODELS * RELEASES_PER_MODEL} release queues, {PRODUCERS} producers' route caches in the bench's process, one private
redis-server per size, all on this machine's cores. Flip: `RouteTable.set_active` until all {PRODUCERS} caches applied
it ({small['flips']} flips per size). Status and scrape: wall time, the calling thread's CPU time (the work itself;
wall time on these shared cores is mostly waiting), round trips counted on the client's connections. Redis memory:
`used_memory` after registration less before, per worker; (data) leaves out its connections' buffers. Commands/s:
`INFO commandstats` with the fleet idle; heartbeats are all but the sweepers' commands.

{table(rows)}

{records_line(large)}

| what | measured | target |
|---|---|---|
| route flip to every producer, p99 at {n_large} workers | **{large['flip_p99_ms']} ms** ({verdict(large['flip_p99_ms'] <= 100)}); {flip_growth:.2f}x the p99 at {n_small} | ≤ 100 ms |
| `status` at {n_large} workers (median of {args.reads}) | **{large['status_ms']} ms** ({verdict(large['status_ms'] <= 1000)}), {large['status_cpu_ms']} ms CPU, {large['status_round_trips']} round trips ({trips:.2f}x those at {n_small}); CPU per worker {n_large} over {n_small}: {growth:.2f} | ≤ 1000 ms; ≤ 1.5 |
| exporter scrape at {n_large} workers | **{large['scrape_ms']} ms** ({verdict(large['scrape_ms'] <= 1000)}), {large['scrape_cpu_ms']} ms CPU, {large['scrape_round_trips']} round trips; CPU per worker {n_large} over {n_small}: {scrape_growth:.2f} | ≤ 1000 ms |
| Redis memory per worker | **{large['bytes_per_worker']} B**, {large['dataset_bytes_per_worker']} B without its connection's buffers ({large['connections_per_worker']} connections per simulated worker) | – |
| Redis CPU while serving ({large['jobs_per_s']} jobs/s) | **{large['busy_cpu_per_s']} s/s** (idle {large['idle_cpu_per_s']}) | – |
| commands/s from heartbeats (idle fleet) | **{large['heartbeat_ops_per_s']}** ({large['heartbeat_ops_per_s'] / n_large:.2f} per worker) | – |
| commands/s idle, sweepers included | {large['idle_ops_per_s']}: {', '.join(f'{k} {v}' for k, v in large['idle_top'].items())} | – |
{before}""")
    print(f"flip p99 {large['flip_p99_ms']} ms; status {large['status_ms']} ms ({large['status_cpu_ms']} ms CPU, "
          f"{large['status_round_trips']} round trips); scrape {large['scrape_ms']} ms; {large['bytes_per_worker']} "
          f"B/worker; heartbeats {large['heartbeat_ops_per_s']} cmds/s")


if __name__ == "__main__":
    main()
