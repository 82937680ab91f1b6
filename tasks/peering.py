"""Peers wired from settings: this node's peer piece server, the peers a sync asks before L3, and what happens when
one of them is in trouble.

cachemgr.peers serves and fetches; fleetstate holds who listens where (NodeRegistry), the site's origin leases
(RedisOriginGate) and the peers in quarantine (PeerQuarantine). This module joins them with the settings, and holds
the task a peer that sent a bad piece is told to run: verify that blob now and repair it from its own peers."""

from __future__ import annotations

import re
from typing import Any

import redis

from cachemgr import Cache, EventLog
from cachemgr.names import node_queue
from cachemgr.peers import PeerClient, PeerServer
from cachemgr.peersync import SHARED_KINDS, PeerSource, PeerTrouble
from cachemgr.repair import repair_blob
from fleetstate.nodes import NodeRegistry
from fleetstate.origin import RedisOriginGate
from fleetstate.peerhealth import PeerQuarantine
from fleetstate.registry import WarmRegistry
from fleetstate.stats import FleetStats

from .app import app
from .settings import FleetSettings

VERIFY_BLOB_TASK = "warmfleet.verify_blob"
"""Sent to a peer's own node queue when it served a bad piece: it verifies the blob and repairs it."""
SHA256 = re.compile(r"[0-9a-f]{64}")


def start_peer_server(settings: FleetSettings) -> PeerServer | None:
    """This node's peer server on the configured address, or None when peers are off."""
    if not settings.peers_on:
        return None
    rate = settings.peer_upload_mbps * 1e6 / 8 if settings.peer_upload_mbps else None
    store = Cache.at(settings.resolved_cache_root).store
    return PeerServer(store, settings.peer_secret or "", settings.peer_address, settings.peer_port, rate).start()


def advertised_address(settings: FleetSettings, server: PeerServer) -> str:
    """What other nodes dial: FLEET_PEER_ADVERTISE (host or host:port), else the address the server is bound to."""
    advertise = settings.peer_advertise
    if not advertise:
        return server.address
    if advertise.rsplit(":", 1)[-1].isdigit() and not advertise.endswith("]"):
        return advertise
    return f"{advertise}:{server.port}"


def announce(client: redis.Redis, settings: FleetSettings, server: PeerServer) -> None:
    stats = server.stats
    NodeRegistry(client).announce_peer(settings.node_name, advertised_address(settings, server),
                                       {"bytes_served": stats.bytes_served, "requests_served": stats.requests_served,
                                        "requests_refused": stats.requests_refused})


def report_trouble(settings: FleetSettings, client: redis.Redis, trouble: PeerTrouble) -> None:
    """A peer this node dropped: put it on the site's quarantine list (bad piece, slow, silent); when it sent a bad
    piece and nobody reported that blob yet, tell it to verify the blob now (a task on its own node queue)."""
    if trouble.kind not in SHARED_KINDS:
        return
    blob = trouble.blob if trouble.kind == "bad_piece" else None
    new = PeerQuarantine(client).report(trouble.peer, trouble.kind, settings.node_name, trouble.detail,
                                        settings.peer_quarantine_seconds, blob, trouble.start, trouble.end)
    if new and blob:
        app.send_task(VERIFY_BLOB_TASK, kwargs={"sha256": blob, "reported_by": settings.node_name},
                      queue=node_queue(trouble.peer))


def peer_source(settings: FleetSettings, client: redis.Redis | None, events: EventLog | None = None) -> PeerSource | None:
    """The peers this node's sync asks first (every other node that announced a server, less those the site has in
    quarantine), or None. Troubles go to `events` (default: this node's event log) and to the site's list."""
    if not settings.peers_on or client is None:
        return None
    try:
        addresses = NodeRegistry(client).peers(exclude=settings.node_name)
    except redis.RedisError:
        return None
    min_rate = settings.peer_min_mbps * 1e6 / 8 if settings.peer_min_mbps else None
    clients = [PeerClient(node, address, settings.peer_secret or "", settings.peer_timeout, min_rate)
               for node, address in addresses.items()]
    gate = RedisOriginGate(client, settings.node_name, settings.peer_lease_seconds)
    if events is None:
        events = EventLog(settings.event_log_path, settings.node_name, sinks=[FleetStats(client).sink])
    return PeerSource(clients, gate, lease_seconds=settings.peer_lease_seconds,
                      wait_seconds=settings.peer_wait_seconds, events=events,
                      on_trouble=lambda trouble: report_trouble(settings, client, trouble),
                      skip=PeerQuarantine(client).peers)


def run_blob_repair(settings: FleetSettings, sha256: str, reported_by: str | None = None) -> dict[str, Any]:
    """Verify one blob of this node's L2 now and repair it from the peers (then L3) if it is bad; then take this
    node's quarantine entry for it off the site's list."""
    if not SHA256.fullmatch(sha256 or ""):
        raise ValueError(f"not a blob name (64 hex digits): {sha256!r}")
    client = settings.state_client() if settings.resolved_broker_url else None
    events = EventLog(settings.event_log_path, settings.node_name,
                      sinks=[FleetStats(client).sink] if client is not None else [])
    store = Cache.at(settings.resolved_cache_root).store
    result = repair_blob(settings.open_archive(), store, sha256, events, peer_source(settings, client, events),
                         reported_by)
    if client is not None:
        PeerQuarantine(client).clear(settings.node_name, sha256)
        if result.outcome == "REPAIRED":
            WarmRegistry(client, ttl=max(settings.warm_ttl_seconds, 24 * 3600)).publish_l2(
                settings.node_name, store, f"maintenance@{settings.node_name}")
    return {"node": settings.node_name, "blob": sha256, "outcome": result.outcome, "refs": list(result.refs),
            "from_peers": result.bytes_from_peers, "from_l3": result.bytes_from_l3, "by_peer": result.by_peer}


@app.task(name=VERIFY_BLOB_TASK)
def verify_blob(sha256: str, reported_by: str | None = None) -> dict[str, Any]:
    """A peer reported a bad piece of `sha256` from this node: verify the blob now, repair it if it is bad."""
    return run_blob_repair(app.fleet_settings, sha256, reported_by)  # type: ignore[attr-defined]
