"""`warmfleet status` in one read: routes, queue depths and the age of each queue's oldest job, warm workers, L2 per
node, and the jobs nothing serves.

A job is *stranded* when it waits on a release queue no warm worker consumes: whatever routed it there (a forced
promote, a pin, a retire, a restart) it would wait forever with no word. Every such queue is listed under
`stranded`, with its depth, the age of its oldest job and what still routes to it, so no job waits unseen; the
metrics exporter serves the same figures (`warmfleet_unserved_queue_oldest_age_seconds`) for the alert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr.names import InvalidName, Release, queue_for

from .queues import oldest_waiting, queue_depths, queued_releases
from .registry import MEMORY_FIELDS, WarmRegistry
from .routes import Route, RouteTable


@dataclass
class ReleaseStatus:
    release: str
    roles: list[str]
    queued: int
    oldest_s: float | None = None  # how long its oldest waiting job has waited
    workers: list[dict[str, Any]] = field(default_factory=list)
    l2: dict[str, dict[str, bool]] = field(default_factory=dict)  # node → component ref → present


@dataclass
class StrandedQueue:
    """Jobs waiting on a release queue that no warm worker consumes."""

    release: str
    queue: str
    queued: int
    oldest_s: float | None
    roles: list[str]  # what still routes jobs there (active, canary, previous); [] when nothing does

    def line(self) -> str:
        age = f"{self.oldest_s:.0f}s" if self.oldest_s is not None else "?"
        routed = f"routed ({', '.join(self.roles)})" if self.roles else "routed by nothing"
        return (f"{self.queued} job(s) waiting up to {age} on {self.release}: no warm worker, {routed}; start one "
                f"(`warmfleet worker --release {self.release}`) or move them (`warmfleet move-queued {self.release} "
                f"<release>`)")


def stranded_queues(client: redis.Redis, warm: dict[str, list[str]] | None = None,
                    now: float | None = None) -> list[StrandedQueue]:
    """Every release queue with jobs waiting and no warm worker, oldest first."""
    warm = WarmRegistry(client).warm_workers() if warm is None else warm
    waiting = [r for r in queued_releases(client) if not warm.get(r)]
    if not waiting:
        return []
    queues = [queue_for(r) for r in waiting]
    depths, ages = queue_depths(client, queues), oldest_waiting(client, queues, now)
    table, roles_of = RouteTable(client), {}
    for model in {Release.parse(r).model for r in waiting}:
        roles_of.update({r: roles for r, roles in _roles(table.get(model)).items()})
    out = [StrandedQueue(r, q, depths[q], ages[q], roles_of.get(r, [])) for r, q in zip(waiting, queues, strict=True)
           if depths[q]]
    return sorted(out, key=lambda s: -(s.oldest_s or 0.0))


def fleet_status(client: redis.Redis) -> dict[str, Any]:
    """One read of everything an operator asks first: routes, queue depths, warm workers, L2 per node."""
    table = RouteTable(client)
    registry = WarmRegistry(client)
    warm = registry.warm_workers()
    workers = {w.worker: w for w in registry.workers()}
    nodes = registry.l2_by_node()
    now = time.time()
    queued = _by_model(queued_releases(client))
    models = sorted(set(table.models()) | {Release.parse(r).model for r in warm} | set(queued))
    out: dict[str, Any] = {"models": {}, "workers": [], "nodes": {}}
    for model in models:
        route = table.get(model)
        roles = _roles(route)
        releases = sorted(set(roles) | {r for r in warm if Release.parse(r).model == model} | set(queued.get(model, [])))
        queues = [queue_for(r) for r in releases]
        depths, ages = queue_depths(client, queues), oldest_waiting(client, queues, now)
        refs = {r: [str(ref) for ref in Release.parse(r).refs()] for r in releases}  # parsed once, not once per node
        out["models"][model] = {
            "active": route.active, "previous": route.previous, "canary": route.canary,
            "canary_weight": route.canary_weight if route.canary else 0.0, "updated_at": route.updated_at,
            "releases": [
                ReleaseStatus(
                    release=r, roles=roles.get(r, []), queued=depths[queue_for(r)], oldest_s=ages[queue_for(r)],
                    workers=[_worker_row(workers.get(name), name, now) for name in warm.get(r, [])],
                    l2={node: {ref: ref in info.refs for ref in refs[r]} for node, info in nodes.items()},
                ).__dict__
                for r in releases
            ],
        }
    out["stranded"] = [s.__dict__ for s in stranded_queues(client, warm, now)]
    out["workers"] = [_worker_row(w, w.worker, now) | {"state": w.state, "releases": w.releases, "error": w.error,
                                                       "warm_error": w.warm_error, "lora_params": w.lora_params,
                                                       "lora_bytes": w.lora_bytes,
                                                       "device": w.device,
                                                       "memory": {k: getattr(w, k) for k in MEMORY_FIELDS}}
                      for w in workers.values()]
    out["nodes"] = {node: {"reported_by": info.reported_by, "age_s": round(now - info.at, 1), "root": info.root,
                           "refs": sorted(info.refs)} for node, info in nodes.items()}
    from .nodes import NodeRegistry
    from .stats import FleetStats, node_sync_bytes

    peers = NodeRegistry(client).peers()
    out["sync_bytes"] = {node: sources | {"peer_server": peers.get(node)}
                         for node, sources in node_sync_bytes(FleetStats(client).snapshot()).items()}
    return out


def _by_model(releases: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in releases:
        try:
            out.setdefault(Release.parse(r).model, []).append(r)
        except InvalidName:
            continue
    return out


def _roles(route: Route) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for role, release in route.referenced():
        roles.setdefault(release, []).append(role)
    return roles


def _worker_row(state: Any, name: str, now: float) -> dict[str, Any]:
    if state is None:  # warm key alive, state record gone: report what is known
        return {"worker": name, "node": "", "heartbeat_age_s": None, "loads": None, "jobs": None, "pid": None}
    return {"worker": name, "node": state.node, "heartbeat_age_s": round(now - state.heartbeat_at, 1),
            "loads": state.loads, "jobs": state.jobs, "pid": state.pid}
