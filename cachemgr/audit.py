"""The L2 audit: re-hash every snapshot, clear what killed downloads left, apply retention, collect
unreferenced blobs. Plan first (a frozen description anyone can print), then execute."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .archive import Archive
from .events import EventLog
from .names import ComponentRef
from .peersync import PeerSource
from .retention import plan_retention_l2
from .store import BlobCheck, SnapshotStore

STALE_AFTER = 6 * 3600
"""Temp files untouched this long belong to a download that was killed; a live one writes continuously."""


@dataclass(frozen=True)
class AuditPlan:
    checks: tuple[BlobCheck, ...]
    stale_temp_files: tuple[str, ...] = ()
    retire: tuple[ComponentRef, ...] = ()
    keep: tuple[tuple[ComponentRef, str], ...] = ()
    orphan_blobs: tuple[str, ...] = ()

    @property
    def corrupt(self) -> tuple[BlobCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def describe(self) -> str:
        lines = [f"checked {len(self.checks)} files: {len(self.corrupt)} bad"]
        lines += [f"  quarantine {c.ref}/{c.path}: {c.reason}" for c in self.corrupt]
        lines += [f"  keep   {ref}  ({why})" for ref, why in self.keep]
        lines += [f"  retire {ref}" for ref in self.retire]
        lines += [f"  remove temp file {name}" for name in self.stale_temp_files]
        if self.orphan_blobs:
            lines.append(f"  collect {len(self.orphan_blobs)} unreferenced blob(s)")
        return "\n".join(lines)


@dataclass
class AuditResult:
    plan: AuditPlan
    quarantined: list[str] = field(default_factory=list)
    removed_snapshots: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    collected_blobs: int = 0
    seconds: float = 0.0


def plan_audit(store: SnapshotStore, keep: int | None = None,
               protected: Mapping[ComponentRef, str] | Iterable[ComponentRef] = (),
               stale_after: float = STALE_AFTER, verify: bool = True, now: float | None = None,
               stamp: bool = False) -> AuditPlan:
    """What an audit would do; `stamp`: blobs that pass the re-hash are stamped verified (the nightly audit, not a
    dry run), so a worker's boot within the trust window need not read them again (SnapshotStore.check)."""
    now = time.time() if now is None else now
    checks: list[BlobCheck] = []
    if verify:
        for ref in store.refs():
            checks.extend(store.check(ref, stamp=stamp))
    stale = []
    if store.tmp.is_dir():
        for p in store.tmp.iterdir():
            if p.name.endswith((".incomplete", ".partial")) and now - p.stat().st_mtime > stale_after:
                stale.append(p.name)
    kept, retire = plan_retention_l2(store, keep, protected) if keep else ((), ())
    live = [r for r in store.refs() if r not in retire]
    referenced = {f.sha256 for r in live for f in store.manifest(r).files}
    corrupt_blobs = {c.sha256 for c in checks if not c.ok}
    orphans = []
    if store.blobs.is_dir():
        orphans = sorted(b.name for b in store.blobs.iterdir() if b.name not in referenced | corrupt_blobs)
    return AuditPlan(tuple(checks), tuple(sorted(stale)), retire, kept, tuple(orphans))


def execute_audit(store: SnapshotStore, plan: AuditPlan, events: EventLog | None = None,
                  archive: Archive | None = None, peers: PeerSource | None = None) -> AuditResult:
    """Quarantine corrupt blobs (kept for inspection) and unlink the snapshots that used them, re-fetch
    those when an archive is given (from `peers` first, under the site's one origin pull), clear stale temp files,
    retire, then collect orphans."""
    from .sync import sync_ref

    started = time.monotonic()
    result = AuditResult(plan)
    broken: set[ComponentRef] = set()
    for check in plan.corrupt:
        if check.reason == "checksum mismatch" and store.quarantine_blob(check.sha256):
            result.quarantined.append(check.sha256)
        broken.add(check.ref)
        if events:
            events.emit("L2_AUDIT", outcome="QUARANTINED", model=check.ref.model, component=check.ref.component,
                        version=check.ref.version, file=check.path, reason=check.reason)
    subsets: dict[ComponentRef, set[str]] = {}  # a snapshot of some files only (one precision) is refetched as such
    for ref in sorted(broken):
        if store.has(ref):
            kept = store.manifest(ref)
            if kept.meta.get("omitted"):
                subsets[ref] = {f.path for f in kept.files}
            store.remove_snapshot(ref)
            result.removed_snapshots.append(str(ref))
    for name in plan.stale_temp_files:
        path = store.tmp / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        result.removed_temp_files.append(name)
    for ref in plan.retire:
        store.remove_snapshot(ref)
        result.retired.append(str(ref))
        if events:
            events.emit("L2_RETIRE", outcome="REMOVED", model=ref.model, component=ref.component, version=ref.version)
    still_referenced = {f.sha256 for r in store.refs() for f in store.manifest(r).files}
    for sha in plan.orphan_blobs:
        if sha not in still_referenced and store.has_blob(sha):
            store.remove_blob(sha)
            result.collected_blobs += 1
    if archive is not None:
        for ref in sorted(broken - set(plan.retire)):
            subset = subsets.get(ref)
            sync_ref(archive, store, ref, events=events, peers=peers,
                     select=(lambda m, subset=subset: subset) if subset is not None else None)
            result.refetched.append(str(ref))
    result.seconds = time.monotonic() - started
    if events:
        events.emit("AUDIT_RUN", outcome="OK" if plan.ok else "REPAIRED", blobs_checked=len(plan.checks),
                    corrupt=len(plan.corrupt), retired=len(result.retired), temp_removed=len(result.removed_temp_files),
                    blobs_collected=result.collected_blobs, seconds=round(result.seconds, 3))
    return result
