"""`warmfleet.canary_tick`: beat's tick of the automatic canary analysis (fleetstate/canary.py), every
FLEET_CANARY_TICK_S on the maintenance queue. Each tick judges every running analysis once; the state is in Redis."""

from __future__ import annotations

from typing import Any

from beat_schedule import CANARY_TICK_TASK
from fleetstate import canary

from .app import app
from .requests import is_pinned
from .settings import FleetSettings


def run_tick(settings: FleetSettings, client: Any | None = None) -> dict[str, str]:
    """One tick with `settings`' bounds; rolled-back canaries' unpinned queued jobs move to the active release."""
    client = client or settings.state_client()
    return canary.tick(client, canary.Bounds.of(settings), move=is_pinned)


@app.task(name=CANARY_TICK_TASK)
def canary_tick() -> dict[str, str]:
    return run_tick(app.fleet_settings)  # type: ignore[attr-defined]
