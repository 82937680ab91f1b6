"""Assemble one file of a new version from pieces already on this node and ranges fetched from the archive, in
one streaming pass and bounded memory.

The file is written front to back: a piece found in a local blob is copied in small chunks, a missing run of
pieces is fetched with ranged GETs a few ranges ahead (at most `buffer_bytes` of fetched bytes are held at once)
and written as soon as its turn comes. Every byte is hashed as it is written, so the caller can verify the file
against the manifest's sha256 without reading it again. A partial file left by an interrupted assembly is
resumed: its leading pieces that still match their hashes are kept, and only the rest is copied or fetched.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .manifest import FileEntry, Piece
from .names import ComponentRef
from .store import ChecksumMismatch

Progress = Callable[[int], None]
COPY_CHUNK = 1 << 20
DEFAULT_BUFFER = 64 << 20
"""Fetched bytes held in memory at once by one file's assembly (ranges in flight × range size)."""
MAX_RANGE = 16 << 20
"""Largest single ranged GET (adjacent missing pieces are merged up to this; larger pieces are split)."""
FETCH_AHEAD = 4
"""Ranged GETs in flight at once, so per-request latency does not leave the link idle."""


class _Finder(Protocol):
    def find(self, piece: Piece) -> tuple[Path, int, int] | None: ...


class _RangeReader(Protocol):
    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes: ...


@dataclass
class AssemblyResult:
    fetched: int = 0
    reused: int = 0
    ranged_gets: int = 0
    resumed: int = 0


def range_plan(buffer_bytes: int) -> tuple[int, int]:
    """(range size, ranges in flight) that keep fetched bytes in memory within `buffer_bytes`."""
    size = max(1 << 20, min(MAX_RANGE, buffer_bytes // FETCH_AHEAD))
    return size, max(1, min(FETCH_AHEAD, buffer_bytes // size))


def coalesce(pieces: list[Piece], max_range: int = MAX_RANGE, split: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges covering `pieces` (in file order): adjacent ones merged up to `max_range`; a piece larger than
    `split` (default `max_range`) is split."""
    split = max(split or max_range, max_range)
    ranges: list[tuple[int, int]] = []
    for p in pieces:
        if ranges and ranges[-1][1] == p.start and p.end - ranges[-1][0] <= max_range:
            ranges[-1] = (ranges[-1][0], p.end)
        else:
            ranges.append((p.start, p.end))
    out = []
    for start, end in ranges:
        for s in range(start, end, split):
            out.append((s, min(end, s + split)))
    return out


def assemble(reader: _RangeReader, ref: ComponentRef, entry: FileEntry, index: _Finder, fh: BinaryIO,
             progress: Progress | None = None, buffer_bytes: int = DEFAULT_BUFFER, max_range: int | None = None,
             result: AssemblyResult | None = None) -> tuple[str, int, AssemblyResult]:
    """Write `entry` into `fh` front to back; returns (sha256, size, what was fetched/reused/resumed).

    `max_range` asks for smaller ranges than the memory bound allows (pieces are merged up to it, and split only
    above the bound); `result`, when given, is filled as the assembly goes, so it tells what was written even when
    the assembly is interrupted."""
    result = result if result is not None else AssemblyResult()
    digest = hashlib.sha256()
    start_piece, digest = _resume(fh, entry, digest)
    pieces = entry.pieces[start_piece:]
    offset = pieces[0].start if pieces else entry.size
    result.resumed = offset
    if progress and offset:
        progress(offset)
    fh.seek(offset)
    fh.truncate(offset)
    range_size, depth = range_plan(buffer_bytes)
    steps: list[tuple[int, int, tuple[Path, int, int] | None]] = []
    missing = []
    for piece in pieces:
        hit = index.find(piece)
        if hit is None:
            missing.append(piece)
        else:
            steps.append((piece.start, piece.end, hit))
    steps.extend((s, e, None) for s, e in coalesce(missing, min(max_range or range_size, range_size), range_size))
    steps.sort(key=lambda step: step[0])
    fetches = deque((s, e) for s, e, hit in steps if hit is None)
    sources: dict[Path, int] = {}
    pending: deque[Future[bytes]] = deque()

    def fetch(start: int, end: int) -> bytes:
        data = reader.read_range(ref, entry.path, start, end)
        if len(data) != end - start:
            raise ChecksumMismatch(f"{ref}/{entry.path}: range {start}-{end} returned {len(data)} bytes")
        return data

    def top_up() -> None:
        while fetches and len(pending) < depth:
            pending.append(pool.submit(fetch, *fetches.popleft()))

    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="l2-range")
    try:
        for start, end, hit in steps:
            if hit is None:
                top_up()
                data = pending.popleft().result()
                top_up()  # the next range starts downloading while this one is hashed and written
                digest.update(data)
                fh.write(data)
                result.fetched += len(data)
                result.ranged_gets += 1
                if progress:
                    progress(len(data))
                del data
                continue
            blob, src_start, src_end = hit
            fd = sources.get(blob)
            if fd is None:
                fd = sources[blob] = os.open(blob, os.O_RDONLY)
            position = src_start
            while position < src_end:
                chunk = os.pread(fd, min(COPY_CHUNK, src_end - position), position)
                if not chunk:
                    raise ChecksumMismatch(f"{blob} shrank while {entry.path} was assembled from it")
                digest.update(chunk)
                fh.write(chunk)
                position += len(chunk)
            result.reused += end - start
            if progress:
                progress(end - start)
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in sources.values():
            os.close(fd)
    return digest.hexdigest(), fh.tell(), result


def _resume(fh: BinaryIO, entry: FileEntry, digest: hashlib._Hash) -> tuple[int, hashlib._Hash]:
    """(index of the first piece still to write, the digest of the kept prefix)."""
    fh.flush()
    have = os.fstat(fh.fileno()).st_size
    kept = 0
    for piece in entry.pieces:
        if piece.end > have:
            break
        trial, part = digest.copy(), hashlib.sha256()
        position = piece.start
        while position < piece.end:
            data = os.pread(fh.fileno(), min(COPY_CHUNK, piece.end - position), position)
            if not data:
                return kept, digest
            trial.update(data)
            part.update(data)
            position += len(data)
        if part.hexdigest() != piece.sha256:
            break
        digest = trial
        kept += 1
    return kept, digest
