"""Peers in trouble, site-wide.

A syncing node that drops a peer for a bad piece, for sending under the rate floor, or for falling silent records it
here (`PeerQuarantine.report`); every node's sync reads the list before each file and skips those peers until the
entry expires (`FLEET_PEER_QUARANTINE_SECONDS`) or, for a bad piece, until the peer has verified and repaired the
blob (`clear`). `peer_health` joins the list with the per-peer counters (fleetstate.stats) and what each peer server
reports about itself (fleetstate.nodes), for `warmfleet status` and the exporter."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from .keys import PEER_QUARANTINE_KEY
from .nodes import NodeRegistry
from .stats import FleetStats, peer_counters


class PeerQuarantine:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def _field(peer: str, kind: str, blob: str | None) -> str:
        return f"{peer}/{kind}/{blob or '-'}"

    def report(self, peer: str, kind: str, by: str, reason: str, seconds: float, blob: str | None = None,
               start: int | None = None, end: int | None = None, now: float | None = None) -> bool:
        """Record a peer in trouble; True when it was not already (the first reporter tells the peer)."""
        now = time.time() if now is None else now
        field = self._field(peer, kind, blob)
        raw = self.redis.hget(PEER_QUARANTINE_KEY, field)
        if raw is not None and _entry(raw).get("until", 0) > now:
            return False
        entry = {"peer": peer, "kind": kind, "blob": blob, "start": start, "end": end, "by": by,
                 "reason": reason[:300], "at": now, "until": now + seconds}
        self.redis.hset(PEER_QUARANTINE_KEY, field, json.dumps(entry))
        return True

    def entries(self, now: float | None = None) -> list[dict[str, Any]]:
        """The live entries, oldest first; expired ones are removed as they are met."""
        now = time.time() if now is None else now
        live, gone = [], []
        for field, raw in self.redis.hgetall(PEER_QUARANTINE_KEY).items():
            entry = _entry(raw)
            if entry.get("until", 0) > now and entry.get("peer"):
                live.append(entry)
            else:
                gone.append(field)
        if gone:
            self.redis.hdel(PEER_QUARANTINE_KEY, *gone)
        return sorted(live, key=lambda e: e.get("at", 0))

    def peers(self) -> set[str]:
        """The peers a sync skips now."""
        return {str(e["peer"]) for e in self.entries()}

    def clear(self, peer: str, blob: str | None = None) -> int:
        """A peer verified (and repaired) `blob`: its bad-piece entry for it goes (all its entries without blob)."""
        names = [f.decode() for f in self.redis.hkeys(PEER_QUARANTINE_KEY)]
        fields = [f for f in names if f.startswith(f"{peer}/") and (blob is None or f.endswith(f"/{blob}"))]
        return int(self.redis.hdel(PEER_QUARANTINE_KEY, *fields)) if fields else 0


def _entry(raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
        return value if isinstance(value, dict) else {}
    except (ValueError, TypeError):
        return {}


def peer_health(client: redis.Redis, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per peer (every node that announced a server, was reported or counted): its live quarantine entries, the
    bad pieces and drops other nodes counted, the verified bytes it sent them, and its own server's counters."""
    now = time.time() if now is None else now
    counters = peer_counters(FleetStats(client).snapshot())
    servers = NodeRegistry(client).peer_servers(now=now)
    entries = PeerQuarantine(client).entries(now)
    out: dict[str, dict[str, Any]] = {}
    for peer in sorted(set(counters) | set(servers) | {str(e["peer"]) for e in entries}):
        mine = [e for e in entries if e["peer"] == peer]
        out[peer] = {
            "quarantine": [{**e, "age_s": round(now - e.get("at", now), 1),
                            "left_s": round(e.get("until", now) - now, 1)} for e in mine],
            **counters.get(peer, {"bad_pieces": 0, "drops": {}, "sent_bytes": 0}),
            "server": servers.get(peer),
        }
        out[peer]["trouble"] = bool(mine or out[peer]["bad_pieces"] or out[peer]["drops"])
    return out


def render_peer_line(peer: str, info: dict[str, Any]) -> str:
    """One line of `warmfleet status` for a peer in trouble."""
    parts = [f"peer {peer}:"]
    for e in info["quarantine"]:
        where = f" blob {str(e['blob'])[:12]}… bytes {e['start']}-{e['end']}" if e.get("blob") else ""
        parts.append(f"QUARANTINED ({e['kind']}{where}, reported by {e['by']} {e['age_s']:.0f}s ago, "
                     f"{e['left_s']:.0f}s left)")
    drops = ", ".join(f"{kind} {n}" for kind, n in sorted(info["drops"].items())) or "none"
    parts.append(f"bad pieces {info['bad_pieces']}, drops: {drops}, sent {info['sent_bytes']} B to peers")
    if info.get("server"):
        s = info["server"]
        parts.append(f"server {s.get('address')}: served {s.get('bytes_served', 0)} B in "
                     f"{s.get('requests_served', 0)} requests, refused {s.get('requests_refused', 0)}")
    return " ".join(parts)
