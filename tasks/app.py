"""The Celery app. Configured from the settings in one call, so tests and the CLI can re-point it."""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from typing import Any

from celery import Celery
from celery.app.backends import by_url
from celery.signals import before_task_publish
from kombu import Queue, pools

import beat_schedule
from fleetstate.client import is_sentinel_url

from . import sentinel, upstream
from . import transport as transport_module
from .router import FleetRouter
from .settings import FleetSettings, load_settings

UNCONFIGURED_BROKER = "redis://broker-not-configured.invalid:6379/0"
SENTINEL_RESULT_RETRY_S = 60.0


class FleetCelery(Celery):
    """Celery, re-pointable in place at other broker and result URLs (`configure` again), through public API only.

    A Celery app keeps its broker connection pool, its producer pool and its result backend once made. `repoint`
    forgets them: kombu's process-wide pool registry is reset (`kombu.pools.reset`: a pool closed earlier would be
    handed back for the same URL), the app's connection pool dropped (`Celery.close`), its `amqp` (a cached property,
    which holds the producer pool) dropped to be made again, and the result backend — made here, per thread, from
    the current `result_backend` setting with `celery.app.backends.by_url` — made again on next use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fleet_backends = threading.local()
        super().__init__(*args, **kwargs)

    def repoint(self) -> None:
        pools.reset()
        self.close()
        with suppress(AttributeError):
            del self.amqp
        self.fleet_backends = threading.local()

    @property
    def backend(self) -> Any:
        """The result backend of this thread (Celery's own rule for a backend that is not thread-safe)."""
        backend = getattr(self.fleet_backends, "backend", None)
        if backend is None:
            cls, url = by_url(self.backend_cls or self.conf.result_backend, self.loader)
            backend = self.fleet_backends.backend = cls(app=self, url=url)
        return backend


app = FleetCelery("warmfleet", include=["tasks.generate", "tasks.maintenance", "tasks.prewarm", "tasks.canary"])


def repoint(target: Celery) -> None:
    """Forget `target`'s connections and result backend, so it uses the URLs it is configured with next (a plain
    Celery app only forgets its connections: configure a fresh one instead of re-pointing it once used)."""
    if isinstance(target, FleetCelery):
        target.repoint()
        return
    pools.reset()
    target.close()
    with suppress(AttributeError):
        del target.amqp


def configure(settings: FleetSettings, target: Celery = app) -> Celery:
    broker = settings.resolved_broker_url
    repoint(target)
    router = FleetRouter(broker, settings.model, settings.route_cache_ttl, settings.sentinel_master)
    result = settings.resolved_result_url or broker
    broker_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout,
                                      "unacked_restore_interval": 5, "unacked_restore_throttle": 0}
    result_options: dict[str, Any] = {"retry_policy": {"timeout": 5.0}}
    # the project's transports are named by the settings (`broker_transport`), never by kombu's scheme aliases
    transport = transport_module.TRANSPORT if (broker or UNCONFIGURED_BROKER).startswith(("redis://", "rediss://")) \
        else None
    failover_strategy: Any = None
    publish_retry: dict[str, Any] = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    if is_sentinel_url(broker):  # the current primary, asked of the sentinels on every (re)connection
        broker_options["master_name"] = settings.sentinel_master
        transport = sentinel.TRANSPORT  # … and again when a demoted primary refuses a write (tasks/sentinel.py)
        failover_strategy = sentinel.failover_hosts  # a switch to the next sentinel keeps this transport
        # a send retries through a failover (writes refused until the promoted primary has its replica: ~10 s)
        # instead of failing in the producer after Celery's default 0.6 s
        publish_retry = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 1.0}
    result_url = result or UNCONFIGURED_BROKER
    if is_sentinel_url(result):
        result_options["master_name"] = settings.sentinel_master
        # a failover refuses writes until the promoted primary has its replica back (~10 s): outlast it
        result_options["retry_policy"] = {"timeout": SENTINEL_RESULT_RETRY_S}
        result_url = f"{sentinel.BACKEND}+{result}"  # celery's "backend class+URL" form (celery.app.backends.by_url)
    target.conf.update(
        broker_url=broker or UNCONFIGURED_BROKER,
        broker_transport=transport,
        broker_failover_strategy=failover_strategy,
        task_publish_retry_policy=publish_retry,
        result_backend=result_url,
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
    upstream.check(target)  # one line naming the library and its version if an internal relied on has changed
    target.fleet_settings = settings  # type: ignore[attr-defined]
    target.fleet_router = router  # type: ignore[attr-defined]
    return target


@before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the send time so the worker can report how long a job waited in its queue."""
    if headers is not None:
        headers.setdefault("fleet_sent_at", time.time())


configure(load_settings())
