"""Fleet-wide counters in Redis, fed by the cache event log of every node and by workers after each job.

They back `warmfleet status`, the CACHE_STATUS line and the Prometheus exporter. Counters only go up;
rates are computed by whoever reads them (the exporter, the alert).
"""

from __future__ import annotations

from typing import Any

import redis

from .keys import STATS_KEY

NODE_FIELD = "node:{node}:{source}_bytes"
"""Per node, the bytes its syncs got from its peers and from L3 (source = peers | l3)."""


PEER_FIELD = "peer:{peer}:{what}"
"""Per peer, as the nodes that fetched from it saw it: sent_bytes (verified bytes it sent them), bad_pieces, and
drops:<kind> (bad_piece, slow, timeout, refused, error)."""


def peer_counters(stats: dict[str, float]) -> dict[str, dict[str, Any]]:
    """peer → {"bad_pieces": n, "drops": {kind: n}, "sent_bytes": n} from a snapshot."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in stats.items():
        if not key.startswith("peer:"):
            continue
        peer, _, what = key[len("peer:"):].partition(":")
        row = out.setdefault(peer, {"bad_pieces": 0, "drops": {}, "sent_bytes": 0})
        if what.startswith("drops:"):
            row["drops"][what[len("drops:"):]] = int(value)
        elif what in ("bad_pieces", "sent_bytes"):
            row[what] = int(value)
    return dict(sorted(out.items()))


def node_sync_bytes(stats: dict[str, float]) -> dict[str, dict[str, int]]:
    """node → {"peers": bytes, "l3": bytes} from a snapshot."""
    out: dict[str, dict[str, int]] = {}
    for key, value in stats.items():
        if key.startswith("node:") and key.endswith("_bytes"):
            node, source = key[len("node:"):-len("_bytes")].rsplit(":", 1)
            out.setdefault(node, {"peers": 0, "l3": 0})[source] = int(value)
    return dict(sorted(out.items()))


class FleetStats:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def incr(self, **fields: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for name, value in fields.items():
            if isinstance(value, int):
                pipe.hincrby(STATS_KEY, name, value)
            else:
                pipe.hincrbyfloat(STATS_KEY, name, value)
        pipe.execute()

    def set(self, **fields: float) -> None:
        self.redis.hset(STATS_KEY, mapping={k: str(v) for k, v in fields.items()})

    def snapshot(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def sink(self, record: dict[str, Any]) -> None:
        """An EventLog sink: turn cache events into counters. Never raises (the event is already on disk)."""
        try:
            self._count(record)
        except redis.RedisError:
            pass

    def _count(self, r: dict[str, Any]) -> None:
        event, outcome = r.get("event"), r.get("outcome")
        if event == "L2_SYNC":
            from_peers = int(r.get("from_peers", 0))
            from_l3 = int(r.get("from_l3", int(r.get("bytes_fetched", 0)) - from_peers))
            node = r.get("node") or "?"
            self.incr(
                l2_bytes_hit=int(r.get("bytes_reused", 0)),
                l3_bytes_fetched=from_l3,
                peer_bytes_fetched=from_peers,
                **{NODE_FIELD.format(node=node, source="peers"): from_peers,
                   NODE_FIELD.format(node=node, source="l3"): from_l3},
                l2_lookups_hit=1 if outcome == "UNCHANGED" else 0,
                l2_lookups_miss=1 if outcome == "UPDATED" else 0,
                **{PEER_FIELD.format(peer=peer, what="sent_bytes"): int(n)
                   for peer, n in (r.get("by_peer") or {}).items()},
            )
        elif event in ("PEER_BAD_PIECE", "PEER_DROPPED") and r.get("peer"):
            kind = str(r.get("kind") or "error")
            fields = {PEER_FIELD.format(peer=r["peer"], what=f"drops:{kind}"): 1}
            if event == "PEER_BAD_PIECE":
                fields[PEER_FIELD.format(peer=r["peer"], what="bad_pieces")] = 1
            self.incr(**fields)
        elif event == "L2_VERIFY" and outcome == "REJECTED":
            self.incr(l2_verify_rejected=1)
        elif event == "L1_LOAD" and outcome != "FAILED":
            self.incr(l1_loads=1, l1_bytes_loaded=int(r.get("bytes", 0)))
        elif event == "L1_LOAD":
            self.incr(l1_load_failures=1)
        elif event == "SYNC_RUN":
            self.incr(**{f"sync_runs_{str(outcome).lower()}": 1, "sync_seconds_total": float(r.get("seconds", 0))})
            self.set(sync_last_seconds=float(r.get("seconds", 0)), sync_last_at=float(r.get("ts", 0)))
        elif event == "AUDIT_RUN":
            self.incr(**{f"audit_runs_{str(outcome).lower()}": 1, "audit_corrupt_total": int(r.get("corrupt", 0))})
            self.set(audit_last_seconds=float(r.get("seconds", 0)), audit_last_at=float(r.get("ts", 0)))


def cache_status(stats: dict[str, float]) -> dict[str, Any]:
    """Per-tier hit ratios. L1: jobs served by a resident pipeline without loading anything (a job never
    triggers a load, so a miss would be a bug). L2/L3: bytes a node needed that were already on its disk,
    versus bytes it had to fetch from the archive (bytes from peers were needed too, but cost the line nothing)."""
    served = stats.get("l1_hits", 0.0)
    l1_miss = stats.get("l1_misses", 0.0)
    hit_bytes = stats.get("l2_bytes_hit", 0.0)
    fetched = stats.get("l3_bytes_fetched", 0.0)
    from_peers = stats.get("peer_bytes_fetched", 0.0)
    needed = hit_bytes + fetched + from_peers
    return {
        "l1_hit_ratio": served / (served + l1_miss) if served + l1_miss else None,
        "l2_hit_ratio": hit_bytes / needed if needed else None,
        "l3_miss_ratio": fetched / needed if needed else None,
        "jobs_served": int(served),
        "bytes_reused": int(hit_bytes),
        "bytes_fetched": int(fetched),
        "bytes_from_peers": int(from_peers),
    }


def render_cache_status(status: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 100:.1f}%".replace(".0%", "%")

    return (f"L1=HIT({pct(status['l1_hit_ratio'])}) L2=HIT({pct(status['l2_hit_ratio'])}) "
            f"L3=MISS({pct(status['l3_miss_ratio'])})")
