"""Hash a file's manifest pieces from the bytes a download writes, so verifying them costs no second read.

A download hands each sequential stream it writes (the whole file, or one ranged part) to `PieceHashes.stream`;
every piece whose bytes all pass through that one stream gets its sha256, the others (a piece cut by a part
boundary, or parts resumed from an earlier try and so never fetched now) get none and the caller hashes them from
the file. The digests are of the bytes as they were written at their offsets: the caller still compares them with
the manifest before anything becomes visible.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Sequence

from ..manifest import Piece


class PieceHashes:
    """Digests of a file's pieces (start offset → sha256 hex), collected from any number of write streams."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self.pieces = tuple(pieces)
        self.starts = [p.start for p in self.pieces]
        self.digests: dict[int, str] = {}
        self._lock = threading.Lock()

    def boundaries(self) -> list[int]:
        """Offsets where a piece starts: a ranged part that starts and ends on them hashes all its pieces."""
        return list(self.starts)

    def stream(self, start: int) -> PieceStream:
        """A hasher for bytes written in order from `start` (a piece start, or the pieces it cuts go unhashed)."""
        return PieceStream(self, start)

    def _done(self, piece: Piece, digest: str) -> None:
        with self._lock:
            self.digests[piece.start] = digest


class PieceStream:
    """Feeds one sequential stream of written bytes to the pieces it covers, finishing each at its end."""

    def __init__(self, owner: PieceHashes, start: int) -> None:
        self.owner = owner
        self.position = start
        index = bisect.bisect_right(owner.starts, start) - 1
        self.index = max(0, index)
        piece = owner.pieces[self.index] if owner.pieces else None
        # a stream that starts inside a piece cannot hash it: skip to the next piece start
        self.digest = hashlib.sha256() if piece is not None and piece.start == start else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pieces = self.owner.pieces
        while view and self.index < len(pieces):
            piece = pieces[self.index]
            take = min(len(view), piece.end - self.position)
            if self.digest is not None:
                self.digest.update(view[:take])
            view = view[take:]
            self.position += take
            if self.position >= piece.end:
                if self.digest is not None:
                    self.owner._done(piece, self.digest.hexdigest())
                self.index += 1
                self.digest = hashlib.sha256()


def aligned_parts(size: int, part_size: int, boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """Cut [0, size) into ranges of about `part_size`, each cut moved forward to the next piece boundary when
    one lies within half a part (so the pieces of a part are hashed as it arrives).

    Inside a piece larger than that the cut stays where it falls, so one huge tensor is still fetched by several
    threads (its digest is then taken from the file); without boundaries the cuts fall every `part_size` bytes."""
    cuts = sorted({b for b in boundaries if 0 < b < size})
    parts: list[tuple[int, int]] = []
    start = 0
    while start < size:
        target = start + part_size
        if target + part_size // 2 >= size:  # a short tail joins the last part
            parts.append((start, size))
            break
        i = bisect.bisect_left(cuts, target)
        end = cuts[i] if i < len(cuts) and cuts[i] - target <= part_size // 2 else target
        parts.append((start, end))
        start = end
    return parts
