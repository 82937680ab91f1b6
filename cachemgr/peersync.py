"""Peers first, L3 last: where a sync gets the bytes no local blob holds.

For each file it needs, a syncing node asks its peers (HEAD /blobs/<sha256>) which of them hold the verified blob.
When some do, the missing ranges are spread over them (one peer per range, in turn, a few ranges in flight), and
every piece a peer sends is hashed against the manifest before it is written; a peer that fails, times out or sends
a bad piece is dropped for the rest of the run and that range is asked of the next peer, and finally of L3. L3 stays
the source of truth: whatever the peers do, the file is verified whole before it enters L2.

One origin pull per site: when no peer holds the blob yet, the node takes a short lease on it (an `OriginGate`,
Redis in the fleet) and pulls it from L3 itself, renewing the lease while it works. Nodes that find the lease taken
wait, polling their peers, and fetch the blob from whichever peer has it once the holder has verified it. If the
holder dies mid-transfer its lease expires (`lease_seconds`), the next node to ask takes it and pulls from L3 (or
from a peer that got the blob meanwhile); a node that waits longer than `wait_seconds` pulls from L3 regardless.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .manifest import FileEntry, Piece
from .names import ComponentRef
from .peers import PeerClient, PeerError

ORIGIN_KEY = "blob:{sha256}"


class BadPiece(ValueError):
    """A peer sent bytes whose hash is not the manifest's."""


class OriginGate(Protocol):
    """A short lease per blob shared by a site's nodes: who pulls it from L3 now."""

    def acquire(self, key: str) -> bool: ...

    def renew(self, key: str) -> bool: ...

    def release(self, key: str) -> None: ...


class _RangeReader(Protocol):
    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes: ...


class MemoryGate:
    """An OriginGate for one process (unit tests, a single node): leases with expiry in a dict."""

    def __init__(self, lease_seconds: float = 30.0) -> None:
        self.lease_seconds = lease_seconds
        self.held: dict[str, float] = {}
        self.lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self.lock:
            now = time.monotonic()
            if self.held.get(key, 0.0) > now:
                return False
            self.held[key] = now + self.lease_seconds
            return True

    def renew(self, key: str) -> bool:
        with self.lock:
            self.held[key] = time.monotonic() + self.lease_seconds
            return True

    def release(self, key: str) -> None:
        with self.lock:
            self.held.pop(key, None)


class PeerSource:
    """The peers one sync run may ask, and which of them were dropped (and why) during the run."""

    def __init__(self, clients: list[PeerClient], gate: OriginGate | None = None, lease_seconds: float = 30.0,
                 poll_seconds: float = 0.25, wait_seconds: float = 900.0) -> None:
        self.clients = list(clients)
        self.gate = gate
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.wait_seconds = wait_seconds
        self.dropped: dict[str, str] = {}
        self.lock = threading.Lock()

    def alive(self) -> list[PeerClient]:
        with self.lock:
            return [c for c in self.clients if c.node not in self.dropped]

    def drop(self, client: PeerClient, reason: str) -> None:
        with self.lock:
            self.dropped.setdefault(client.node, reason)

    def holders(self, sha256: str) -> list[PeerClient]:
        """The live peers that hold a verified copy of the blob (asked all at once)."""
        clients = self.alive()
        if not clients:
            return []

        def ask(client: PeerClient) -> bool:
            try:
                return client.has(sha256)
            except PeerError as exc:
                self.drop(client, str(exc))
                return False

        with ThreadPoolExecutor(max_workers=min(8, len(clients)), thread_name_prefix="peer-has") as pool:
            answers = list(pool.map(ask, clients))
        return [c for c, yes in zip(clients, answers, strict=True) if yes]

    @contextlib.contextmanager
    def turn(self, sha256: str) -> Iterator[list[PeerClient]]:
        """Yields the peers to fetch a blob from; an empty list means: pull it from L3 (holding the site's lease
        on it while the body runs, when there is a gate). Blocks while another node holds the lease."""
        key = ORIGIN_KEY.format(sha256=sha256)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            holders = self.holders(sha256)
            if holders:
                yield holders
                return
            if self.gate is None or time.monotonic() > deadline:
                yield []
                return
            if self.gate.acquire(key):
                holders = self.holders(sha256)  # the last holder may have finished just before we took over
                if holders:
                    self.gate.release(key)
                    yield holders
                    return
                stop = threading.Event()
                renewer = threading.Thread(target=self._renew, args=(key, stop), daemon=True,
                                           name=f"origin-lease-{sha256[:8]}")
                renewer.start()
                try:
                    yield []
                finally:
                    stop.set()
                    renewer.join()
                    self.gate.release(key)
                return
            time.sleep(self.poll_seconds)

    def _renew(self, key: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                self.gate.renew(key)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - a lost lease only means another node may pull it too
                pass


def check_pieces(pieces: list[Piece], start: int, data: bytes) -> None:
    for piece in pieces:
        chunk = memoryview(data)[piece.start - start:piece.end - start]
        if hashlib.sha256(chunk).hexdigest() != piece.sha256:
            raise BadPiece(f"bytes {piece.start}-{piece.end} do not match the manifest")


class PeerRanges:
    """A range reader for `assemble`: ranges of one file from the peers holding its blob, else from L3.

    Ranges that are whole pieces are verified piece by piece as they arrive. A piece larger than one range (a big
    tensor split over several ranged reads) is fetched whole from a peer, verified, and its slices handed out from
    memory: at most one such piece is held at a time."""

    def __init__(self, source: PeerSource, archive: _RangeReader, entry: FileEntry,
                 holders: list[PeerClient]) -> None:
        self.source = source
        self.archive = archive
        self.entry = entry
        self.holders = holders
        self.from_peers = 0
        self.from_l3 = 0
        self.by_peer: dict[str, int] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._big_lock = threading.Lock()
        self._big: tuple[int, int, bytes] | None = None

    def _candidates(self) -> list[PeerClient]:
        alive = [c for c in self.holders if c.node not in self.source.dropped]
        if not alive:
            return []
        k = next(self._turn) % len(alive)
        return alive[k:] + alive[:k]

    def _whole(self, client: PeerClient, pieces: list[Piece]) -> bytes:
        lo, hi = pieces[0].start, pieces[-1].end
        with self._big_lock:
            if self._big and self._big[:2] == (lo, hi):
                return self._big[2]
            data = client.read(self.entry.sha256, lo, hi)
            check_pieces(pieces, lo, data)
            self._big = (lo, hi, data)
            with self._lock:
                self.by_peer[client.node] = self.by_peer.get(client.node, 0) + len(data)
            return data

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        pieces = [p for p in self.entry.pieces if p.start < end and p.end > start]
        if pieces:
            lo, hi = pieces[0].start, pieces[-1].end
            for client in self._candidates():
                try:
                    if (lo, hi) == (start, end):
                        data = client.read(self.entry.sha256, start, end)
                        check_pieces(pieces, start, data)
                        with self._lock:
                            self.by_peer[client.node] = self.by_peer.get(client.node, 0) + len(data)
                    else:
                        data = self._whole(client, pieces)[start - lo:end - lo]
                except (PeerError, BadPiece) as exc:
                    self.source.drop(client, f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.from_peers += len(data)
                return data
        data = self.archive.read_range(ref, path, start, end)
        with self._lock:
            self.from_l3 += len(data)
        return data
