"""L3 → L2: bring versions onto a node's disk, differentially and verified, never exposing a partial file.

A version's manifest cuts each file into pieces with their own hashes (each safetensors tensor is a piece).
Syncing a new version reuses every piece already present in any local blob of the same component and
fetches only the missing byte ranges with ranged GETs, streaming them to the temp file as they arrive (memory
stays within `buffer_bytes` whatever the model size); the bytes are hashed as they are written and checked against
the manifest before the file is renamed into the store.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .archive import Archive
from .archive.piecehash import PieceHashes
from .assemble import DEFAULT_BUFFER, AssemblyResult, assemble
from .events import EventLog
from .manifest import FileEntry, Manifest, Piece
from .names import ComponentRef, Release
from .peersync import NoPeerLeft, PeerRanges, PeerSource, peer_range
from .store import ChecksumMismatch, SnapshotStore

Progress = Callable[[int], None]
Select = Callable[[Manifest], "set[str] | None"]
"""Which files of a version a node needs (None: all); the rest is never fetched."""
FILE_WORKERS = 4
"""Files of one version fetched at once (each large one is itself split into parallel ranged GETs by OSS)."""
VERIFY_WORKERS = max(2, min(8, os.cpu_count() or 2))
VERIFY_GROUP = 8 << 20


def _all(manifest: Manifest) -> None:
    return None


_ALL: Select = _all
"""No filter: every file of the version."""


@dataclass(frozen=True)
class SyncReport:
    ref: ComponentRef
    outcome: str  # UPDATED | UNCHANGED
    bytes_fetched: int = 0
    bytes_reused: int = 0
    files_fetched: int = 0
    seconds: float = 0.0
    ranged_gets: int = 0
    bytes_from_peers: int = 0
    """Of bytes_fetched, those the node's peers sent (verified like the rest); the others came from L3."""
    by_peer: dict[str, int] = field(default_factory=dict)
    """Verified bytes each peer sent (node → bytes)."""

    @property
    def bytes_from_l3(self) -> int:
        return self.bytes_fetched - self.bytes_from_peers


@dataclass
class SyncSummary:
    reports: list[SyncReport] = field(default_factory=list)

    @property
    def bytes_fetched(self) -> int:
        return sum(r.bytes_fetched for r in self.reports)

    @property
    def bytes_reused(self) -> int:
        return sum(r.bytes_reused for r in self.reports)

    @property
    def bytes_from_peers(self) -> int:
        return sum(r.bytes_from_peers for r in self.reports)

    @property
    def bytes_from_l3(self) -> int:
        return sum(r.bytes_from_l3 for r in self.reports)

    @property
    def by_peer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reports:
            for node, n in r.by_peer.items():
                out[node] = out.get(node, 0) + n
        return dict(sorted(out.items()))

    @property
    def updated(self) -> list[ComponentRef]:
        return [r.ref for r in self.reports if r.outcome == "UPDATED"]


class PieceIndex:
    """sha256 of a piece → where those bytes already are on this node (a verified blob and an offset)."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[Path, int, int]] = {}

    @classmethod
    def for_component(cls, store: SnapshotStore, model: str, component: str) -> PieceIndex:
        index = cls()
        for ref in store.refs():
            if ref.model != model or ref.component != component:
                continue
            for entry in store.manifest(ref).files:
                blob = store.blob_path(entry.sha256)
                if not blob.is_file():
                    continue
                for piece in entry.pieces:
                    index.where.setdefault(piece.sha256, (blob, piece.start, piece.end))
        return index

    def find(self, piece: Piece) -> tuple[Path, int, int] | None:
        hit = self.where.get(piece.sha256)
        return hit if hit and hit[2] - hit[1] == piece.size else None


@dataclass
class _FileResult:
    fetched: int = 0
    reused: int = 0
    ranged_gets: int = 0
    from_peers: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)

    def add(self, done: AssemblyResult, resumed: bool) -> None:
        """Count one assembly (a try): bytes it fetched and copied; what it resumed only for the first try (a later
        try resumes what the earlier ones wrote, counted there)."""
        self.fetched += done.fetched
        self.reused += done.reused + (done.resumed if resumed else 0)
        self.ranged_gets += done.ranged_gets


def _pieces(entry: FileEntry) -> tuple[Piece, ...]:
    """The pieces a download is checked by: the manifest's, or the whole file as one piece when it has none."""
    return entry.pieces or (Piece(0, entry.size, entry.sha256),)


def _verify_pieces(fh: BinaryIO, entry: FileEntry, known: dict[int, str] | None = None) -> tuple[str, int] | None:
    """Check a downloaded file piece by piece against the manifest.

    `known` holds the digests the download computed from the bytes as it wrote them (start offset → sha256): those
    pieces are compared without reading them again; any other piece (resumed from an earlier try, cut by a part
    boundary) is re-read from the file, on several threads (hashlib releases the GIL). The pieces tile the file end
    to end and the file has exactly the manifest's size, so when every one matches, the file is the one the
    manifest's sha256 names: that digest is returned without a pass over the whole file. A file of the wrong size
    returns None, and the caller hashes it whole (and rejects it)."""
    size = os.fstat(fh.fileno()).st_size
    if size != entry.size:
        return None
    known = known or {}
    unread: list[Piece] = []
    for piece in _pieces(entry):
        digest = known.get(piece.start)
        if digest is None:
            unread.append(piece)
        elif digest != piece.sha256:
            raise ChecksumMismatch(f"bytes {piece.start}-{piece.end} of {entry.path} do not match the manifest; "
                                   "the bytes were discarded")
    if not unread:
        return entry.sha256, size
    groups: list[list[Piece]] = [[]]
    for piece in unread:  # a few MiB per task: tiny tensors are not worth a thread hop each
        if sum(p.size for p in groups[-1]) >= VERIFY_GROUP:
            groups.append([])
        groups[-1].append(piece)

    def check(group: list[Piece]) -> Piece | None:
        for piece in group:
            digest = hashlib.sha256()
            position = piece.start
            while position < piece.end:
                data = os.pread(fh.fileno(), min(1 << 20, piece.end - position), position)
                if not data:
                    return piece
                digest.update(data)
                position += len(data)
            if digest.hexdigest() != piece.sha256:
                return piece
        return None

    with ThreadPoolExecutor(max_workers=VERIFY_WORKERS, thread_name_prefix="l2-verify") as pool:
        bad = next((p for p in pool.map(check, groups) if p is not None), None)
    if bad is not None:
        raise ChecksumMismatch(f"bytes {bad.start}-{bad.end} of {entry.path} do not match the manifest; "
                               "the bytes were discarded")
    return entry.sha256, size


def _fetch_file(archive: Archive, store: SnapshotStore, ref: ComponentRef, entry: FileEntry, index: PieceIndex,
                progress: Progress | None, buffer_bytes: int = DEFAULT_BUFFER,
                peers: PeerSource | None = None) -> _FileResult:
    result = _FileResult()
    with store.lock(entry.sha256) as held:
        if store.has_blob(entry.sha256):  # another process fetched it while we waited
            result.reused = entry.size
            if progress:
                progress(entry.size)
            return result
        if peers is None or not entry.pieces:
            _fill_from_l3(archive, store, ref, entry, index, progress, buffer_bytes, held, result, first=True)
            return result
        missing = sum(p.size for p in entry.pieces if index.find(p) is None)
        first = True
        while True:  # a try per turn: when every holder is dropped, the blob's turn is asked again
            with peers.turn(entry.sha256) as holders:
                if not holders:  # this node is the site's one origin pull of the blob (or there are no peers)
                    _fill_from_l3(archive, store, ref, entry, index, progress, buffer_bytes, held, result, first)
                    return result
                reader = PeerRanges(peers, entry, holders)
                done = AssemblyResult()

                def from_peers(fh: BinaryIO, reader: PeerRanges = reader, done: AssemblyResult = done) -> tuple[str, int]:
                    digest, size, _ = assemble(reader, ref, entry, index, fh, progress, buffer_bytes,
                                               max_range=peer_range(missing, len(reader.holders)), result=done)
                    return digest, size

                try:
                    store.write_blob(entry.sha256, entry.size, from_peers, resumable=held)
                    return result
                except NoPeerLeft:
                    continue
                finally:
                    result.add(done, resumed=first)
                    result.from_peers += done.fetched
                    for node, n in reader.by_peer.items():
                        result.by_peer[node] = result.by_peer.get(node, 0) + n
                    first = False


def _fill_from_l3(archive: Archive, store: SnapshotStore, ref: ComponentRef, entry: FileEntry, index: PieceIndex,
                  progress: Progress | None, buffer_bytes: int, held: bool, result: _FileResult,
                  first: bool) -> None:
    reusable = sum(p.size for p in entry.pieces if index.find(p))
    # after a try from peers in this run, the partial file's verified pieces are kept and only the rest is fetched
    partial = not first and held and store.partial_path(entry.sha256).is_file()
    if reusable or partial:  # copy local pieces, fetch the rest
        done = AssemblyResult()

        def fill(fh: BinaryIO) -> tuple[str, int]:
            digest, size, _ = assemble(archive, ref, entry, index, fh, progress, buffer_bytes, result=done)
            return digest, size

        try:
            store.write_blob(entry.sha256, entry.size, fill, resumable=held)
        finally:
            result.add(done, resumed=first)
        return

    def download(fh: BinaryIO) -> tuple[str, int] | None:
        fh.seek(0)
        hashes = PieceHashes(_pieces(entry))  # hashed in the download threads as the bytes are written
        archive.download(ref, entry.path, fh, progress, size=entry.size, hashes=hashes)
        fh.truncate()  # a longer stale partial must not leave its tail behind
        result.fetched += entry.size
        fh.flush()
        return _verify_pieces(fh, entry, hashes.digests)

    store.write_blob(entry.sha256, entry.size, download, resumable=held)


def sync_ref(
    archive: Archive,
    store: SnapshotStore,
    ref: ComponentRef,
    progress: Progress | None = None,
    events: EventLog | None = None,
    manifest: Manifest | None = None,
    buffer_bytes: int = DEFAULT_BUFFER,
    select: Select | None = None,
    peers: PeerSource | None = None,
) -> SyncReport:
    """Make `ref` present in `store`, fetching only bytes no local blob of the component already holds.

    `buffer_bytes` bounds the fetched bytes the whole sync holds in memory at once (shared by the files fetched
    together), so a sync's memory does not grow with the model's size."""
    started = time.monotonic()
    if store.has(ref, select or _ALL):
        report = SyncReport(ref, "UNCHANGED", 0, store.manifest(ref).total_size, 0, time.monotonic() - started)
        _log(events, report)
        return report
    manifest = manifest or archive.read_manifest(ref)
    if manifest.ref != ref:
        raise ChecksumMismatch(f"the archive's manifest for {ref} describes {manifest.ref}")
    keep = select(manifest) if select else None
    if keep is not None and store.has(ref):  # a subset is here already (another precision): widen it
        keep = keep | {f.path for f in store.manifest(ref).files}
    if keep is not None and keep != {f.path for f in manifest.files}:
        manifest = manifest.subset(keep)
    index = PieceIndex.for_component(store, ref.model, ref.component)
    fetched = reused = files = gets = from_peers = 0
    by_peer: dict[str, int] = {}
    todo: list[FileEntry] = []
    twins: list[FileEntry] = []  # the same bytes under another name in this version: fetched once
    for entry in manifest.files:
        if store.has_blob(entry.sha256):
            reused += entry.size
            if progress:
                progress(entry.size)
        elif any(e.sha256 == entry.sha256 for e in todo):
            twins.append(entry)
        else:
            todo.append(entry)

    per_file = max(1 << 20, buffer_bytes // max(1, min(FILE_WORKERS, len(todo))))

    def fetch(entry: FileEntry) -> _FileResult:
        try:
            return _fetch_file(archive, store, ref, entry, index, progress, per_file, peers)
        except ChecksumMismatch as exc:
            if events:
                events.emit("L2_VERIFY", outcome="REJECTED", model=ref.model, component=ref.component,
                            version=ref.version, file=entry.path, reason=str(exc))
            raise ChecksumMismatch(f"{ref}/{entry.path}: {exc}") from None

    # files of a version are fetched a few at a time: a version is many small files (configs, tokenizers)
    # and a few large ones, so per-request latency, not bandwidth, bounds a serial sync
    with ThreadPoolExecutor(max_workers=min(FILE_WORKERS, max(1, len(todo))), thread_name_prefix="l2-sync") as pool:
        futures = [pool.submit(fetch, entry) for entry in todo]
        try:
            results = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for twin in twins:
        reused += twin.size
        if progress:
            progress(twin.size)
    for result in results:
        fetched += result.fetched
        reused += result.reused
        gets += result.ranged_gets
        from_peers += result.from_peers
        files += 1 if result.fetched else 0
        for node, n in result.by_peer.items():
            by_peer[node] = by_peer.get(node, 0) + n
    store.commit_snapshot(manifest)
    report = SyncReport(ref, "UPDATED", fetched, reused, files, time.monotonic() - started, gets, from_peers,
                        dict(sorted(by_peer.items())))
    _log(events, report)
    return report


def sync_release(
    archive: Archive,
    store: SnapshotStore,
    release: Release,
    progress: Progress | None = None,
    events: EventLog | None = None,
    select: Select | None = None,
    peers: PeerSource | None = None,
) -> SyncSummary:
    return sync_refs(archive, store, release.refs(), progress, events, select=select, peers=peers)


def sync_refs(
    archive: Archive,
    store: SnapshotStore,
    refs: Iterable[ComponentRef],
    progress: Progress | None = None,
    events: EventLog | None = None,
    select: Select | None = None,
    peers: PeerSource | None = None,
) -> SyncSummary:
    summary = SyncSummary()
    for ref in refs:
        summary.reports.append(sync_ref(archive, store, ref, progress, events, select=select, peers=peers))
    return summary


def _log(events: EventLog | None, report: SyncReport) -> None:
    if events is None:
        return
    events.emit(
        "L2_SYNC",
        outcome=report.outcome,
        model=report.ref.model,
        component=report.ref.component,
        version=report.ref.version,
        bytes_fetched=report.bytes_fetched,
        bytes_reused=report.bytes_reused,
        from_peers=report.bytes_from_peers,
        from_l3=report.bytes_from_l3,
        **({"by_peer": report.by_peer} if report.by_peer else {}),
        seconds=round(report.seconds, 3),
    )
