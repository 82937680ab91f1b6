"""`warmfleet flower [Flower's options]`: Flower on the fleet's app, answering a bad `generate` sent through its API
with HTTP 400 and the one-line reason (fleetctl/flower.py). The local fleet, compose and Kubernetes all run it.

Registered on the main group by `fleetctl/cli/main.py`; it does not import `fleetctl.cli`.
"""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []})
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(flower_args: tuple[str, ...]) -> None:
    """Flower with the fleet's checks; every option is Flower's own (e.g. --address=, --port=, FLOWER_* variables)."""
    from fleetctl.flower import main as run_flower

    run_flower(list(flower_args))


def register(group: click.Group) -> None:
    group.add_command(flower)
