"""Celery's broker transport and result backend for `sentinel://` URLs, on connections that follow a failover.

kombu's SentinelChannel and celery's SentinelBackend ask the sentinels for the primary only when a connection is
made; a demoted primary that is still alive keeps the ones they hold. With the data servers' `min-replicas-to-write 1`
that primary refuses writes, and fleetstate.client.FailoverAwareConnection turns the refusal (NOREPLICAS, or a MULTI
aborted for it, as kombu's queue binding is) into a reconnection through the sentinels (see docs/reliability.md,
"Redis Sentinel"); and every push waits for the replica (WAIT 1). Both are set through public attributes: the
channel's `connection_class`, and the backend's `connparams`, which celery hands to redis-py's Sentinel.

A `;`-separated Sentinel URL is a list of failover alternates to kombu: on a connection error kombu switches to the
next one, and a switch to a URL sets the transport from the URL's scheme again (kombu's own, without the outbox, the
replicated push or the failover-aware connection). `failover_hosts`, the app's `broker_failover_strategy`, hands
kombu each alternate's host instead, which `Connection.switch` takes as a host and keeps the configured transport
(the sentinel channel finds the primary through every sentinel of the URL either way).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from celery.backends.redis import SentinelBackend
from kombu.transport.redis import SentinelChannel, SentinelTransport

from fleetstate.client import FailoverAwareConnection

from .transport import OutboxPut


class FleetSentinelChannel(OutboxPut, SentinelChannel):
    connection_class = FailoverAwareConnection
    replicated = True  # every push waits for the replica (OutboxPut); a generate send records its outbox entry too


class FleetSentinelTransport(SentinelTransport):
    Channel = FleetSentinelChannel


class FleetSentinelBackend(SentinelBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connparams["connection_class"] = FailoverAwareConnection


def failover_hosts(alternates: list[str]) -> Iterator[str]:
    """kombu's failover strategy for a Sentinel broker URL: round robin over the alternates, as hosts (see above)."""
    return itertools.cycle([urlsplit(url).hostname or url for url in alternates])


TRANSPORT = f"{__name__}:FleetSentinelTransport"
BACKEND = f"{__name__}:FleetSentinelBackend"
