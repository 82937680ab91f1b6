"""Peers first, at a site: three nodes (each its own L2 and a real peer server on loopback), one redis-server, and
the OSS dev server as L3, whose request log says exactly which object bytes crossed the line.

The story runs in order: a first start, a nightly update, a new node, bad peers, an origin puller that dies."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr import EventLog
from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from cachemgr.peers import PeerClient, PeerServer
from cachemgr.peersync import ORIGIN_KEY, PeerSource
from cachemgr.store import SnapshotStore
from cachemgr.sync import sync_ref
from fleetstate.nodes import NodeRegistry
from fleetstate.origin import RedisOriginGate
from ossserver import OssServer
from tasks.peering import announce, peer_source
from tasks.settings import FleetSettings

pytestmark = pytest.mark.integration
AK, SK, SECRET = "peer-ak", "peer-sk", "site-secret"
SMALL, BIG = 128 << 10, 9 << 20  # 24 small tensors and one larger than a ranged read (it is split)
NODES = ("node-a", "node-b", "node-c")


def write_version(folder: Path, changed: dict[int, int]) -> Path:
    """A safetensors checkpoint whose tensor i is seeded by changed.get(i, 0), plus a config that never changes."""
    folder.mkdir(parents=True)
    tensors = {f"t{i:02d}": np.random.default_rng(1000 * changed.get(i, 0) + i).integers(
        0, 255, size=BIG if i == 0 else SMALL, dtype=np.uint8) for i in range(25)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"layers": 25}')
    return folder


def l3_data_bytes(oss: OssServer, since: int) -> int:
    """Object bytes (not manifests or listings) read from OSS since request number `since`."""
    total = 0
    for r in oss.requests[since:]:
        if r.method != "GET" or not r.key or r.key.endswith("manifest.json") or not r.range:
            continue
        start, end = r.range.split("=", 1)[1].split("-")
        total += int(end) - int(start) + 1
    return total


def changed_bytes(new, *olds) -> int:
    """Bytes of `new` in pieces that none of the versions a node already holds has."""
    before = {p.sha256 for old in olds for f in old.files for p in f.pieces}
    return sum(p.size for f in new.files for p in f.pieces if p.sha256 not in before)


def assert_only_verified(store: SnapshotStore) -> None:
    """Nothing unverified is visible: every blob hashes to its name, every snapshot checks, no temp file is left."""
    for blob in store.blobs.iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    for ref in store.refs():
        assert all(c.ok for c in store.check(ref)), ref
    assert not [p for p in store.tmp.iterdir() if p.name.endswith((".incomplete", ".partial"))]


class Node:
    def __init__(self, name: str, root: Path, oss: OssServer, redis_url: str) -> None:
        self.name = name
        self.settings = FleetSettings(home=root, node_name=name, broker_url=redis_url, peer_secret=SECRET,
                                      peer_port=0, peer_timeout=5)
        self.store = SnapshotStore(root / "l2")
        self.events = EventLog(root / "events.jsonl", name)
        self.archive = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        self.server = PeerServer(self.store, SECRET).start()

    def sync(self, client, ref: ComponentRef, peers: PeerSource | None = None):
        return sync_ref(self.archive, self.store, ref, events=self.events,
                        peers=peers or peer_source(self.settings, client))

    def stop(self) -> None:
        self.server.stop()
        self.archive.close()


def in_parallel(nodes: list[Node], client, ref: ComponentRef) -> dict[str, object]:
    reports: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(node: Node) -> None:
        try:
            reports[node.name] = node.sync(client, ref)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return reports


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    with OssServer(root / "oss", access_key_id=AK, access_key_secret=SK) as oss:
        oss.create_bucket("models")
        publisher = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        manifests = {}
        for version, changed in {"v1": {}, "v2": {3: 1, 7: 1, 11: 1}, "v3": {0: 2, 5: 2}}.items():
            ref = ComponentRef("m", "base", version)
            manifests[version] = publisher.publish(ref, write_version(root / "build" / version, changed))
        client = redis_server.client()
        nodes = [Node(name, root / name, oss, redis_server.url) for name in NODES]
        for node in nodes:
            announce(client, node.settings, node.server)
        yield {"oss": oss, "client": client, "redis_url": redis_server.url, "nodes": nodes, "manifests": manifests, "root": root}
        for node in nodes:
            node.stop()
        publisher.close()


def test_a_first_start_of_three_nodes_reads_the_version_from_oss_once(site):
    oss, client, nodes = site["oss"], site["client"], site["nodes"]
    v1 = site["manifests"]["v1"]
    since = len(oss.requests)
    reports = in_parallel(nodes, client, v1.ref)
    assert l3_data_bytes(oss, since) == v1.total_size
    assert sum(r.bytes_from_l3 for r in reports.values()) == v1.total_size
    assert sum(r.bytes_from_peers for r in reports.values()) == 2 * v1.total_size
    for node in nodes:
        assert node.store.has(v1.ref)
        assert_only_verified(node.store)


def test_a_nightly_update_reaches_every_node_with_one_copy_of_its_changed_bytes_from_oss(site):
    oss, client, nodes = site["oss"], site["client"], site["nodes"]
    v1, v2 = site["manifests"]["v1"], site["manifests"]["v2"]
    changed = changed_bytes(v2, v1)
    assert 0 < changed < v2.total_size / 5
    since = len(oss.requests)
    reports = in_parallel(nodes, client, v2.ref)
    assert l3_data_bytes(oss, since) == changed
    assert sorted(r.bytes_from_l3 for r in reports.values()) == [0, 0, changed]
    assert sorted(r.bytes_from_peers for r in reports.values()) == [0, changed, changed]
    for node in nodes:
        assert node.store.has(v2.ref)
        assert_only_verified(node.store)
        record = [e for e in node.events.read() if e["event"] == "L2_SYNC" and e["version"] == "v2"][-1]
        assert record["from_peers"] + record["from_l3"] == record["bytes_fetched"]


def test_a_new_node_fills_from_its_peers_with_nothing_from_oss(site, tmp_path):
    oss, client = site["oss"], site["client"]
    v2 = site["manifests"]["v2"]
    fresh = Node("node-new", tmp_path / "new", oss, site["redis_url"])
    try:
        since = len(oss.requests)
        report = fresh.sync(client, v2.ref)
        assert l3_data_bytes(oss, since) == 0
        assert report.bytes_from_l3 == 0 and report.bytes_from_peers == v2.total_size
        assert fresh.store.has(v2.ref)
        assert_only_verified(fresh.store)
    finally:
        fresh.stop()


class CuttingRelay:
    """A TCP relay to a real peer server that hangs up after `limit` bytes of each answer: a peer that dies
    mid-transfer, as its clients see it."""

    def __init__(self, upstream: tuple[str, int], limit: int) -> None:
        self.upstream, self.limit = upstream, limit
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.upstream) as up:
            conn.settimeout(5)
            request = conn.recv(65536)
            up.sendall(request)
            sent = 0
            while sent < self.limit:
                data = up.recv(min(65536, self.limit - sent))
                if not data:
                    break
                conn.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self.sock.close()


def test_corrupt_dying_and_wrongly_keyed_peers_change_only_where_the_bytes_come_from(site, tmp_path):
    oss, nodes = site["oss"], site["nodes"]
    v2 = site["manifests"]["v2"]
    good = nodes[0]
    shutil.copytree(good.store.root, tmp_path / "corrupt")  # a peer whose disk rotted after it verified
    corrupt_store = SnapshotStore(tmp_path / "corrupt")
    entry = v2.file("model.safetensors")
    blob = corrupt_store.blob_path(entry.sha256)
    blob.chmod(0o644)
    with open(blob, "r+b") as fh:
        for piece in entry.pieces[1:]:  # whatever range it is asked for, it sends a bad piece
            fh.seek(piece.start + 10)
            fh.write(b"\xff\x00\xff")
    corrupt = PeerServer(corrupt_store, SECRET).start()
    wrong = PeerServer(good.store, "another-site").start()
    dying = CuttingRelay(("127.0.0.1", good.server.port), limit=40_000)
    fresh = SnapshotStore(tmp_path / "fresh")
    clients = [PeerClient("corrupt", corrupt.address, SECRET, 5), PeerClient("dying", dying.address, SECRET, 5),
               PeerClient("wrong-key", wrong.address, SECRET, 5), PeerClient("good", good.server.address, SECRET, 5)]
    source = PeerSource(clients)
    try:
        since = len(oss.requests)
        report = sync_ref(good.archive, fresh, v2.ref, peers=source)
        assert set(source.dropped) == {"corrupt", "dying", "wrong-key"}, source.dropped
        assert "do not match the manifest" in source.dropped["corrupt"]
        assert report.bytes_from_peers + report.bytes_from_l3 == v2.total_size
        assert l3_data_bytes(oss, since) == report.bytes_from_l3
        assert fresh.has(v2.ref)
        assert_only_verified(fresh)
    finally:
        corrupt.stop()
        wrong.stop()
        dying.close()


def test_when_the_origin_puller_dies_its_lease_expires_and_the_site_still_reads_the_change_once(site):
    oss, client, nodes = site["oss"], site["client"], site["nodes"]
    v1, v2, v3 = site["manifests"]["v1"], site["manifests"]["v2"], site["manifests"]["v3"]
    blob = v3.file("model.safetensors").sha256
    dead = RedisOriginGate(client, "node-dead", lease_seconds=1.5)
    assert dead.acquire(ORIGIN_KEY.format(sha256=blob))  # it took the lease, then died: never renewed
    assert dead.holder(ORIGIN_KEY.format(sha256=blob)) == "node-dead"
    since = len(oss.requests)
    reports = in_parallel(nodes, client, v3.ref)
    assert l3_data_bytes(oss, since) == changed_bytes(v3, v1, v2)
    assert sorted(r.bytes_from_l3 for r in reports.values())[:2] == [0, 0]
    for node in nodes:
        assert node.store.has(v3.ref)
        assert_only_verified(node.store)
    assert NodeRegistry(client).peers(exclude="node-a").keys() == {"node-b", "node-c"}


def test_the_stats_count_bytes_from_peers_and_from_l3_per_node_and_the_alert_only_l3(site):
    from fleetctl.metrics import FleetCollector, MissRateAlert
    from fleetstate.stats import FleetStats, cache_status, node_sync_bytes

    client, nodes = site["client"], site["nodes"]
    stats = FleetStats(client)
    client.delete("fleet:stats")
    records = [e for n in nodes for e in n.events.read() if e["event"] == "L2_SYNC"]
    for record in records:
        stats.sink(record)
    per_node = node_sync_bytes(stats.snapshot())
    for node in nodes:
        mine = [r for r in records if r["node"] == node.name]
        assert per_node[node.name] == {"peers": sum(r["from_peers"] for r in mine),
                                       "l3": sum(r["from_l3"] for r in mine)}
    status = cache_status(stats.snapshot())
    l3 = sum(r["from_l3"] for r in records)
    assert status["bytes_fetched"] == l3 and status["bytes_from_peers"] == sum(r["from_peers"] for r in records)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in FleetCollector(client).collect()
               for s in m.samples}
    assert samples[("warmfleet_node_sync_bytes_total", (("node", "node-a"), ("source", "l3")))] == \
        per_node["node-a"]["l3"]
    from fleetstate.rollout import fleet_status

    status_rows = fleet_status(client)["sync_bytes"]  # what `warmfleet status` prints per node
    assert status_rows["node-b"]["peers"] == per_node["node-b"]["peers"]
    assert status_rows["node-b"]["peer_server"] == nodes[1].server.address
    clock = iter([0.0, 10.0])
    alert = MissRateAlert(client, nodes[0].events, threshold=0.01, window=60, clock=lambda: next(clock))
    alert.evaluate()
    stats.sink({"event": "L2_SYNC", "node": "node-a", "bytes_reused": 0, "bytes_fetched": 1000, "from_peers": 1000,
                "from_l3": 0, "outcome": "UPDATED"})
    alert.evaluate()
    assert alert.last_ratio == 0.0  # a night served by peers is no L3 miss
