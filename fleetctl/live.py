"""`warmfleet warm` / `retire` from the operator's seat: pick the workers, send the control command, wait for them.

The workers do the work between two jobs (workers/live.py); this side checks what it can before anything is sent
(an unknown release, a release still routed, declared prewarm, pinned or with jobs waiting) and reports each worker in one line.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from cachemgr import Archive, Release
from cachemgr.names import InvalidName, queue_for
from fleetstate.catalog import describe_missing, unarchived
from fleetstate.live import reasons_to_keep
from fleetstate.queues import queue_depth
from fleetstate.registry import WarmRegistry, WorkerState
from fleetstate.routes import RouteTable
from tasks.prewarm import RETIRE_COMMAND, WARM_COMMAND, send_command

ANSWER_SECONDS = 60.0
"""How long a worker may take to answer: a solo-pool worker reads control commands between two jobs, so at least
one long job (a command sent meanwhile is still run when the job ends, answered or not)."""


class LiveRefused(ValueError):
    """A warm or retire refused before or by the workers: the message is one line."""


@dataclass
class LiveOutcome:
    release: str
    done: dict[str, float] = field(default_factory=dict)  # worker → seconds from the command to warm (or retired)
    refused: dict[str, str] = field(default_factory=dict)  # worker → its one line
    failed: dict[str, str] = field(default_factory=dict)  # worker → why its load failed (it serves what it did)
    states: dict[str, WorkerState] = field(default_factory=dict)


def _parse(release: str) -> Release:
    try:
        return Release.parse(release)
    except InvalidName as exc:
        raise LiveRefused(str(exc)) from None


def _targets(registry: WarmRegistry, on: list[str], everywhere: bool, serving: str | None = None) -> list[str]:
    live = [w for w in registry.workers() if w.state == "warm"]
    if everywhere:
        names = [w.worker for w in live if serving is None or serving in w.releases]
    elif on:
        known = {w.worker: w for w in live}
        names = []
        for name in on:
            full = name if name in known else next((w for w in known if w.split("@", 1)[0] == name), None)
            if full is None:
                raise LiveRefused(f"no warm worker named {name!r}; `warmfleet status` lists them")
            names.append(full)
    else:
        raise LiveRefused("name the workers: --on WORKER (repeatable) or --everywhere")
    if not names:
        raise LiveRefused("no warm worker to send it to" + (f" (none serves {serving})" if serving else ""))
    return names


def _wait(registry: WarmRegistry, outcome: LiveOutcome, ticket: str, pending: list[str], started: float,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pending:
        for name in list(pending):
            state = registry.worker(name)
            if state is not None and state.warm_ticket == ticket:
                pending.remove(name)
                outcome.states[name] = state
                if state.warm_error:
                    outcome.failed[name] = state.warm_error
                else:
                    outcome.done[name] = time.monotonic() - started
        if pending and time.monotonic() > deadline:
            for name in pending:
                outcome.failed[name] = f"not done after {timeout:g}s; see `warmfleet status` and its log"
            return
        time.sleep(0.01)


def warm(app: Any, client: redis.Redis, archive: Archive, release: str, on: list[str] = (), everywhere: bool = False,
         timeout: float = 300.0) -> LiveOutcome:
    """Every targeted worker on the release's base syncs its LoRA into L2, loads it between jobs and announces."""
    rel = _parse(release)
    missing = unarchived(client, rel, archive)  # the catalog learns what the archive said
    if missing:
        raise LiveRefused(f"unknown release {rel}: {describe_missing(rel, missing)}")
    registry = WarmRegistry(client)
    workers = _targets(registry, list(on), everywhere)
    return _run(app, registry, WARM_COMMAND, str(rel), workers, timeout)


def retire(app: Any, client: redis.Redis, release: str, on: list[str] = (), everywhere: bool = False,
           force: bool = False, timeout: float = 120.0, confirm: Callable[[str], bool] | None = None) -> LiveOutcome:
    """Targeted workers stop consuming the release's queue and delete its adapter; refused while it must stay.

    With `force`, a retire that leaves a routed release (or its waiting jobs) with no warm worker is put to
    `confirm` with what it leaves unserved, and refused unless it answers yes."""
    rel = str(_parse(release))
    reasons = reasons_to_keep(client, rel)
    if reasons and not force:
        raise LiveRefused(f"refusing to retire {rel}: {'; '.join(reasons)}; promote or roll back first, or --force")
    registry = WarmRegistry(client)
    if not registry.is_warm(rel):
        raise LiveRefused(f"no worker serves {rel}; nothing to retire")
    workers = _targets(registry, list(on), everywhere, serving=rel if everywhere else None)
    unserved = _left_unserved(client, registry, rel, workers, reasons)
    if unserved and not (confirm is not None and confirm(unserved)):
        raise LiveRefused(f"not retired: {unserved}")
    return _run(app, registry, RETIRE_COMMAND, rel, workers, timeout)


def _left_unserved(client: redis.Redis, registry: WarmRegistry, release: str, workers: list[str],
                   reasons: list[str]) -> str | None:
    """What a retire from `workers` would leave unserved, in one line; None if a worker stays warm on the release,
    or no job would be left waiting (nothing routes new jobs to it and none is queued for it)."""
    remaining = set(registry.warm_workers(release).get(release, [])) - set(workers)
    if remaining or not reasons:
        return None
    rel = Release.parse(release)
    route = RouteTable(client).get(rel.model)
    roles = [role for role, routed in route.referenced() if routed == release]
    effects = []
    if "active" in roles:
        effects.append(f"every new job of {rel.model} will wait unserved (it is the active release)")
    if "canary" in roles:
        effects.append(f"{route.canary_weight:g}% of new jobs of {rel.model} will wait unserved (it is the canary)")
    if "previous" in roles:
        effects.append(f"`warmfleet rollback {rel.model}` will pass over it")
    waiting = queue_depth(client, queue_for(release))
    if waiting:
        effects.append(f"{waiting} job(s) already queued for it will wait (`warmfleet move-queued {release} <release>`)")
    if not ({"active", "canary"} & set(roles) or waiting):
        return None  # no job left unserved (a rollback target, a pin, a prewarm): --force is answer enough
    return f"retiring {release} from {', '.join(workers)} leaves no worker warm on it: {'; '.join(effects)}"


def _run(app: Any, registry: WarmRegistry, command: str, release: str, workers: list[str], timeout: float) -> LiveOutcome:
    ticket = uuid.uuid4().hex
    started = time.monotonic()
    outcome = LiveOutcome(release)
    answers = send_command(app, command, release, ticket, workers, timeout=min(timeout, ANSWER_SECONDS))
    accepted = []
    for name, answer in answers.items():
        if "refused" in answer or "ok" not in answer:
            outcome.refused[name] = str(answer.get("refused") or answer.get("error") or answer)
        else:
            accepted.append(name)
    _wait(registry, outcome, ticket, accepted, started, timeout)
    return outcome
