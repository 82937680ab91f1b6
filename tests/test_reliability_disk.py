"""A full disk during a sync: one clear error, the temp file removed, the previous version intact and still served.
L2 sits on a small tmpfs under a live worker (where mounting is permitted), or the sync runs under RLIMIT_FSIZE."""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr import EventLog, LocalArchive, Release, SnapshotStore
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_RELEASES
from tasks.settings import FleetSettings

from .support import NEXT, child_env, fleet_settings_for, record_result, run_sync, start_worker, tree, trial_count

pytestmark = pytest.mark.integration

NEW = DEMO_RELEASES[1]


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int):
    """A tmpfs of `size_mb` at `path` (needs CAP_SYS_ADMIN); skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}): the test needs root"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def publish_next_with_a_big_file(archive: LocalArchive, demo_archive_dir: Path, folder: Path, mib: int) -> None:
    shutil.copytree(demo_archive_dir / "nano-banana" / "base" / "v1.1.0", folder)
    (folder / "manifest.json").unlink()
    save_file({"extra": np.random.default_rng(1).integers(0, 256, mib << 20, dtype=np.uint8)},
              str(folder / "unet" / "extra.safetensors"))
    archive.publish(Release.parse(NEXT).base, folder, meta={"family": "sdxl"})


def assert_disk_full_and_nothing_changed(done: subprocess.CompletedProcess, root: Path, before: dict) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("sync:")]  # tqdm
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"L2 disk full at {root}: free space or lower FLEET_RETENTION_KEEP" in lines[0]
    store = SnapshotStore(root)
    assert list(store.tmp.iterdir()) == []  # the temp file was removed, not left to fill the disk
    assert not store.has(Release.parse(NEXT).base)
    assert tree(root) == before
    assert all(c.ok for ref in Release.parse(NEW).refs() for c in store.check(ref))


def test_a_full_disk_fails_the_sync_clearly_and_the_previous_version_is_still_served(redis_server, producer,
                                                                                      demo_archive_dir, tmp_path):
    """L2 on a 24 MiB tmpfs holds the served release (7 MiB); a new version with a 32 MiB file does not fit."""
    archive_dir = tmp_path / "archive"
    shutil.copytree(demo_archive_dir, archive_dir)
    with small_disk(tmp_path / "l2", 24) as root:
        settings = fleet_settings_for(tmp_path / "home", redis_server.url, archive_dir, cache_root=root)
        worker = start_worker(settings, [NEW], "w-small-disk", tmp_path / "logs")
        try:
            publish_next_with_a_big_file(LocalArchive(archive_dir), demo_archive_dir, tmp_path / "next", 32)
            SnapshotStore(root).tmp.mkdir(exist_ok=True)
            trials = trial_count(2)
            for trial in range(trials):
                before = tree(root)
                done = run_sync(child_env(settings), NEXT)
                assert_disk_full_and_nothing_changed(done, root, before)
                result = producer.generate.delay(f"served from a full disk {trial}", seed=trial, release=NEW).get(
                    timeout=300)
                assert result["worker"] == f"w-small-disk@{settings.node_name}"
            failed = [e for e in EventLog(settings.event_log_path).read() if e["event"] == "SYNC_RUN"]
            assert [e["outcome"] for e in failed] == ["FAILED"] * trials
            assert "L2 disk full" in failed[-1]["reason"]
        finally:
            worker.stop()
    record_result("disk full during sync (tmpfs)", trials=trials, sent=trials, completed=trials, lost=0,
                  duplicated=0, notes="ENOSPC: one clear line, temp file removed, previous version served")


def test_a_file_size_limit_fails_the_sync_with_the_same_clear_message(demo_archive_dir, tmp_path):
    """Where no tmpfs can be mounted: the sync process runs under RLIMIT_FSIZE, so its writes fail with EFBIG."""
    archive_dir = tmp_path / "archive"
    shutil.copytree(demo_archive_dir, archive_dir)
    root = tmp_path / "l2"
    sync_release(LocalArchive(archive_dir), SnapshotStore(root), Release.parse(NEW))
    SnapshotStore(root).tmp.mkdir(exist_ok=True)
    publish_next_with_a_big_file(LocalArchive(archive_dir), demo_archive_dir, tmp_path / "next", 16)
    settings = FleetSettings(home=tmp_path / "home", cache_root=root, archive_url=archive_dir.as_uri())

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    for _ in range(2):
        before = tree(root)
        done = run_sync(child_env(settings), NEXT, preexec_fn=limit_file_size)
        assert_disk_full_and_nothing_changed(done, root, before)
        assert "File too large" in done.stderr
