"""Promote, canary and rollback: route changes that only ever point jobs at releases the archive holds and some
worker holds warm (`--force` waives the second only, and says what will wait).

A route flip costs one Redis transaction and a pub/sub message; no worker loads or restarts. The guards against
flipping to a release nobody serves, and the rollback rule (back down the model's route stack to the newest earlier
warm release, never forward), live here, so the CLI and any other caller share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr.names import Release, queue_for

from .catalog import describe_missing, unarchived
from .queues import MoveReport, PinnedTest, move_queued, queue_depth
from .registry import WarmRegistry
from .routes import Route, RouteError, RouteTable


class RouteRefused(RuntimeError):
    """A route change refused because the jobs it sends could not be served; the message says the fix."""


@dataclass
class RouteChange:
    before: Route
    after: Route
    forced: bool = False
    abandoned: str | None = None  # the release jobs no longer go to (rollback)
    moved: MoveReport | None = None
    waiting: str | None = None  # forced onto a release no worker serves: what will wait, and for what
    skipped: list[str] = field(default_factory=list)  # rollback: earlier releases passed over, with the reason


def _require_archived(client: redis.Redis, release: str, archive: Any, action: str) -> None:
    """Never route to a release whose components the archive does not hold: no worker could ever load it, so
    `--force` does not waive this."""
    missing = unarchived(client, release, archive)
    if missing:
        raise RouteRefused(f"refusing to {action} {release}: {describe_missing(release, missing)}; "
                           "--force does not route to versions no worker could load")


def _require_warm(client: redis.Redis, release: str, force: bool, action: str) -> str | None:
    """None when a worker is warm on `release`; with `force`, what will wait for one (refused without it)."""
    if WarmRegistry(client).is_warm(release):
        return None
    if force:
        waiting = queue_depth(client, queue_for(release))
        return (f"no worker is warm on {release}: {waiting} job(s) already queued for it and every new job routed "
                f"to it wait in {queue_for(release)} until one is (`warmfleet worker --release {release}`, or "
                f"`warmfleet warm {release} --everywhere` on workers of its base); `warmfleet status` shows their age")
    raise RouteRefused(
        f"refusing to {action} {release}: no warm worker serves it, so its jobs would wait. Start one "
        f"(`warmfleet worker --release {release}`) and wait until `warmfleet status` shows it warm, or pass --force"
    )


def promote(client: redis.Redis, model: str, release: str, canary: float | None = None, force: bool = False,
            actor: str = "cli", archive: Any = None) -> RouteChange:
    """`release` becomes active (ending any canary), or with `canary` gets that percentage of new jobs.

    Refused when the archive lacks one of its components (asked of `archive`, else of the catalog), and when no
    worker is warm on it unless `force`; a forced change says what will wait (`RouteChange.waiting`)."""
    rel = Release.parse(release)
    if rel.model != model:
        raise RouteError(f"{rel} is not a release of {model}")
    table = RouteTable(client)
    before = table.get(model)
    if canary is not None and canary <= 0:
        return RouteChange(before, table.clear_canary(model, actor=actor, reason="canary-off"))
    action = "canary" if canary is not None else "promote"
    _require_archived(client, str(rel), archive, action)
    waiting = _require_warm(client, str(rel), force, action)
    forced = waiting is not None
    if canary is not None:
        after = table.set_canary(rel, canary, actor=actor, forced=forced)
    else:
        after = table.set_active(rel, actor=actor, reason="promote", forced=forced)
    return RouteChange(before, after, forced=forced, waiting=waiting)


def rollback(client: redis.Redis, model: str, to: str | None = None, force: bool = False,
             move: PinnedTest | None = None, actor: str = "cli", archive: Any = None) -> RouteChange:
    """Undo: drop a running canary; else go back down the model's route stack to the newest earlier release that
    the archive holds and a worker is warm on (with `force`, the newest the archive holds), or to `to`.

    A rollback only ever goes back: the releases above its target are dropped from the stack, so a second rollback
    goes further back. With `move` (the test that tells a pinned job, `tasks.requests.is_pinned`), unpinned jobs
    already queued for the abandoned release are moved to the target's queue, keeping their task ids."""
    table = RouteTable(client)
    before = table.get(model)
    if not before.active:
        raise RouteError(f"{model} has no active release to roll back from; `warmfleet promote {model} <release>`")
    skipped: list[str] = []
    waiting = None
    if before.canary and to is None:
        target, abandoned = before.active, before.canary
        waiting = _require_warm(client, str(target), force, "roll back to")
        after = table.clear_canary(model, actor=actor, reason="rollback")
    else:
        if to:
            target = str(Release.parse(to))
            if Release.parse(target).model != model:
                raise RouteError(f"{target} is not a release of {model}")
            _require_archived(client, target, archive, "roll back to")
        else:
            target, skipped = _rollback_target(client, table, model, force, archive)
        abandoned = before.active
        waiting = _require_warm(client, target, force, "roll back to")
        after = table.rewind(target, actor=actor, reason="rollback", forced=waiting is not None)
    moved = move_queued(client, abandoned, str(target), move) if move and abandoned and abandoned != target else None
    return RouteChange(before, after, forced=waiting is not None, abandoned=abandoned, moved=moved, waiting=waiting,
                       skipped=skipped)


def _rollback_target(client: redis.Redis, table: RouteTable, model: str, force: bool,
                     archive: Any) -> tuple[str, list[str]]:
    """The newest release below the top of the stack that the archive holds and a worker is warm on (with `force`,
    the newest the archive holds), and the newer ones passed over with why."""
    stack = table.stack(model)
    earlier = [entry.release for entry in reversed(stack[:-1]) if entry.release != (stack[-1].release if stack else "")]
    if not earlier:
        raise RouteError(f"{model} has no earlier release to roll back to; see `warmfleet routes history {model}`")
    registry = WarmRegistry(client)
    skipped, cold = [], None
    for release in dict.fromkeys(earlier):
        if unarchived(client, release, archive):
            skipped.append(f"{release} (not in the archive)")
        elif registry.is_warm(release):
            return release, skipped
        else:
            cold = cold or release
            skipped.append(f"{release} (no warm worker)")
    if force and cold:
        return cold, [s for s in skipped if not s.startswith(cold + " ")]
    hint = "; pass --force to route to the newest one the archive holds anyway" if cold else ""
    raise RouteRefused(f"refusing to roll back {model}: no earlier release is warm and in the archive "
                       f"({', '.join(skipped)}); start a worker for one, or `warmfleet rollback {model} --to RELEASE`"
                       f"{hint}")


from .status import fleet_status  # noqa: E402,F401  (status was first written here; callers still import it)
