"""Workers whose model cannot be loaded as published: they never announce themselves warm, never consume their
queue, and `warmfleet status` says why. Bit rot in L2 is caught at boot (sha256 against the manifest): the bad blob
is quarantined and fetched again from the archive, or, when the archive's copy is bad too, the worker refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachemgr import EventLog, LocalArchive, Release, SnapshotStore
from cachemgr.names import queue_for
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.registry import WarmRegistry
from tasks.settings import FleetSettings

from .support import PNG_MAGIC, REPO, child_env, fleet_settings_for, record_result, start_worker, trial_count

pytestmark = pytest.mark.integration

NEW = DEMO_RELEASES[1]
UNET = "unet/diffusion_pytorch_model.safetensors"


def release_archive(demo_archive_dir: Path, dest: Path) -> LocalArchive:
    """A private archive holding just the release's versions, for a test to damage."""
    for ref in Release.parse(NEW).refs():
        shutil.copytree(demo_archive_dir / ref.model / ref.component / ref.version,
                        dest / ref.model / ref.component / ref.version)
    return LocalArchive(dest)


def flip_byte(path: Path, offset: int | None = None) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def settings_for(redis_server, tmp_path: Path, name: str, archive: LocalArchive) -> FleetSettings:
    return fleet_settings_for(tmp_path / name, redis_server.url, archive.root)


def unet_blob(store: SnapshotStore) -> Path:
    return store.blob_path(store.manifest(Release.parse(NEW).base).file(UNET).sha256)


def damaged(case: str, demo_archive_dir: Path, tmp_path: Path, name: str | None = None) -> LocalArchive:
    """An archive (and for L2 cases a pre-filled L2 at tmp_path/name/l2, the L2 of settings_for(name)) with one file
    damaged as `case` says; `name` is the folder (the case by default)."""
    name = name or case
    archive = release_archive(demo_archive_dir, tmp_path / name / "archive")
    base = Release.parse(NEW).base
    unet = archive.root / base.model / base.component / base.version / UNET
    if case.startswith("l2-"):
        store = SnapshotStore(tmp_path / name / "l2")
        sync_release(archive, store, Release.parse(NEW))
        if case == "l2-flipped-byte" or case == "l2-and-l3-flipped-byte":
            flip_byte(unet_blob(store))
        elif case == "l2-blob-deleted":
            unet_blob(store).unlink()
    if case == "l3-missing-file":
        unet.unlink()
    elif case in ("l3-flipped-byte", "l2-and-l3-flipped-byte"):
        flip_byte(unet)
    return archive


FAILING = {
    "l3-missing-file": f"{UNET} is not in the archive",
    "l3-flipped-byte": "ChecksumMismatch",
    "l2-and-l3-flipped-byte": f"was corrupt ({UNET} (checksum mismatch)) and could not be fetched again",
}
REPAIRED = ("l2-flipped-byte", "l2-blob-deleted")


def test_a_worker_whose_files_are_bad_never_warms_never_consumes_and_status_says_why(redis_server, producer,
                                                                                     demo_archive_dir, tmp_path):
    """Given a job waiting on the release's queue, workers whose archive or L2 copy is damaged beyond repair all
    fail at boot: none is ever warm, the job is still queued, and `warmfleet status` shows each one's reason."""
    client = redis_server.client()
    job = producer.generate.delay("waits for a healthy worker", seed=5, release=NEW)
    cases = list(FAILING)
    runs = [(f"{cases[i % len(cases)]}-{i}", cases[i % len(cases)]) for i in range(trial_count(len(cases)))]
    workers = {}
    for wave in range(0, len(runs), len(cases)):  # a few at a time: each is a whole worker process
        started = []
        for name, case in runs[wave:wave + len(cases)]:
            settings = settings_for(redis_server, tmp_path, name, damaged(case, demo_archive_dir, tmp_path, name))
            workers[name] = (settings, start_worker(settings, [NEW], name, tmp_path / "logs", wait=False), case)
            started.append(workers[name][1])
        for worker in started:
            assert worker.proc.wait(timeout=900) == 3, worker.log_text()[-2000:]

    registry = WarmRegistry(client)
    assert registry.warm_workers(NEW) == {}
    assert client.llen(queue_for(NEW)) == 1 and job.state == "PENDING"
    states = {w.worker: w for w in registry.workers()}
    status = subprocess.run([sys.executable, "-m", "fleetctl.cli", "status"], env=child_env(workers[runs[0][0]][0]),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    for name, (_, worker, case) in workers.items():
        reason = FAILING[case]
        state = states[f"{name}@testnode"]
        assert state.state == "failed" and reason in state.error, state
        row = next(line for line in status.stdout.splitlines() if line.startswith(f"{name}@testnode"))
        assert " failed " in row and reason in row, status.stdout
        assert "ready." not in worker.log_text()  # Celery's consumer never started

    # the job is not lost: the next healthy worker of the release serves it
    settings = settings_for(redis_server, tmp_path, "healthy", release_archive(demo_archive_dir, tmp_path / "good"))
    worker = start_worker(settings, [NEW], "healthy", tmp_path / "logs", timeout=600)
    try:
        assert job.get(timeout=600)["worker"] == "healthy@testnode"
    finally:
        worker.stop()
    record_result("model fails to load (L2/L3 damaged)", trials=len(runs), sent=1, completed=1, lost=0,
                  duplicated=0, notes=f"{len(runs)} damaged workers ({', '.join(cases)} in turn): none warm; the job "
                                      "waited queued, status showed each reason, then a healthy worker served it")


@pytest.mark.parametrize("case", REPAIRED)
def test_bit_rot_in_l2_is_quarantined_and_fetched_again_at_boot(redis_server, producer, demo_archive_dir, tmp_path,
                                                                 case):
    """A blob of the release in L2 no longer matches its manifest (a flipped byte) or is gone: the worker finds it
    at boot, moves it to quarantine/, fetches the file again from the archive, checks it, and only then loads."""
    count = trial_count(1)
    for trial in range(count):
        name = f"{case}-{trial}"
        archive = damaged(case, demo_archive_dir, tmp_path, name)
        settings = settings_for(redis_server, tmp_path, name, archive)
        store = SnapshotStore(settings.resolved_cache_root)
        bad_sha = store.manifest(Release.parse(NEW).base).file(UNET).sha256
        worker = start_worker(settings, [NEW], name, tmp_path / "logs", timeout=600)
        try:
            result = producer.generate.delay(f"after repair: {name}", seed=9, release=NEW).get(timeout=600)
            assert result["worker"] == f"{name}@testnode"
            assert Path(result["image_uri"].removeprefix("file://")).read_bytes().startswith(PNG_MAGIC)
        finally:
            worker.stop()
        assert all(c.ok for ref in Release.parse(NEW).refs() for c in store.check(ref))
        quarantined = sorted(p.name.split(".")[0] for p in (store.root / "quarantine").glob("*")) \
            if (store.root / "quarantine").is_dir() else []
        assert quarantined == ([bad_sha] if case == "l2-flipped-byte" else [])
        verify = [(e["outcome"], e.get("file")) for e in EventLog(settings.event_log_path).read()
                  if e["event"] == "L2_VERIFY"]
        assert verify == [("QUARANTINED", UNET), ("REPAIRED", None)]
    record_result(f"L2 bit rot repaired at boot ({case})", trials=count, sent=count, completed=count, lost=0,
                  duplicated=0, notes="each trial a fresh L2 with the damage; the worker repaired it and served")


def test_bit_rot_in_l2_with_no_good_copy_in_the_archive_is_refused(redis_server, demo_archive_dir, tmp_path):
    """The L2 blob is corrupt and the archive no longer has the file: the bad blob is quarantined, the fetch fails,
    and the worker refuses to load (state failed, with the reason), rather than load bytes nobody published."""
    archive = damaged("l2-flipped-byte", demo_archive_dir, tmp_path)
    base = Release.parse(NEW).base
    (archive.root / base.model / base.component / base.version / UNET).unlink()
    settings = settings_for(redis_server, tmp_path, "l2-flipped-byte", archive)
    worker = start_worker(settings, [NEW], "no-archive-copy", tmp_path / "logs", wait=False)
    assert worker.proc.wait(timeout=300) == 3
    registry = WarmRegistry(redis_server.client())
    state = {w.worker: w for w in registry.workers()}["no-archive-copy@testnode"]
    assert state.state == "failed" and "was corrupt" in state.error and f"{UNET} is not in the archive" in state.error
    assert "no-archive-copy@testnode" not in registry.warm_workers().get(NEW, [])
    assert len(list((settings.resolved_cache_root / "quarantine").iterdir())) == 1
