"""The warm registry: which worker holds which release in device memory, kept alive by heartbeats."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .keys import WARM_KEY, WARM_PATTERN, WORKER_KEY, WORKER_PATTERN


@dataclass
class WorkerState:
    worker: str
    node: str
    pid: int
    state: str  # loading | warm | failed | stopping
    releases: list[str] = field(default_factory=list)
    device: str = "cpu"
    loads: int = 0  # pipelines loaded by this process since it started
    jobs: int = 0
    error: str = ""
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
            started_at=float(d.get("started_at", 0)),
            heartbeat_at=float(d.get("heartbeat_at", 0)),
        )


class WarmRegistry:
    def __init__(self, client: redis.Redis, ttl: float = 15.0) -> None:
        self.redis = client
        self.ttl = ttl

    def publish(self, state: WorkerState) -> None:
        """Write the worker's state; warm releases get their own TTL'd key so a dead worker vanishes."""
        state.heartbeat_at = time.time()
        ttl_ms = int(self.ttl * 1000)
        pipe = self.redis.pipeline()
        key = WORKER_KEY.format(worker=state.worker)
        pipe.delete(key)
        pipe.hset(key, mapping=state.to_redis())
        # a failed worker's record outlives its heartbeat so `status` can still say why
        pipe.pexpire(key, ttl_ms if state.state != "failed" else max(ttl_ms, 3600_000))
        for release in state.releases:
            warm_key = WARM_KEY.format(release=release, worker=state.worker)
            if state.state == "warm":
                pipe.hset(warm_key, mapping={"worker": state.worker, "node": state.node, "since": str(state.started_at)})
                pipe.pexpire(warm_key, ttl_ms)
            else:
                pipe.delete(warm_key)
        pipe.execute()

    def withdraw(self, state: WorkerState) -> None:
        pipe = self.redis.pipeline()
        for release in state.releases:
            pipe.delete(WARM_KEY.format(release=release, worker=state.worker))
        pipe.delete(WORKER_KEY.format(worker=state.worker))
        pipe.execute()

    def warm_workers(self, release: str | None = None) -> dict[str, list[str]]:
        """release → workers currently warm on it (heartbeat within the TTL)."""
        out: dict[str, list[str]] = {}
        for key in self.redis.scan_iter(match=WARM_PATTERN, count=500):
            _, _, rest = key.decode().partition("fleet:warm:")
            rel, _, worker = rest.rpartition(":")
            if release and rel != release:
                continue
            out.setdefault(rel, []).append(worker)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def is_warm(self, release: str) -> bool:
        return bool(self.warm_workers(release).get(release))

    def workers(self) -> list[WorkerState]:
        states = []
        for key in self.redis.scan_iter(match=WORKER_PATTERN, count=500):
            raw = self.redis.hgetall(key)
            if raw:
                states.append(WorkerState.from_redis(raw))
        return sorted(states, key=lambda s: s.worker)

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


class Heartbeat(threading.Thread):
    """Re-publishes a worker's state every `interval` seconds until stopped."""

    def __init__(self, registry: WarmRegistry, state: WorkerState, interval: float) -> None:
        super().__init__(name="warmfleet-heartbeat", daemon=True)
        self.registry = registry
        self.state = state
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.registry.publish(self.state)
            except redis.RedisError:
                continue  # the broker is down or restarting: try again at the next beat

    def stop(self) -> None:
        self._stop_event.set()
