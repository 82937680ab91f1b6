"""Retention in L3 and L2: keep the newest N versions of each component plus anything protected, retire the rest.

Plan, then execute (as huggingface_hub's cache deletion does): the plan is a frozen value an operator can read
before anything is deleted, and execution re-checks protection because a route may have moved meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .archive.base import Archive, VersionNotFound
from .names import ComponentRef, version_sort_key
from .store import SnapshotStore

DEFAULT_KEEP = 5


@dataclass(frozen=True)
class KeptVersion:
    version: str
    reason: str
    """e.g. "latest 5", "protected: routed", or both joined by "; "."""


@dataclass(frozen=True)
class ComponentPlan:
    model: str
    component: str
    keep: tuple[KeptVersion, ...]
    delete: tuple[str, ...]
    """Oldest first, the order `execute` deletes in."""

    def refs_to_delete(self) -> list[ComponentRef]:
        return [ComponentRef(self.model, self.component, v) for v in self.delete]


@dataclass(frozen=True)
class RetentionPlan:
    keep_last: int
    components: tuple[ComponentPlan, ...]

    @property
    def to_delete(self) -> tuple[ComponentRef, ...]:
        return tuple(ref for c in self.components for ref in c.refs_to_delete())

    @property
    def kept(self) -> dict[ComponentRef, str]:
        return {ComponentRef(c.model, c.component, k.version): k.reason for c in self.components for k in c.keep}

    def describe(self) -> str:
        """One line per version: what stays and why, what goes."""
        lines = []
        for c in self.components:
            for k in c.keep:
                lines.append(f"keep   {c.model}/{c.component}/{k.version}  ({k.reason})")
            for v in c.delete:
                lines.append(f"delete {c.model}/{c.component}/{v}")
        return "\n".join(lines)


def _protection(protected: Mapping[ComponentRef, str] | Iterable[ComponentRef], prefix: str = "protected: ",
                ) -> dict[ComponentRef, str]:
    """Protected refs with the reason each is kept (a plain iterable of refs: just "protected")."""
    if isinstance(protected, Mapping):
        return {ref: f"{prefix}{why}" if why else "protected" for ref, why in protected.items()}
    return {ref: "protected" for ref in protected}


def plan_retention(
    archive: Archive,
    keep: int = DEFAULT_KEEP,
    protected: Mapping[ComponentRef, str] | Iterable[ComponentRef] = (),
) -> RetentionPlan:
    """Which published versions to keep and which to delete; reads listings only, changes nothing.

    `protected` holds versions that a route, a warm worker or a pin refers to: a set, or a mapping to the
    reason ("routed", "warm", "pinned") to show in the plan. They are kept whatever their age.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (got {keep}): retention never deletes the newest version")
    guard = _protection(protected)
    plans = []
    for model in archive.list_models():
        for component in archive.list_components(model):
            versions = archive.list_versions(model, component)
            latest = set(versions[-keep:])
            kept, doomed = [], []
            for version in versions:
                reasons = []
                if version in latest:
                    reasons.append(f"latest {keep}")
                why = guard.get(ComponentRef(model, component, version))
                if why:
                    reasons.append(why)
                if reasons:
                    kept.append(KeptVersion(version, "; ".join(reasons)))
                else:
                    doomed.append(version)
            if versions:
                plans.append(ComponentPlan(model, component, tuple(kept), tuple(doomed)))
    return RetentionPlan(keep, tuple(plans))


def execute(
    plan: RetentionPlan,
    archive: Archive,
    protected: Mapping[ComponentRef, str] | Iterable[ComponentRef] = (),
) -> list[ComponentRef]:
    """Delete the plan's versions, oldest first; skip any that became protected since planning.

    Returns what was deleted. A version already gone (another node ran retention) is not an error.
    """
    guard = _protection(protected)
    deleted = []
    for ref in plan.to_delete:
        if ref in guard or ref in plan.kept:
            continue
        try:
            archive.delete_version(ref)
        except VersionNotFound:
            continue
        deleted.append(ref)
    return deleted


def plan_retention_l2(store: SnapshotStore, keep: int,
                      protected: Mapping[ComponentRef, str] | Iterable[ComponentRef] = ()) -> tuple[tuple, tuple]:
    """L2: per component, the newest `keep` versions and every protected one stay; the rest retire."""
    guard = _protection(protected, prefix="")
    by_component: dict[tuple[str, str], list[ComponentRef]] = {}
    for ref in store.refs():
        by_component.setdefault((ref.model, ref.component), []).append(ref)
    kept: list[tuple[ComponentRef, str]] = []
    retire: list[ComponentRef] = []
    for refs in by_component.values():
        refs.sort(key=lambda r: version_sort_key(r.version))
        newest = set(refs[-keep:]) if keep > 0 else set()
        for ref in refs:
            if ref in guard:
                kept.append((ref, guard[ref]))
            elif ref in newest:
                kept.append((ref, f"latest {keep}"))
            else:
                retire.append(ref)
    return tuple(kept), tuple(retire)
