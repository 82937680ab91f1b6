"""Peers first: what the slow line to OSS carries when a site's nodes fill their L2 from each other.

N nodes (each its own L2 and peer server on loopback, one redis-server for the origin leases and the registry)
sync a new version at once (the nightly fan-out), with OSS behind the emulated 100 Mbps / 45 ms line. Compared in
the same run: the object bytes OSS served for the version with peers, against one node syncing it without peers
(what each node costs the line today); and a new, empty node filled from its peers, against the time the line
needs to carry the same bytes at its rate.
Run: .venv/bin/python bench/bench_peers.py [--nodes 6] [--mib 64] [--changed 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import entry, machine, merge_results, today, write_section  # noqa: E402
from cachemgr.archive.oss import OssArchive  # noqa: E402
from cachemgr.names import ComponentRef  # noqa: E402
from cachemgr.peers import PeerServer  # noqa: E402
from cachemgr.store import SnapshotStore  # noqa: E402
from cachemgr.sync import sync_ref  # noqa: E402
from ossserver import Link, OssServer  # noqa: E402
from tasks.peering import announce, peer_source  # noqa: E402
from tasks.settings import FleetSettings  # noqa: E402
from tests.support import RedisServer  # noqa: E402

AK, SK, SECRET = "bench-ak", "bench-sk", "bench-secret"
TENSORS = 64


def write_version(folder: Path, mib: int, changed: int, seed: int) -> None:
    folder.mkdir(parents=True)
    size = (mib << 20) // TENSORS
    tensors = {f"t{i:03d}": np.random.default_rng((seed if i < changed else 0) * 1000 + i).integers(
        0, 255, size=size, dtype=np.uint8) for i in range(TENSORS)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(f'{{"tensors": {TENSORS}}}')


def origin_bytes(oss: OssServer, since: int) -> int:
    """Object bytes (no manifests, no listings) OSS served since request number `since`."""
    total = 0
    for r in oss.requests[since:]:
        if r.method == "GET" and r.key and r.range and not r.key.endswith("manifest.json"):
            start, end = r.range.split("=", 1)[1].split("-")
            total += int(end) - int(start) + 1
    return total


class Node:
    def __init__(self, name: str, root: Path, oss: OssServer, redis_url: str) -> None:
        self.name = name
        self.settings = FleetSettings(home=root, node_name=name, broker_url=redis_url, peer_secret=SECRET, peer_port=0)
        self.store = SnapshotStore(root / "l2")
        self.archive = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        self.server = PeerServer(self.store, SECRET).start()

    def sync(self, client, ref: ComponentRef, peers: bool = True):  # noqa: ANN001, ANN201
        return sync_ref(self.archive, self.store, ref, peers=peer_source(self.settings, client) if peers else None)

    def stop(self) -> None:
        self.server.stop()
        self.archive.close()


def all_at_once(nodes: list[Node], client, ref: ComponentRef) -> float:  # noqa: ANN001
    errors: list[BaseException] = []

    def run(node: Node) -> None:
        try:
            node.sync(client, ref)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def run(n_nodes: int, mib: int, changed: int, rate_mbps: float, delay_ms: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis", appendonly=False).start()
        oss = OssServer(tmp / "oss", access_key_id=AK, access_key_secret=SK,
                        link=Link(rate_bps=rate_mbps * 1e6, delay_ms=delay_ms)).start()
        nodes: list[Node] = []
        try:
            oss.create_bucket("models")
            publisher = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
            v1, v2 = ComponentRef("m", "base", "v1"), ComponentRef("m", "base", "v2")
            write_version(tmp / "build" / "v1", mib, 0, 0)
            write_version(tmp / "build" / "v2", mib, changed, 1)
            m1 = publisher.publish(v1, tmp / "build" / "v1")
            m2 = publisher.publish(v2, tmp / "build" / "v2")
            before = {p.sha256 for f in m1.files for p in f.pieces}
            changed_bytes = sum(p.size for f in m2.files for p in f.pieces if p.sha256 not in before)
            client = redis_server.client()
            nodes = [Node(f"node-{i}", tmp / f"node-{i}", oss, redis_server.url) for i in range(n_nodes + 1)]
            site, solo = nodes[:-1], nodes[-1]
            for node in site:
                announce(client, node.settings, node.server)

            since = len(oss.requests)
            first_start_s = all_at_once(site, client, v1)  # the site's first start: v1 crosses the line once
            first_origin = origin_bytes(oss, since)

            since = len(oss.requests)
            nightly_s = all_at_once(site, client, v2)  # the nightly fan-out of v2
            nightly_origin = origin_bytes(oss, since)

            solo.sync(client, v1)  # the baseline node holds v1 (from peers) and syncs v2 on its own, as today
            since = len(oss.requests)
            solo.sync(client, v2, peers=False)
            solo_origin = origin_bytes(oss, since)

            fresh = Node("node-new", tmp / "node-new", oss, redis_server.url)
            nodes.append(fresh)
            since = len(oss.requests)
            started = time.perf_counter()
            report = fresh.sync(client, v2)
            fill_s = time.perf_counter() - started
            fill_origin = origin_bytes(oss, since)
            assert report.bytes_from_l3 == 0 and fresh.store.has(v2)
            line_s = m2.total_size / (rate_mbps * 1e6 / 8)
            publisher.close()
            return {"nodes": n_nodes, "version_bytes": m2.total_size, "changed_bytes": changed_bytes,
                    "first_origin": first_origin, "first_start_s": first_start_s,
                    "nightly_origin": nightly_origin, "nightly_s": nightly_s, "solo_origin": solo_origin,
                    "fill_s": fill_s, "fill_origin": fill_origin, "line_s": line_s}
        finally:
            for node in nodes:
                node.stop()
            oss.stop()
            redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6, help="nodes at the site (the reference deployment has 6)")
    parser.add_argument("--mib", type=int, default=64, help="size of the base checkpoint")
    parser.add_argument("--changed", type=int, default=3, help=f"tensors changed in the new version, of {TENSORS}")
    parser.add_argument("--rate", type=float, default=100.0, help="the OSS line, Mbit/s")
    parser.add_argument("--delay-ms", type=float, default=45.0)
    args = parser.parse_args()
    r = run(args.nodes, args.mib, args.changed, args.rate, args.delay_ms)
    mb = 1e6
    per_version = r["nightly_origin"] / r["changed_bytes"]
    first = r["first_origin"] / r["version_bytes"]
    fill = r["fill_s"] / r["line_s"]
    merge_results([
        entry("peers.origin_bytes_per_version_over_changed", round(per_version, 4), "ratio", "<= 1.05"),
        entry("peers.first_start_origin_bytes_over_version", round(first, 4), "ratio", "<= 1.05"),
        entry("peers.new_node_fill_over_link_limit", round(fill, 4), "ratio", "< 1"),
        entry("peers.new_node_origin_bytes", r["fill_origin"], "B", "0"),
        entry("peers.without_peers_origin_bytes_per_node_over_changed", round(r["solo_origin"] / r["changed_bytes"], 4),
              "ratio", None),
    ])
    write_section("peers", f"""
## Peers first: one origin pull per site (bench/bench_peers.py, {today()}, {machine()})

{r['nodes']} nodes, each its own L2 and peer server on loopback; OSS behind an emulated {args.rate:g} Mbit/s line,
+{args.delay_ms:g} ms per request; a {r['version_bytes'] / mb:.1f} MB base checkpoint, {args.changed} of {TENSORS}
tensors changed ({r['changed_bytes'] / mb:.2f} MB). Object bytes counted from the OSS server's request log.

| what | with peers | without peers (each node on its own) |
|---|---|---|
| nightly update, OSS bytes for the site ÷ changed bytes | **{per_version:.3f}** (target ≤ 1.05), {r['nightly_s']:.1f} s for all | {r['solo_origin'] / r['changed_bytes']:.3f} per node → {r['nodes'] * r['solo_origin'] / r['changed_bytes']:.1f} for {r['nodes']} nodes |
| first start of the site, OSS bytes ÷ version size | **{first:.3f}**, {r['first_start_s']:.1f} s for all | {r['nodes']:.0f} (each node pulls it) |
| a new node filled from its peers | {r['fill_origin']} B from OSS, {r['fill_s']:.2f} s = **{fill:.3f}** × the line's floor ({r['line_s']:.1f} s) | {r['version_bytes'] / mb:.1f} MB from OSS, ≥ {r['line_s']:.1f} s |
""")
    print(f"nightly: OSS bytes ÷ changed = {per_version:.3f} for {r['nodes']} nodes; first start ÷ version = "
          f"{first:.3f}; new node from peers: {r['fill_s']:.2f} s vs the line's {r['line_s']:.1f} s ({fill:.3f}), "
          f"{r['fill_origin']} B from OSS")


if __name__ == "__main__":
    main()
