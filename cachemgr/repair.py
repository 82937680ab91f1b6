"""Repairs: a snapshot re-hashed before a worker loads it, or one blob a peer reported bad, fetched again.

Both quarantine what is corrupt (kept for inspection), unlink the snapshots that use it and sync them again, with the
node's peers first when given (the same path as any sync: piece hashes on arrival, the site's one origin pull under
its lease when no peer holds a good copy), then check the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .archive import Archive, ArchiveError
from .events import EventLog
from .names import ComponentRef
from .peersync import PeerSource
from .store import ChecksumMismatch, SnapshotStore
from .sync import SyncReport, sync_ref


def _refetch(archive: Archive, store: SnapshotStore, ref: ComponentRef, events: EventLog | None,
             peers: PeerSource | None, what: str) -> SyncReport:
    """Unlink a snapshot whose blobs were quarantined and sync it again (the same subset of its files)."""
    kept = store.manifest(ref)
    store.remove_snapshot(ref)
    subset = {f.path for f in kept.files} if kept.meta.get("omitted") else None
    try:
        report = sync_ref(archive, store, ref, events=events, peers=peers,
                          select=(lambda m: subset) if subset is not None else None)
    except (ChecksumMismatch, ArchiveError) as exc:
        raise ChecksumMismatch(f"{ref} in L2 at {store.root} was corrupt ({what}) and could not be fetched "
                               f"again: {exc}") from exc
    still = [c for c in store.check(ref) if not c.ok]
    if still:
        raise ChecksumMismatch(f"{ref} is still corrupt after a fresh fetch: "
                               + ", ".join(f"{c.path} ({c.reason})" for c in still))
    return report


def verify_ref(archive: Archive | None, store: SnapshotStore, ref: ComponentRef,
               events: EventLog | None = None, trust_seconds: float = 0.0,
               peers: PeerSource | None = None) -> list[str]:
    """Re-hash a snapshot against its manifest before anything loads it. Corrupt or missing blobs are quarantined
    (kept for inspection), the snapshot is unlinked and fetched again (from `peers` first), then checked again.

    Returns the paths that were repaired; raises ChecksumMismatch when the snapshot is still bad (or there is no
    archive to repair it from), so a worker refuses to load bytes that are not the published ones."""
    bad = [c for c in store.check(ref, trust_seconds) if not c.ok]  # `trust_seconds`: SnapshotStore.check
    if not bad:
        return []
    for check in bad:
        if check.reason == "checksum mismatch":
            store.quarantine_blob(check.sha256)
        if events:
            events.emit("L2_VERIFY", outcome="QUARANTINED", model=ref.model, component=ref.component,
                        version=ref.version, file=check.path, reason=check.reason)
    what = ", ".join(f"{c.path} ({c.reason})" for c in bad)
    if archive is None:
        store.remove_snapshot(ref)
        raise ChecksumMismatch(f"{ref} in L2 at {store.root} is corrupt: {what}; no archive to fetch it again from")
    report = _refetch(archive, store, ref, events, peers, what)
    if events:
        events.emit("L2_VERIFY", outcome="REPAIRED", model=ref.model, component=ref.component, version=ref.version,
                    files=len(bad), from_peers=report.bytes_from_peers, from_l3=report.bytes_from_l3)
    return [c.path for c in bad]


@dataclass(frozen=True)
class BlobRepair:
    sha256: str
    outcome: str
    """OK (the blob hashes right), REPAIRED (quarantined and fetched again), NOT_HELD (not in this L2)."""
    refs: tuple[str, ...] = ()
    bytes_from_peers: int = 0
    bytes_from_l3: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)


def _hashes_to(path: object, sha256: str, size: int) -> bool:
    digest, length = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:  # type: ignore[call-overload]
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                length += len(chunk)
    except OSError:
        return False
    return length == size and digest.hexdigest() == sha256


def repair_blob(archive: Archive, store: SnapshotStore, sha256: str, events: EventLog | None = None,
                peers: PeerSource | None = None, reported_by: str | None = None) -> BlobRepair:
    """Verify one blob now (a peer reported a bad piece of it): when it does not hash to its name, quarantine it and
    sync every snapshot that uses it again, from `peers` first. Raises ChecksumMismatch when that fails."""
    refs = [r for r in store.refs() if any(f.sha256 == sha256 for f in store.manifest(r).files)]
    blob = store.blob_path(sha256)
    if not refs or not blob.is_file():
        return BlobRepair(sha256, "NOT_HELD")
    entry = next(f for f in store.manifest(refs[0]).files if f.sha256 == sha256)
    told = {"reported_by": reported_by} if reported_by else {}
    if _hashes_to(blob, sha256, entry.size):
        if events:
            events.emit("L2_VERIFY", outcome="OK", blob=sha256, file=entry.path, trigger="peer-report", **told)
        return BlobRepair(sha256, "OK", tuple(map(str, refs)))
    store.quarantine_blob(sha256)
    if events:
        for ref in refs:
            events.emit("L2_VERIFY", outcome="QUARANTINED", model=ref.model, component=ref.component,
                        version=ref.version, file=entry.path, blob=sha256, reason="checksum mismatch",
                        trigger="peer-report", **told)
    reports = [_refetch(archive, store, ref, events, peers, f"{entry.path} (checksum mismatch)") for ref in refs]
    by_peer: dict[str, int] = {}
    for report in reports:
        for node, n in report.by_peer.items():
            by_peer[node] = by_peer.get(node, 0) + n
    from_peers = sum(r.bytes_from_peers for r in reports)
    from_l3 = sum(r.bytes_from_l3 for r in reports)
    if events:
        events.emit("L2_VERIFY", outcome="REPAIRED", blob=sha256, file=entry.path, refs=len(refs),
                    from_peers=from_peers, from_l3=from_l3, trigger="peer-report", **told)
    return BlobRepair(sha256, "REPAIRED", tuple(map(str, refs)), from_peers, from_l3, by_peer)
