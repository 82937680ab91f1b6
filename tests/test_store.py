"""L2: atomic, verified, content-addressed; a reader never sees a partial or wrong file."""

import hashlib
import os
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cachemgr import Cache, ChecksumMismatch, EventLog, MemoryArchive, SnapshotMissing
from cachemgr.manifest import build_manifest
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_ref

REF = ComponentRef("m", "base", "v1")


def make_version(tmp_path, seed=0):
    src = tmp_path / f"src{seed}"
    (src / "unet").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float32)}, str(src / "unet" / "w.safetensors"))
    (src / "config.json").write_text(f'{{"seed": {seed}}}')
    return src


def test_a_synced_version_is_a_folder_of_links_to_verified_blobs(tmp_path):
    archive = MemoryArchive()
    src = make_version(tmp_path)
    archive.publish(REF, src)
    store = Cache.at(tmp_path / "l2").store
    report = sync_ref(archive, store, REF)
    assert report.outcome == "UPDATED" and report.files_fetched == 2
    folder = store.path(REF)
    assert (folder / "unet" / "w.safetensors").is_symlink()
    assert (folder / "config.json").read_text() == (src / "config.json").read_text()
    loaded = load_file(str(folder / "unet" / "w.safetensors"))
    assert loaded["w"].shape == (64, 64)
    assert store.refs() == [REF]
    again = sync_ref(archive, store, REF)
    assert again.outcome == "UNCHANGED" and again.bytes_fetched == 0


def test_bytes_that_do_not_match_the_manifest_never_become_visible(tmp_path):
    archive = MemoryArchive()
    archive.publish(REF, make_version(tmp_path))
    key = (REF, "unet/w.safetensors")
    data = bytearray(archive.objects[key])
    data[-1] ^= 0xFF  # the archive now serves a corrupted object
    archive.objects[key] = bytes(data)
    store = Cache.at(tmp_path / "l2").store
    events = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(ChecksumMismatch, match="discarded"):
        sync_ref(archive, store, REF, events=events)
    assert not store.has(REF)
    bad_sha = hashlib.sha256(bytes(data)).hexdigest()
    good_sha = archive.read_manifest(REF).file("unet/w.safetensors").sha256
    assert not store.has_blob(good_sha) and not (store.blobs / bad_sha).exists()
    assert list(store.tmp.glob("*.incomplete")) == []  # the temp file was removed too
    assert [e["outcome"] for e in events.read() if e["event"] == "L2_VERIFY"] == ["REJECTED"]
    with pytest.raises(SnapshotMissing, match="warmfleet sync"):
        store.path(REF)


def test_a_failed_download_leaves_no_partial_file(tmp_path):
    store = Cache.at(tmp_path / "l2").store
    payload = os.urandom(4096)
    sha = hashlib.sha256(payload).hexdigest()

    def fill(fh):
        fh.write(payload[:1000])
        raise ConnectionError("network dropped")

    with pytest.raises(ConnectionError):
        store.add_blob(sha, len(payload), fill)
    assert not store.has_blob(sha)
    assert list(store.tmp.iterdir()) == []
    assert store.add_blob(sha, len(payload), lambda fh: fh.write(payload)).read_bytes() == payload


def test_versions_share_unchanged_blobs(tmp_path):
    archive = MemoryArchive()
    src = make_version(tmp_path, seed=1)
    archive.publish(REF, src)
    (src / "config.json").write_text('{"changed": true}')  # v2 changes only the config
    v2 = ComponentRef("m", "base", "v2")
    archive.publish(v2, src)
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF)
    report = sync_ref(archive, store, v2)
    assert report.files_fetched == 1
    assert report.bytes_reused == (src / "unet" / "w.safetensors").stat().st_size
    assert len(list(store.blobs.iterdir())) == 3
    assert store.latest("m", "base") == "v2"
    store.remove_snapshot(v2)
    assert store.latest("m", "base") == "v1"
    store.remove_snapshot(REF)
    assert store.latest("m", "base") is None


def test_concurrent_syncs_of_one_version_agree(tmp_path):
    archive = MemoryArchive()
    archive.publish(REF, make_version(tmp_path))
    store = Cache.at(tmp_path / "l2").store
    errors = []

    def run():
        try:
            sync_ref(archive, Cache.at(tmp_path / "l2").store, REF)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(c.ok for c in store.check(REF))


def test_check_finds_a_corrupted_blob_and_the_audit_quarantines_it(tmp_path):
    from cachemgr.audit import execute_audit, plan_audit

    archive = MemoryArchive()
    archive.publish(REF, make_version(tmp_path))
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF)
    blob = store.blob_path(store.manifest(REF).file("config.json").sha256)
    os.chmod(blob, 0o644)
    blob.write_text('{"seed": 999}')
    plan = plan_audit(store)
    assert [(c.path, c.reason) for c in plan.corrupt] == [("config.json", "checksum mismatch")]
    result = execute_audit(store, plan)
    assert result.removed_snapshots == [str(REF)] and not store.has(REF)
    assert sync_ref(archive, store, REF).files_fetched == 1  # the next sync repairs it
    assert plan_audit(store).ok


def test_manifest_meta_survives_into_l2(tmp_path):
    src = make_version(tmp_path)
    manifest = build_manifest(REF, src, {"family": "sdxl"})
    archive = MemoryArchive()
    archive.publish(REF, src, meta={"family": "sdxl"})
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF)
    assert store.manifest(REF).meta == {"family": "sdxl"}
    assert [f.sha256 for f in store.manifest(REF).files] == [f.sha256 for f in manifest.files]


def test_a_parsed_manifest_is_reused_only_while_its_file_is_the_same(tmp_path):
    archive = MemoryArchive()
    archive.publish(REF, make_version(tmp_path), meta={"family": "sdxl", "tags": ["a"]})
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF)
    first = store.manifest(REF)
    first.meta["tags"].append("changed by one caller")  # each caller's meta is its own
    assert store.manifest(REF).meta == {"family": "sdxl", "tags": ["a"]}
    # the manifest replaced as the store replaces it (a new file renamed over the old one): read again
    path = store.manifest_path(REF)
    replaced = path.with_suffix(".new")
    replaced.write_text(path.read_text().replace('"sdxl"', '"sd15"'))
    os.replace(replaced, path)
    assert store.manifest(REF).meta["family"] == "sd15"
    path.unlink()
    with pytest.raises(SnapshotMissing):
        store.manifest(REF)
