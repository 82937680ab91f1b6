"""`warmfleet promote | rollback | routes | status`: version switching by queue routing, from the operator's seat.

Registered on the main group by `fleetctl/cli/main.py`. It imports `cli_common`, never `fleetctl.cli`: under
`python -m fleetctl.cli` that module runs as `__main__`, and importing it by name would build a second CLI.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import socket
from collections.abc import Callable
from typing import Any

import click

from cachemgr.events import human_bytes

from .common import _archive, _settings
from .common import _redis as _broker
from .common import friendly as _common_friendly


def _redis(ctx: click.Context) -> Any:
    return _broker(_settings(ctx))


def _actor() -> str:
    """Who made a route change, for `routes history`: the operator's login on this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The shared friendly errors, plus route changes refused with a reason: one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fleetstate.rollout import RouteRefused
        from fleetstate.routes import RouteError

        try:
            return fn(*args, **kwargs)
        except (RouteError, RouteRefused) as exc:
            raise click.ClickException(str(exc)) from None

    return _common_friendly(wrapper)


@click.command()
@click.argument("model")
@click.argument("release")
@click.option("--canary", type=click.FloatRange(0, 100), metavar="PERCENT",
              help="send only this share of new jobs to RELEASE (0 ends a canary); without it, promote fully")
@click.option("--force", is_flag=True, help="change the route even with no warm worker for the release yet (never to "
              "a release whose versions the archive lacks)")
@click.option("--analyze", is_flag=True, help="with --canary: step the share up (FLEET_CANARY_STEPS) while the canary's "
              "failures and p95 latency stay within bounds of the active release's, roll back by itself otherwise")
@click.pass_context
@friendly
def promote(ctx: click.Context, model: str, release: str, canary: float | None, force: bool, analyze: bool) -> None:
    """Send new jobs for MODEL to RELEASE (all of them, or a --canary share)."""
    from fleetstate import canary as analysis
    from fleetstate.rollout import promote as promote_route

    if analyze and not canary:
        raise click.ClickException("--analyze needs --canary PERCENT (the first share to watch)")
    client = _redis(ctx)
    if analyze:
        running = analysis.read(client, model)
        if running and running.get("state") == "running":
            raise click.ClickException(f"an analysis of {model} already runs ({running['release']} at "
                                       f"{running['share']}%); wait for it or `warmfleet rollback {model}`")
    change = promote_route(client, model, release, canary=canary, force=force, actor=_actor(),
                           archive=_archive(_settings(ctx)))
    if analyze:
        try:
            state = analysis.start(client, model, release, analysis.Bounds.of(_settings(ctx)))
        except analysis.AnalysisError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{model}: analysing {release}: shares {state['steps']}%, a window of "
                   f"{_settings(ctx).canary_window_s:g}s each (beat's warmfleet.canary_tick; `warmfleet status`)")
    route = change.after
    if route.canary:
        click.echo(f"{model}: canary {route.canary} gets {route.canary_weight:g}% of new jobs; "
                   f"active {route.active} the rest")
    else:
        click.echo(f"{model}: active {route.active} (previous {route.previous or '-'})")
    if change.waiting:
        click.echo(f"forced: {change.waiting}")


@click.command()
@click.argument("model")
@click.option("--to", "to", metavar="RELEASE", help="roll back to this release (any the archive holds) instead of the "
              "newest earlier warm one")
@click.option("--move-queued", is_flag=True, help="also move unpinned jobs queued for the abandoned release")
@click.option("--force", is_flag=True, help="roll back even with no warm worker for the target")
@click.pass_context
@friendly
def rollback(ctx: click.Context, model: str, to: str | None, move_queued: bool, force: bool) -> None:
    """Undo the last route change of MODEL: end a canary, else go back down its route stack to the newest earlier
    release that is warm (never forward: a second rollback goes further back)."""
    from fleetstate.rollout import rollback as rollback_route
    from tasks.requests import is_pinned

    change = rollback_route(_redis(ctx), model, to=to, force=force, move=is_pinned if move_queued else None,
                            actor=_actor(), archive=_archive(_settings(ctx)))
    after = change.after
    click.echo(f"{model}: active {after.active}; no longer routed: {change.abandoned or '-'}")
    if change.skipped:
        click.echo(f"passed over: {', '.join(change.skipped)}")
    if change.waiting:
        click.echo(f"forced: {change.waiting}")
    if change.moved is not None:
        m = change.moved
        click.echo(f"moved {len(m.moved)} queued job(s) from {m.source} to {m.target}; "
                   f"left {len(m.pinned)} pinned, {m.unreadable} unreadable; {m.taken_meanwhile} taken meanwhile")


@click.group(invoke_without_command=True)
@click.pass_context
def routes(ctx: click.Context) -> None:
    """The route table (default: show it) and its history."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(routes_show)


@routes.command("show")
@click.pass_context
@friendly
def routes_show(ctx: click.Context) -> None:
    """Each model's active release, previous release and canary."""
    from fleetstate.routes import RouteTable

    table = RouteTable(_redis(ctx))
    models = table.models()
    if not models:
        click.echo("no routes yet: `warmfleet promote <model> <release>`")
    for model in models:
        route = table.get(model)
        canary = f"{route.canary} {route.canary_weight:g}%" if route.canary else "-"
        click.echo(f"{model:<20} active {route.active}  previous {route.previous or '-'}  canary {canary}")
    for release in table.prewarms():
        click.echo(f"{'prewarm':<20} {release}")


@routes.command("prewarm")
@click.argument("model")
@click.argument("release", required=False)
@click.option("--remove", is_flag=True, help="withdraw the declaration (retention and eviction may take it again)")
@click.pass_context
@friendly
def routes_prewarm(ctx: click.Context, model: str, release: str | None, remove: bool) -> None:
    """Declare RELEASE "warm on its base": with FLEET_AUTO_WARM on, every running worker of that base loads it before
    anyone promotes it; retention keeps it and the adapter budget never evicts it. Without RELEASE: list them."""
    from cachemgr import Release
    from fleetstate.routes import RouteError, RouteTable

    from .common import _archive

    table = RouteTable(_redis(ctx))
    if release is None:
        declared = table.prewarms(model)
        click.echo("\n".join(declared) if declared else f"no prewarm declared for {model}")
        return
    rel = Release.parse(release)
    if rel.model != model:
        raise RouteError(f"{rel} is a release of {rel.model}, not {model}")
    if not remove:
        missing = [str(ref) for ref in rel.refs() if not _archive(_settings(ctx)).has_version(ref)]
        if missing:
            raise RouteError(f"unknown release {rel}: the archive has no {', '.join(missing)}; publish it first")
    changed = table.set_prewarm(rel, on=not remove, actor=_actor())
    if remove:
        click.echo(f"{model}: prewarm {rel} withdrawn" if changed else f"{model}: {rel} was not declared")
    else:
        click.echo(f"{model}: prewarm {rel} declared; with FLEET_AUTO_WARM on, workers of its base load it at the "
                   "next auto-warm tick or node sync" + ("" if changed else " (already declared)"))


@routes.command("history")
@click.argument("model", required=False)
@click.option("-n", "--last", default=20, show_default=True, help="how many changes")
@click.pass_context
@friendly
def routes_history(ctx: click.Context, model: str | None, last: int) -> None:
    """Each model's route stack (what rollback goes back to, newest first), then who changed which route, when, from
    what to what (newest first)."""
    from fleetstate.routes import RouteTable

    table = RouteTable(_redis(ctx))
    for name in [model] if model else table.models():
        stack = table.stack(name)
        click.echo(f"{name}: route stack, newest first ({len(stack)}; `warmfleet rollback {name}` goes down it)")
        for i, entry in enumerate(reversed(stack)):
            click.echo(f"  {'active  ' if i == 0 else '        '}{entry.release:<44} {_when(entry.at)}  "
                       f"{entry.actor:<24} {entry.reason}{'  FORCED' if entry.forced else ''}")
    entries = table.history(model, count=last)
    click.echo("changes, newest first:")
    if not entries:
        click.echo("no route changes recorded")
    for e in entries:
        click.echo(f"{_when(e['ts'])}  {e.get('actor', '?'):<24} {e.get('reason', '?'):<10} {e.get('model')}: "
                   f"{_history_change(e)}{'  FORCED' if e.get('forced') else ''}")


def _when(ts: float) -> str:
    if not ts:
        return f"{'?':<24}"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _history_change(e: dict[str, Any]) -> str:
    """`active A → B`, and the canary when it changed: what a reader of the history asks first."""
    if e.get("prewarm"):
        return f"prewarm {'-' if e.get('reason') == 'prewarm-off' else '+'} {e['prewarm']}"
    before, after = e.get("from") or "-", e.get("to") or "-"
    text = f"active {before} → {after}" if before != after else f"active {after}"
    canary_before, canary_after = e.get("from_canary") or "-", e.get("canary") or "-"
    if canary_before != canary_after:
        text += f"; canary {canary_before} → {canary_after}"
    return text


@click.command()
@click.option("--json", "as_json", is_flag=True, help="the same, as JSON")
@click.pass_context
@friendly
def status(ctx: click.Context, as_json: bool) -> None:
    """Per model: routes, and per release its queue depth, warm workers and the L2 state of its components."""
    from fleetstate.status import fleet_status

    report = fleet_status(_redis(ctx))
    from fleetstate.peerhealth import peer_health, render_peer_line

    report["peers"] = peer_health(_redis(ctx))  # per peer: quarantine, bad pieces, drops, bytes sent, its server
    from fleetstate.canary import analyses

    report["canary_analysis"] = analyses(_redis(ctx))  # each model's canary analysis, running or last finished
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    for stranded in report["stranded"]:
        click.echo(f"STRANDED {_stranded_line(stranded)}")
    for model, info in report["models"].items():
        canary = f"{info['canary']} ({info['canary_weight']:g}% of new jobs)" if info["canary"] else "-"
        click.echo(f"model {model}: active {info['active'] or '-'}  canary {canary}  previous {info['previous'] or '-'}")
        if model in report["canary_analysis"]:
            a = report["canary_analysis"][model]
            click.echo(f"  canary analysis of {a['release']}: {a['state']} at {a['share']}%"
                       f"{'  ' + a['reason'] if a['reason'] else ''}")
        for rel in info["releases"]:
            age = f"  oldest {rel['oldest_s']:.0f}s" if rel["queued"] and rel["oldest_s"] is not None else ""
            click.echo(f"  {rel['release']:<44} {','.join(rel['roles']) or '-':<16} queued {rel['queued']:>5}{age}")
            for w in rel["workers"]:
                age = f"{w['heartbeat_age_s']:.1f}s" if w["heartbeat_age_s"] is not None else "?"
                click.echo(f"      warm  {w['worker']:<28} beat {age:>6}  loads {w['loads']}  jobs {w['jobs']}")
            if not rel["workers"]:
                click.echo("      warm  - (no worker: promote/rollback to it are refused without --force)")
            for node, refs in rel["l2"].items():
                cells = ", ".join(f"{ref.split('/', 1)[1]} {'ok' if ok else 'MISSING'}" for ref, ok in refs.items())
                click.echo(f"      L2 {node}: {cells}")
            if not rel["l2"]:
                click.echo("      L2 unknown: no live worker reports its node's L2")
    _print_workers(report["workers"])
    for node, sync in report.get("sync_bytes", {}).items():
        click.echo(f"sync {node}: from_peers={human_bytes(sync['peers'])} from_l3={human_bytes(sync['l3'])}"
                   f"  peer server {sync['peer_server'] or '-'}")
    for peer, info in report["peers"].items():  # peers in trouble only
        if info["trouble"]:
            click.echo(render_peer_line(peer, info))


def _stranded_line(row: dict[str, Any]) -> str:
    from fleetstate.status import StrandedQueue

    return StrandedQueue(**row).line()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _print_workers(rows: list[dict[str, Any]]) -> None:
    click.echo(f"{'worker':<28} {'state':<8} {'loads':>5} {'jobs':>6} {'beat':>6}  {'device':<8} "
               f"{'memory GiB (alloc/resv/peak/total, L1)':<40} releases")
    for w in rows:
        age = f"{w['heartbeat_age_s']:.1f}s" if w["heartbeat_age_s"] is not None else "?"
        m = w.get("memory") or {}
        memory = (f"{_gib(m.get('mem_allocated', 0))}/{_gib(m.get('mem_reserved', 0))}/{_gib(m.get('mem_peak', 0))}/"
                  f"{_gib(m.get('mem_total', 0))}, L1 {_gib(m.get('l1_bytes', 0))}")
        reason = f"  {'reason' if w['state'] == 'sick' else 'error'}: {w['error']}" if w["error"] else ""
        click.echo(f"{w['worker']:<28} {w['state']:<8} {w['loads']:>5} {w['jobs']:>6} {age:>6}  "
                   f"{w.get('device') or '?':<8} {memory:<40} {', '.join(w['releases'])}{reason}")
        if w.get("warm_error"):
            click.echo(f"{'':<28} last warm failed: {w['warm_error']}")


def register(group: click.Group) -> None:
    """Add these commands to the `warmfleet` group."""
    from .review import review  # `warmfleet review A B`: registered here while main.py's module list is being edited

    for command in (promote, rollback, routes, status, review):
        group.add_command(command)
