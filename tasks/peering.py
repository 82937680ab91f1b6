"""Peers wired from settings: this node's peer piece server, and the peers a sync asks before L3.

cachemgr.peers serves and fetches; fleetstate holds who listens where (NodeRegistry) and the site's origin
leases (RedisOriginGate). This module only joins them with the settings."""

from __future__ import annotations

import redis

from cachemgr import Cache
from cachemgr.peers import PeerClient, PeerServer
from cachemgr.peersync import PeerSource
from fleetstate.nodes import NodeRegistry
from fleetstate.origin import RedisOriginGate

from .settings import FleetSettings


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
    NodeRegistry(client).announce_peer(settings.node_name, advertised_address(settings, server))


def peer_source(settings: FleetSettings, client: redis.Redis | None) -> PeerSource | None:
    """The peers this node's sync asks first (every other node that announced a server), or None."""
    if not settings.peers_on or client is None:
        return None
    try:
        addresses = NodeRegistry(client).peers(exclude=settings.node_name)
    except redis.RedisError:
        return None
    clients = [PeerClient(node, address, settings.peer_secret or "", settings.peer_timeout)
               for node, address in addresses.items()]
    gate = RedisOriginGate(client, settings.node_name, settings.peer_lease_seconds)
    return PeerSource(clients, gate, lease_seconds=settings.peer_lease_seconds,
                      wait_seconds=settings.peer_wait_seconds)
