"""Maintenance tasks: thin wrappers over `cachemgr`, run by each node's maintenance worker.

Beat sends the fleet-wide task to the shared maintenance queue; whichever maintenance worker takes it fans
it out to every known node's own queue, so each node syncs and audits its own disk.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from beat_schedule import AUDIT_FLEET_TASK, AUDIT_TASK, SYNC_FLEET_TASK, SYNC_TASK
from cachemgr import Cache, EventLog, Release
from cachemgr.audit import execute_audit, plan_audit
from cachemgr.names import ComponentRef, node_queue
from cachemgr.sync import sync_refs
from cachemgr.variants import default_dtype, files_for
from fleetstate.catalog import Catalog
from fleetstate.fanout import FanOutRuns
from fleetstate.locks import run_lock
from fleetstate.nodes import NodeRegistry
from fleetstate.peerhealth import PeerQuarantine
from fleetstate.pins import protected_refs
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable
from fleetstate.stats import FleetStats, cache_status, render_cache_status

from .app import app
from .peering import peer_source
from .prewarm import auto_warm
from .settings import FleetSettings


def wanted_refs(settings: FleetSettings, client: redis.Redis | None) -> list[ComponentRef]:
    """What a node's L2 should hold: routed releases (active, previous, canary), declared prewarms, releases warm
    anywhere, this node's configured releases, and the newest version of each component of a routed model."""
    releases: set[str] = set(settings.worker_releases)
    models: set[str] = {Release.parse(r).model for r in releases}
    if client is not None:
        table = RouteTable(client)
        for model in table.models():
            route = table.get(model)
            models.add(model)
            releases.update(release for _, release in route.referenced())
        releases.update(table.prewarms())
        releases.update(WarmRegistry(client).warm_workers())
    refs = {ref for r in releases for ref in Release.parse(r).refs()}
    archive = settings.open_archive()
    for model in models:
        for component in archive.list_components(model):
            latest = archive.latest_version(model, component)
            if latest:
                refs.add(ComponentRef(model, component, latest))
    return sorted(refs)


def node_dtype(settings: FleetSettings) -> str:
    """The precision this node's workers compute in (as worker boot resolves it: cachemgr.variants.default_dtype
    unless set), so the nightly sync fetches only that precision's files."""
    if settings.dtype != "auto":
        return settings.dtype
    device = settings.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return default_dtype(device)


def redis_client(settings: FleetSettings) -> redis.Redis | None:
    url = settings.resolved_broker_url
    return settings.state_client() if url else None


def event_log(settings: FleetSettings, client: redis.Redis | None) -> EventLog:
    sinks = [FleetStats(client).sink] if client is not None else []
    return EventLog(settings.event_log_path, settings.node_name, sinks=sinks)


def run_sync(settings: FleetSettings, refs: list[ComponentRef] | None = None, progress: Any = None) -> dict[str, Any]:
    client = redis_client(settings)
    events = event_log(settings, client)
    cache = Cache.at(settings.resolved_cache_root)
    started = time.monotonic()
    try:
        archive = settings.open_archive()
        refs = refs if refs is not None else wanted_refs(settings, client)
        summary = sync_refs(archive, cache.store, refs, progress=progress, events=events,
                            peers=peer_source(settings, client, events), select=files_for(node_dtype(settings)))
    except Exception as exc:
        events.emit("SYNC_RUN", outcome="FAILED", reason=f"{type(exc).__name__}: {exc}",
                    seconds=round(time.monotonic() - started, 3))
        raise
    events.emit("SYNC_RUN", outcome="UPDATED" if summary.updated else "UNCHANGED", versions=len(summary.reports),
                bytes_fetched=summary.bytes_fetched, bytes_reused=summary.bytes_reused,
                from_peers=summary.bytes_from_peers, from_l3=summary.bytes_from_l3,
                **({"by_peer": summary.by_peer} if summary.by_peer else {}),
                seconds=round(time.monotonic() - started, 3))
    if client is not None:
        WarmRegistry(client, ttl=max(settings.warm_ttl_seconds, 24 * 3600)).publish_l2(
            settings.node_name, cache.store, f"maintenance@{settings.node_name}")
        try:  # what the archive holds now, for routing and producers (fleetstate/catalog.py)
            Catalog(client).refresh(archive)
        except Exception as exc:  # the sync itself succeeded; the catalog is corrected at the next listing
            events.emit("CATALOG", outcome="FAILED", reason=f"{type(exc).__name__}: {exc}")
    return {
        "node": settings.node_name,
        "versions": [f"{r.ref} {r.outcome}" for r in summary.reports],
        "bytes_fetched": summary.bytes_fetched,
        "bytes_reused": summary.bytes_reused,
        "from_peers": summary.bytes_from_peers,
        "from_l3": summary.bytes_from_l3,
        "by_peer": summary.by_peer,
    }


def run_audit(settings: FleetSettings, dry_run: bool = False) -> dict[str, Any]:
    client = redis_client(settings)
    events = event_log(settings, client)
    store = Cache.at(settings.resolved_cache_root).store
    plan = plan_audit(store, keep=settings.retention_keep, protected=protected_refs(client, settings.worker_releases),
                      stamp=not dry_run)
    result = None
    if not dry_run:
        archive = settings.open_archive()
        result = execute_audit(store, plan, events, archive=archive, peers=peer_source(settings, client, events))
        if client is not None:  # repaired here: the site may ask this node for those blobs again
            for sha in result.quarantined:
                PeerQuarantine(client).clear(settings.node_name, sha)
    status = cache_status(FleetStats(client).snapshot()) if client is not None else None
    if status is not None and not dry_run:
        events.emit("CACHE_STATUS", line=render_cache_status(status), **status)
    return {
        "node": settings.node_name,
        "dry_run": dry_run,
        "plan": plan.describe(),
        "blobs_checked": len(plan.checks),
        "corrupt": [f"{c.ref}/{c.path}: {c.reason}" for c in plan.corrupt],
        "quarantined": result.quarantined if result else [],
        "refetched": result.refetched if result else [],
        "retired": result.retired if result else [str(r) for r in plan.retire],
        "temp_files_removed": result.removed_temp_files if result else list(plan.stale_temp_files),
        "cache_status": render_cache_status(status) if status else None,
    }


def _settings() -> FleetSettings:
    return app.fleet_settings  # type: ignore[attr-defined]


RUN_LOCK_SECONDS = 6 * 3600
"""A node's sync or audit holds its lock at most this long; a killed run's lock expires after it."""
FAN_OUT_WINDOW = 30 * 60
"""A fleet-wide run triggered again while the last one is in progress, and younger than this, is not sent again;
one whose nodes have all answered (ok or failed) never blocks the next trigger."""


@app.task(name=SYNC_TASK)
def sync_l2(refs: list[str] | None = None, fanout: str | None = None) -> dict[str, Any]:
    """Sync this node's L2 (the task runs on the node whose queue it was sent to); one run at a time. Then, with
    FLEET_AUTO_WARM, the node's running workers load the declared prewarms now in its L2."""
    settings = _settings()
    parsed = [ComponentRef(*r.split("/")) for r in refs] if refs else None
    result = _node_run(settings, "sync", fanout, lambda: run_sync(settings, parsed))
    if "skipped" in result:
        return result
    return {**result, "auto_warm": auto_warm(settings, node=settings.node_name)}


@app.task(name=AUDIT_TASK)
def audit_l2(dry_run: bool = False, fanout: str | None = None) -> dict[str, Any]:
    settings = _settings()
    return _node_run(settings, "audit", fanout, lambda: run_audit(settings, dry_run))


def _node_run(settings: FleetSettings, name: str, fanout: str | None, body: Any) -> dict[str, Any]:
    """One node's sync or audit under its run lock, its outcome recorded in the fleet-wide run that sent it."""
    client = redis_client(settings)
    runs = FanOutRuns(client) if client is not None and fanout else None
    node = settings.node_name
    with run_lock(client, f"{name}:{node}", RUN_LOCK_SECONDS) as held:
        if not held:
            if runs:
                runs.mark(name, fanout, node, "skipped", detail=f"another {name} of this node is running")
            return {"node": node, "skipped": f"another {name} of this node is running"}
        if runs:
            runs.mark(name, fanout, node, "running")
        try:
            result = body()
        except Exception as exc:
            if runs:
                runs.mark(name, fanout, node, "failed", detail=f"{type(exc).__name__}: {exc}")
            raise
        if runs:
            runs.mark(name, fanout, node, "ok", detail=_summary(name, result))
        return result


def _summary(name: str, result: dict[str, Any]) -> str:
    if name == "sync":
        return (f"{len(result['versions'])} version(s), {result['bytes_fetched']} B fetched "
                f"({result['from_peers']} B from peers, {result['from_l3']} B from L3)")
    return f"{result['blobs_checked']} blob(s) checked, {len(result['corrupt'])} corrupt"


def _fan_out(name: str, task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    settings = _settings()
    client = redis_client(settings)
    nodes = (NodeRegistry(client).nodes() if client is not None else []) or [settings.node_name]
    if client is None:
        return {node: app.send_task(task, kwargs=kwargs, queue=node_queue(node)).id for node in nodes}
    runs = FanOutRuns(client)
    run = runs.begin(name, nodes, FAN_OUT_WINDOW)
    if isinstance(run, str):
        return {"skipped": run}
    sent = {}
    for node in nodes:
        result = app.send_task(task, kwargs={**kwargs, "fanout": run.run}, queue=node_queue(node))
        runs.sent(name, run.run, node, result.id)
        sent[node] = result.id
    return sent


@app.task(name=SYNC_FLEET_TASK)
def sync_fleet() -> dict[str, Any]:
    """Beat's nightly sync: one sync per node, each on that node's own queue; once per window."""
    return _fan_out("sync", SYNC_TASK, {})


@app.task(name=AUDIT_FLEET_TASK)
def audit_fleet(dry_run: bool = False) -> dict[str, Any]:
    return _fan_out("audit", AUDIT_TASK, {"dry_run": dry_run})
