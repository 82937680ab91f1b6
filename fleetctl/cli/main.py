"""`warmfleet`: one CLI for operators. Errors are one line that names what to check, never a traceback."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from tasks.settings import FleetSettings, offline_environment

from .common import _archive, _settings, friendly  # noqa: E402


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """warmfleet: a Celery fleet of GPU workers that keep their model resident."""
    offline_environment()
    _settings(ctx)


# -- the local fleet ---------------------------------------------------------------------------------------


def _default_releases(settings: FleetSettings) -> list[str]:
    from fleetctl.demo.builders import DEMO_RELEASES

    return settings.worker_releases or list(DEMO_RELEASES)


@main.command()
@click.option("--release", "releases", multiple=True, help="a release to start a worker for (repeatable)")
@click.option("--active", help="the release new jobs go to (default: the last one)")
@click.option("--foreground", is_flag=True, help="stay up until Ctrl-C, then stop everything")
@click.option("--no-flower", is_flag=True)
@click.option("--no-beat", is_flag=True)
@click.option("--archive", type=click.Choice(["local", "oss"]), default="local",
              help="L3: a local directory, or the project's OSS-protocol server on loopback (a real oss:// archive)")
@click.option("--gpus", metavar="0,1,…", help="one worker per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES)")
@click.option("--tls", is_flag=True, help="Redis over TLS only (rediss://, certificate verified; FLEET_LOCAL_TLS)")
@click.pass_context
@friendly
def up(ctx: click.Context, releases: tuple[str, ...], active: str | None, foreground: bool, no_flower: bool,
       no_beat: bool, archive: str, gpus: str | None, tls: bool) -> None:
    """Start a local fleet on embedded defaults (private redis, workers, beat, Flower)."""
    from fleetctl.gpus import parse_gpus
    from fleetctl.localfleet import LocalFleet

    settings = _settings(ctx)
    if tls:
        settings = settings.model_copy(update={"local_tls": True})
    fleet = LocalFleet(settings, log=click.echo)
    state = fleet.up(list(releases) or _default_releases(settings), active, flower=not no_flower, beat=not no_beat,
                     archive=archive, gpus=parse_gpus(gpus))
    _print_fleet(state)
    if foreground:
        _wait_for_interrupt(fleet, state)


def _print_fleet(state: Any) -> None:
    from fleetctl.localfleet import redacted

    click.echo(f"fleet up: broker {redacted(state.broker_url)} (password in the state file, mode 0600)")
    if state.flower_url:
        click.echo(f"  flower   {state.flower_url}")
    if state.metrics_url:
        click.echo(f"  metrics  {state.metrics_url}")
    if getattr(state, "api_url", None):
        click.echo(f"  api      {state.api_url}  (keys: `warmfleet api-key add <client>`)")
    if getattr(state, "roles", None):
        click.echo(f"  roles    {', '.join(sorted(state.roles))}: each process logs in as its own (URLs in the state "
                   "file)")
    if state.archive_url:
        click.echo(f"  archive  {state.archive_url} at {state.oss['endpoint'] if state.oss else ''}")
    for p in state.procs:
        click.echo(f"  {p.name:<12} pid {p.pid:<8} log {p.log}")


def _wait_for_interrupt(fleet: Any, state: Any) -> None:
    click.echo("running in the foreground; Ctrl-C stops everything")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stopped = fleet.down(state)
        click.echo(f"stopped: {', '.join(stopped)}")


@main.command()
@click.pass_context
@friendly
def down(ctx: click.Context) -> None:
    """Stop a background local fleet started by `warmfleet up`."""
    from fleetctl.localfleet import LocalFleet

    fleet = LocalFleet(_settings(ctx))
    stopped = fleet.down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "no local fleet is running")
    if fleet.gone:
        click.echo(f"already gone (not signalled): {', '.join(fleet.gone)}")


DEMO_PROMPTS = ("a red circle on the left", "a blue square in the center", "a yellow triangle on the right",
                "a green circle on the right")
"""What the trained demo models draw (fleetctl/demo/shapes.py): a colour, a shape, a side."""


@main.command()
@click.option("--prompt", "prompts", multiple=True, help="prompts to send (default: a few examples)")
@click.option("--foreground", is_flag=True, help="stay up after the demo until Ctrl-C")
@click.option("--archive", type=click.Choice(["local", "oss"]), default="local", help="L3 kind, as for `up`")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where the contact sheet goes (default: demo-sheet.png in the fleet's state folder)")
@click.pass_context
@friendly
def demo(ctx: click.Context, prompts: tuple[str, ...], foreground: bool, archive: str, sheet: Path | None) -> None:
    """The main job: start a local fleet, send prompts through generate.delay, print what happened and a contact
    sheet of the images, stop."""
    from fleetctl.demo.sheet import contact_sheet, read_image
    from fleetctl.localfleet import LocalFleet
    from tasks import configure, generate

    settings = _settings(ctx)
    releases = _default_releases(settings)
    fleet = LocalFleet(settings, log=click.echo)
    state = fleet.up(releases, None, archive=archive)
    try:
        _print_fleet(state)
        configure(settings.model_copy(update={"broker_url": state.broker_url}))
        jobs = []
        for i, prompt in enumerate(prompts or DEMO_PROMPTS):
            kwargs: dict[str, Any] = {"seed": 1000 + i}
            if i == len(prompts or DEMO_PROMPTS) - 1 and len(releases) > 1:
                kwargs["release"] = releases[0]  # one job pinned to the previous release
            jobs.append((prompt, generate.delay(prompt, **kwargs)))
        rows = [(prompt, r.get(timeout=120)) for prompt, r in jobs]
        _print_results(rows)
        outputs = settings.resolved_output_url
        click.echo(f"\nimages are in {outputs}")
        sheet = sheet or settings.state_dir / "demo-sheet.png"
        contact_sheet([(p, r["release"], read_image(r, outputs)) for p, r in rows], sheet)
        click.echo(f"contact sheet: {sheet}")
    finally:
        if foreground:
            _wait_for_interrupt(fleet, state)
        else:
            stopped = fleet.down(state)
            click.echo(f"stopped: {', '.join(stopped)}")


def _print_results(rows: list[tuple[str, dict[str, Any]]]) -> None:
    header = f"{'prompt':<26} {'release':<40} {'worker':<22} {'queued':>9} {'infer':>9}  image"
    click.echo(header)
    click.echo("-" * len(header))
    for prompt, res in rows:
        t = res["timings"]
        click.echo(
            f"{prompt[:26]:<26} {res['release']:<40} {res['worker'][:22]:<22} "
            f"{t['queued_ms'] or 0:>7.1f}ms {t['inference_ms']:>7.1f}ms  {res['image_uri']}"
        )


# -- processes ---------------------------------------------------------------------------------------------


@main.command()
@click.option("--release", "releases", multiple=True, help="release to serve (repeatable; default FLEET_WORKER_RELEASES)")
@click.option("--name", help="worker name (default gpu-<pid>@<node>)")
@click.option("--device", help="cpu, cuda, cuda:N or auto (default FLEET_DEVICE); checked before any sync or load")
@click.option("--loglevel", default="INFO")
@click.pass_context
def worker(ctx: click.Context, releases: tuple[str, ...], name: str | None, device: str | None, loglevel: str) -> None:
    """Run one GPU worker: ensure L2, load the pipeline once, announce warm, then consume."""
    from workers.boot import run_worker

    settings = _settings(ctx)
    if device:
        settings = settings.model_copy(update={"device": device})
    sys.exit(run_worker(settings, list(releases) or settings.worker_releases, name, loglevel))


@main.command("maintenance-worker")
@click.option("--name")
@click.option("--loglevel", default="INFO")
@click.pass_context
def maintenance_worker(ctx: click.Context, name: str | None, loglevel: str) -> None:
    """Run the node's maintenance worker (sync, audit)."""
    from workers.boot import run_maintenance_worker

    sys.exit(run_maintenance_worker(_settings(ctx), name, loglevel))


# -- models and the cache ----------------------------------------------------------------------------------


@main.command()
@click.option("--release", "releases", multiple=True, help="sync these releases (default: what the fleet needs)")
@click.option("--fleet", is_flag=True, help="every node: send beat's fan-out and wait for each node's outcome")
@click.option("--timeout", default=3600.0, help="with --fleet: how long to wait for the nodes")
@click.pass_context
@friendly
def sync(ctx: click.Context, releases: tuple[str, ...], fleet: bool, timeout: float) -> None:
    """Bring versions from the archive (L3) into this node's L2: differential and verified (same code as beat's)."""
    from tqdm import tqdm

    if fleet:
        from .fleetwide import run_fleetwide

        sys.exit(run_fleetwide(_settings(ctx), "sync", {}, timeout))

    from cachemgr import Cache, Release
    from tasks.maintenance import redis_client, run_sync, wanted_refs

    settings = _settings(ctx)
    archive = _archive(settings)
    store = Cache.at(settings.resolved_cache_root).store
    if releases:
        refs = sorted({ref for r in releases for ref in Release.parse(r).refs()})
    else:
        client = redis_client(settings)
        try:
            if client is not None:
                client.ping()
        except Exception:
            client = None  # no fleet up: sync what this node is configured for and the newest versions
        refs = wanted_refs(settings, client)
    total = sum(archive.read_manifest(r).total_size for r in refs if not store.has(r))
    with tqdm(total=total, unit="B", unit_scale=True, desc="sync", disable=total == 0) as bar:
        result = run_sync(settings, refs, progress=bar.update)
    for line in result["versions"]:
        click.echo(f"  {line}")
    peers = ", ".join(f"{node} {n} B" for node, n in result["by_peer"].items())
    click.echo(f"fetched {result['bytes_fetched']} B: {result['from_peers']} B from peers" + (f" ({peers})" if peers else "")
               + f", {result['from_l3']} B from L3; reused {result['bytes_reused']} B already on disk")


@main.command()
@click.option("--dry-run", is_flag=True, help="print the plan, change nothing")
@click.option("--fleet", is_flag=True, help="every node: send beat's fan-out and wait for each node's outcome")
@click.option("--timeout", default=3600.0, help="with --fleet: how long to wait for the nodes")
@click.pass_context
@friendly
def audit(ctx: click.Context, dry_run: bool, fleet: bool, timeout: float) -> None:
    """Re-hash L2, quarantine and re-fetch corrupt files, clear stale temp files, apply retention (same as beat's)."""
    from tasks.maintenance import run_audit

    if fleet:
        from .fleetwide import run_fleetwide

        sys.exit(run_fleetwide(_settings(ctx), "audit", {"dry_run": dry_run}, timeout))

    result = run_audit(_settings(ctx), dry_run=dry_run)
    click.echo(result["plan"])
    if not dry_run:
        click.echo(f"quarantined {len(result['quarantined'])}, re-fetched {len(result['refetched'])}, "
                   f"retired {len(result['retired'])}, temp files removed {len(result['temp_files_removed'])}")
    if result["cache_status"]:
        click.echo(f"CACHE_STATUS {result['cache_status']}")
    if result["corrupt"] and dry_run:
        sys.exit(1)


@main.group()
def cache() -> None:
    """The cache event log."""


@cache.command("log")
@click.option("-n", "--last", default=50, help="how many events")
@click.option("--json", "as_json", is_flag=True, help="raw JSON lines")
@click.pass_context
def cache_log(ctx: click.Context, last: int, as_json: bool) -> None:
    from cachemgr.events import EventLog, render

    settings = _settings(ctx)
    for record in EventLog(settings.event_log_path).read(last):
        click.echo(json.dumps(record) if as_json else render(record))


@main.command()
@click.argument("prompt")
@click.option("--release")
@click.option("--seed", type=int)
@click.option("--steps", type=int)
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--timeout", default=120.0)
@click.pass_context
@friendly
def generate(ctx: click.Context, prompt: str, release: str | None, seed: int | None, steps: int | None,
             width: int | None, height: int | None, timeout: float) -> None:
    """Send one prompt through the fleet and print the result."""
    from tasks import generate as generate_task

    from .results import wait_one_line

    params = {k: v for k, v in dict(release=release, seed=seed, steps=steps, width=width, height=height).items()
              if v is not None}
    result = wait_one_line(generate_task.delay(prompt, **params), timeout)
    click.echo(json.dumps(result, indent=1))


from . import api, archive, dead, flowercmd, health, live, ops, queues, roles, routing  # noqa: E402  their commands register on the group

for _module in (routing, health, ops, dead, live, queues, archive, api, roles, flowercmd):
    _module.register(main)

