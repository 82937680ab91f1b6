"""L3 → L2: bring versions onto a node's disk, verified, without ever exposing a partial file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .archive import Archive
from .events import EventLog
from .manifest import Manifest
from .names import ComponentRef, Release
from .store import ChecksumMismatch, SnapshotStore

Progress = Callable[[int], None]


@dataclass(frozen=True)
class SyncReport:
    ref: ComponentRef
    outcome: str  # UPDATED | UNCHANGED
    bytes_fetched: int = 0
    bytes_reused: int = 0
    files_fetched: int = 0
    seconds: float = 0.0


@dataclass
class SyncSummary:
    reports: list[SyncReport] = field(default_factory=list)

    @property
    def bytes_fetched(self) -> int:
        return sum(r.bytes_fetched for r in self.reports)

    @property
    def bytes_reused(self) -> int:
        return sum(r.bytes_reused for r in self.reports)


def sync_ref(
    archive: Archive,
    store: SnapshotStore,
    ref: ComponentRef,
    progress: Progress | None = None,
    events: EventLog | None = None,
    manifest: Manifest | None = None,
) -> SyncReport:
    """Make `ref` present in `store`. Blobs already present (any version) are reused, not fetched."""
    started = time.monotonic()
    if store.has(ref):
        report = SyncReport(ref, "UNCHANGED", 0, store.manifest(ref).total_size, 0, time.monotonic() - started)
        _log(events, report)
        return report
    manifest = manifest or archive.read_manifest(ref)
    fetched = reused = files = 0
    for entry in manifest.files:
        if store.has_blob(entry.sha256):
            reused += entry.size
            if progress:
                progress(entry.size)
            continue
        with store.lock(entry.sha256):
            if store.has_blob(entry.sha256):  # another process fetched it while we waited
                reused += entry.size
                if progress:
                    progress(entry.size)
                continue
            try:
                store.add_blob(
                    entry.sha256, entry.size, lambda fh, e=entry: archive.download(ref, e.path, fh, progress)
                )
            except ChecksumMismatch as exc:
                if events:
                    events.emit("L2_VERIFY", outcome="REJECTED", model=ref.model, component=ref.component,
                                version=ref.version, file=entry.path, reason=str(exc))
                raise ChecksumMismatch(f"{ref}/{entry.path}: {exc}") from None
            fetched += entry.size
            files += 1
    store.commit_snapshot(manifest)
    report = SyncReport(ref, "UPDATED", fetched, reused, files, time.monotonic() - started)
    _log(events, report)
    return report


def sync_release(
    archive: Archive,
    store: SnapshotStore,
    release: Release,
    progress: Progress | None = None,
    events: EventLog | None = None,
) -> SyncSummary:
    return sync_refs(archive, store, release.refs(), progress, events)


def sync_refs(
    archive: Archive,
    store: SnapshotStore,
    refs: Iterable[ComponentRef],
    progress: Progress | None = None,
    events: EventLog | None = None,
) -> SyncSummary:
    summary = SyncSummary()
    for ref in refs:
        summary.reports.append(sync_ref(archive, store, ref, progress, events))
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
        seconds=round(report.seconds, 3),
    )
