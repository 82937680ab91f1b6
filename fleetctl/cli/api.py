"""`warmfleet api` (HTTP for producers in any language, fleetctl/api.py) and `warmfleet api-key add|remove|list`."""

from __future__ import annotations

import click

from .common import _settings, friendly


@click.command("api")
@click.option("--port", type=int, default=None, help="default: FLEET_API_PORT (9820)")
@click.option("--address", default=None, help="default: FLEET_API_ADDRESS (127.0.0.1)")
@click.pass_context
@friendly
def api(ctx: click.Context, port: int | None, address: str | None) -> None:
    """Serve the HTTP API (POST /v1/generations, GET /v1/generations/{id}, /v1/openapi.json) as the producer role."""
    from fleetctl.api import serve

    settings = _settings(ctx)
    update = {k: v for k, v in {"api_port": port, "api_address": address}.items() if v is not None}
    serve(settings.model_copy(update=update), log=click.echo)


@click.group("api-key")
def api_key() -> None:
    """The HTTP API's keys, one per client, stored hashed."""


@api_key.command("add")
@click.argument("client")
@click.pass_context
@friendly
def add(ctx: click.Context, client: str) -> None:
    """A new key for CLIENT (replacing its old one), printed once."""
    from fleetctl.apikeys import ApiKeys, KeyError_

    try:
        key = ApiKeys(_settings(ctx).resolved_api_keys_file).add(client)
    except KeyError_ as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)


@api_key.command("remove")
@click.argument("client")
@click.pass_context
@friendly
def remove(ctx: click.Context, client: str) -> None:
    """Revoke CLIENT's key."""
    from fleetctl.apikeys import ApiKeys

    if not ApiKeys(_settings(ctx).resolved_api_keys_file).remove(client):
        raise click.ClickException(f"no API key for {client}")
    click.echo(f"removed the key of {client}")


@api_key.command("list")
@click.pass_context
def list_keys(ctx: click.Context) -> None:
    """The clients that have a key."""
    from fleetctl.apikeys import ApiKeys

    for name in ApiKeys(_settings(ctx).resolved_api_keys_file).clients():
        click.echo(name)


def register(group: click.Group) -> None:
    group.add_command(api)
    group.add_command(api_key)
