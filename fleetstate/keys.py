"""Every Redis key and channel the fleet uses, declared once; kombu's and Celery's own keys as those libraries name
them.

kombu's Redis transport and Celery's Redis result backend name their keys with public class attributes (settings a
transport option could change). They are read here, once, from the installed libraries rather than repeated; the
boot check (tasks/upstream.py) refuses a configuration that would change them.
"""

from bisect import bisect

from celery.backends.base import KeyValueStoreBackend
from kombu.transport.redis import Channel as KombuRedisChannel

ROUTE_KEY = "fleet:route:{model}"  # hash: active, previous, canary, canary_weight, updated_at
ROUTE_MODELS = "fleet:routes"  # set of models with a route
ROUTE_HISTORY = "fleet:routes:history"  # stream: model, from, to, from_canary, canary, actor, reason, forced[, prewarm]
ROUTE_CHANNEL = "fleet:routes:changed"  # pub/sub: a model name when its route changes
PREWARM_KEY = "fleet:routes:prewarm"  # set of releases declared "warm on their base" before any promote
ROUTE_STACK_KEY = "fleet:route:{model}:stack"  # list, oldest first: JSON {release, actor, at, reason, forced} per
# release the model was routed to, the active one last; rollback rewinds it (fleetstate/routes.py)
CATALOG_KEY = "fleet:catalog:{model}"  # set: "component/version" of every version the archive (L3) holds
CATALOG_MODELS = "fleet:catalog:models"  # set of models the catalog lists
CATALOG_LISTED = "fleet:catalog:listed"  # when the whole archive was last listed (absent: the catalog is partial)
CATALOG_CHANNEL = "fleet:catalog:changed"  # pub/sub: a model name when its catalog changes
LIVE_WARM_KEY = "fleet:live-warm"  # hash: release → JSON {workers, at, by} of LoRA releases warmed live (re-warmed at boot)
WARM_KEY = "fleet:warm:{release}:{worker}"  # hash with TTL: a worker warm on a release
WARM_PATTERN = "fleet:warm:*"
WORKER_KEY = "fleet:worker:{worker}"  # hash with TTL: a worker's state, loads, last error
WORKER_PATTERN = "fleet:worker:*"
PIN_KEY = "fleet:pins"  # set of component refs that retention must keep
DEAD_KEY = "fleet:dead"  # list of jobs recorded as dead, with reasons
NODE_L2_KEY = "fleet:l2:{node}"  # hash with TTL: the component refs a node's L2 holds, as its workers last saw them
NODE_L2_PATTERN = "fleet:l2:*"
# The registry's directories, so readers list it without walking the keyspace (a day of job records is most of it):
# sorted sets whose members are the names above and whose scores are when the member's key expires (epoch ms); the
# keys stay the truth (a member whose key is gone is not listed), writers drop members long expired.
WORKERS_INDEX = "fleet:registry:workers"  # worker → when its WORKER_KEY expires
WARM_INDEX = "fleet:registry:warm"  # "<release>:<worker>" → when its WARM_KEY expires
NODE_L2_INDEX = "fleet:registry:l2"  # node → when its NODE_L2_KEY expires

# kombu's Redis transport keeps one list per queue and priority step: `queue` for step 0, then `queue` + sep + step
# for the others (its channel's `sep` and `priority_steps`).
PRIORITY_SEP: str = KombuRedisChannel.sep
QUEUE_PRIORITY_STEPS: tuple[int, ...] = tuple(KombuRedisChannel.priority_steps)


def priority_list(queue: str, priority: int) -> str:
    """The list kombu pushes a message of `priority` to: the step at or below it (kombu's `Channel.priority`)."""
    step = QUEUE_PRIORITY_STEPS[max(0, bisect(QUEUE_PRIORITY_STEPS, int(priority)) - 1)]
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def queue_lists(queue: str) -> list[str]:
    """Every Redis list holding messages of a queue, highest priority (kombu's step 0) first."""
    return [priority_list(queue, step) for step in QUEUE_PRIORITY_STEPS]

STATS_KEY = "fleet:stats"  # hash of counters: per-tier hits and bytes, syncs, audits, loads
NODES_KEY = "fleet:nodes"  # hash: node → last time its maintenance worker was seen (nodes with an L2)
PEERS_KEY = "fleet:peers"  # hash: node → JSON {address, ts} of its peer piece server (cachemgr.peers)
ORIGIN_LEASE_KEY = "fleet:origin:{key}"  # SET NX PX: the node pulling a blob from L3 for the whole site now
PEER_QUARANTINE_KEY = "fleet:peers:quarantine"  # hash: peer/kind/blob → JSON {by, reason, at, until}: peers the site skips
ALERTS_KEY = "fleet:alerts"  # hash: alert name → JSON of its state (firing since, value)
FANOUT_KEY = "fleet:fanout:{name}"  # hash: the current fleet-wide run (run, started_at) and node:<node> → JSON outcome
RUN_LOCK_KEY = "fleet:lock:{name}"  # SET NX PX: one run of a maintenance job at a time, expiring if its holder dies
JOB_KEY = "fleet:job:{task_id}"  # hash with TTL: one job's executions (runs, completed, duplicates, result, dead)
LEASE_KEY = "fleet:lease:{task_id}"  # SET NX PX: the worker executing a job now, renewed while it runs
RELEASE_META_KEY = "fleet:release-meta:{release}"  # hash: a release's own settings (job_time_limit_s)
OUTBOX_KEY = "fleet:outbox"  # hash: delivery tag → JSON {task_id, list, message, resends} of sent, unclaimed jobs
OUTBOX_AT_KEY = "fleet:outbox:at"  # sorted set: delivery tag → when its message was sent (or last found queued)
OUTBOX_QUEUES_KEY = "fleet:outbox:queues"  # set: every queue list a send or a queue move pushed onto, so `status`
# finds the lists holding jobs without walking the keyspace (fleetstate/queues.py `queued_releases`)
DELIVERIES_KEY = "fleet:deliveries"  # hash: delivery tag → JSON {worker, task_id} of messages in a worker's hands

# kombu's Redis transport keeps every unacknowledged message in a hash and a sorted set scored by delivery time;
# a message whose score is older than visibility_timeout is put back in its queue (kombu.transport.redis.QoS).
KOMBU_UNACKED: str = KombuRedisChannel.unacked_key
KOMBU_UNACKED_INDEX: str = KombuRedisChannel.unacked_index_key
KOMBU_LAYOUT_OPTIONS = ("sep", "priority_steps", "unacked_key", "unacked_index_key", "global_keyprefix")
"""Transport options that would move kombu's keys away from the names above (refused at boot)."""

# Celery's Redis result backend keeps a task's state at its key prefix + the task id (`get_key_for_task`).
CELERY_META_KEY = KeyValueStoreBackend.task_keyprefix + "{task_id}"
CELERY_LAYOUT_OPTIONS = ("global_keyprefix",)
"""Result backend transport options that would move Celery's keys (refused at boot)."""
