"""Pieces hashed as the OSS download writes them (no second read to verify), against the project's OSS server:
ranged parts cut on piece boundaries, digests that match the manifest, and the guarantee that stays — a corrupted
piece, whether it came over the wire or sat in a resumed partial file, never becomes visible in L2."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr.archive import ArchiveUnavailable
from cachemgr.archive.piecehash import PieceHashes, aligned_parts
from cachemgr.store import ChecksumMismatch, SnapshotStore
from cachemgr.sync import sync_ref

from .support import OSS_REF as REF
from .support import make_archive

KEY = "l3/nano-banana/base/v1.0.0/model.safetensors"
TENSORS = 40
TENSOR_BYTES = 30_000


@pytest.fixture
def published(server, bucket_name, tmp_path):
    """1.2 MB of 40 tensors (pieces of ~30 kB) plus one 600 kB tensor, in parts of 128 KiB on two threads."""
    source = tmp_path / "model"
    source.mkdir()
    rng = np.random.default_rng(3)
    tensors = {f"t{i:02d}": rng.integers(0, 256, TENSOR_BYTES, dtype=np.uint8) for i in range(TENSORS)}
    tensors["zbig"] = rng.integers(0, 256, 600_000, dtype=np.uint8)  # spans several parts
    save_file(tensors, str(source / "model.safetensors"))
    (source / "config.json").write_text('{"sample_size": 8}')
    archive = make_archive(server, bucket_name, tmp_path)
    manifest = archive.publish(REF, source)
    yield archive, manifest.file("model.safetensors"), source
    archive.close()


def requested(server, since: int) -> list[tuple[int, int]]:
    spans = []
    for record in server.requests[since:]:
        if record.method == "GET" and record.key == KEY and record.range:
            first, last = record.range.removeprefix("bytes=").split("-")
            spans.append((int(first), int(last) + 1))
    return sorted(spans)


def test_parts_are_cut_on_piece_boundaries_and_every_piece_inside_one_part_is_hashed(server, published, tmp_path):
    archive, entry, source = published
    hashes = PieceHashes(entry.pieces)
    mark = len(server.requests)
    target = tmp_path / "out.safetensors"
    with open(target, "wb") as fh:
        archive.download(REF, "model.safetensors", fh, size=entry.size, hashes=hashes)

    assert target.read_bytes() == (source / "model.safetensors").read_bytes()
    spans = requested(server, mark)
    assert len(spans) > 4 and spans[0][0] == 0 and spans[-1][1] == entry.size
    starts = {p.start for p in entry.pieces} | {entry.size}
    big = max(entry.pieces, key=lambda p: p.size)
    inside_big = [s for s, _ in spans if big.start < s < big.end]
    assert inside_big, "the 600 kB tensor is fetched by more than one part"
    assert all(s in starts for s, _ in spans if s not in inside_big)  # every other cut falls on a piece start
    expected = {p.start: p.sha256 for p in entry.pieces if p is not big}
    assert hashes.digests == expected  # all but the tensor cut by parts, which the caller reads from the file


def test_a_connection_dropped_inside_a_part_still_hashes_its_pieces(server, bucket_name, published, tmp_path):
    archive, entry, _ = published
    server.drop_after(bucket_name, KEY, offset=500_000, times=1)
    hashes = PieceHashes(entry.pieces)
    with open(tmp_path / "out.safetensors", "wb") as fh:
        archive.download(REF, "model.safetensors", fh, size=entry.size, hashes=hashes)
    big = max(entry.pieces, key=lambda p: p.size)
    assert hashes.digests == {p.start: p.sha256 for p in entry.pieces if p is not big}


@pytest.mark.parametrize("where", ["small tensor", "tensor cut by parts"])
def test_a_piece_corrupted_in_the_bucket_is_rejected_and_never_visible(server, bucket_name, published, tmp_path,
                                                                       where):
    archive, entry, _ = published
    big = max(entry.pieces, key=lambda p: p.size)
    piece = big if where == "tensor cut by parts" else entry.pieces[len(entry.pieces) // 2]
    server.corrupt(bucket_name, KEY, offset=piece.start + piece.size // 2)
    store = SnapshotStore(tmp_path / "l2")

    with pytest.raises(ChecksumMismatch, match=f"bytes {piece.start}-{piece.end} of model.safetensors"):
        sync_ref(archive, store, REF)

    assert not store.has(REF) and not store.has_blob(entry.sha256)
    assert not store.partial_path(entry.sha256).exists()  # a mismatch discards the bytes


def test_a_resumed_download_verifies_the_parts_it_did_not_fetch_again(server, bucket_name, published, tmp_path):
    """The first sync is cut mid-file; a byte of a part it finished is then flipped on disk. The resumed sync
    fetches only the missing parts, has no digest for the kept ones, reads them from the file and rejects it."""
    archive, entry, source = published
    server.drop_after(bucket_name, KEY, offset=700_000)
    store = SnapshotStore(tmp_path / "l2")
    with pytest.raises(ArchiveUnavailable, match="resumes"):
        sync_ref(archive, store, REF)
    partial = store.partial_path(entry.sha256)
    assert partial.is_file() and not store.has_blob(entry.sha256)
    server.clear_faults()

    first = entry.pieces[1]  # in the first part, which the cut run finished
    with open(partial, "r+b") as fh:
        byte = os.pread(fh.fileno(), 1, first.start)
        os.pwrite(fh.fileno(), bytes([byte[0] ^ 0xFF]), first.start)
    mark = len(server.requests)
    with pytest.raises(ChecksumMismatch, match=f"bytes {first.start}-{first.end} "):
        sync_ref(archive, store, REF)
    assert requested(server, mark) and min(s for s, _ in requested(server, mark)) > first.end  # resumed, not refetched
    assert not store.has(REF) and not store.has_blob(entry.sha256) and not partial.exists()

    report = sync_ref(archive, store, REF)  # from scratch now: whole and verified
    assert report.outcome == "UPDATED" and all(c.ok for c in store.check(REF))
    assert store.blob_path(entry.sha256).read_bytes() == (source / "model.safetensors").read_bytes()


def test_aligned_parts_tile_the_file():
    mib = 1 << 20
    assert aligned_parts(0, 32 * mib, []) == []
    assert aligned_parts(100 * mib, 32 * mib, []) == [(0, 32 * mib), (32 * mib, 64 * mib), (64 * mib, 100 * mib)]
    parts = aligned_parts(100 * mib, 32 * mib, range(0, 100 * mib, 5 * mib))
    assert parts == [(0, 35 * mib), (35 * mib, 70 * mib), (70 * mib, 100 * mib)]
    huge = aligned_parts(128 * mib + 200, 32 * mib, [100, 128 * mib + 100])  # one tensor: cut where it falls
    assert huge[:3] == [(0, 32 * mib), (32 * mib, 64 * mib), (64 * mib, 96 * mib)] and huge[-1][1] == 128 * mib + 200
