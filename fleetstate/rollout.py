"""Promote, canary and rollback: route changes that only ever point jobs at releases some worker holds warm.

A route flip costs one Redis transaction and a pub/sub message; no worker loads or restarts. The guard against
flipping to a release nobody serves lives here, so the CLI and any other caller share it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr.names import Release, queue_for

from .queues import MoveReport, PinnedTest, move_queued, queue_depths, queued_releases
from .registry import MEMORY_FIELDS, WarmRegistry
from .routes import Route, RouteError, RouteTable


class RouteRefused(RuntimeError):
    """A route change refused because no warm worker would serve the jobs it sends; the message says the fix."""


@dataclass
class RouteChange:
    before: Route
    after: Route
    forced: bool = False
    abandoned: str | None = None  # the release jobs no longer go to (rollback)
    moved: MoveReport | None = None


def _require_warm(client: redis.Redis, release: str, force: bool, action: str) -> None:
    if force or WarmRegistry(client).is_warm(release):
        return
    raise RouteRefused(
        f"refusing to {action} {release}: no warm worker serves it, so its jobs would wait. Start one "
        f"(`warmfleet worker --release {release}`) and wait until `warmfleet status` shows it warm, or pass --force"
    )


def promote(client: redis.Redis, model: str, release: str, canary: float | None = None, force: bool = False,
            actor: str = "cli") -> RouteChange:
    """`release` becomes active (ending any canary), or with `canary` gets that percentage of new jobs."""
    rel = Release.parse(release)
    if rel.model != model:
        raise RouteError(f"{rel} is not a release of {model}")
    table = RouteTable(client)
    before = table.get(model)
    if canary is not None and canary <= 0:
        return RouteChange(before, table.clear_canary(model, actor=actor, reason="canary-off"))
    _require_warm(client, str(rel), force, "canary" if canary is not None else "promote")
    if canary is not None:
        after = table.set_canary(rel, canary, actor=actor, forced=force)
    else:
        after = table.set_active(rel, actor=actor, reason="promote", forced=force)
    return RouteChange(before, after, forced=force)


def rollback(client: redis.Redis, model: str, to: str | None = None, force: bool = False,
             move: PinnedTest | None = None, actor: str = "cli") -> RouteChange:
    """Undo the last change: drop a running canary, else make the previous (or `to`) release active again.

    With `move` (the test that tells a pinned job, `tasks.requests.is_pinned`), unpinned jobs already queued for the abandoned release are moved to the target's queue, keeping
    their task ids; pinned jobs stay where they are.
    """
    table = RouteTable(client)
    before = table.get(model)
    if before.canary and to is None:
        target, abandoned = before.active, before.canary
        _require_warm(client, str(target), force, "roll back to")
        after = table.clear_canary(model, actor=actor, reason="rollback")
    else:
        target = str(Release.parse(to)) if to else before.previous
        if not target:
            raise RouteError(f"{model} has no previous release to roll back to; see `warmfleet routes history {model}`")
        if Release.parse(target).model != model:
            raise RouteError(f"{target} is not a release of {model}")
        abandoned = before.active
        _require_warm(client, target, force, "roll back to")
        after = table.set_active(target, actor=actor, reason="rollback", forced=force)
    moved = move_queued(client, abandoned, str(target), move) if move and abandoned and abandoned != target else None
    return RouteChange(before, after, forced=force, abandoned=abandoned, moved=moved)


@dataclass
class ReleaseStatus:
    release: str
    roles: list[str]
    queued: int
    workers: list[dict[str, Any]] = field(default_factory=list)
    l2: dict[str, dict[str, bool]] = field(default_factory=dict)  # node → component ref → present


def fleet_status(client: redis.Redis) -> dict[str, Any]:
    """One read of everything an operator asks first: routes, queue depths, warm workers, L2 per node."""
    table = RouteTable(client)
    registry = WarmRegistry(client)
    warm = registry.warm_workers()
    workers = {w.worker: w for w in registry.workers()}
    nodes = registry.l2_by_node()
    now = time.time()
    models = sorted(set(table.models()) | {Release.parse(r).model for r in warm})
    out: dict[str, Any] = {"models": {}, "workers": [], "nodes": {}}
    for model in models:
        route = table.get(model)
        roles = _roles(route)
        releases = sorted(set(roles) | {r for r in warm if Release.parse(r).model == model}
                          | set(queued_releases(client, model)))
        depths = queue_depths(client, [queue_for(r) for r in releases])
        out["models"][model] = {
            "active": route.active, "previous": route.previous, "canary": route.canary,
            "canary_weight": route.canary_weight if route.canary else 0.0, "updated_at": route.updated_at,
            "releases": [
                ReleaseStatus(
                    release=r, roles=roles.get(r, []), queued=depths[queue_for(r)],
                    workers=[_worker_row(workers.get(name), name, now) for name in warm.get(r, [])],
                    l2={node: {str(ref): str(ref) in info.refs for ref in Release.parse(r).refs()}
                        for node, info in nodes.items()},
                ).__dict__
                for r in releases
            ],
        }
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
