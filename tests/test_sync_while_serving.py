"""A sync lands new versions beside the old while workers serve; nobody reloads, nothing fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest
import redis
from safetensors.numpy import load_file, save_file

from cachemgr import Cache, LocalArchive, Release
from cachemgr.names import ComponentRef
from fleetstate.registry import WarmRegistry
from tasks.settings import FleetSettings

from .support import REPO, child_env, fleet_settings_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir, tmp_path_factory) -> FleetSettings:
    """This module publishes into its archive, so it gets a private copy of the demo archive."""
    archive = tmp_path_factory.mktemp("private") / "archive"
    shutil.copytree(demo_archive_dir, archive)
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, archive)


def publish_fine_tune(settings: FleetSettings, tmp_path, base: ComponentRef, new: ComponentRef) -> int:
    """A new base version equal to `base` but for one UNet tensor; returns that tensor's size in bytes."""
    store = Cache.at(settings.resolved_cache_root).store
    src = tmp_path / "fine-tune"
    for entry in store.manifest(base).files:
        dest = src / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.path(base) / entry.path, dest)
    unet = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(unet), metadata={"format": "pt"})
    archive = LocalArchive(settings.resolved_archive_url.removeprefix("file://"))
    archive.publish(new, src, meta=store.manifest(base).meta)
    return tensors[name].nbytes


def test_sync_lands_a_new_version_beside_the_old_while_workers_serve(fleet_settings, producer, two_workers, tmp_path):
    old, new = two_workers["releases"]
    base = Release.parse(new).base
    fine_tuned = ComponentRef(base.model, "base", "v1.2.0")
    changed = publish_fine_tune(fleet_settings, tmp_path, base, fine_tuned)

    results, errors, stop = [], [], threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set() or i < 6:
            try:
                results.append(producer.generate.delay(f"during sync {i}", seed=i).get(timeout=120))
            except Exception as exc:  # reported below
                errors.append(exc)
            i += 1

    sender = threading.Thread(target=send)
    sender.start()
    try:
        done = subprocess.run([sys.executable, "-m", "fleetctl.cli", "sync", "--release",
                               f"{base.model}@base-v1.2.0+lora-v2.3.1"],
                              env=child_env(fleet_settings), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        sender.join(timeout=300)
    assert done.returncode == 0, done.stderr
    assert errors == []
    assert len(results) >= 6 and {r["release"] for r in results} == {new}

    store = Cache.at(fleet_settings.resolved_cache_root).store
    assert store.has(fine_tuned) and store.has(base)  # beside, not instead
    assert all(c.ok for c in store.check(base)) and all(c.ok for c in store.check(fine_tuned))
    fetched = int(done.stdout.split("fetched ")[-1].split(" B")[0])
    assert fetched == changed  # only the changed tensor crossed from L3
    states = {w.worker: w for w in WarmRegistry(redis.Redis.from_url(fleet_settings.broker_url)).workers()}
    assert states["w-new@testnode"].loads == 1 and states["w-old@testnode"].loads == 1
