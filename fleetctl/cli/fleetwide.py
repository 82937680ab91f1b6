"""`warmfleet sync --fleet` / `audit --fleet`: the same fan-out beat sends, then each node's outcome as it comes."""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from tasks.settings import FleetSettings

from .common import _redis


def run_fleetwide(settings: FleetSettings, name: str, kwargs: dict, timeout: float,
                  echo: Callable[[str], None] = click.echo) -> int:
    """Trigger the fleet-wide `name` run (sync or audit) and follow it; 0 when every node answered ok."""
    from beat_schedule import AUDIT_FLEET_TASK, MAINTENANCE_QUEUE, SYNC_FLEET_TASK
    from fleetstate.fanout import PENDING, FanOutRuns
    from fleetstate.nodes import NodeRegistry
    from tasks import app, configure

    client = _redis(settings)
    if not NodeRegistry(client).nodes():
        raise click.ClickException("no node has registered: start a maintenance worker (`warmfleet maintenance-worker`)")
    if app.conf.broker_url != settings.resolved_broker_url:
        configure(settings)
    task = {"sync": SYNC_FLEET_TASK, "audit": AUDIT_FLEET_TASK}[name]
    answer = app.send_task(task, kwargs=kwargs, queue=MAINTENANCE_QUEUE).get(timeout=timeout)
    if "skipped" in answer:
        echo(f"not sent again: {answer['skipped']}")
    runs = FanOutRuns(client)
    run = runs.current(name)
    if run is None:
        raise click.ClickException(f"no fleet-wide {name} run recorded; is the maintenance worker current?")
    echo(f"{name} run {run.run}: sent to {len(run.nodes)} node(s): {', '.join(run.nodes)}")
    shown: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        run = runs.current(name) or run
        done = [n for n, s in run.nodes.items() if s.get("state") not in PENDING]
        for node, state in run.nodes.items():
            line = f"{state.get('state')} {state.get('detail', '')}".strip()
            if shown.get(node) != line:
                shown[node] = line
                echo(f"[{len(done)}/{len(run.nodes)}] {node}: {line}")
        if len(done) == len(run.nodes) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    waiting = [n for n in run.nodes if n not in done]
    failed = run.failed()
    ok = len(done) - len(failed)
    echo(f"{name}: {ok} node(s) ok, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
         + (f", {len(waiting)} not answered after {timeout:.0f}s ({', '.join(waiting)})" if waiting else ""))
    return 1 if failed or waiting else 0
