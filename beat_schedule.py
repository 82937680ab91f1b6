"""Celery beat's schedule: a plain dict, task names as strings. Run exactly one beat per fleet."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as every

SYNC_TASK = "warmfleet.sync"  # one node's L2, sent to that node's queue
AUDIT_TASK = "warmfleet.audit"
SYNC_FLEET_TASK = "warmfleet.sync_fleet"  # fans out to every node with an L2
AUDIT_FLEET_TASK = "warmfleet.audit_fleet"
AUTO_WARM_TASK = "warmfleet.auto_warm"  # declared prewarms onto running workers (FLEET_AUTO_WARM)
CANARY_TICK_TASK = "warmfleet.canary_tick"  # the automatic canary analysis (fleetstate/canary.py)
MAINTENANCE_QUEUE = "fleet.maintenance"


def _zoned(schedule: crontab, app: Any) -> crontab:
    """Bind a crontab to the app whose timezone it runs in. Set through the property, not the constructor,
    so beat's shelve can still pickle the schedule (it stores constructor arguments, and the app is not
    picklable); after unpickling, the beat process's current app is that same configured app."""
    if app is not None:
        schedule.app = app
    return schedule


def build_schedule(settings: Any, app: Any = None) -> dict[str, dict[str, Any]]:
    """The nightly L2 sync and the audit, at the times the settings give, in the timezone of `app`
    (Celery's crontab reads the timezone from its app; `tasks.configure` passes the configured one); with
    auto_warm on, the auto-warm tick too."""
    schedule = {
        "nightly-l2-sync": {
            "task": SYNC_FLEET_TASK,
            "schedule": _zoned(crontab(hour=settings.sync_hour, minute=settings.sync_minute), app),
            "options": {"queue": MAINTENANCE_QUEUE},
        },
        "l2-audit": {
            "task": AUDIT_FLEET_TASK,
            "schedule": _zoned(crontab(hour=settings.audit_hour, minute=settings.audit_minute), app),
            "options": {"queue": MAINTENANCE_QUEUE},
        },
    }
    tick = getattr(settings, "canary_tick_s", None)
    if tick:
        schedule["canary-analysis"] = {"task": CANARY_TICK_TASK, "schedule": every(timedelta(seconds=tick), app=app),
                                       "options": {"queue": MAINTENANCE_QUEUE, "expires": tick}}
    if getattr(settings, "auto_warm", False):
        schedule["auto-warm"] = {"task": AUTO_WARM_TASK, "schedule": settings.auto_warm_seconds,
                                 "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.auto_warm_seconds}}
    return schedule
