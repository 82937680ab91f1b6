"""Every Redis key and channel the fleet uses, declared once."""

ROUTE_KEY = "fleet:route:{model}"  # hash: active, previous, canary, canary_weight, updated_at
ROUTE_MODELS = "fleet:routes"  # set of models with a route
ROUTE_HISTORY = "fleet:routes:history"  # stream: model, from, to, from_canary, canary, actor, reason, forced[, prewarm]
ROUTE_CHANNEL = "fleet:routes:changed"  # pub/sub: a model name when its route changes
PREWARM_KEY = "fleet:routes:prewarm"  # set of releases declared "warm on their base" before any promote
WARM_KEY = "fleet:warm:{release}:{worker}"  # hash with TTL: a worker warm on a release
WARM_PATTERN = "fleet:warm:*"
WORKER_KEY = "fleet:worker:{worker}"  # hash with TTL: a worker's state, loads, last error
WORKER_PATTERN = "fleet:worker:*"
PIN_KEY = "fleet:pins"  # set of component refs that retention must keep
DEAD_KEY = "fleet:dead"  # list of jobs recorded as dead, with reasons
NODE_L2_KEY = "fleet:l2:{node}"  # hash with TTL: the component refs a node's L2 holds, as its workers last saw them
NODE_L2_PATTERN = "fleet:l2:*"

# kombu's Redis transport keeps one list per queue and priority step: `queue` for step 0, then
# `queue` + "\x06\x16" + step for the others (kombu.transport.redis.Channel.sep and PRIORITY_STEPS).
PRIORITY_SEP = "\x06\x16"
QUEUE_PRIORITY_LIST = "{queue}" + PRIORITY_SEP + "{priority}"
QUEUE_PRIORITY_STEPS = (0, 3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """Every Redis list holding messages of a queue, highest priority (kombu's step 0) first."""
    return [queue if p == 0 else QUEUE_PRIORITY_LIST.format(queue=queue, priority=p) for p in QUEUE_PRIORITY_STEPS]

STATS_KEY = "fleet:stats"  # hash of counters: per-tier hits and bytes, syncs, audits, loads
NODES_KEY = "fleet:nodes"  # hash: node → last time its maintenance worker was seen (nodes with an L2)
PEERS_KEY = "fleet:peers"  # hash: node → JSON {address, ts} of its peer piece server (cachemgr.peers)
ORIGIN_LEASE_KEY = "fleet:origin:{key}"  # SET NX PX: the node pulling a blob from L3 for the whole site now
ALERTS_KEY = "fleet:alerts"  # hash: alert name → JSON of its state (firing since, value)
FANOUT_KEY = "fleet:fanout:{name}"  # hash: the current fleet-wide run (run, started_at) and node:<node> → JSON outcome
RUN_LOCK_KEY = "fleet:lock:{name}"  # SET NX PX: one run of a maintenance job at a time, expiring if its holder dies
JOB_KEY = "fleet:job:{task_id}"  # hash with TTL: one job's executions (runs, completed, duplicates, result, dead)
LEASE_KEY = "fleet:lease:{task_id}"  # SET NX PX: the worker executing a job now, renewed while it runs
RELEASE_META_KEY = "fleet:release-meta:{release}"  # hash: a release's own settings (job_time_limit_s)
OUTBOX_KEY = "fleet:outbox"  # hash: delivery tag → JSON {task_id, list, message, resends} of sent, unclaimed jobs
OUTBOX_AT_KEY = "fleet:outbox:at"  # sorted set: delivery tag → when its message was sent (or last found queued)
DELIVERIES_KEY = "fleet:deliveries"  # hash: delivery tag → JSON {worker, task_id} of messages in a worker's hands

# kombu's Redis transport keeps every unacknowledged message in a hash and a sorted set scored by delivery time;
# a message whose score is older than visibility_timeout is put back in its queue (kombu.transport.redis.QoS).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
