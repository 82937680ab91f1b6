"""Peers first, L3 last: where a sync gets the bytes no local blob holds.

For each file it needs, a syncing node asks its peers (HEAD /blobs/<sha256>) which of them hold the verified blob.
When some do, the missing ranges are spread over them: each range goes to the holder with the fewest of this node's
requests in flight (at most `PER_PEER` each), then the fewest bytes given so far, ties broken by a rendezvous hash
of (blob, range), so a release comes from all its holders about evenly and two nodes do not pick the same order.
Every piece a peer sends is hashed against the manifest before it is written. A peer that fails, times out, sends
under the minimum rate or sends a bad piece is dropped for the rest of the run and the range is asked of another
holder; the trouble is reported (an event, and `on_trouble`, which the fleet wires to a site-wide quarantine and to
telling the peer to verify its blob). When every holder of a blob has been dropped, the file goes back to its turn:
other holders, or the site's one origin pull (the partial file is resumed, its verified pieces kept). L3 stays the
source of truth: whatever the peers do, the file is verified whole before it enters L2.

One origin pull per site: when no peer holds the blob yet, the node takes a short lease on it (an `OriginGate`,
Redis in the fleet) and pulls it from L3 itself, renewing the lease while it works. Nodes that find the lease taken
wait, polling their peers, and fetch the blob from whichever peer has it once the holder has verified it. If the
holder dies mid-transfer its lease expires (`lease_seconds`), the next node to ask takes it and pulls from L3 (or
from a peer that got the blob meanwhile); a node that waits longer than `wait_seconds` pulls from L3 regardless.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from .events import EventLog
from .manifest import FileEntry, Piece
from .names import ComponentRef
from .peers import RATE_GRACE, PeerClient, PeerError

ORIGIN_KEY = "blob:{sha256}"
PER_PEER = 2
"""Requests one sync keeps in flight to one peer; the minimum rate is asked of each."""
PEER_MAX_RANGE = 2 << 20
PEER_MIN_RANGE = 128 << 10
HEDGE_FACTOR, HEDGE_MIN, HEDGE_MAX = 3.0, 0.05, 4 << 20
"""A range (≤ HEDGE_MAX bytes) still running after HEDGE_FACTOR × what the recent requests' median pace needs for it
(at least HEDGE_MIN s, at most RATE_GRACE) is asked of a second holder too; the first good answer wins."""
SHARED_KINDS = frozenset({"bad_piece", "slow", "timeout"})
"""Troubles worth telling the site about (a peer refused or gone is seen by each node at no cost)."""


class BadPiece(ValueError):
    """A peer sent bytes whose hash is not the manifest's."""

    def __init__(self, piece: Piece) -> None:
        super().__init__(f"bytes {piece.start}-{piece.end} do not match the manifest")
        self.piece = piece


class NoPeerLeft(Exception):  # noqa: N818 - a state, not an error: the file goes back to its turn
    """Every holder of a blob was dropped while the file was being assembled."""


@dataclass(frozen=True)
class PeerTrouble:
    """Why a peer was dropped during a sync: kind is bad_piece, slow, timeout, refused or error."""

    peer: str
    kind: str
    detail: str
    blob: str | None = None
    start: int | None = None
    end: int | None = None
    path: str | None = None


class OriginGate(Protocol):
    """A short lease per blob shared by a site's nodes: who pulls it from L3 now."""

    def acquire(self, key: str) -> bool: ...

    def renew(self, key: str) -> bool: ...

    def release(self, key: str) -> None: ...


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


def _rank(key: str, node: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\n{node}".encode(), digest_size=8).digest(), "big")


class PeerSource:
    """The peers one sync run may ask, which of them were dropped (and why), and what each was given.

    `skip()` names peers the site has quarantined (asked before each file); `on_trouble` is called once per dropped
    peer (never raising into the sync); `events` gets a PEER_BAD_PIECE or PEER_DROPPED line for each."""

    def __init__(self, clients: list[PeerClient], gate: OriginGate | None = None, lease_seconds: float = 30.0,
                 poll_seconds: float = 0.25, wait_seconds: float = 900.0, events: EventLog | None = None,
                 on_trouble: Callable[[PeerTrouble], None] | None = None,
                 skip: Callable[[], Iterable[str]] | None = None) -> None:
        self.clients = list(clients)
        self.gate = gate
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.wait_seconds = wait_seconds
        self.events = events
        self.on_trouble = on_trouble
        self.skip = skip
        self.dropped: dict[str, str] = {}
        self.troubles: list[PeerTrouble] = []
        self.inflight: dict[str, int] = {}
        self.given: dict[str, int] = {}
        self.paces: list[float] = []
        self.hedges = 0
        self.cond = threading.Condition()

    def quarantined(self) -> set[str]:
        if self.skip is None:
            return set()
        try:
            return set(self.skip())
        except Exception:  # noqa: BLE001 - no shared list (Redis away): every peer is asked, each piece still checked
            return set()

    def alive(self) -> list[PeerClient]:
        with self.cond:
            return [c for c in self.clients if c.node not in self.dropped]

    def drop(self, client: PeerClient, trouble: PeerTrouble | str) -> None:
        if isinstance(trouble, str):
            trouble = PeerTrouble(client.node, "error", trouble)
        with self.cond:
            first = client.node not in self.dropped
            if first:
                self.dropped[client.node] = f"{trouble.kind}: {trouble.detail}"
                self.troubles.append(trouble)
            self.cond.notify_all()
        if first:
            self._report(trouble)

    def _report(self, t: PeerTrouble) -> None:
        if self.events is not None:
            where = {"blob": t.blob, "start": t.start, "end": t.end, "file": t.path} if t.blob else {}
            self.events.emit("PEER_BAD_PIECE" if t.kind == "bad_piece" else "PEER_DROPPED", outcome="DROPPED",
                             peer=t.peer, kind=t.kind, **{k: v for k, v in where.items() if v is not None},
                             reason=t.detail)
        if self.on_trouble is not None:
            try:
                self.on_trouble(t)
            except Exception:  # noqa: BLE001 - telling others is best effort; this node already dropped the peer
                pass

    def holders(self, sha256: str) -> list[PeerClient]:
        """The live, unquarantined peers that hold a verified copy of the blob (asked all at once)."""
        skip = self.quarantined()
        clients = [c for c in self.alive() if c.node not in skip]
        if not clients:
            return []

        def ask(client: PeerClient) -> bool:
            try:
                return client.has(sha256)
            except PeerError as exc:
                self.drop(client, PeerTrouble(client.node, exc.kind, str(exc)))
                return False

        with ThreadPoolExecutor(max_workers=min(8, len(clients)), thread_name_prefix="peer-has") as pool:
            answers = list(pool.map(ask, clients))
        return [c for c, yes in zip(clients, answers, strict=True) if yes]

    def acquire(self, holders: list[PeerClient], key: str, nbytes: int, skip: Iterable[str] = (),
                block: bool = True) -> PeerClient | None:
        """A holder (not in `skip`) to ask for `nbytes` (a slot taken: `release` it), waiting while all are busy
        (unless not `block`); None when every such holder has been dropped."""
        skip = set(skip)
        with self.cond:
            while True:
                options = [c for c in holders if c.node not in self.dropped and c.node not in skip]
                if not options:
                    return None
                free = [c for c in options if self.inflight.get(c.node, 0) < PER_PEER]
                if free:
                    best = min(free, key=lambda c: (self.inflight.get(c.node, 0), self.given.get(c.node, 0),
                                                    -_rank(key, c.node)))
                    self.inflight[best.node] = self.inflight.get(best.node, 0) + 1
                    self.given[best.node] = self.given.get(best.node, 0) + nbytes
                    return best
                if not block:
                    return None
                self.cond.wait(0.5)

    def release(self, client: PeerClient, nbytes: int = 0, seconds: float | None = None) -> None:
        """Give a slot back; with `seconds`, the request succeeded and its pace counts for hedging."""
        with self.cond:
            self.inflight[client.node] -= 1
            if seconds is not None:
                self.paces = [*self.paces[-31:], nbytes / max(seconds, 1e-6)]
            self.cond.notify_all()

    def hedge_after(self, nbytes: int) -> float:
        """Seconds after which a range of `nbytes` still running is asked of a second holder too."""
        with self.cond:
            paces = sorted(self.paces)
        if len(paces) < 2:
            return RATE_GRACE
        return min(RATE_GRACE, max(HEDGE_MIN, HEDGE_FACTOR * nbytes / paces[len(paces) // 2]))

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


def _spawn(fn: Callable[..., bytes | None], *args: object) -> Future[bytes | None]:
    """Run `fn` on a daemon thread of its own: a request that lost a hedge may outlive the sync that asked."""
    future: Future[bytes | None] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)

    threading.Thread(target=run, name="peer-read", daemon=True).start()
    return future


def check_pieces(pieces: list[Piece], start: int, data: bytes) -> None:
    for piece in pieces:
        chunk = memoryview(data)[piece.start - start:piece.end - start]
        if hashlib.sha256(chunk).hexdigest() != piece.sha256:
            raise BadPiece(piece)


def peer_range(missing: int, holders: int) -> int:
    """The range size to ask peers for: small enough that a file's missing bytes make several ranges per holder
    (a small file is spread too), within [PEER_MIN_RANGE, PEER_MAX_RANGE]. Pieces are never cut below it."""
    return max(PEER_MIN_RANGE, min(PEER_MAX_RANGE, missing // (4 * max(1, holders))))


class PeerRanges:
    """A range reader for `assemble`: ranges of one file from the peers holding its blob. Raises NoPeerLeft when
    every holder has been dropped (the caller goes back to the blob's turn).

    Ranges that are whole pieces are verified piece by piece as they arrive. A piece larger than one range (a big
    tensor split over several ranged reads) is fetched whole from a peer, verified, and its slices handed out from
    memory: at most one such piece is held at a time."""

    def __init__(self, source: PeerSource, entry: FileEntry, holders: list[PeerClient]) -> None:
        self.source = source
        self.entry = entry
        self.holders = holders
        self.from_peers = 0
        self.by_peer: dict[str, int] = {}
        self._lock = threading.Lock()
        self._big_lock = threading.Lock()
        self._big: tuple[int, int, bytes] | None = None

    def _attempt(self, client: PeerClient, pieces: list[Piece], start: int, end: int) -> bytes | None:
        """One request for bytes [start, end) (whole pieces), verified; None when it failed (the peer dropped)."""
        sha, began, seconds = self.entry.sha256, time.monotonic(), None
        try:
            data = client.read(sha, start, end)
            check_pieces(pieces, start, data)
            seconds = time.monotonic() - began
            return data
        except PeerError as exc:
            self.source.drop(client, PeerTrouble(client.node, exc.kind, str(exc), sha, start, end, self.entry.path))
        except BadPiece as exc:
            self.source.drop(client, PeerTrouble(client.node, "bad_piece", str(exc), sha, exc.piece.start,
                                                 exc.piece.end, self.entry.path))
        finally:
            self.source.release(client, end - start, seconds)
        return None

    def _fetch(self, pieces: list[Piece], start: int, end: int) -> bytes:
        """Bytes [start, end) (whole pieces) from some holder, verified; a range that lags is hedged."""
        key, nbytes, asked = f"{self.entry.sha256}:{start}", end - start, set()
        while (client := self.source.acquire(self.holders, key, nbytes, asked)) is not None:
            asked.add(client.node)
            began, hedged = time.monotonic(), nbytes > HEDGE_MAX
            running = {_spawn(self._attempt, client, pieces, start, end): client}
            while running:
                done, _ = wait(running, timeout=0.02, return_when=FIRST_COMPLETED)
                for future in done:
                    peer, data = running.pop(future), future.result()
                    if data is not None:  # a loser still running finishes (or fails) on its own
                        with self._lock:
                            self.by_peer[peer.node] = self.by_peer.get(peer.node, 0) + len(data)
                        return data
                if running and not hedged and time.monotonic() - began > self.source.hedge_after(nbytes):
                    other = self.source.acquire(self.holders, key, nbytes, asked, block=False)
                    if other is not None:
                        hedged = True
                        asked.add(other.node)
                        running[_spawn(self._attempt, other, pieces, start, end)] = other
                        with self.source.cond:
                            self.source.hedges += 1
        raise NoPeerLeft(f"every peer holding {self.entry.path} was dropped")

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        pieces = [p for p in self.entry.pieces if p.start < end and p.end > start]
        lo, hi = pieces[0].start, pieces[-1].end
        if (lo, hi) == (start, end):
            data = self._fetch(pieces, start, end)
        else:
            with self._big_lock:
                if not (self._big and self._big[:2] == (lo, hi)):
                    self._big = None
                    self._big = (lo, hi, self._fetch(pieces, lo, hi))
                data = self._big[2][start - lo:end - lo]
        with self._lock:
            self.from_peers += len(data)
        return data
