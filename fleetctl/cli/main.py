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
@click.pass_context
@friendly
def up(ctx: click.Context, releases: tuple[str, ...], active: str | None, foreground: bool, no_flower: bool,
       no_beat: bool, archive: str, gpus: str | None) -> None:
    """Start a local fleet on embedded defaults (private redis, workers, beat, Flower)."""
    from fleetctl.gpus import parse_gpus
    from fleetctl.localfleet import LocalFleet

    settings = _settings(ctx)
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

    stopped = LocalFleet(_settings(ctx)).down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "no local fleet is running")


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
@click.argument("model")
@click.argument("component")
@click.argument("version")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--family", help="expected family (sd, sd2, sdxl, wuerstchen); detected from the files, refused if different")
@click.option("--config", "config", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a diffusers folder with the configs of a single-file checkpoint (default: the family's standard)")
@click.option("--meta", multiple=True, help="key=value stored in the manifest (repeatable)")
@click.option("--dry-run", is_flag=True, help="print what would be uploaded, the family and precision; upload nothing")
@click.pass_context
@friendly
def publish(ctx: click.Context, model: str, component: str, version: str, path: Path, family: str | None,
            config: Path | None, meta: tuple[str, ...], dry_run: bool) -> None:
    """Push a model version into the archive: a diffusers folder, a single-file checkpoint, or a LoRA file/PEFT folder.

    The family and layout are read from the files; what would not boot is refused before anything is uploaded. A
    single-file checkpoint is converted here, once, by diffusers (workers/models/convert.py: the whole model in
    memory, ~7 GB for an SDXL fp16 file) and published as a diffusers folder whose manifest keeps the file's name
    and sha256; --dry-run converts nothing."""
    import tempfile

    from tqdm import tqdm

    from cachemgr.names import ComponentRef
    from workers.models.layouts import plan_version
    from workers.models.skeleton import check_boots
    from workers.models.vae import check_vae_boots, plan_vae_folder

    ref = ComponentRef(model, component, version)
    extra: dict[str, Any] = dict(m.split("=", 1) for m in meta)
    for k, v in list(extra.items()):
        try:
            extra[k] = json.loads(v)
        except ValueError:
            pass
    archive = _archive(_settings(ctx))
    if component == "vae":  # an AutoencoderKL folder that releases may name (`…+vae-v1.0.0`)
        plan = plan_vae_folder(path)
        check_vae_boots(plan)
    elif component in ("base", "lora"):
        plan = plan_version(path, component, family, config, _published_base(archive, model) if component == "lora" else None)
        check_boots(plan)
    else:
        raise click.ClickException(f"component {component!r} is not served by this fleet; publish base, lora or vae")
    for line in plan.describe():
        click.echo(line)
    if dry_run:
        click.echo(f"dry run: nothing uploaded to {archive.url}")
        return
    if archive.has_version(ref):
        raise click.ClickException(f"{ref} is already published in {archive.url}; publish a new version instead")
    with tempfile.TemporaryDirectory(prefix="warmfleet-publish-") as tmp:
        if plan.layout == "single-file":  # converted once, here: workers load the diffusers folder as it is
            from workers.models.convert import convert_single_file

            click.echo(f"converting {plan.meta['checkpoint']} into a diffusers folder …")
            plan = convert_single_file(plan, Path(tmp) / "converted")
            click.echo(plan.notes[-1])
        source = plan.stage(Path(tmp) / "upload")
        extra = {**plan.meta, **extra}
        total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"publish {ref}", disable=total < (8 << 20)) as bar:
            manifest = archive.publish(ref, source, meta=extra, progress=bar.update)
    click.echo(f"published {ref}: {len(manifest.files)} files, {manifest.total_size} bytes → {archive.url}")


def _published_base(archive: Any, model: str) -> tuple[str, dict] | None:
    """(family, tensor shapes) of the model's newest base in the archive, which a new LoRA must fit."""
    from cachemgr.names import ComponentRef
    from workers.models.detect import single_file_family

    version = archive.latest_version(model, "base") if "base" in archive.list_components(model) else None
    if version is None:
        return None
    manifest = archive.read_manifest(ComponentRef(model, "base", version))
    shapes = {t.name: t.shape for f in manifest.files for t in f.tensors}
    family = str(manifest.meta.get("family") or "")
    if family == "single-file":  # published by hand before families were detected: read it from the keys
        family = single_file_family(shapes) or family
    return family, shapes


@main.command("publish-demo")
@click.pass_context
@friendly
def publish_demo_cmd(ctx: click.Context) -> None:
    """Build the tiny demo models offline and publish the versions missing from the archive."""
    import shutil
    import tempfile

    from fleetctl.demo.builders import publish_demo

    archive = _archive(_settings(ctx))
    work = Path(tempfile.mkdtemp(prefix="warmfleet-demo-"))
    try:
        done = publish_demo(archive, work, log=click.echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"{len(done)} version(s) published to {archive.url}" if done else "demo models already published")


@main.command()
@click.argument("model", required=False)
@click.pass_context
@friendly
def versions(ctx: click.Context, model: str | None) -> None:
    """List the versions in the archive (and which are in this node's L2); a base converted from a single-file
    checkpoint at publish names that file and its sha256."""
    from cachemgr import Cache
    from cachemgr.names import ComponentRef

    settings = _settings(ctx)
    archive = _archive(settings)
    store = Cache.at(settings.resolved_cache_root).store
    for m in [model] if model else archive.list_models():
        for component in archive.list_components(m):
            for version in archive.list_versions(m, component):
                ref = ComponentRef(m, component, version)
                held = store.has(ref)
                line = f"{str(ref):<40} {'L2' if held else '  '}"
                if component == "base":  # the L2 copy of the manifest when there is one, else the archive's
                    origin = (store.manifest(ref) if held else archive.read_manifest(ref)).meta.get("converted_from")
                    if isinstance(origin, dict) and origin.get("file"):
                        line += f"  converted from {origin['file']} (sha256 {str(origin.get('sha256', ''))[:12]}…)"
                click.echo(line)


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
    click.echo(f"fetched {result['bytes_fetched']} B from L3, reused {result['bytes_reused']} B already on disk")


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


from . import dead, health, live, ops, routing  # noqa: E402  their commands register on the main group

for _module in (routing, health, ops, dead, live):
    _module.register(main)

