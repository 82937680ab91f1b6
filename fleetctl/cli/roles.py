"""`warmfleet roles apply | config`: the fleet's Redis ACL users (fleetstate/acl.py) on a Redis of your own."""

from __future__ import annotations

import os

import click

from .common import _settings, friendly

PASSWORD_ENV = "FLEET_{role}_PASSWORD"
"""Where `roles apply` and `roles config` read each role's password: FLEET_PRODUCER_PASSWORD, FLEET_WORKER_PASSWORD…"""


def _passwords() -> dict[str, str]:
    from fleetstate.acl import ROLES

    missing = [PASSWORD_ENV.format(role=r.upper()) for r in ROLES if not os.environ.get(PASSWORD_ENV.format(role=r.upper()))]
    if missing:
        raise click.ClickException(f"set {', '.join(missing)} (one password per role)")
    return {r: os.environ[PASSWORD_ENV.format(role=r.upper())] for r in ROLES}


@click.group("roles")
def roles() -> None:
    """The fleet's roles as Redis ACL users: producer, worker, maintenance, operator, monitoring."""


@roles.command("apply")
@click.option("--save", is_flag=True, help="then ACL SAVE (a Redis started with an aclfile keeps them over restarts)")
@click.pass_context
@friendly
def apply(ctx: click.Context, save: bool) -> None:
    """Create or reset every role on the broker's Redis (FLEET_BROKER_URL: a user allowed ACL, the admin)."""
    from fleetstate.acl import apply_roles

    client = _settings(ctx).state_client()
    apply_roles(client, _passwords())
    if save:
        client.execute_command("ACL", "SAVE")
    click.echo("roles applied: producer, worker, maintenance, operator, monitoring")


@roles.command("config")
def config() -> None:
    """Print the roles as redis.conf `user` lines (passwords from FLEET_<ROLE>_PASSWORD)."""
    from fleetstate.acl import config_lines

    for line in config_lines(_passwords()):
        click.echo(line)


def register(group: click.Group) -> None:
    group.add_command(roles)
