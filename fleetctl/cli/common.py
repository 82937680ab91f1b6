"""What every CLI module shares: the settings of this invocation, friendly errors, the broker and archive."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from tasks.settings import FleetSettings, load_settings


def _settings(ctx: click.Context) -> FleetSettings:
    return ctx.ensure_object(dict).setdefault("settings", load_settings())


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        from cachemgr import ArchiveError, ChecksumMismatch, InvalidName, ManifestError, SnapshotMissing
        from cachemgr.store import DiskFull
        from fleetctl.localfleet import FleetError
        from tasks.requests import BadRequest
        from tasks.router import FleetNotConfigured, NoRoute
        from workers.models import LoadError
        from workers.models.detect import LayoutError

        try:
            return fn(*args, **kwargs)
        except (ArchiveError, ChecksumMismatch, InvalidName, ManifestError, SnapshotMissing, BadRequest,
                FleetNotConfigured, NoRoute, FleetError, LoadError, LayoutError, DiskFull) as exc:
            raise click.ClickException(str(exc)) from None
        except redis.ConnectionError as exc:
            raise click.ClickException(f"cannot reach the broker: {exc}; is the fleet up (`warmfleet up`)?") from None
        except (redis.ResponseError, OSError) as exc:  # kombu re-raises a refusal as its OperationalError (OSError)
            from fleetstate.acl import denied_message

            line = denied_message(exc, load_settings().resolved_broker_url)
            if line is None:
                raise
            raise click.ClickException(line) from None

    return wrapper


def _redis(settings: FleetSettings):

    from tasks.router import FleetNotConfigured

    url = settings.resolved_broker_url
    if not url:
        raise FleetNotConfigured("no broker: set FLEET_BROKER_URL or start a local fleet with `warmfleet up`")
    return settings.state_client()


def _archive(settings: FleetSettings):

    return settings.open_archive()
