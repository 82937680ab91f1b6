"""`warmfleet dead`: the jobs that failed after every retry, newest first, with their reason and arguments.

Registered on the main group by `fleetctl/cli/main.py`; like `cli_health`, it does not import `fleetctl.cli`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict

import click

from .common import _redis, _settings, friendly

PROMPT_CHARS = 40


@click.command()
@click.option("-n", "--last", default=50, show_default=True, help="how many dead jobs")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line, arguments included")
@click.pass_context
@friendly
def dead(ctx: click.Context, last: int, as_json: bool) -> None:
    """Jobs recorded as dead (their pipeline call kept failing after FLEET_JOB_MAX_RETRIES retries)."""
    from fleetstate.dead import DeadLetters

    letters = DeadLetters(_redis(_settings(ctx)))
    jobs = letters.list(last)
    if as_json:
        for job in jobs:
            click.echo(json.dumps(asdict(job)))
        return
    total = letters.count()
    click.echo(f"{total} dead job(s)" + (f", newest {len(jobs)} shown" if total > len(jobs) else ""))
    for job in jobs:
        when = dt.datetime.fromtimestamp(job.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        prompt = str(job.kwargs.get("prompt", ""))
        if len(prompt) > PROMPT_CHARS:
            prompt = prompt[:PROMPT_CHARS] + "…"
        click.echo(f"{when}Z  {job.task_id}  retries {job.retries}  on {job.worker}  queue {job.queue or '-'}")
        click.echo(f"    prompt {prompt!r}")
        click.echo(f"    reason {job.reason}")


def register(group: click.Group) -> None:
    group.add_command(dead)
