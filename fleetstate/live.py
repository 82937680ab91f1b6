"""What may leave a worker's device memory: a release nothing routes, pins, declares or still has jobs waiting for.

Read by `warmfleet retire` (refused while any reason holds, unless forced) and by a worker that must make room for
a new adapter (it evicts only releases with no reason to stay). One reading, so the two never disagree.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from cachemgr.names import Release, queue_for

from .keys import LIVE_WARM_KEY
from .pins import Pins
from .queues import queue_depth
from .routes import RouteTable


def base_key(release: Release) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Releases with the same key differ only in their LoRA, so one loaded pipeline can serve them all."""
    return release.model, tuple((c, v) for c, v in release.components if c != "lora")


def reasons_to_keep(client: redis.Redis, release: str) -> list[str]:
    """Why `release` must stay loaded: routed (with its role), declared prewarm, pinned, or jobs waiting; [] if none."""
    rel = Release.parse(release)
    table = RouteTable(client)
    reasons = [f"routed ({role})" for role, routed in table.get(rel.model).referenced() if routed == str(rel)]
    reasons += ["declared prewarm (`warmfleet routes prewarm --remove`)"] if str(rel) in table.prewarms(rel.model) else []
    pinned = set(Pins(client).all())
    reasons += [f"pinned ({ref})" for ref in rel.refs() if ref.component == "lora" and ref in pinned]
    waiting = queue_depth(client, queue_for(rel))
    if waiting:
        reasons.append(f"{waiting} job(s) waiting in its queue")
    return reasons


class LiveWarms:
    """LoRA releases warmed live on running workers (`warmfleet warm`), recorded so they outlive a restart: a worker
    warms again, at boot, every recorded release of a base it serves (workers/live.py). A release's record lists the
    workers that hold it; a retire or an eviction takes the worker off, and the record goes with the last one."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def all(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(LIVE_WARM_KEY).items()}

    def add(self, release: str, worker: str) -> None:
        self._update(release, lambda workers: workers | {worker})

    def remove(self, release: str, worker: str) -> None:
        self._update(release, lambda workers: workers - {worker})

    def _update(self, release: str, change: Any) -> None:
        rel = str(Release.parse(release))
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(LIVE_WARM_KEY)
                    raw = pipe.hget(LIVE_WARM_KEY, rel)
                    record = json.loads(raw) if raw else {"workers": [], "since": time.time()}
                    workers = sorted(change(set(record["workers"])))
                    pipe.multi()
                    if workers:
                        pipe.hset(LIVE_WARM_KEY, rel, json.dumps({**record, "workers": workers, "at": time.time()}))
                    else:
                        pipe.hdel(LIVE_WARM_KEY, rel)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
