"""`warmfleet move-queued FROM TO`: jobs waiting on one release's queue go to another's, at any time, task ids kept.

What `rollback --move-queued` does at the moment of a rollback, for whenever an operator finds jobs stranded (`warmfleet
status` lists them): on a release nothing serves any more, forced onto a cold one, pinned to one that was retired.
"""

from __future__ import annotations

import click

from .common import _archive, _redis, _settings, friendly


@click.command("move-queued")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@click.option("--include-pinned", is_flag=True,
              help="move jobs pinned to FROM too, re-pinned to TO (their results then name TO)")
@click.option("--force", is_flag=True, help="move even when no worker is warm on TO yet (they wait there instead)")
@click.pass_context
@friendly
def move_queued_cmd(ctx: click.Context, source: str, target: str, include_pinned: bool, force: bool) -> None:
    """Move the jobs waiting for release FROM onto the queue of release TO, keeping their task ids and order.

    TO must be a release of the same model whose versions the archive holds, with a warm worker (or --force). Jobs
    pinned to FROM stay unless --include-pinned; jobs held by dead workers move too."""
    from cachemgr import Release
    from cachemgr.names import queue_for
    from fleetstate.catalog import describe_missing, unarchived
    from fleetstate.queues import move_queued, queue_depth
    from fleetstate.registry import WarmRegistry
    from tasks.requests import is_pinned, repinned

    src, dst = Release.parse(source), Release.parse(target)
    if src == dst:
        raise click.ClickException(f"FROM and TO are the same release ({src}); name another release to move to")
    if src.model != dst.model:
        raise click.ClickException(f"{dst} is a release of {dst.model}, the jobs of {src} are for {src.model}; "
                                   f"move them to a release of {src.model}")
    settings = _settings(ctx)
    client = _redis(settings)
    missing = unarchived(client, dst, _archive(settings))
    if missing:
        raise click.ClickException(f"refusing to move jobs to {dst}: {describe_missing(dst, missing)}")
    if not WarmRegistry(client).is_warm(str(dst)) and not force:
        raise click.ClickException(f"refusing to move jobs to {dst}: no worker is warm on it, so they would wait there "
                                   f"too; start one (`warmfleet worker --release {dst}`) or pass --force")
    report = move_queued(client, str(src), str(dst), is_pinned, repin=repinned if include_pinned else None)
    click.echo(f"moved {len(report.moved)} job(s) from {src} to {dst}, task ids kept"
               + (f" ({len(report.repinned)} re-pinned to {dst})" if report.repinned else "")
               + (f" ({len(report.moved_unacked)} held by dead workers)" if report.moved_unacked else ""))
    left = queue_depth(client, queue_for(src))
    if report.pinned or report.unreadable or left:
        click.echo(f"left on {src}: {len(report.pinned)} pinned to it (--include-pinned moves them), "
                   f"{report.unreadable} unreadable; {left} still queued there")
    if not WarmRegistry(client).is_warm(str(dst)):
        click.echo(f"forced: no worker is warm on {dst}; the moved jobs wait in {queue_for(dst)} until one is")


def register(group: click.Group) -> None:
    group.add_command(move_queued_cmd)
