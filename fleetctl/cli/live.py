"""`warmfleet warm | retire`: a new LoRA version goes live on running workers, and an old one leaves them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from .common import _archive, _redis, _settings, friendly


def _refusals(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fleetctl.live import LiveRefused

        try:
            return fn(*args, **kwargs)
        except LiveRefused as exc:
            raise click.ClickException(str(exc)) from None

    return friendly(wrapper)


def _app(ctx: click.Context) -> Any:
    from tasks import app, configure

    configure(_settings(ctx))
    return app


def _report(outcome: Any, verb: str, adapter: str = "") -> None:
    for name, seconds in outcome.done.items():
        state = outcome.states.get(name)
        memory = (f"; the worker's LoRA layers now {state.lora_params} params, {state.lora_bytes} B in all"
                  if state else "")
        click.echo(f"{name}: {verb} {outcome.release}{adapter} in {seconds * 1000:.0f} ms "
                   f"(loads {state.loads if state else '?'}{memory})")
    for name, line in outcome.refused.items():
        click.echo(f"{name}: refused: {line}", err=True)
    for name, line in outcome.failed.items():
        click.echo(f"{name}: failed: {line}", err=True)
    if not outcome.done:
        sys.exit(1)


@click.command()
@click.argument("release")
@click.option("--on", "on", multiple=True, metavar="WORKER", help="a worker to warm (repeatable)")
@click.option("--everywhere", is_flag=True, help="every warm worker on the release's base")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for the workers")
@click.pass_context
@_refusals
def warm(ctx: click.Context, release: str, on: tuple[str, ...], everywhere: bool, timeout: float) -> None:
    """Load RELEASE's LoRA on running workers of its base, between two jobs; they then consume its queue."""
    from fleetctl.live import warm as warm_release

    settings = _settings(ctx)
    archive = _archive(settings)
    outcome = warm_release(_app(ctx), _redis(settings), archive, release, list(on), everywhere, timeout)
    _report(outcome, "warm on", _adapter_text(archive, release))


@click.command()
@click.argument("release")
@click.option("--on", "on", multiple=True, metavar="WORKER", help="a worker to retire it from (repeatable)")
@click.option("--everywhere", is_flag=True, help="every worker that serves it")
@click.option("--force", is_flag=True, help="retire even while routed, pinned or with jobs waiting (asks first when "
              "that leaves it with no warm worker)")
@click.option("--yes", is_flag=True, help="with --force: do not ask, retire even when that leaves jobs unserved")
@click.option("--timeout", default=120.0, show_default=True)
@click.pass_context
@_refusals
def retire(ctx: click.Context, release: str, on: tuple[str, ...], everywhere: bool, force: bool, yes: bool,
           timeout: float) -> None:
    """Stop serving RELEASE on workers: cancel its queue consumer and free its adapter's memory."""
    from fleetctl.live import retire as retire_release

    def confirm(unserved: str) -> bool:
        click.echo(f"warning: {unserved}", err=True)
        if yes:
            return True
        try:
            return click.confirm("retire it anyway?", default=False, err=True)
        except click.Abort:
            raise click.ClickException("not retired: no answer; pass --yes to retire anyway") from None

    settings = _settings(ctx)
    outcome = retire_release(_app(ctx), _redis(settings), release, list(on), everywhere, force, timeout,
                             confirm=confirm)
    _report(outcome, "retired")


def _adapter_text(archive: Any, release: str) -> str:
    """` (its LoRA v2.4.0: 1.2 MB)`: the new adapter's own size, from its manifest."""
    from cachemgr import Release
    from cachemgr.events import human_bytes

    try:
        refs = [ref for ref in Release.parse(release).refs() if ref.component == "lora"]
        return "".join(f" (its LoRA {ref.version}: {human_bytes(archive.read_manifest(ref).total_size)})" for ref in refs)
    except Exception:  # a size we could not read must not hide that the warm succeeded
        return ""


def register(group: click.Group) -> None:
    for command in (warm, retire):
        group.add_command(command)
