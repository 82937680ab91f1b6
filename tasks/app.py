"""The Celery app. Configured from the settings in one call, so tests and the CLI can re-point it."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from kombu import Queue
from kombu.transport import TRANSPORT_ALIASES

import beat_schedule
from fleetstate.client import is_sentinel_url

from . import results, sentinel
from . import transport as transport_module
from .router import FleetRouter
from .settings import FleetSettings, load_settings

UNCONFIGURED_BROKER = "redis://broker-not-configured.invalid:6379/0"
SENTINEL_RESULT_RETRY_S = 60.0

app = Celery("warmfleet", include=["tasks.generate", "tasks.maintenance", "tasks.prewarm"])

# kombu reads a `;`-separated broker URL (every Sentinel URL is one) as failover alternates, and on a connection
# error it switches to the next one by re-parsing it, which sets the transport from the URL's scheme again: the plain
# kombu transport, without the outbox, the replicated push or the failover-aware connection. The schemes name the
# project's transports instead, so a switched or re-created connection keeps them.
TRANSPORT_ALIASES.update(redis=transport_module.TRANSPORT, rediss=transport_module.TRANSPORT,
                         sentinel=sentinel.TRANSPORT)


def _drop_connections(target: Celery) -> None:
    """Forget pooled connections and the cached result backend, so a re-pointed app uses its new URLs.

    kombu keeps its pools in a process-wide registry keyed by connection: a pool closed earlier would be handed
    back for the same URL, so the registry is reset too (only a process that re-points its app does this)."""
    from kombu import pools

    pools.reset()
    target._pool = None
    amqp = target.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    target._backend_cache = None
    target._local = threading.local()


def configure(settings: FleetSettings, target: Celery = app) -> Celery:
    broker = settings.resolved_broker_url
    _drop_connections(target)
    router = FleetRouter(broker, settings.model, settings.route_cache_ttl, settings.sentinel_master)
    result = settings.resolved_result_url or broker
    broker_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout,
                                      "unacked_restore_interval": 5, "unacked_restore_throttle": 0}
    result_options: dict[str, Any] = {"retry_policy": {"timeout": 5.0}}
    transport = transport_module.TRANSPORT if broker and broker.startswith(("redis://", "rediss://")) else None
    publish_retry: dict[str, Any] = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    if is_sentinel_url(broker):  # the current primary, asked of the sentinels on every (re)connection
        broker_options["master_name"] = settings.sentinel_master
        transport = sentinel.TRANSPORT  # … and again when a demoted primary refuses a write (tasks/sentinel.py)
        # a send retries through a failover (writes refused until the promoted primary has its replica: ~10 s)
        # instead of failing in the producer after Celery's default 0.6 s
        publish_retry = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 1.0}
    if is_sentinel_url(result):
        result_options["master_name"] = settings.sentinel_master
        # a failover refuses writes until the promoted primary has its replica back (~10 s): outlast it
        result_options["retry_policy"] = {"timeout": SENTINEL_RESULT_RETRY_S}
    target.loader.override_backends = {**target.loader.override_backends, "sentinel": sentinel.BACKEND,
                                       "redis": results.BACKEND, "rediss": results.BACKEND}
    target.conf.update(
        broker_url=broker or UNCONFIGURED_BROKER,
        broker_transport=transport,
        task_publish_retry_policy=publish_retry,
        result_backend=result or UNCONFIGURED_BROKER,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        result_expires=24 * 3600,
        task_default_queue="fleet.default",
        task_create_missing_queues=True,
        task_queues=[Queue("fleet.default"), Queue(beat_schedule.MAINTENANCE_QUEUE)],
        task_routes=(router,),
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_options,
        result_backend_transport_options=result_options,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone=settings.timezone,
        enable_utc=True,
        beat_schedule=beat_schedule.build_schedule(settings, target),
    )
    target.fleet_settings = settings  # type: ignore[attr-defined]
    # the fleet's state lives on the broker's server: a worker writes Celery's records in its own scripts only there
    target.fleet_results_shared = result == broker  # type: ignore[attr-defined]
    target.fleet_router = router  # type: ignore[attr-defined]
    return target


@before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the send time so the worker can report how long a job waited in its queue."""
    if headers is not None:
        headers.setdefault("fleet_sent_at", time.time())


configure(load_settings())
