"""Operator commands for the cache tiers and observability: prune, pin, metrics, cache status."""

from __future__ import annotations

import click

from .common import _archive, _redis, _settings, friendly


@click.command()
@click.option("--dry-run", is_flag=True, help="print the plan, delete nothing")
@click.option("--keep", type=int, help="versions kept per component (default FLEET_RETENTION_KEEP)")
@click.pass_context
@friendly
def prune(ctx: click.Context, dry_run: bool, keep: int | None) -> None:
    """Retention in L3: keep the newest N versions of each component and every routed, warm or pinned one."""
    from cachemgr.retention import execute, plan_retention
    from fleetstate.pins import protected_refs

    settings = _settings(ctx)
    try:
        client = _redis(settings)
        client.ping()
    except Exception:
        raise click.ClickException(
            "cannot read routes, warm workers and pins from the broker, so nothing is safe to delete; "
            "start the fleet or set FLEET_BROKER_URL") from None
    archive = _archive(settings)
    protected = protected_refs(client, settings.worker_releases)
    plan = plan_retention(archive, keep or settings.retention_keep, protected)
    click.echo(plan.describe() or "the archive is empty")
    if dry_run:
        click.echo(f"dry run: {len(plan.to_delete)} version(s) would be deleted")
        return
    deleted = execute(plan, archive, protected_refs(client, settings.worker_releases))
    from fleetstate.catalog import Catalog

    Catalog(client).forget(deleted)  # routing and producers now refuse releases that named them
    click.echo(f"deleted {len(deleted)} version(s)")


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="unpin instead")
@click.pass_context
@friendly
def pin(ctx: click.Context, refs: tuple[str, ...], remove: bool) -> None:
    """Pin component versions (model/component/version) so no tier's retention removes them."""
    from cachemgr.names import ComponentRef, InvalidName
    from fleetstate.pins import Pins

    pins = Pins(_redis(_settings(ctx)))
    for text in refs:
        parts = text.split("/")
        if len(parts) != 3:
            raise InvalidName(f"invalid ref {text!r}: expected model/component/version")
        ref = ComponentRef(*parts)
        (pins.remove if remove else pins.add)(ref)
        click.echo(f"{'unpinned' if remove else 'pinned'} {ref}")


@click.command()
@click.option("--port", type=int, help="default FLEET_METRICS_PORT")
@click.pass_context
@friendly
def metrics(ctx: click.Context, port: int | None) -> None:
    """Serve Prometheus metrics for the whole fleet and evaluate the L3 miss-rate alert."""
    from fleetctl.metrics import serve_metrics

    settings = _settings(ctx)
    _redis(settings)
    click.echo(f"metrics on http://{settings.metrics_address}:{port or settings.metrics_port}/metrics")
    try:
        serve_metrics(settings, port)
    except KeyboardInterrupt:
        pass


@click.command("status")
@click.pass_context
@friendly
def cache_status_cmd(ctx: click.Context) -> None:
    """Fleet-wide hit ratios per tier, as in the CACHE_STATUS event."""
    from fleetstate.stats import FleetStats, cache_status, render_cache_status

    status = cache_status(FleetStats(_redis(_settings(ctx))).snapshot())
    click.echo(f"CACHE_STATUS {render_cache_status(status)}  jobs={status['jobs_served']} "
               f"reused={status['bytes_reused']}B fetched={status['bytes_fetched']}B")


def register(group: click.Group) -> None:
    for command in (prune, pin, metrics):
        group.add_command(command)
    group.commands["cache"].add_command(cache_status_cmd)
