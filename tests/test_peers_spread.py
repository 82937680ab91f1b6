"""Peers under faults, in one process: real peer servers on loopback over real L2 stores, one redis-server, a local
archive as L3.

How ranges are spread over the holders of a blob, the rate floor, a bad piece reported (event, counters, the site's
quarantine list, a verify task on the peer's own queue) and skipped by the next node, the peer repairing from its own
peers, the audit repairing from peers, and a file whose only holder turns bad half way finishing from L3 with the
verified half kept. The same with real worker processes: tests/test_peers_faults.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr import EventLog, LocalArchive
from cachemgr.names import ComponentRef, node_queue
from cachemgr.peers import PeerClient, PeerError, PeerServer
from cachemgr.peersync import MemoryGate, PeerSource
from cachemgr.store import SnapshotStore
from cachemgr.sync import sync_ref
from fleetstate.peerhealth import PeerQuarantine, peer_health, render_peer_line
from fleetstate.stats import FleetStats, peer_counters
from tasks.peering import announce, peer_source, run_blob_repair
from tasks.settings import FleetSettings

SECRET = "spread-secret"
V1, SMALL = ComponentRef("m", "base", "v1"), ComponentRef("m", "lora", "v1")


def write_version(folder: Path, tensors: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    save_file({f"t{i:02d}": np.random.default_rng(seed * 100 + i).integers(0, 255, size, np.uint8)
               for i in range(tensors)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"tensors": tensors}))
    return folder


def rot(store: SnapshotStore, sha256: str, pieces) -> None:  # noqa: ANN001 - manifest pieces
    """Flip bytes inside each of `pieces` of a blob, as bit rot after it was verified."""
    blob = store.blob_path(sha256)
    blob.chmod(0o644)
    with open(blob, "r+b") as fh:
        for piece in pieces:
            fh.seek(piece.start + 7)
            fh.write(b"\x00\xff\x00")


def events_of(home: Path, event: str) -> list[dict]:
    path = home / "events.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event] if path.exists() else []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    archive = LocalArchive(root / "archive")
    big = archive.publish(V1, write_version(root / "build" / "v1", tensors=24, size=64 << 10, seed=1))
    small = archive.publish(SMALL, write_version(root / "build" / "small", tensors=8, size=32 << 10, seed=2))
    holders = []
    for i in range(5):
        store = SnapshotStore(root / f"holder-{i}")
        sync_ref(archive, store, V1)
        sync_ref(archive, store, SMALL)
        holders.append((f"holder-{i}", store, PeerServer(store, SECRET).start()))
    yield {"root": root, "archive": archive, "big": big, "small": small, "holders": holders}
    for _, _, server in holders:
        server.stop()


def test_a_release_comes_from_all_five_holders_about_evenly_and_a_small_file_from_more_than_one(site, tmp_path):
    clients = [PeerClient(name, server.address, SECRET, 5) for name, _, server in site["holders"]]
    store = SnapshotStore(tmp_path / "l2")
    source = PeerSource(clients)
    report = sync_ref(site["archive"], store, V1, peers=source)
    assert report.bytes_from_l3 == 0 and report.bytes_from_peers == site["big"].total_size
    assert set(report.by_peer) == {name for name, _, _ in site["holders"]}, report.by_peer
    assert max(report.by_peer.values()) / sum(report.by_peer.values()) <= 0.35, report.by_peer
    small = sync_ref(site["archive"], store, SMALL, peers=PeerSource(clients))
    entry = site["small"].file("model.safetensors")
    assert entry.size < 300_000 and small.bytes_from_l3 == 0
    assert len([n for n in small.by_peer.values() if n]) >= 2, small.by_peer  # not the whole file from one peer
    assert all(c.ok for c in store.check(V1)) and all(c.ok for c in store.check(SMALL))


def test_a_peer_under_the_rate_floor_is_dropped_as_slow_and_the_file_comes_from_the_others(site, tmp_path):
    name, store, _ = site["holders"][0]
    slow = PeerServer(store, SECRET, upload_rate=64_000).start()  # about 0.5 Mbit/s
    try:
        entry = site["big"].file("model.safetensors")
        with pytest.raises(PeerError) as raised:
            PeerClient("slow", slow.address, SECRET, 5, min_rate=1e6).read(entry.sha256, 0, 512 << 10)
        assert raised.value.kind == "slow" and "under the floor of 8 Mbit/s" in str(raised.value)
        good = [PeerClient(n, s.address, SECRET, 5, min_rate=1e6) for n, _, s in site["holders"][1:3]]
        events = EventLog(tmp_path / "events.jsonl", "fetcher")
        source = PeerSource([PeerClient("slow", slow.address, SECRET, 5, min_rate=1e6), *good], events=events)
        fresh = SnapshotStore(tmp_path / "l2")
        report = sync_ref(site["archive"], fresh, V1, peers=source)
        assert report.bytes_from_l3 == 0 and not report.by_peer.get("slow")
        deadline = time.monotonic() + 10  # its ranges were hedged to the others: its own requests end at the floor
        while "slow" not in source.dropped and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.dropped["slow"].startswith("slow:"), source.dropped
        assert [(e["peer"], e["kind"]) for e in events.read() if e["event"] == "PEER_DROPPED"] == [("slow", "slow")]
    finally:
        slow.stop()


def test_when_the_only_holder_turns_bad_half_way_the_verified_half_is_kept_and_the_rest_comes_from_l3(site, tmp_path):
    _, store, _ = site["holders"][0]
    shutil.copytree(store.root, tmp_path / "late-rot")
    rotten = SnapshotStore(tmp_path / "late-rot")
    entry = site["big"].file("model.safetensors")
    rot(rotten, entry.sha256, entry.pieces[-3:])
    with PeerServer(rotten, SECRET) as server:
        source = PeerSource([PeerClient("late", server.address, SECRET, 5)], gate=MemoryGate())
        fresh = SnapshotStore(tmp_path / "l2")
        report = sync_ref(site["archive"], fresh, V1, peers=source)
    assert source.dropped["late"].startswith("bad_piece:")
    model = site["big"].file("model.safetensors").size
    config = site["big"].file("config.json").size
    assert report.bytes_fetched == site["big"].total_size and report.bytes_reused == 0
    assert config < report.bytes_from_peers < model  # the config and the pieces before the bad one, from the peer
    assert report.bytes_from_l3 == site["big"].total_size - report.bytes_from_peers
    assert all(c.ok for c in fresh.check(V1))


@pytest.fixture(scope="module")
def nodes(site, redis_server):
    """Three nodes as the fleet wires them (tasks.peering): node-a rotten (every piece of its model file), node-b
    and node-c empty; the producer side of the tasks app points at the same redis-server."""
    import tasks

    client = redis_server.client()
    out = {}
    for name in ("node-a", "node-b", "node-c"):
        home = site["root"] / name
        settings = FleetSettings(home=home, node_name=name, broker_url=redis_server.url, peer_secret=SECRET,
                                 peer_port=0, peer_timeout=5, peer_min_mbps=0,
                                 archive_url=(site["root"] / "archive").as_uri())
        store = SnapshotStore(settings.resolved_cache_root)
        server = PeerServer(store, SECRET).start()
        announce(client, settings, server)
        out[name] = {"settings": settings, "store": store, "server": server, "home": home}
    sync_ref(site["archive"], out["node-a"]["store"], V1)
    entry = site["big"].file("model.safetensors")
    rot(out["node-a"]["store"], entry.sha256, entry.pieces)
    tasks.configure(out["node-b"]["settings"])
    yield {"client": client, **out}
    for node in out.values():
        node["server"].stop()
    tasks.app.pool.force_close_all()


def test_a_bad_piece_is_reported_quarantined_and_the_peer_told_then_the_next_node_skips_it(site, nodes):
    client, b, c = nodes["client"], nodes["node-b"], nodes["node-c"]
    entry = site["big"].file("model.safetensors")
    report = sync_ref(site["archive"], b["store"], V1, peers=peer_source(b["settings"], client))
    assert all(check.ok for check in b["store"].check(V1))
    [bad] = events_of(b["home"], "PEER_BAD_PIECE")
    assert (bad["node"], bad["peer"], bad["blob"], bad["file"]) == ("node-b", "node-a", entry.sha256, entry.path)
    assert any(p.start == bad["start"] and p.end == bad["end"] for p in entry.pieces)
    assert report.bytes_from_l3 >= entry.size  # its only holder was bad: the site's one origin pull
    [quarantined] = PeerQuarantine(client).entries()
    assert (quarantined["peer"], quarantined["kind"], quarantined["by"]) == ("node-a", "bad_piece", "node-b")
    [message] = [json.loads(m) for m in client.lrange(node_queue("node-a"), 0, -1)]
    assert message["headers"]["task"] == "warmfleet.verify_blob"  # node-a is told, on its own queue
    assert not PeerQuarantine(client).report("node-a", "bad_piece", "node-c", "again", 60, entry.sha256)

    report = sync_ref(site["archive"], c["store"], V1, peers=peer_source(c["settings"], client))
    assert report.bytes_from_l3 == 0 and set(report.by_peer) == {"node-b"}  # node-a skipped, not asked
    assert not events_of(c["home"], "PEER_BAD_PIECE")

    counters = peer_counters(FleetStats(client).snapshot())
    assert counters["node-a"]["bad_pieces"] == 1 and counters["node-a"]["drops"] == {"bad_piece": 1}
    health = peer_health(client)
    assert health["node-a"]["trouble"] and "QUARANTINED (bad_piece blob" in render_peer_line("node-a", health["node-a"])
    from fleetctl.metrics import FleetCollector

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in FleetCollector(client).collect()
               for s in m.samples}
    assert samples[("warmfleet_peer_bad_pieces_total", (("peer", "node-a"),))] == 1
    assert samples[("warmfleet_peer_quarantined", (("kind", "bad_piece"), ("peer", "node-a")))] == 1


def test_the_told_peer_repairs_from_its_peers_with_nothing_from_l3_and_leaves_the_quarantine(site, nodes):
    client, a = nodes["client"], nodes["node-a"]
    entry = site["big"].file("model.safetensors")
    result = run_blob_repair(a["settings"], entry.sha256, reported_by="node-b")
    assert result["outcome"] == "REPAIRED" and result["from_l3"] == 0 and result["from_peers"] == entry.size
    assert set(result["by_peer"]) <= {"node-b", "node-c"}
    blob = a["store"].blob_path(entry.sha256)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.sha256
    assert [p.name.split(".")[0] for p in (a["store"].root / "quarantine").iterdir()] == [entry.sha256]
    assert not PeerQuarantine(client).peers()
    outcomes = [(e["outcome"], e.get("reported_by")) for e in events_of(a["home"], "L2_VERIFY")]
    assert outcomes == [("QUARANTINED", "node-b"), ("REPAIRED", "node-b")]
    assert run_blob_repair(a["settings"], entry.sha256)["outcome"] == "OK"
    with pytest.raises(ValueError, match="not a blob name"):
        run_blob_repair(a["settings"], "../etc/passwd")


def test_the_audit_repairs_a_corrupt_blob_from_its_peers(site, nodes):
    from tasks.maintenance import run_audit

    c = nodes["node-c"]
    entry = site["big"].file("model.safetensors")
    rot(c["store"], entry.sha256, entry.pieces[:1])
    before = len(events_of(c["home"], "L2_SYNC"))
    result = run_audit(c["settings"])
    assert result["refetched"] == [str(V1)] and result["quarantined"] == [entry.sha256]
    [record] = events_of(c["home"], "L2_SYNC")[before:]
    assert record["from_l3"] == 0 and record["from_peers"] == entry.size and record["by_peer"]
    assert all(check.ok for check in c["store"].check(V1))
