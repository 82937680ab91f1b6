"""Waiting for a job's result from the CLI: its value, or one line saying why there is none (never a traceback)."""

from __future__ import annotations

from typing import Any

import click


def wait_one_line(result: Any, timeout: float) -> Any:
    """`result.get()`, with every failure a user can act on turned into one line and exit status 1."""
    from celery.exceptions import TimeoutError as ResultTimeout

    from tasks.errors import one_line

    try:
        return result.get(timeout=timeout)
    except ResultTimeout:
        raise click.ClickException(
            f"job {result.id}: no result after {timeout:g}s; is a worker warm on its release (`warmfleet status`)?"
        ) from None
    except Exception as exc:  # the worker's own one-line reason, whatever type carried it
        raise click.ClickException(f"job {result.id} failed: {one_line(exc)}") from None
