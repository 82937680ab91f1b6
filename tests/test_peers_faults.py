"""Peers under faults, live: three real `warmfleet maintenance-worker` processes (each its own home, L2 and node
name; node-c uploads at 0.2 Mbit/s), one redis-server, the OSS dev server as L3, syncs sent to each node's own queue.

A blob that rotted on node-a after it was verified: the first node to fetch it (node-b) reports the bad piece,
node-a verifies and repairs it from its peers at once (no nightly audit, nothing from L3), and the next node
(node-c) never downloads a bad byte. A slow peer: node-b drops node-c by rate and finishes from node-a. What an
operator sees: `warmfleet status` names the peers in trouble, `warmfleet sync` says where the bytes came from.
The same mechanisms in one process, with more cases: tests/test_peers_spread.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from beat_schedule import SYNC_TASK
from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef, node_queue
from fleetstate.nodes import NodeRegistry
from fleetstate.peerhealth import PeerQuarantine
from fleetstate.stats import FleetStats, peer_counters
from ossserver import OssServer
from tasks.settings import FleetSettings

from .support import REPO, child_env

pytestmark = pytest.mark.integration
AK, SK, SECRET = "faults-ak", "faults-sk", "faults-secret"
NODES = ("node-a", "node-b", "node-c")
SLOW = "node-c"


def write_version(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    save_file({f"t{i:02d}": np.random.default_rng(seed * 100 + i).integers(0, 255, 192 << 10, np.uint8)
               for i in range(12)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"layers": 12}')
    return folder


def cli(settings: FleetSettings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], env=child_env(settings), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    import tasks

    root = tmp_path_factory.mktemp("faults-site")
    with OssServer(root / "oss", access_key_id=AK, access_key_secret=SK) as oss:
        oss.create_bucket("models")
        publisher = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        base = FleetSettings(home=root / "operator", broker_url=redis_server.url, archive_url="oss://models/site",
                             oss_endpoint=oss.endpoint, oss_access_key_id=AK, oss_access_key_secret=SK,
                             peer_secret=SECRET, peer_port=0, peer_timeout=5, peer_lease_seconds=10,
                             peer_min_mbps=4, node_name="operator")
        procs: dict[str, subprocess.Popen] = {}
        for node in NODES:
            settings = base.model_copy(update={"home": root / node, "node_name": node,
                                               "peer_upload_mbps": 0.2 if node == SLOW else None})
            procs[node] = subprocess.Popen(
                [sys.executable, "-m", "fleetctl.cli", "maintenance-worker", "--name", f"maint@{node}"],
                stdout=open(root / f"{node}.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(settings), cwd=REPO, start_new_session=True)
        tasks.configure(base)
        client = redis_server.client()
        try:
            yield {"oss": oss, "client": client, "root": root, "settings": base, "procs": procs,
                   "publisher": publisher, "app": tasks.app}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            tasks.app.pool.force_close_all()
            publisher.close()


def logs(site) -> str:
    return "\n".join(f"--- {n}\n" + (site["root"] / f"{n}.log").read_text(errors="replace")[-3000:] for n in NODES)


def wait_for_announcements(site, timeout: float = 120) -> None:
    registry = NodeRegistry(site["client"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(NODES) <= set(registry.peers()) and set(NODES) <= set(registry.nodes()):
            return
        dead = [n for n, p in site["procs"].items() if p.poll() is not None]
        assert not dead, f"maintenance workers exited: {dead}\n{logs(site)}"
        time.sleep(0.2)
    raise AssertionError(f"not every node announced its peer server:\n{logs(site)}")


def events(site, node: str, event: str) -> list[dict]:
    path = site["root"] / node / "events.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event] if path.exists() else []


def sync_on(site, node: str, ref: ComponentRef) -> dict:
    """A sync of `ref` on one node, sent to its own queue as the fleet-wide fan-out does; its result."""
    result = site["app"].send_task(SYNC_TASK, kwargs={"refs": [f"{ref.model}/{ref.component}/{ref.version}"]},
                                   queue=node_queue(node))
    try:
        return result.get(timeout=180)
    except Exception as exc:
        raise AssertionError(f"sync on {node} failed: {exc}\n{logs(site)}") from exc


def l3_bytes(site, since: int, key_suffix: str) -> int:
    """Object bytes of one file OSS served since request number `since` (reads are ranged GETs)."""
    total = 0
    for r in site["oss"].requests[since:]:
        if r.method == "GET" and r.key and r.key.endswith(key_suffix):
            assert r.range, r
            start, end = r.range.split("=", 1)[1].split("-")
            total += int(end) - int(start) + 1
    return total


def test_a_rotten_blob_is_reported_repaired_at_once_from_peers_and_never_reaches_a_second_node(site):
    wait_for_announcements(site)
    client, publisher = site["client"], site["publisher"]
    manifest = publisher.publish(ComponentRef("m", "base", "v1"), write_version(site["root"] / "build" / "v1", 1))
    entry = manifest.file("model.safetensors")
    assert sync_on(site, "node-a", manifest.ref)["from_l3"] == manifest.total_size
    blob = site["root"] / "node-a" / "l2" / "blobs" / entry.sha256  # rots after it was verified
    blob.chmod(0o644)
    with open(blob, "r+b") as fh:
        for piece in entry.pieces:
            fh.seek(piece.start + 11)
            fh.write(b"\xff\x00\xff")
    assert sync_on(site, "node-a", manifest.ref)["versions"] == [f"{manifest.ref} UNCHANGED"]  # it cannot tell

    since = len(site["oss"].requests)
    b = sync_on(site, "node-b", manifest.ref)
    [bad] = events(site, "node-b", "PEER_BAD_PIECE")
    assert (bad["node"], bad["peer"], bad["blob"], bad["file"]) == ("node-b", "node-a", entry.sha256, entry.path)
    assert any((p.start, p.end) == (bad["start"], bad["end"]) for p in entry.pieces)
    assert b["by_peer"].get("node-a", 0) < entry.size  # not the model file: every piece of it was bad

    deadline = time.monotonic() + 90
    while not [e for e in events(site, "node-a", "L2_VERIFY") if e["outcome"] == "REPAIRED"]:
        assert time.monotonic() < deadline, f"node-a did not repair the blob\n{logs(site)}"
        time.sleep(0.3)
    verify = events(site, "node-a", "L2_VERIFY")
    assert [(e["outcome"], e.get("trigger"), e.get("reported_by")) for e in verify] == [
        ("QUARANTINED", "peer-report", "node-b"), ("REPAIRED", "peer-report", "node-b")]
    # node-a's only holder was bad, so the site pulled the file from OSS once: node-b pulled it and node-a's repair
    # took it from node-b, or node-a's repair took the site's lease first and node-b waited for it
    assert l3_bytes(site, since, "model.safetensors") == entry.size
    config = l3_bytes(site, since, "config.json")  # node-b's, when node-a was in quarantine before it asked for it
    assert b["from_l3"] - config + verify[-1]["from_l3"] == entry.size
    assert verify[-1]["from_peers"] + verify[-1]["from_l3"] == entry.size
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.sha256
    assert "node-a" not in PeerQuarantine(client).peers()  # repaired: the site may ask it again

    c = sync_on(site, "node-c", manifest.ref)
    assert c["from_l3"] == 0 and c["from_peers"] == manifest.total_size
    assert not events(site, "node-c", "PEER_BAD_PIECE") and not events(site, "node-c", "PEER_DROPPED")
    assert peer_counters(FleetStats(client).snapshot())["node-a"]["bad_pieces"] == 1


def test_a_slow_peer_is_dropped_by_rate_and_the_sync_finishes_from_the_others(site):
    wait_for_announcements(site)
    manifest = site["publisher"].publish(ComponentRef("m", "base", "v2"),
                                         write_version(site["root"] / "build" / "v2", 2))
    sync_on(site, "node-a", manifest.ref)
    assert sync_on(site, SLOW, manifest.ref)["from_l3"] == 0
    b = sync_on(site, "node-b", manifest.ref)
    assert b["from_l3"] == 0 and b["by_peer"] == {"node-a": b["bytes_fetched"]}, b  # the config is v1's: reused
    deadline = time.monotonic() + 30  # its ranges may be hedged to node-a first: its own requests end at the floor
    while not [e for e in events(site, "node-b", "PEER_DROPPED") if e["peer"] == SLOW]:
        assert time.monotonic() < deadline, f"node-b did not drop {SLOW}\n{logs(site)}"
        time.sleep(0.2)
    [dropped] = [e for e in events(site, "node-b", "PEER_DROPPED") if e["peer"] == SLOW]
    assert dropped["kind"] == "slow" and "under the floor of 4 Mbit/s" in dropped["reason"]
    [entry] = [e for e in PeerQuarantine(site["client"]).entries() if e["peer"] == SLOW]
    assert (entry["kind"], entry["by"]) == ("slow", "node-b")


def test_status_names_the_peers_in_trouble_and_sync_says_where_its_bytes_came_from(site):
    out = cli(site["settings"], "status")
    assert out.returncode == 0, out.stdout + out.stderr
    [line_c] = [line for line in out.stdout.splitlines() if line.startswith(f"peer {SLOW}:")]
    assert "QUARANTINED (slow, reported by node-b" in line_c and "drops: slow 1" in line_c
    [line_a] = [line for line in out.stdout.splitlines() if line.startswith("peer node-a:")]
    assert "bad pieces 1, drops: bad_piece 1" in line_a and "QUARANTINED" not in line_a
    assert "served" in line_a  # its server's own counters, from its announcement

    fresh = site["settings"].model_copy(update={"home": site["root"] / "node-d", "node_name": "node-d"})
    size = sum(f.size for f in site["publisher"].read_manifest(ComponentRef("m", "base", "v2")).files)
    out = cli(fresh, "sync", "--release", "m@base-v2")
    assert out.returncode == 0, out.stdout + out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("fetched")]
    assert line.startswith(f"fetched {size} B: {size} B from peers (node-a ") and ", 0 B from L3;" in line, line
    assert SLOW not in line  # in quarantine: not asked
    shares = dict(part.rsplit(" ", 2)[:2] for part in line.split("(", 1)[1].split(")", 1)[0].split(", "))
    assert set(shares) == {"node-a", "node-b"} and sum(map(int, shares.values())) == size, line
