"""Declared prewarms made real: a release declared with `warmfleet routes prewarm` is loaded on every running worker
of its base before anyone promotes it (opt-in: FLEET_AUTO_WARM), by the warm command `warmfleet warm` sends.

Run on beat's auto-warm tick (every worker of the fleet) and after each node's sync (that node's workers). The
workers do the work between two jobs (workers/live.py); this side only picks them and sends the command.
"""

from __future__ import annotations

from typing import Any

import redis

from beat_schedule import AUTO_WARM_TASK
from cachemgr import Release
from fleetstate.live import base_key
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable

from .app import app
from .settings import FleetSettings

WARM_COMMAND = "fleet_warm"  # workers/live.py's control commands, by the names Celery gives them
RETIRE_COMMAND = "fleet_retire"
AUTO_TICKET = "auto:{release}"
"""The ticket of an auto-warm: a worker whose last request was this one and failed is not sent it again."""


def send_command(app: Any, command: str, release: str, ticket: str, workers: list[str],
                 timeout: float) -> dict[str, dict]:
    """Send a live-adapter control command to `workers`; worker → its answer (a refusal when it did not answer)."""
    replies = app.control.broadcast(command, arguments={"release": release, "ticket": ticket}, destination=workers,
                                    reply=True, timeout=timeout, limit=len(workers))
    answers = {name: answer for reply in replies or [] for name, answer in reply.items()}
    return {name: answers.get(name, {"refused": f"{name} did not answer within {timeout:g}s"}) for name in workers}


def missing_prewarms(client: redis.Redis, node: str | None = None) -> dict[str, list[str]]:
    """Declared release → the warm workers (of `node`, or all) that serve its base but not it yet."""
    workers = [w for w in WarmRegistry(client).workers() if w.state == "warm" and (node is None or w.node == node)]
    missing: dict[str, list[str]] = {}
    for release in RouteTable(client).prewarms():
        key = base_key(Release.parse(release))
        for w in workers:
            if release in w.releases or not any(base_key(Release.parse(r)) == key for r in w.releases):
                continue
            if w.warm_ticket == AUTO_TICKET.format(release=release) and w.warm_error:
                continue  # it failed on this worker: `warmfleet status` says why; an operator's warm retries
            missing.setdefault(release, []).append(w.worker)
    return missing


def auto_warm(settings: FleetSettings, node: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Send the warm command for every declared prewarm a running worker of its base lacks; release → worker →
    its answer. Nothing is sent while FLEET_AUTO_WARM is off. A worker answers between two jobs; one that does not
    within `timeout` still runs the command when its job ends."""
    if not settings.auto_warm:
        return {"skipped": "FLEET_AUTO_WARM is off"}
    url = settings.resolved_broker_url
    if not url:
        return {"skipped": "no broker"}
    sent: dict[str, Any] = {}
    for release, workers in missing_prewarms(settings.state_client(), node).items():
        answers = send_command(app, WARM_COMMAND, release, AUTO_TICKET.format(release=release), workers, timeout)
        sent[release] = {name: answer.get("ok") or answer.get("refused") or str(answer)
                         for name, answer in answers.items()}
    return sent


@app.task(name=AUTO_WARM_TASK)
def auto_warm_fleet() -> dict[str, Any]:
    """Beat's auto-warm tick: every running worker of the fleet."""
    return auto_warm(app.fleet_settings)  # type: ignore[attr-defined]
