"""The L2 audit: re-hash every snapshot against its manifest; plan first, then act."""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import EventLog
from .store import BlobCheck, SnapshotStore


@dataclass(frozen=True)
class AuditPlan:
    checks: tuple[BlobCheck, ...]
    stale_temp_files: tuple[str, ...] = ()

    @property
    def corrupt(self) -> tuple[BlobCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def ok(self) -> bool:
        return not self.corrupt


@dataclass
class AuditResult:
    plan: AuditPlan
    quarantined: list[str] = field(default_factory=list)
    removed_snapshots: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)


def plan_audit(store: SnapshotStore) -> AuditPlan:
    checks: list[BlobCheck] = []
    for ref in store.refs():
        checks.extend(store.check(ref))
    stale = tuple(sorted(p.name for p in store.tmp.glob("*.incomplete"))) if store.tmp.is_dir() else ()
    return AuditPlan(tuple(checks), stale)


def execute_audit(store: SnapshotStore, plan: AuditPlan, events: EventLog | None = None) -> AuditResult:
    """Quarantine corrupt blobs and unlink the snapshots that used them, so the next sync re-fetches."""
    result = AuditResult(plan)
    for check in plan.corrupt:
        moved = store.quarantine_blob(check.sha256) if check.reason == "checksum mismatch" else None
        if moved:
            result.quarantined.append(check.sha256)
        if store.has(check.ref):
            store.remove_snapshot(check.ref)
            result.removed_snapshots.append(str(check.ref))
        if events:
            events.emit("L2_AUDIT", outcome="QUARANTINED", model=check.ref.model, component=check.ref.component,
                        version=check.ref.version, file=check.path, reason=check.reason)
    if events:
        events.emit("L2_AUDIT", outcome="OK" if plan.ok else "REPAIRED", blobs_checked=len(plan.checks),
                    corrupt=len(plan.corrupt))
    return result
