"""Peers first, live: three real `warmfleet maintenance-worker` processes (each its own home, L2 and node name, one
redis-server, the OSS dev server as L3) and a fleet-wide sync triggered with `warmfleet sync --fleet`.

What the wiring must do, seen from outside: each node's peer server announces itself in Redis, the site reads each
version from OSS once and the other nodes take it from their peers, the stats say so per node, and a stopped node
withdraws its announcement and closes its port."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from cachemgr.peers import PeerClient, PeerError
from cachemgr.store import SnapshotStore
from fleetstate.nodes import NodeRegistry
from fleetstate.routes import RouteTable
from fleetstate.stats import FleetStats, node_sync_bytes
from ossserver import OssServer
from tasks.settings import FleetSettings

from .support import REPO, child_env

pytestmark = pytest.mark.integration
AK, SK, SECRET = "live-ak", "live-sk", "live-site-secret"
NODES = ("node-a", "node-b", "node-c")


def write_version(folder: Path, changed: set[int]) -> Path:
    folder.mkdir(parents=True)
    tensors = {f"t{i:02d}": np.random.default_rng(i + (1000 if i in changed else 0)).integers(0, 255, 192 << 10,
                                                                                               np.uint8)
               for i in range(12)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"layers": 12}')
    return folder


def cli(settings: FleetSettings, *args: str) -> subprocess.CompletedProcess:
    env = child_env(settings)
    env.pop("FLEET_NODE_NAME", None)
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-site")
    with OssServer(root / "oss", access_key_id=AK, access_key_secret=SK) as oss:
        oss.create_bucket("models")
        publisher = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        base = FleetSettings(home=root / "operator", broker_url=redis_server.url, archive_url="oss://models/site",
                             oss_endpoint=oss.endpoint, oss_access_key_id=AK, oss_access_key_secret=SK,
                             peer_secret=SECRET, peer_port=0, peer_timeout=5, peer_lease_seconds=10,
                             node_name="operator")
        procs: dict[str, subprocess.Popen] = {}
        for node in NODES:
            settings = base.model_copy(update={"home": root / node, "node_name": node})
            procs[node] = subprocess.Popen(
                [sys.executable, "-m", "fleetctl.cli", "maintenance-worker", "--name", f"maint@{node}"],
                stdout=open(root / f"{node}.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(settings), cwd=REPO, start_new_session=True)
        client = redis_server.client()
        try:
            yield {"oss": oss, "client": client, "root": root, "settings": base, "procs": procs,
                   "publisher": publisher}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            publisher.close()


def logs(site) -> str:
    return "\n".join(f"--- {n}\n" + (site["root"] / f"{n}.log").read_text(errors="replace")[-2000:] for n in NODES)


def wait_for_announcements(site, timeout: float = 120) -> dict[str, str]:
    registry = NodeRegistry(site["client"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = registry.peers()
        if set(NODES) <= set(registry.nodes()) and set(NODES) <= set(peers):
            return peers
        dead = [n for n, p in site["procs"].items() if p.poll() is not None]
        assert not dead, f"maintenance workers exited: {dead}\n{logs(site)}"
        time.sleep(0.2)
    raise AssertionError(f"not every node announced its peer server:\n{logs(site)}")


def node_events(site, node: str, event: str) -> list[dict]:
    path = site["root"] / node / "events.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event] if path.exists() else []


def test_each_node_announces_a_peer_server_that_answers_signed_requests_only(site):
    peers = wait_for_announcements(site)
    for node, address in peers.items():
        if node not in NODES:
            continue
        assert address.startswith("127.0.0.1:") and port_open(address)
        assert PeerClient(node, address, SECRET, 5).has("0" * 64) is False  # signed: answered (no such blob)
        with pytest.raises(PeerError, match="refused our signature"):
            PeerClient(node, address, "not-the-secret", 5).has("0" * 64)


def test_a_fleet_wide_sync_reads_the_version_from_oss_once_and_the_other_nodes_take_it_from_peers(site):
    oss, client, publisher = site["oss"], site["client"], site["publisher"]
    wait_for_announcements(site)
    manifest = publisher.publish(ComponentRef("m", "base", "v1"), write_version(site["root"] / "build" / "v1", set()))
    RouteTable(client).set_active("m@base-v1", actor="test")
    client.delete("fleet:stats")
    since = len(oss.requests)
    out = cli(site["settings"], "sync", "--fleet", "--timeout", "240")
    assert out.returncode == 0, out.stdout + out.stderr + logs(site)
    assert "3 node(s) ok" in out.stdout, out.stdout

    data = [r for r in oss.requests[since:] if r.method == "GET" and r.key.endswith(("safetensors", "config.json"))]
    per_key: dict[str, int] = {}
    for r in data:
        per_key[r.key] = per_key.get(r.key, 0) + 1
    assert per_key and all(n == 1 for n in per_key.values()), per_key  # each file crossed the line once

    per_node = node_sync_bytes(FleetStats(client).snapshot())
    assert sum(per_node[n]["l3"] for n in NODES) == manifest.total_size, per_node
    assert sum(per_node[n]["peers"] for n in NODES) == 2 * manifest.total_size, per_node
    assert sum(1 for n in NODES if per_node[n]["peers"] > 0) >= 2  # the second and third node: from their peers
    for node in NODES:
        store = SnapshotStore(site["root"] / node / "l2")
        assert store.has(manifest.ref) and all(c.ok for c in store.check(manifest.ref))
        for blob in store.blobs.iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        [record] = [e for e in node_events(site, node, "L2_SYNC") if e.get("version") == "v1"]
        assert record["from_peers"] + record["from_l3"] == manifest.total_size
        assert per_node[node] == {"peers": record["from_peers"], "l3": record["from_l3"]}


def test_a_stopped_node_withdraws_its_announcement_and_closes_its_port(site):
    peers = wait_for_announcements(site)
    for node in NODES:
        proc = site["procs"][node]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, logs(site)
    remaining = NodeRegistry(site["client"]).peers()
    assert not set(NODES) & set(remaining), remaining
    assert not [n for n in NODES if port_open(peers[n])]
