"""The warm registry: which worker holds which release in device memory, kept alive by heartbeats."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from cachemgr.store import SnapshotStore

from .keys import NODE_L2_INDEX, NODE_L2_KEY, WARM_INDEX, WARM_KEY, WORKER_KEY, WORKERS_INDEX

MEMORY_FIELDS = ("l1_bytes", "mem_allocated", "mem_reserved", "mem_total", "mem_peak")


@dataclass
class WorkerState:
    worker: str
    node: str
    pid: int
    state: str  # loading | warm | sick | failed | stopping
    releases: list[str] = field(default_factory=list)
    device: str = "cpu"
    loads: int = 0  # pipelines loaded by this process since it started
    jobs: int = 0
    error: str = ""
    warm_ticket: str = ""  # the last live warm or retire request this worker finished (warmfleet warm/retire)
    warm_error: str = ""  # why that request failed, one line; empty when it succeeded
    lora_params: int = 0  # parameters of the LoRA layers resident in its pipelines (what adapters cost)
    lora_bytes: int = 0

    l1_bytes: int = 0  # bytes the loaded pipelines' modules hold (parameters and buffers)
    mem_allocated: int = 0  # device memory, as the worker's allocator sees it (0 on the CPU)
    mem_reserved: int = 0
    mem_total: int = 0
    mem_peak: int = 0
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)

    def to_redis(self) -> dict[str, str]:
        data = asdict(self)
        data["releases"] = json.dumps(self.releases)
        return {k: str(v) for k, v in data.items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> WorkerState:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            worker=d["worker"],
            node=d.get("node", ""),
            pid=int(d.get("pid", 0)),
            state=d.get("state", "?"),
            releases=json.loads(d.get("releases", "[]")),
            device=d.get("device", ""),
            loads=int(d.get("loads", 0)),
            jobs=int(d.get("jobs", 0)),
            error=d.get("error", ""),
            warm_ticket=d.get("warm_ticket", ""),
            warm_error=d.get("warm_error", ""),
            lora_params=int(d.get("lora_params", 0)),
            lora_bytes=int(d.get("lora_bytes", 0)),
            **{k: int(d.get(k, 0) or 0) for k in MEMORY_FIELDS},
            started_at=float(d.get("started_at", 0)),
            heartbeat_at=float(d.get("heartbeat_at", 0)),
        )


@dataclass(frozen=True)
class NodeL2:
    """The component refs one node's L2 holds, as a live worker on that node last listed them."""

    node: str
    refs: frozenset[str]
    root: str
    reported_by: str
    at: float


INDEX_SLACK_MS = 60_000
"""Readers list index members that expired up to this long ago and let the keys decide (clocks of the writer and the
reader may differ); writers drop members expired longer ago than this."""


def _warm_member(release: str, worker: str) -> str:
    return f"{release}:{worker}"


class WarmRegistry:
    """Workers' states and warm releases as keys with TTLs, listed through the index sorted sets (keys.py), so that
    `status`, the exporter and promote read the registry in a fixed number of round trips whatever the fleet's size,
    and never walk the keyspace."""

    def __init__(self, client: redis.Redis, ttl: float = 15.0) -> None:
        self.redis = client
        self.ttl = ttl

    def publish(self, state: WorkerState) -> None:
        """Write the worker's state; warm releases get their own TTL'd key so a dead worker vanishes."""
        state.heartbeat_at = time.time()
        ttl_ms = int(self.ttl * 1000)
        now_ms = int(state.heartbeat_at * 1000)
        # a failed worker's record outlives its heartbeat so `status` can still say why
        record_ms = ttl_ms if state.state != "failed" else max(ttl_ms, 3600_000)
        pipe = self.redis.pipeline()
        key = WORKER_KEY.format(worker=state.worker)
        pipe.delete(key)
        pipe.hset(key, mapping=state.to_redis())
        pipe.pexpire(key, record_ms)
        pipe.zadd(WORKERS_INDEX, {state.worker: now_ms + record_ms})
        warm = {}
        for release in state.releases:
            warm_key = WARM_KEY.format(release=release, worker=state.worker)
            if state.state == "warm":
                pipe.hset(warm_key, mapping={"worker": state.worker, "node": state.node, "since": str(state.started_at)})
                pipe.pexpire(warm_key, ttl_ms)
                warm[_warm_member(release, state.worker)] = now_ms + ttl_ms
            else:
                pipe.delete(warm_key)
                pipe.zrem(WARM_INDEX, _warm_member(release, state.worker))
        if warm:
            pipe.zadd(WARM_INDEX, warm)
        pipe.execute()

    def withdraw(self, state: WorkerState) -> None:
        pipe = self.redis.pipeline()
        for release in state.releases:
            pipe.delete(WARM_KEY.format(release=release, worker=state.worker))
            pipe.zrem(WARM_INDEX, _warm_member(release, state.worker))
        pipe.delete(WORKER_KEY.format(worker=state.worker))
        pipe.zrem(WORKERS_INDEX, state.worker)
        pipe.execute()

    def withdraw_release(self, state: WorkerState, release: str) -> None:
        """The worker no longer serves `release` (retired live): drop its warm key now, not when the TTL runs out."""
        with self.redis.pipeline() as pipe:
            pipe.delete(WARM_KEY.format(release=release, worker=state.worker))
            pipe.zrem(WARM_INDEX, _warm_member(release, state.worker))
            pipe.execute()
        self.publish(state)

    def prune(self) -> int:
        """Drop index members whose keys expired over a minute ago (a worker that died without withdrawing); run by
        the heartbeat now and then, never by readers (which may be read-only). Returns how many were dropped."""
        before = f"({int(time.time() * 1000) - INDEX_SLACK_MS}"
        with self.redis.pipeline(transaction=False) as pipe:
            for index in (WORKERS_INDEX, WARM_INDEX, NODE_L2_INDEX):
                pipe.zremrangebyscore(index, "-inf", before)
            return sum(pipe.execute())

    def _listed(self, index: str) -> list[str]:
        """Members of an index whose keys may still live (expiring after now, less the clock slack)."""
        since = int(time.time() * 1000) - INDEX_SLACK_MS
        return [m.decode() for m in self.redis.zrangebyscore(index, since, "+inf")]

    def worker(self, name: str) -> WorkerState | None:
        raw = self.redis.hgetall(WORKER_KEY.format(worker=name))
        return WorkerState.from_redis(raw) if raw else None

    def warm_workers(self, release: str | None = None) -> dict[str, list[str]]:
        """release → workers currently warm on it (heartbeat within the TTL): two round trips, the index and then
        one pipelined EXISTS per listed warm key (the key's TTL decides)."""
        pairs = [member.rpartition(":")[::2] for member in self._listed(WARM_INDEX)]
        pairs = [(rel, worker) for rel, worker in pairs if not release or rel == release]
        if not pairs:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for rel, worker in pairs:
                pipe.exists(WARM_KEY.format(release=rel, worker=worker))
            alive = pipe.execute()
        out: dict[str, list[str]] = {}
        for (rel, worker), live in zip(pairs, alive, strict=True):
            if live:
                out.setdefault(rel, []).append(worker)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def is_warm(self, release: str) -> bool:
        return bool(self.warm_workers(release).get(release))

    def workers(self) -> list[WorkerState]:
        """Every worker whose state record lives, by name: the index, then one pipelined HGETALL per worker."""
        names = self._listed(WORKERS_INDEX)
        if not names:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(WORKER_KEY.format(worker=name))
            found = pipe.execute()
        return sorted((WorkerState.from_redis(raw) for raw in found if raw), key=lambda s: s.worker)

    def publish_l2(self, node: str, store: SnapshotStore, worker: str) -> None:
        """Say what this node's L2 holds; it expires with the heartbeats, so a silent node reads as unknown."""
        refs = [str(ref) for ref in store.refs()]
        key = NODE_L2_KEY.format(node=node)
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"refs": json.dumps(refs), "root": str(store.root), "worker": worker,
                                    "at": repr(now)})
            pipe.pexpire(key, int(self.ttl * 1000))
            pipe.zadd(NODE_L2_INDEX, {node: int(now * 1000) + int(self.ttl * 1000)}, gt=True)
            pipe.execute()

    def l2_by_node(self) -> dict[str, NodeL2]:
        """node → what its L2 holds, for every node whose listing lives: the index, then one pipelined HGETALL."""
        nodes = self._listed(NODE_L2_INDEX)
        if not nodes:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(NODE_L2_KEY.format(node=node))
            found = pipe.execute()
        out = {}
        for node, raw_bytes in zip(nodes, found, strict=True):
            raw = {k.decode(): v.decode() for k, v in raw_bytes.items()}
            if raw:
                out[node] = NodeL2(node, frozenset(json.loads(raw.get("refs", "[]"))), raw.get("root", ""),
                                   raw.get("worker", ""), float(raw.get("at", 0)))
        return dict(sorted(out.items()))

    def wait_warm(self, releases: list[str], timeout: float = 120.0, since: float = 0.0) -> dict[str, Any]:
        """Wait until every release has a warm worker; fail fast if a worker started after `since` failed."""
        deadline = time.monotonic() + timeout
        while True:
            warm = self.warm_workers()
            if all(warm.get(r) for r in releases):
                return warm
            failed = [w for w in self.workers() if w.state == "failed" and w.started_at >= since and set(w.releases) & set(releases)]
            if failed:
                raise RuntimeError("; ".join(f"worker {w.worker} failed to load: {w.error}" for w in failed))
            if time.monotonic() > deadline:
                missing = [r for r in releases if not warm.get(r)]
                raise TimeoutError(f"no warm worker after {timeout:.0f}s for: {', '.join(missing)}")
            time.sleep(0.2)


PRUNE_SECONDS = 60.0
"""How often each heartbeat drops the registry's long-expired index members (at a random phase per worker)."""


class Heartbeat(threading.Thread):
    """Re-publishes a worker's state every `interval` seconds until stopped, and its node's L2 contents if given
    the store (so `warmfleet status` can say which releases a node could warm without a download)."""

    def __init__(self, registry: WarmRegistry, state: WorkerState, interval: float,
                 l2: SnapshotStore | None = None, refresh: Callable[[WorkerState], None] | None = None) -> None:
        super().__init__(name="warmfleet-heartbeat", daemon=True)
        self.registry = registry
        self.state = state
        self.interval = interval
        self.l2 = l2
        self.refresh = refresh  # e.g. sample the device's memory into the state before each beat
        self._stop_event = threading.Event()

    def run(self) -> None:
        self._publish_l2()
        prune_at = time.monotonic() + random.uniform(0, PRUNE_SECONDS)
        while not self._stop_event.wait(self.interval):
            try:
                if self.refresh is not None:
                    self.refresh(self.state)
            except Exception:  # a figure we could not read must not stop the heartbeat
                pass
            try:
                self.registry.publish(self.state)
                if time.monotonic() >= prune_at:
                    prune_at = time.monotonic() + PRUNE_SECONDS
                    self.registry.prune()
            except redis.RedisError:
                continue  # the broker is down or restarting: try again at the next beat
            self._publish_l2()

    def _publish_l2(self) -> None:
        if self.l2 is None:
            return
        try:
            self.registry.publish_l2(self.state.node, self.l2, self.state.worker)
        except (redis.RedisError, OSError, ValueError):
            pass  # best effort: status then reads this node's L2 as unknown

    def stop(self) -> None:
        self._stop_event.set()
