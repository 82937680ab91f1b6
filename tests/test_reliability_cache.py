"""Faults in the cache tiers, injected for real: the archive unreachable during a sync, a download killed with
SIGKILL halfway, two syncs of one version at once on one L2, and a full disk. `warmfleet sync` runs as its own
process against the project's OSS-protocol server; workers are real processes serving from L2 meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from safetensors.numpy import save_file

from cachemgr import ArchiveError, Cache, EventLog, LocalArchive, Release, SnapshotStore
from cachemgr.archive.oss import DEFAULT_PART_SIZE, OssArchive
from cachemgr.names import ComponentRef
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.stats import FleetStats
from ossserver import OssServer
from tasks.maintenance import run_sync as run_sync_task

from .support import (
    NEXT,
    PNG_MAGIC,
    REPO,
    child_env,
    fleet_settings_for,
    record_result,
    run_sync,
    start_worker,
    tree,
    trial_count,
    wait_for,
)

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
KEY_ID, SECRET = "LTAIreliability01", "never-in-a-log-9b1c"
BUCKET = "models"
BIG = ComponentRef("bigmodel", "base", "v1")
BIG_SIZE = 4 * DEFAULT_PART_SIZE  # 128 MiB: four parallel ranged GETs, resumable part by part


class Oss:
    """The OSS test server on a fixed port, which a test may stop and start again (an archive outage)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = OssServer(root, access_key_id=KEY_ID, access_key_secret=SECRET).start()
        self.server.create_bucket(BUCKET)
        self.port = self.server.port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = OssServer(self.root, port=self.port, access_key_id=KEY_ID, access_key_secret=SECRET).start()

    def archive(self, **options) -> OssArchive:
        return OssArchive(BUCKET, "", endpoint=self.endpoint, access_key_id=KEY_ID, access_key_secret=SECRET, **options)

    def gets(self, key: str, since: int = 0) -> list:
        return [r for r in self.server.requests[since:] if r.method == "GET" and r.key == key]


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    server = Oss(tmp_path_factory.mktemp("oss"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big_version(oss, tmp_path_factory) -> dict:
    """A 128 MiB version in OSS: one safetensors tensor of random bytes and a config."""
    folder = tmp_path_factory.mktemp("big")
    save_file({"w": np.random.default_rng(7).integers(0, 256, BIG_SIZE - 128, dtype=np.uint8)},
              str(folder / "weights.safetensors"))
    (folder / "model_index.json").write_text('{"_class_name": "BigModel"}')
    manifest = oss.archive().publish(BIG, folder)
    entry = manifest.file("weights.safetensors")
    return {"key": f"{BIG.key}/weights.safetensors", "sha": entry.sha256, "size": entry.size, "manifest": manifest}


def sync_env(oss: Oss, home: Path, cache_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(home), FLEET_CACHE_ROOT=str(cache_root), FLEET_ARCHIVE_URL=f"oss://{BUCKET}",
               FLEET_OSS_ENDPOINT=oss.endpoint, FLEET_OSS_ACCESS_KEY_ID=KEY_ID, FLEET_OSS_ACCESS_KEY_SECRET=SECRET,
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def start_sync(env: dict[str, str], release: str, log: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "sync", "--release", release], env=env, cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, **popen)


def requested_bytes(records: list) -> int:
    total = 0
    for r in records:
        start, _, end = (r.range or "").removeprefix("bytes=").partition("-")
        total += int(end) - int(start) + 1
    return total


class BlobWatcher(threading.Thread):
    """Looks at blobs/ and snapshots/ every few milliseconds and remembers every file it ever saw, with its size."""

    def __init__(self, store: SnapshotStore) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.seen: dict[str, set[int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for folder in (self.store.blobs, self.store.root / "snapshots"):
                for path in folder.rglob("*") if folder.is_dir() else ():
                    with contextlib.suppress(OSError):
                        if path.is_file():
                            self.seen.setdefault(str(path.relative_to(self.store.root)), set()).add(path.stat().st_size)
            time.sleep(0.003)

    def stop(self) -> dict[str, set[int]]:
        self.halt.set()
        self.join(timeout=10)
        return self.seen


def test_a_sync_killed_mid_download_leaves_nothing_visible_and_the_next_one_resumes(oss, big_version, tmp_path):
    """`warmfleet sync` of a 128 MiB version is killed with SIGKILL while its download is under way (the server
    cuts transfers at an offset, so the process is caught between parts): no partial file ever appears among the
    blobs or snapshots; the next sync fetches only what is missing and verifies the whole file."""
    size, sha = big_version["size"], big_version["sha"]
    cuts = [40 << 20, 72 << 20, 104 << 20]
    trials, resumed = [cuts[i % len(cuts)] for i in range(trial_count(2))], []
    for n, cut in enumerate(trials):
        root = tmp_path / f"l2-{n}"
        store = SnapshotStore(root)
        watcher = BlobWatcher(store)
        watcher.start()
        env = sync_env(oss, tmp_path / f"home-{n}", root)
        oss.server.drop_after(BUCKET, big_version["key"], cut)
        proc = start_sync(env, str(Release.parse("bigmodel@base-v1")), tmp_path / f"sync-{n}.log")
        parts_done = cut // DEFAULT_PART_SIZE
        wait_for(lambda r=root, k=parts_done: checkpoint_parts(r) >= k, timeout=300, what="parts on disk")
        assert proc.poll() is None, "the sync ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

        assert not store.has_blob(sha) and not store.has(BIG)
        assert store.partial_path(sha).is_file()  # under tmp/, resumable, invisible to readers
        oss.server.clear_faults()
        mark = len(oss.server.requests)
        done = run_sync(env, "bigmodel@base-v1")
        seen = watcher.stop()

        assert done.returncode == 0, done.stderr
        fetched = requested_bytes(oss.gets(big_version["key"], mark))
        assert fetched == size - parts_done * DEFAULT_PART_SIZE  # only the parts the killed run had not finished
        resumed.append(fetched)
        assert all(c.ok for c in store.check(BIG))
        assert not store.partial_path(sha).exists()
        assert seen[f"blobs/{sha}"] == {size}, "a blob was visible before it was whole"
        whole = {f.size for f in big_version["manifest"].files}
        assert all(sizes <= whole for sizes in seen.values()), seen
    record_result("download killed (kill -9 of sync)", trials=len(trials), sent=len(trials), completed=len(trials),
                  lost=0, duplicated=0, notes="resumed runs fetched " + ", ".join(f"{b >> 20} MiB" for b in resumed)
                  + f" of {size >> 20} MiB; no partial blob ever visible")


def checkpoint_parts(root: Path) -> int:
    for path in (root / "checkpoints").glob("*.download.json"):
        with contextlib.suppress(OSError, ValueError):
            return len(json.loads(path.read_text()).get("done", ()))
    return 0


def test_two_syncs_of_one_version_at_once_download_it_once(oss, big_version, tmp_path):
    """Two `warmfleet sync` processes on one L2 (two containers sharing a volume) reach the same version together:
    one downloads it, the other waits for the blob's lock and finds it there; both see the same verified files."""
    size, sha = big_version["size"], big_version["sha"]
    trials, manifest_key = trial_count(1), f"{BIG.key}/manifest.json"
    for n in range(trials):
        root = tmp_path / f"shared-l2-{n}"
        store = SnapshotStore(root)
        mark = len(oss.server.requests)
        with store.lock(sha):  # both processes must be inside the sync before either may download
            procs = [start_sync(sync_env(oss, tmp_path / f"home-{n}-{i}", root), "bigmodel@base-v1",
                                tmp_path / f"two-{n}-{i}.log") for i in range(2)]
            wait_for(lambda m=mark: len(oss.gets(manifest_key, m)) >= 4, timeout=300, what="both syncs started")
            time.sleep(1.0)
            assert all(p.poll() is None for p in procs)
        codes = [p.wait(timeout=600) for p in procs]
        logs = [(tmp_path / f"two-{n}-{i}.log").read_text() for i in range(2)]

        assert codes == [0, 0], logs
        assert requested_bytes(oss.gets(big_version["key"], mark)) == size  # every byte fetched once
        fetched = sorted(int(log.split("fetched ")[1].split(" B")[0]) for log in logs)
        assert sum(fetched) == big_version["manifest"].total_size and fetched[1] >= size, logs  # one took the weights
        assert all(c.ok for c in store.check(BIG))
        assert [p.name for p in store.blobs.iterdir()].count(sha) == 1
    record_result("two syncs at once (one L2)", trials=trials, sent=2 * trials, completed=2 * trials, lost=0,
                  duplicated=0, notes="one download per version, counted in GETs at the OSS server")


# -- the archive unreachable, and a full disk, while a worker serves --------------------------------------------


@pytest.fixture(scope="module")
def oss_fleet(redis_server, oss, demo_archive_dir, tmp_path_factory):
    """A worker warm on NEW from an OSS archive, and a newer base version published there for syncs to fetch."""
    local, remote = LocalArchive(demo_archive_dir), oss.archive()
    for ref in Release.parse(NEW).refs():
        if not remote.has_version(ref):
            remote.publish(ref, demo_archive_dir / ref.model / ref.component / ref.version,
                           meta=local.read_manifest(ref).meta)
    base = Release.parse(NEXT).base
    folder = tmp_path_factory.mktemp("v1.2.0") / "base"
    shutil.copytree(demo_archive_dir / "nano-banana" / "base" / "v1.1.0", folder)
    (folder / "manifest.json").unlink()
    (folder / "release-notes.txt").write_text("v1.2.0: a new base version\n")
    if not remote.has_version(base):
        remote.publish(base, folder, meta=local.read_manifest(Release.parse(NEW).base).meta)
    settings = fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, f"oss://{BUCKET}",
                                  oss_endpoint=oss.endpoint, oss_access_key_id=KEY_ID, oss_access_key_secret=SECRET)
    import tasks

    tasks.configure(settings)
    worker = start_worker(settings, [NEW], "w-oss", tmp_path_factory.mktemp("logs"))
    yield {"settings": settings, "worker": worker, "producer": tasks}
    worker.stop()
    tasks.app.pool.force_close_all()


def test_the_archive_unreachable_during_a_sync_leaves_l2_untouched_and_serving_goes_on(oss, oss_fleet):
    """The archive goes away (server stopped), or answers 503 to every try: the sync retries with backoff, fails
    with one line saying what to check, reports the failed run, and changes nothing in L2, while the warm worker
    serves from L1/L2. With a passing fault (two 503s) the same sync succeeds and verifies."""
    settings, producer = oss_fleet["settings"], oss_fleet["producer"]
    root = settings.resolved_cache_root
    env = child_env(settings)
    retries = oss.archive().retries
    stats = FleetStats(redis.Redis.from_url(settings.broker_url))
    served, outages = 0, 0
    for trial in range((trial_count(2) + 1) // 2):  # two outages a round: stopped, then 503
        for fault in ("stopped", "503"):
            before, failed_runs = tree(root), stats.snapshot().get("sync_runs_failed", 0)
            job = producer.generate.delay(f"during the outage {trial} {fault}", seed=trial, release=NEW)
            with archive_fault(oss, fault, retries + 1) as tries:
                failed = run_sync(env, NEXT)  # the operator's `warmfleet sync`
            with archive_fault(oss, fault, retries + 1), pytest.raises(ArchiveError):
                run_sync_task(settings, [ref for ref in Release.parse(NEXT).refs()])  # beat's nightly sync
            result = job.get(timeout=300)
            served += result["image_uri"] is not None
            outages += 1

            assert failed.returncode == 1 and "Traceback" not in failed.stderr
            lines = [line for line in failed.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, failed.stderr
            if fault == "stopped":
                assert "cannot reach OSS endpoint" in lines[0] and "FLEET_OSS_ENDPOINT" in lines[0]
            else:
                assert "kept failing (503 ServiceUnavailable)" in lines[0] and f"{retries + 1} tries" in lines[0]
                assert len(tries) == retries + 1 and len({(r.method, r.key) for r in tries}) == 1  # one call, retried
            assert stats.snapshot().get("sync_runs_failed", 0) == failed_runs + 1
            assert tree(root) == before  # blobs, snapshots, manifests and tmp/ exactly as they were
            assert Path(result["image_uri"].removeprefix("file://")).read_bytes().startswith(PNG_MAGIC)
    runs = [e for e in EventLog(settings.event_log_path).read() if e["event"] == "SYNC_RUN"]
    assert [e["outcome"] for e in runs[-outages:]] == ["FAILED"] * outages
    assert all("ArchiveUnavailable" in e["reason"] for e in runs[-outages:])

    mark = len(oss.server.requests)
    oss.server.fail_next(2)
    ok = run_sync(env, NEXT)
    assert ok.returncode == 0, ok.stderr
    first = oss.server.requests[mark:mark + 3]
    assert len({(r.method, r.key) for r in first}) == 1  # two 503s, then the same call succeeded
    store = Cache.at(root).store
    assert all(c.ok for ref in Release.parse(NEXT).refs() for c in store.check(ref))
    record_result("archive unreachable during sync", trials=outages, sent=outages, completed=served, lost=0,
                  duplicated=0, notes=f"each failed sync tried {retries + 1} times with backoff; L2 unchanged; "
                                      "then two 503s were retried through and the sync verified")


@contextlib.contextmanager
def archive_fault(oss: Oss, fault: str, count: int):
    """The archive stopped for the block, or answering 503 to its next `count` requests; yields those requests."""
    mark = len(oss.server.requests)
    tries: list = []
    if fault == "stopped":
        oss.stop()
    else:
        oss.server.fail_next(count)
    try:
        yield tries
    finally:
        if fault == "stopped":
            oss.start()
        else:
            oss.server.clear_faults()
        tries.extend(oss.server.requests[mark:])
