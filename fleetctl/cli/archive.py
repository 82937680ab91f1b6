"""`warmfleet publish | publish-demo | versions`: what goes into the archive (L3), and what it holds.

Each tells the fleet's catalog of archive versions (fleetstate/catalog.py) what it learnt, when a broker answers:
routing and producers refuse releases the catalog says the archive lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tasks.settings import FleetSettings

from .common import _archive, _settings, friendly


@click.command()
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
    if archive.has_version(ref):  # before any planning: a dry run says so too, and nothing is printed first
        raise click.ClickException(f"{ref} is already published in {archive.url}; versions are never overwritten: "
                                   f"publish it as a new version (`warmfleet versions {model}` lists them)")
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
    _tell_catalog(_settings(ctx), lambda catalog: catalog.record([ref]))


def _tell_catalog(settings: FleetSettings, change: Any) -> None:
    """Tell the fleet's catalog of archive versions (fleetstate/catalog.py) what this command learnt, when a broker is
    configured and answers; without a fleet there is nothing to tell (workers list the archive at boot)."""
    import redis

    from fleetstate.catalog import Catalog

    if not settings.resolved_broker_url:
        return
    try:
        change(Catalog(settings.state_client()))
    except (redis.RedisError, OSError):
        pass


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


@click.command("publish-demo")
@click.pass_context
@friendly
def publish_demo_cmd(ctx: click.Context) -> None:
    """Build the tiny demo models offline and publish the versions missing from the archive."""
    import shutil
    import tempfile

    from cachemgr.names import ComponentRef
    from fleetctl.demo.builders import publish_demo

    archive = _archive(_settings(ctx))
    work = Path(tempfile.mkdtemp(prefix="warmfleet-demo-"))
    try:
        done = publish_demo(archive, work, log=click.echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"{len(done)} version(s) published to {archive.url}" if done else "demo models already published")
    _tell_catalog(_settings(ctx), lambda catalog: catalog.record([ComponentRef(*text.split("/")) for text in done]))


@click.command()
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
    models = archive.list_models()
    if model and model not in models:
        raise click.ClickException(f"the archive ({archive.url}) has no model {model!r}; it holds "
                                   f"{', '.join(models) or 'nothing yet'} (`warmfleet publish` adds one)")
    _tell_catalog(settings, lambda catalog: catalog.refresh(archive))
    for m in [model] if model else models:
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


def register(group: click.Group) -> None:
    for command in (publish, publish_demo_cmd, versions):
        group.add_command(command)
