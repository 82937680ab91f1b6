"""Retention in both tiers never removes what a route, a warm worker or a pin refers to — read from Redis,
as the fleet does — and a corrupted object in OSS never reaches L2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cachemgr import Cache, ChecksumMismatch, LocalArchive
from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_ref
from fleetstate.pins import Pins, protected_refs
from fleetstate.registry import WarmRegistry, WorkerState
from fleetstate.routes import RouteTable
from ossserver import OssServer

from .support import REPO, child_env, fleet_settings_for

pytestmark = pytest.mark.integration

MODEL = "retained"


def lora(v: int) -> ComponentRef:
    return ComponentRef(MODEL, "lora", f"v{v}.0.0")


@pytest.fixture
def fleet(redis_server, tmp_path):
    client = redis_server.client()
    for key in client.scan_iter(match="fleet:*"):
        client.delete(key)
    archive = LocalArchive(tmp_path / "archive")
    for v in range(1, 10):
        src = tmp_path / "src" / str(v)
        src.mkdir(parents=True)
        (src / "config.json").write_text(f'{{"v": {v}}}')
        archive.publish(lora(v), src)
    base = ComponentRef(MODEL, "base", "v1.0.0")
    (tmp_path / "src" / "base").mkdir()
    (tmp_path / "src" / "base" / "model_index.json").write_text("{}")
    archive.publish(base, tmp_path / "src" / "base")
    table = RouteTable(client)
    table.set_active(f"{MODEL}@base-v1.0.0+lora-v1.0.0", actor="test")  # becomes the previous release
    table.set_active(f"{MODEL}@base-v1.0.0+lora-v2.0.0", actor="test")  # the active one
    WarmRegistry(client, ttl=60).publish(WorkerState(worker="w@n", node="n", pid=1, state="warm",
                                                     releases=[f"{MODEL}@base-v1.0.0+lora-v3.0.0"]))
    Pins(client).add(lora(4))
    settings = fleet_settings_for(tmp_path / "home", redis_server.url, archive.url, cache_root=tmp_path / "l2",
                                  retention_keep=2)
    yield settings, archive, client
    for key in client.scan_iter(match="fleet:*"):
        client.delete(key)


def test_protection_comes_from_routes_warm_workers_and_pins(fleet):
    settings, _, client = fleet
    reasons = protected_refs(client)
    assert reasons[lora(1)] == "routed (previous)"
    assert reasons[lora(2)] == "routed (active)"
    assert reasons[lora(3)] == "warm on a worker"
    assert reasons[lora(4)] == "pinned"
    assert lora(5) not in reasons


def test_prune_dry_run_shows_the_plan_then_prune_keeps_every_protected_version(fleet):
    settings, archive, _ = fleet
    env = child_env(settings)
    dry = subprocess.run([sys.executable, "-m", "fleetctl.cli", "prune", "--dry-run"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"keep   {MODEL}/lora/v1.0.0  (protected: routed (previous))" in dry.stdout
    assert f"keep   {MODEL}/lora/v4.0.0  (protected: pinned)" in dry.stdout
    assert f"delete {MODEL}/lora/v5.0.0" in dry.stdout
    assert "dry run: 3 version(s) would be deleted" in dry.stdout
    assert archive.list_versions(MODEL, "lora") == [f"v{v}.0.0" for v in range(1, 10)]

    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", "prune"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert archive.list_versions(MODEL, "lora") == ["v1.0.0", "v2.0.0", "v3.0.0", "v4.0.0", "v8.0.0", "v9.0.0"]


def test_prune_refuses_to_guess_when_it_cannot_read_the_protections(fleet, tmp_path):
    settings, archive, _ = fleet
    from fleetctl.localfleet import free_port

    env = child_env(settings, FLEET_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", "prune"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "nothing is safe to delete" in done.stderr
    assert len(archive.list_versions(MODEL, "lora")) == 9


def test_l2_retention_in_the_audit_keeps_every_protected_version(fleet):
    from tasks.maintenance import run_audit

    settings, archive, _ = fleet
    store = Cache.at(settings.resolved_cache_root).store
    for v in range(1, 10):
        sync_ref(archive, store, lora(v))
    result = run_audit(settings)
    assert sorted(result["retired"]) == sorted(str(lora(v)) for v in (5, 6, 7))
    assert [r.version for r in store.refs() if r.component == "lora"] == [
        "v1.0.0", "v2.0.0", "v3.0.0", "v4.0.0", "v8.0.0", "v9.0.0"]


def test_a_corrupted_object_in_oss_never_reaches_l2(tmp_path):
    with OssServer(tmp_path / "oss") as server:
        server.create_bucket("models")
        archive = OssArchive("models", "p", endpoint=server.endpoint, checkpoint_dir=tmp_path / "ckpt")
        src = tmp_path / "v"
        src.mkdir()
        (src / "config.json").write_text('{"weights": "' + "x" * 4096 + '"}')
        ref = ComponentRef("m", "base", "v1.0.0")
        archive.publish(ref, src)
        server.corrupt("models", "p/m/base/v1.0.0/config.json", offset=100)
        store = Cache.at(tmp_path / "l2").store
        with pytest.raises(ChecksumMismatch, match="discarded"):
            sync_ref(archive, store, ref)
        assert not store.has(ref)
        assert list(store.blobs.iterdir()) == []
        assert [p for p in store.tmp.iterdir() if not p.name.endswith(".lock")] == []
