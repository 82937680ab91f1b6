"""A worker's boot re-hashes its release's L2 files unless a full check passed recently and the file is unchanged
on disk since (SnapshotStore.check's trust_seconds): a restart reads no multi-GB release twice, while any change
made through the filesystem is hashed again and caught. Reads are counted from the kernel (/proc/self/io rchar)."""

from __future__ import annotations

import os
import time

import numpy as np
from safetensors.numpy import save_file

from cachemgr import Cache, MemoryArchive
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_ref

REF = ComponentRef("m", "base", "v1")
SIZE = 8 << 20  # one 8 MiB tensor file: a full check reads all of it


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def synced(tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    weights = np.random.default_rng(0).standard_normal(SIZE // 4).astype(np.float32)
    save_file({"w": weights}, str(src / "unet" / "w.safetensors"))
    archive = MemoryArchive()
    archive.publish(REF, src)
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF)
    return store


def check_reading(store, trust_seconds):
    before = read_bytes()
    checks = store.check(REF, trust_seconds)
    return checks, read_bytes() - before


def test_a_recently_verified_unchanged_release_is_not_read_again(tmp_path):
    store = synced(tmp_path)
    checks, read = check_reading(store, 0)  # a full check: reads every byte, stamps every blob
    assert all(c.ok for c in checks) and read >= SIZE
    checks, read = check_reading(store, 3600)
    assert all(c.ok for c in checks) and read < SIZE // 8
    assert {c.reason for c in checks} == {"unchanged since verified"}


def test_a_file_written_after_its_check_is_hashed_again_and_caught(tmp_path):
    store = synced(tmp_path)
    store.check(REF)
    blob = store.blob_path(store.manifest(REF).file("unet/w.safetensors").sha256)
    stat = os.stat(blob)
    with open(blob, "r+b") as f:  # one flipped byte, the modification time put back: the ctime still moves
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    checks, read = check_reading(store, 3600)
    assert read >= SIZE
    assert [c.reason for c in checks if not c.ok] == ["checksum mismatch"]
    checks, read = check_reading(store, 3600)  # a failed check leaves no stamp behind
    assert read >= SIZE and not all(c.ok for c in checks)


def test_a_stamp_older_than_the_trust_window_means_a_full_check(tmp_path):
    store = synced(tmp_path)
    store.check(REF)
    checks, read = check_reading(store, 1e-6)
    assert all(c.ok for c in checks) and read >= SIZE


def test_a_removed_blob_takes_its_stamp_with_it(tmp_path):
    store = synced(tmp_path)
    store.check(REF)
    sha = store.manifest(REF).file("unet/w.safetensors").sha256
    stamps = store.root / "verified"
    assert (stamps / sha).is_file()
    store.remove_blob(sha)
    assert not store.blob_path(sha).exists() and not (stamps / sha).exists()


def test_a_stamp_from_the_future_means_a_full_check(tmp_path, monkeypatch):
    """A stamp is the clock's reading as it is (never rounded up past it), and one ahead of the clock (the clock
    stepped back since) is not trusted."""
    import cachemgr.store

    store = synced(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(cachemgr.store.time, "time", lambda: 1_700_000_000.0006)
        store.check(REF)
    sha = store.manifest(REF).file("unet/w.safetensors").sha256
    stamp = store.root / "verified" / sha
    at, identity = stamp.read_text().split(" ", 1)
    assert float(at) == 1_700_000_000.0006
    stamp.write_text(f"{time.time() + 600!r} {identity}")
    checks, read = check_reading(store, 3600)
    assert all(c.ok for c in checks) and read >= SIZE
