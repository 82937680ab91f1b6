"""Maintenance tasks that beat sends: thin wrappers over `cachemgr`, run by each node's maintenance worker."""

from __future__ import annotations

from typing import Any

import redis

from beat_schedule import AUDIT_TASK, SYNC_TASK
from cachemgr import Cache, EventLog, Release, open_archive
from cachemgr.audit import execute_audit, plan_audit
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_refs

from .app import app
from .registry import WarmRegistry
from .routing import RouteTable
from .settings import FleetSettings


def wanted_refs(settings: FleetSettings, client: redis.Redis | None) -> list[ComponentRef]:
    """What a node's L2 should hold: routed releases (active and previous), releases warm anywhere,
    this node's configured releases, and the newest version of each component of a routed model."""
    releases: set[str] = set(settings.worker_releases)
    models: set[str] = {Release.parse(r).model for r in releases}
    if client is not None:
        table = RouteTable(client)
        for model in table.models():
            route = table.get(model)
            models.add(model)
            releases.update(r for r in (route.active, route.previous) if r)
        releases.update(WarmRegistry(client).warm_workers())
    refs = {ref for r in releases for ref in Release.parse(r).refs()}
    archive = open_archive(settings.resolved_archive_url, **settings.oss_options())
    for model in models:
        for component in archive.list_components(model):
            latest = archive.latest_version(model, component)
            if latest:
                refs.add(ComponentRef(model, component, latest))
    return sorted(refs)


def _redis(settings: FleetSettings) -> redis.Redis | None:
    url = settings.resolved_broker_url
    return redis.Redis.from_url(url) if url else None


@app.task(name=SYNC_TASK)
def sync_l2() -> dict[str, Any]:
    settings: FleetSettings = app.fleet_settings  # type: ignore[attr-defined]
    cache = Cache.at(settings.resolved_cache_root)
    events = EventLog(settings.event_log_path, settings.node_name)
    archive = open_archive(settings.resolved_archive_url, **settings.oss_options())
    summary = sync_refs(archive, cache.store, wanted_refs(settings, _redis(settings)), events=events)
    return {
        "node": settings.node_name,
        "versions": [f"{r.ref} {r.outcome}" for r in summary.reports],
        "bytes_fetched": summary.bytes_fetched,
        "bytes_reused": summary.bytes_reused,
    }


@app.task(name=AUDIT_TASK)
def audit_l2(dry_run: bool = False) -> dict[str, Any]:
    settings: FleetSettings = app.fleet_settings  # type: ignore[attr-defined]
    store = Cache.at(settings.resolved_cache_root).store
    plan = plan_audit(store)
    result = None if dry_run else execute_audit(store, plan, EventLog(settings.event_log_path, settings.node_name))
    return {
        "node": settings.node_name,
        "blobs_checked": len(plan.checks),
        "corrupt": [f"{c.ref}/{c.path}: {c.reason}" for c in plan.corrupt],
        "quarantined": result.quarantined if result else [],
    }
