"""What may leave a worker's device memory: a release nothing routes, pins or still has jobs waiting for.

Read by `warmfleet retire` (refused while any reason holds, unless forced) and by a worker that must make room for
a new adapter (it evicts only releases with no reason to stay). One reading, so the two never disagree.
"""

from __future__ import annotations

import redis

from cachemgr.names import Release, queue_for

from .pins import Pins
from .queues import queue_depth
from .routes import RouteTable


def reasons_to_keep(client: redis.Redis, release: str) -> list[str]:
    """Why `release` must stay loaded: routed (with its role), pinned, or jobs waiting in its queue; [] if none."""
    rel = Release.parse(release)
    reasons = [f"routed ({role})" for role, routed in RouteTable(client).get(rel.model).referenced()
               if routed == str(rel)]
    pinned = set(Pins(client).all())
    reasons += [f"pinned ({ref})" for ref in rel.refs() if ref.component == "lora" and ref in pinned]
    waiting = queue_depth(client, queue_for(rel))
    if waiting:
        reasons.append(f"{waiting} job(s) waiting in its queue")
    return reasons
