"""`warmfleet health`: exit 0 only when this host's worker is warm in the registry.

The container HEALTHCHECK and the Kubernetes probes run it, so "healthy" means what the fleet means by
ready: the pipeline is loaded and the worker announces itself warm with a live heartbeat.
Registered on the main group by `fleetctl/cli/main.py`; like `cli_routing`, it does not import `fleetctl.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click

from fleetstate.registry import WarmRegistry, WorkerState
from tasks.settings import FleetSettings, load_settings

PROBE_TIMEOUT_SECONDS = 5.0


def _mine(state: WorkerState, node: str, worker: str | None) -> bool:
    return state.worker == worker if worker else state.node == node


def unhealthy_reason(registry: WarmRegistry, node: str, worker: str | None = None,
                     releases: Iterable[str] = ()) -> str | None:
    """Why this host's worker is not warm, or None when it is.

    `worker` is a full worker name (`gpu@node`); without it every worker registered from `node` counts,
    and each one must be warm. Each worker must be warm on all the releases it serves, and on `releases`.
    """
    states = [s for s in registry.workers() if _mine(s, node, worker)]
    if not states:
        who = f"worker {worker}" if worker else f"any worker on {node}"
        return f"no record of {who}: not started yet, or its heartbeat expired"
    warm = registry.warm_workers()
    for s in states:
        if s.state != "warm":
            return f"{s.worker} is {s.state}" + (f": {s.error}" if s.error else "")
        cold = [r for r in s.releases if s.worker not in warm.get(r, [])]
        if cold:
            return f"{s.worker} is not warm on {', '.join(cold)}"
    for release in releases:
        if not any(s.worker in warm.get(release, []) for s in states):
            return f"no worker of this host is warm on {release}"
    return None


@click.command()
@click.option("--worker", "name", metavar="NAME",
              help="the worker's --name (default: every worker registered from this host, FLEET_NODE_NAME)")
@click.option("--release", "releases", multiple=True,
              help="also require a warm worker on this release (repeatable; default FLEET_WORKER_RELEASES)")
@click.option("--broker-down-ok", is_flag=True,
              help="exit 0 when the broker cannot be reached: for liveness probes, so that a Redis outage "
                   "does not restart every warm worker")
@click.pass_context
def health(ctx: click.Context, name: str | None, releases: tuple[str, ...], broker_down_ok: bool) -> None:
    """Exit 0 only when this host's worker is warm in the registry (for HEALTHCHECK and probes)."""
    import redis

    from workers.boot import worker_name

    settings: FleetSettings = ctx.ensure_object(dict).get("settings") or load_settings()
    url = settings.resolved_broker_url
    if not url:
        click.echo("unhealthy: no broker configured (FLEET_BROKER_URL)", err=True)
        sys.exit(1)
    full_name = worker_name(settings, [], name) if name else None
    client = settings.state_client(socket_connect_timeout=PROBE_TIMEOUT_SECONDS, socket_timeout=PROBE_TIMEOUT_SECONDS)
    try:
        reason = unhealthy_reason(WarmRegistry(client), settings.node_name, full_name,
                                  list(releases) or settings.worker_releases)
    except redis.RedisError as exc:
        if broker_down_ok:
            click.echo(f"broker unreachable ({exc}); reporting healthy because of --broker-down-ok")
            return
        click.echo(f"unhealthy: cannot reach the broker: {exc}", err=True)
        sys.exit(1)
    finally:
        client.close()
    if reason:
        click.echo(f"unhealthy: {reason}", err=True)
        sys.exit(1)
    click.echo(f"warm: {full_name or 'every worker on ' + settings.node_name}")


def register(group: click.Group) -> None:
    group.add_command(health)
