"""Real fleets on a lab's private LAN (tests/netns.py), and the partitions they are promised to survive.

Each part in its own namespace and address: Redis (or a Sentinel set), the OSS dev server behind a kernel-shaped
line, the producers (the calling thread, entered into the `prod` member), each node's workers. A partition is a link
set down. The trials here are shared by the fault test (one trial, CI) and `python -m bench netfleet` (ten or more);
each returns what it counted and asserts nothing about durations. What each scenario promises is written in
docs/reliability.md ("Partitions").
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from beat_schedule import SYNC_TASK
from cachemgr.names import ComponentRef, node_queue, queue_for
from cachemgr.store import SnapshotStore
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.keys import KOMBU_UNACKED, PEER_QUARANTINE_KEY
from fleetstate.leases import job_record
from fleetstate.nodes import NodeRegistry
from tasks.settings import FleetSettings

from .netns import Lab, NsOss, NsRedis, start_node_process, start_node_worker, wait_tcp
from .sentinels import MASTER, WRITE_GUARD
from .support import Calibration, WorkerProc, fleet_settings_for, wait_warm

RELEASE = DEMO_RELEASES[1]
AK, SK, PEER_SECRET = "netfleet-ak", "netfleet-sk", "netfleet-peer-secret"
JOB_SETTINGS: dict[str, Any] = {"heartbeat_seconds": 1.0, "warm_ttl_seconds": 4.0, "job_lease_seconds": 30.0,
                                "visibility_timeout": 60}
"""A holder silent past the warm TTL (4 s) looks dead and its job goes to a peer, which waits on the execution lease
(30 s, renewed every 10 s): a holder back before the lease lapses finishes its job, and the peer returns its result."""


def l2_faults(root: Path) -> list[str]:
    """Every committed snapshot under an L2 root re-hashed against its manifest: what does not verify (none: good)."""
    if not (root / "snapshots").exists():
        return []
    store = SnapshotStore(root)
    return [f"{c.ref} {c.path}: {c.reason}" for ref in store.refs() for c in store.check(ref, stamp=False) if not c.ok]


@dataclass
class Outcome:
    """What one trial sent and what became of it; `sent = completed + lost`, refused sends counted apart."""

    scenario: str
    sent: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    refused: int = 0
    corrupt_l2: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


# -- a fleet of GPU workers, one per node ------------------------------------------------------------------------


@dataclass
class JobFleet:
    lab: Lab
    redis: Any  # NsRedis, or NsSentinelSet
    settings: FleetSettings  # the producers'
    nodes: dict[str, FleetSettings]
    workers: dict[str, WorkerProc]
    tasks: Any

    def client(self):  # noqa: ANN201 - redis.Redis on the fleet state (the primary, behind Sentinel)
        return self.settings.state_client()

    def meta(self, task_id: str) -> dict:
        return self.tasks.app.backend.get_task_meta(task_id)

    def wait_settled(self, task_id: str, timeout: float = 60) -> bool:
        """Wait until no copy of the job waits in its queue or unacknowledged, and no worker reports it active (a
        peer's copy has been answered: the holder's ack may have removed the shared delivery tag before)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = [raw for raw in client.hvals(KOMBU_UNACKED) if task_id.encode() in raw]
            if not held and not client.llen(queue_for(RELEASE)):
                active = self.tasks.app.control.inspect(timeout=1.0).active() or {}
                if len(active) == len(self.workers) and not any(
                        job.get("id") == task_id for jobs in active.values() for job in jobs):
                    return True
            time.sleep(0.2)
        return False

    def wait_started(self, task_id: str, timeout: float = 300) -> str:
        """The worker (`name@node`) that reported the job STARTED."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.meta(task_id)
            info = m.get("result") if isinstance(m.get("result"), dict) else {}
            if m.get("status") == "STARTED" and info.get("hostname"):
                return info["hostname"]
            time.sleep(0.05)
        raise AssertionError(f"job {task_id} not started within {timeout} s")


@dataclass
class NsSentinelSet:
    """A primary and a replica (each its own member) and three sentinels (one member), as tests/sentinels.py
    starts them on loopback: the data servers refuse writes without an in-sync replica (WRITE_GUARD)."""

    lab: Lab
    dir: Path
    master: str = MASTER
    data: dict[str, NsRedis] = field(default_factory=dict)
    ports: tuple[int, ...] = (26379, 26380, 26381)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://{self.lab.address('sentinels')}:{p}" for p in self.ports) + "/0"

    def start(self) -> NsSentinelSet:
        primary = self.lab.address("redis-a")
        self.data["redis-a"] = NsRedis(self.lab, "redis-a", self.dir / "a", extra=WRITE_GUARD).start()
        self.data["redis-b"] = NsRedis(self.lab, "redis-b", self.dir / "b",
                                       extra=(*WRITE_GUARD, "--replicaof", primary, "6379")).start()
        for server in self.data.values():
            wait_tcp(server.host, server.port)
        for i, port in enumerate(self.ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(f"port {port}\nbind {self.lab.address('sentinels')}\nprotected-mode no\ndir {self.dir}\n"
                            f"sentinel monitor {self.master} {primary} 6379 2\n"
                            f"sentinel down-after-milliseconds {self.master} 1000\n"
                            f"sentinel failover-timeout {self.master} 15000\n"
                            f"sentinel parallel-syncs {self.master} 1\n")
            self.lab.popen("sentinels", [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
                           self.dir / f"sentinel{i}.log")
            wait_tcp(self.lab.address("sentinels"), port)
        self.wait_ready()
        return self

    def sentinel(self, i: int = 0):  # noqa: ANN201
        import redis

        return redis.Redis(host=self.lab.address("sentinels"), port=self.ports[i], decode_responses=True,
                           socket_timeout=2, socket_connect_timeout=2)

    def primary(self) -> str:
        """The member the sentinels name as primary (all must agree)."""
        named = {self.sentinel(i).sentinel_get_master_addr_by_name(self.master)[0] for i in range(len(self.ports))}
        if len(named) != 1:
            raise AssertionError(f"the sentinels disagree on the primary: {named}")
        return next(m for m, server in self.data.items() if server.host in named)

    def wait_ready(self, timeout: float = 120) -> None:
        """Every sentinel names the same primary and sees its replica, and the replica is in sync."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                primary = self.primary()
                replica = next(server for m, server in self.data.items() if m != primary)
                if all(len(self.sentinel(i).sentinel_slaves(self.master)) == 1 for i in range(len(self.ports))) \
                        and replica.client().info("replication").get("master_link_status") == "up":
                    return
            except (redis.RedisError, AssertionError, StopIteration, IndexError, KeyError, TypeError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"sentinel set not ready after {timeout} s (see {self.dir})")


@contextmanager
def job_fleet(root: Path, archive_dir: Path, nodes: tuple[str, ...] = ("node-a", "node-b"), sentinel: bool = False,
              **overrides: Any) -> Iterator[JobFleet]:
    """Redis (or a Sentinel set), the producers (the calling thread) and one warm worker per node, each in its
    namespace; workers read the archive from a local folder (no network: a partition cuts them from Redis only)."""
    import tasks

    with ExitStack() as stack:
        lab = stack.enter_context(Lab())
        servers = ("redis-a", "redis-b", "sentinels") if sentinel else ("redis",)
        for member in (*servers, "prod", *nodes):
            lab.add(member)
        stack.enter_context(lab.entered("prod"))
        if sentinel:
            redis_server: Any = NsSentinelSet(lab, root / "sentinel").start()
        else:
            redis_server = NsRedis(lab, "redis", root / "redis").start()
            wait_tcp(redis_server.host, redis_server.port)
        settings = fleet_settings_for(root / "prod", redis_server.url, archive_dir, **(JOB_SETTINGS | overrides))
        node_settings = {n: settings.model_copy(update={"home": root / n, "node_name": n}) for n in nodes}
        workers = {n: start_node_worker(lab, n, s, [RELEASE], "gpu0", root / "logs") for n, s in node_settings.items()}
        for n, worker in workers.items():
            wait_warm(node_settings[n], worker, timeout=300)
        tasks.configure(settings)
        stack.callback(tasks.app.pool.force_close_all)
        yield JobFleet(lab, redis_server, settings, node_settings, workers, tasks)


def worker_cut_trial(fleet: JobFleet, calibration: Calibration, cut_s: float = 8.0, job_s: float = 16.0,
                     seed: int = 0) -> Outcome:
    """A worker cut from Redis (its node's link down) `cut_s` into a job of about `job_s`, then back: the job must
    complete once. The peer node, still connected, sees the holder's heartbeat lapse and receives the job; it waits on
    the holder's execution lease and returns the holder's result."""
    out = Outcome("worker cut from Redis mid-job", sent=1)
    started = time.monotonic()
    r = fleet.tasks.generate.delay(f"partitioned mid-job {seed}", seed=seed, release=RELEASE,
                                   **calibration.job(job_s))
    holder = fleet.wait_started(r.id)
    node = holder.split("@", 1)[1]
    time.sleep(1.0)
    still_running = fleet.meta(r.id)["status"] == "STARTED"
    fleet.lab.cut(node)
    try:
        time.sleep(cut_s)
    finally:
        fleet.lab.heal(node)
    try:
        result = r.get(timeout=300)
    except Exception as exc:  # noqa: BLE001 - counted as lost, with the reason
        out.lost, out.notes["error"] = 1, f"{type(exc).__name__}: {exc}"
        return out
    out.seconds = time.monotonic() - started
    calibration.learn(result)
    settled = fleet.wait_settled(r.id)
    record = job_record(fleet.client(), r.id)
    out.completed = 1
    out.duplicated = int(int(record.get("completed", "0")) > 1)
    out.notes = {"holder": holder, "served_by": result["worker"], "runs": record.get("runs"),
                 "completed": record.get("completed"), "duplicates": record.get("duplicates", "0"),
                 "cut_while_running": still_running, "task_id": r.id, "settled": settled}
    for settings in fleet.nodes.values():
        out.corrupt_l2 += l2_faults(settings.resolved_cache_root)
    return out


def produce_during(fleet: JobFleet, scenario: str, fault: Callable[[], dict[str, Any]], producers: int = 4,
                   before_s: float = 2.0, after_s: float = 3.0, seed: int = 0) -> Outcome:
    """Producer threads send small jobs before, during and after `fault()`: a send either returns (and its job must
    then complete, once) or raises to the producer (never acknowledged: the producer's to send again)."""
    out = Outcome(scenario)
    acknowledged: list[Any] = []
    refused: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                r = fleet.tasks.generate.delay(f"producer {n} job {i}", seed=seed * 1000 + n * 100 + i,
                                               release=RELEASE, steps=2)
                with lock:
                    acknowledged.append(r)
            except Exception as exc:  # noqa: BLE001 - a refused send is the producer's to retry
                with lock:
                    refused.append(type(exc).__name__)
                time.sleep(0.2)
            i += 1
            time.sleep(0.3)

    threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in range(producers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(before_s)
    out.notes.update(fault())
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    out.sent, out.refused = len(acknowledged), len(refused)
    client = fleet.client()
    for r in acknowledged:
        try:
            r.get(timeout=300)
            out.completed += 1
            out.duplicated += int(int(job_record(client, r.id).get("completed", "0")) > 1)
        except Exception as exc:  # noqa: BLE001 - an acknowledged send without a result is lost
            out.lost += 1
            out.notes.setdefault("errors", []).append(f"{r.id}: {type(exc).__name__}: {exc}")
    out.seconds = time.monotonic() - started
    out.notes["refused_kinds"] = sorted(set(refused))
    for settings in fleet.nodes.values():
        out.corrupt_l2 += l2_faults(settings.resolved_cache_root)
    return out


def producers_cut_trial(fleet: JobFleet, cut_s: float = 5.0, seed: int = 0) -> Outcome:
    """The producers' namespace loses its link while they send, then gets it back."""
    def fault() -> dict[str, Any]:
        fleet.lab.cut("prod")
        try:
            time.sleep(cut_s)
        finally:
            fleet.lab.heal("prod")
        return {"cut_s": cut_s}

    return produce_during(fleet, "producers cut from Redis", fault, seed=seed)


def primary_cut_trial(fleet: JobFleet, cut_s: float = 12.0, seed: int = 0) -> Outcome:
    """Behind Sentinel, the primary's member loses its link (cut from its replica, the sentinels and every client)
    while producers send; the sentinels promote the replica; the link comes back and the old primary rejoins as a
    replica. Every acknowledged send completes once."""
    sentinels: NsSentinelSet = fleet.redis

    def fault() -> dict[str, Any]:
        old = sentinels.primary()
        fleet.lab.cut(old)
        try:
            time.sleep(cut_s)
            new = sentinels.primary()  # asked from the producers' side, which still reaches the sentinels
        finally:
            fleet.lab.heal(old)
        sentinels.wait_ready()
        return {"old_primary": old, "new_primary": new}

    return produce_during(fleet, "Redis primary cut from its replica (Sentinel)", fault, seed=seed, after_s=5.0)


# -- a site of nodes syncing from the archive and from each other -----------------------------------------------


def write_version(folder: Path, mib: int, seed: int, tensors: int = 32, changed: int | None = None,
                  base_seed: int = 0) -> Path:
    """A checkpoint of `mib` MiB of seeded random bytes (incompressible, like weights) and a config; with `changed`,
    only the first `changed` tensors follow `seed`, the others `base_seed` (a new version of a base)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (mib << 20) // tensors
    seeds = [seed if changed is None or i < changed else base_seed for i in range(tensors)]
    save_file({f"t{i:03d}": np.random.default_rng(seeds[i] * 1000 + i).integers(0, 255, size=size, dtype=np.uint8)
               for i in range(tensors)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(f'{{"tensors": {tensors}}}')
    return folder


@dataclass
class SiteFleet:
    lab: Lab
    redis: NsRedis
    oss: NsOss
    settings: FleetSettings  # the operator's (producers' namespace)
    nodes: dict[str, FleetSettings]
    procs: dict[str, WorkerProc]
    tasks: Any
    root: Path

    def client(self):  # noqa: ANN201
        return self.redis.client()

    def publisher(self):  # noqa: ANN201 - an OssArchive opened from the producers' namespace
        from cachemgr.archive.oss import OssArchive

        return OssArchive("models", "site", endpoint=self.oss.endpoint, access_key_id=AK, access_key_secret=SK)

    def send_sync(self, node: str, ref: ComponentRef):  # noqa: ANN201 - AsyncResult
        return self.tasks.app.send_task(SYNC_TASK, kwargs={"refs": [f"{ref.model}/{ref.component}/{ref.version}"]},
                                        queue=node_queue(node))

    def sync(self, node: str, ref: ComponentRef, timeout: float = 600) -> dict:
        return self.send_sync(node, ref).get(timeout=timeout)

    def l2(self, node: str) -> Path:
        return self.nodes[node].resolved_cache_root

    def wait_bytes(self, member: str, since: int, at_least: int, timeout: float = 60) -> bool:
        """Wait until `member`'s link has sent `at_least` bytes more than `since` (a transfer under way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lab.sent_bytes(member) - since >= at_least:
                return True
            time.sleep(0.02)
        return False


@contextmanager
def site_fleet(root: Path, nodes: int = 6, rate_mbit: float = 100.0, delay_ms: float = 45.0,
               **overrides: Any) -> Iterator[SiteFleet]:
    """Redis, the OSS dev server (its line shaped in the kernel at `rate_mbit`, `delay_ms` per request in the
    server), the operator (the calling thread) and `nodes` nodes, each a `warmfleet maintenance-worker` with its
    peer server on its own address."""
    import tasks

    names = tuple(f"node-{i}" for i in range(nodes))
    with ExitStack() as stack:
        lab = stack.enter_context(Lab())
        for member in ("redis", "oss", "prod", *names):
            lab.add(member)
        lab.shape("oss", rate_mbit)
        stack.enter_context(lab.entered("prod"))
        redis_server = NsRedis(lab, "redis", root / "redis").start()
        oss = NsOss(lab, "oss", root / "oss", AK, SK, delay_ms=delay_ms).start()
        wait_tcp(redis_server.host, redis_server.port)
        wait_tcp(lab.address("oss"), oss.port)
        base = FleetSettings(home=root / "operator", broker_url=redis_server.url, archive_url="oss://models/site",
                             oss_endpoint=oss.endpoint, oss_access_key_id=AK, oss_access_key_secret=SK,
                             peer_secret=PEER_SECRET, peer_port=9810, peer_timeout=5, peer_lease_seconds=10,
                             node_name="operator", heartbeat_seconds=1.0, warm_ttl_seconds=4.0, **overrides)
        node_settings = {n: base.model_copy(update={"home": root / n, "node_name": n, "peer_address": lab.address(n)})
                         for n in names}
        procs = {n: start_node_process(lab, n, s, ["maintenance-worker", "--name", f"maint@{n}"], n, root / "logs")
                 for n, s in node_settings.items()}
        tasks.configure(base)
        stack.callback(tasks.app.pool.force_close_all)
        client = redis_server.client()
        registry = NodeRegistry(client)
        deadline = time.monotonic() + 180
        while not set(names) <= set(registry.peers()):
            dead = [n for n, p in procs.items() if p.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"nodes did not announce their peer servers (exited: {dead}):\n"
                                     + "\n".join(p.log_text()[-2000:] for p in procs.values()))
            time.sleep(0.2)
        yield SiteFleet(lab, redis_server, oss, base, node_settings, procs, tasks, root)


def archive_cut_trial(site: SiteFleet, node: str, ref: ComponentRef, size: int, cut_s: float = 6.0) -> Outcome:
    """The archive's link goes down while `node` syncs `ref` from it (nobody else holds it), then comes back: the
    sync retries through or fails with its reason; a failed one is sent again and must resume and verify. L2 never
    holds an unverified snapshot."""
    out = Outcome("node cut from the archive mid-sync", sent=1)
    since = site.lab.sent_bytes("oss")
    started = time.monotonic()
    pending = site.send_sync(node, ref)
    mid = site.wait_bytes("oss", since, min(size // 4, 4 << 20))
    site.lab.cut("oss")
    try:
        time.sleep(cut_s)
        out.corrupt_l2 += l2_faults(site.l2(node))  # what a reader sees during the cut
    finally:
        site.lab.heal("oss")
    tries, fetched = 1, 0
    try:
        fetched += pending.get(timeout=600)["from_l3"]
    except Exception as exc:  # noqa: BLE001 - a sync that gave up says why; the next one resumes
        out.notes["first_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        tries += 1
        try:
            fetched += site.sync(node, ref)["from_l3"]
        except Exception as again:  # noqa: BLE001
            out.lost, out.notes["error"] = 1, f"{type(again).__name__}: {again}"
    out.seconds = time.monotonic() - started
    if not out.lost:
        store = SnapshotStore(site.l2(node))
        out.completed = int(store.has(ref) and all(c.ok for c in store.check(ref, stamp=False)))
        out.lost = 1 - out.completed
    out.corrupt_l2 += l2_faults(site.l2(node))
    out.notes.update(cut_mid_transfer=mid, tries=tries, fetched_over_size=round(fetched / size, 3))
    return out


def peer_cut_trial(site: SiteFleet, holders: list[str], fetcher: str, ref: ComponentRef, size: int,
                   heal_after_s: float = 8.0) -> Outcome:
    """`fetcher` fills its L2 from `holders` (they hold `ref`); the first holder seen uploading to it loses its link
    midway: the fetcher drops that peer, takes its pieces from the others (or the archive), and verifies all."""
    out = Outcome("peer cut mid-transfer", sent=1)
    site.client().delete(PEER_QUARANTINE_KEY)  # each trial meets the site anew (a peer cut before is not skipped)
    since = {h: site.lab.sent_bytes(h) for h in holders}
    oss_since = site.lab.sent_bytes("oss")
    started = time.monotonic()
    pending = site.send_sync(fetcher, ref)
    cut = None
    deadline = time.monotonic() + 60
    while cut is None and time.monotonic() < deadline and not pending.ready():
        cut = next((h for h in holders if site.lab.sent_bytes(h) - since[h] >= min(size // 8, 1 << 20)), None)
    if cut:
        site.lab.cut(cut)
    try:
        deadline = time.monotonic() + heal_after_s
        while time.monotonic() < deadline and not pending.ready():
            time.sleep(0.1)
        result = pending.get(timeout=600)
        out.completed = 1
        out.notes.update(from_l3=result["from_l3"], from_peers=result["from_peers"],
                         by_peer=result.get("by_peer") or {})
    except Exception as exc:  # noqa: BLE001
        out.lost, out.notes["error"] = 1, f"{type(exc).__name__}: {exc}"
    finally:
        if cut:
            site.lab.heal(cut)
    out.seconds = time.monotonic() - started
    store = SnapshotStore(site.l2(fetcher))
    if out.completed and not (store.has(ref) and all(c.ok for c in store.check(ref, stamp=False))):
        out.completed, out.lost = 0, 1
    out.corrupt_l2 += l2_faults(site.l2(fetcher))
    out.notes.update(cut=cut, oss_bytes=site.lab.sent_bytes("oss") - oss_since)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value
