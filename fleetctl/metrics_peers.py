"""The exporter's peer families: per peer, what the nodes that fetched from it saw (verified bytes, bad pieces, drops
by kind), whether the site has it in quarantine, and its own server's counters (from its announcement)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleetstate.peerhealth import peer_health


def peer_families(client: redis.Redis) -> Iterator[Any]:
    health = peer_health(client)
    sent = CounterMetricFamily("warmfleet_peer_sent_bytes", "Verified bytes each peer sent to other nodes' syncs",
                               labels=["peer"])
    bad = CounterMetricFamily("warmfleet_peer_bad_pieces", "Pieces from a peer that failed the manifest's hash "
                              "(the peer was dropped for that run and told to verify the blob)", labels=["peer"])
    drops = CounterMetricFamily("warmfleet_peer_drops", "Times a node dropped a peer for a run, by why (bad_piece, "
                                "slow: under FLEET_PEER_MIN_MBPS, timeout, refused, error)", labels=["peer", "kind"])
    quarantined = GaugeMetricFamily("warmfleet_peer_quarantined", "1 while the site skips a peer, by why",
                                    labels=["peer", "kind"])
    served = CounterMetricFamily("warmfleet_peer_server_bytes_served", "Bytes a node's peer server sent, as it last "
                                 "announced (resets when the node restarts)", labels=["node"])
    requests = CounterMetricFamily("warmfleet_peer_server_requests", "Requests a node's peer server answered, by "
                                   "outcome (served, refused)", labels=["node", "outcome"])
    for peer, info in health.items():
        sent.add_metric([peer], info["sent_bytes"])
        bad.add_metric([peer], info["bad_pieces"])
        for kind, n in info["drops"].items():
            drops.add_metric([peer, kind], n)
        for kind in sorted({e["kind"] for e in info["quarantine"]}):
            quarantined.add_metric([peer, kind], 1.0)
        server = info.get("server") or {}
        if "bytes_served" in server:
            served.add_metric([peer], server["bytes_served"])
            requests.add_metric([peer, "served"], server.get("requests_served", 0))
            requests.add_metric([peer, "refused"], server.get("requests_refused", 0))
    yield from (sent, bad, drops, quarantined, served, requests)
