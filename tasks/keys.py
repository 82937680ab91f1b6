"""Every Redis key and channel the fleet uses, declared once."""

ROUTE_KEY = "fleet:route:{model}"  # hash: active, previous, canary, canary_weight, updated_at
ROUTE_MODELS = "fleet:routes"  # set of models with a route
ROUTE_HISTORY = "fleet:routes:history"  # stream of changes
ROUTE_CHANNEL = "fleet:routes:changed"  # pub/sub: a model name when its route changes
WARM_KEY = "fleet:warm:{release}:{worker}"  # hash with TTL: a worker warm on a release
WARM_PATTERN = "fleet:warm:*"
WORKER_KEY = "fleet:worker:{worker}"  # hash with TTL: a worker's state, loads, last error
WORKER_PATTERN = "fleet:worker:*"
PIN_KEY = "fleet:pins"  # set of component refs that retention must keep
DEAD_KEY = "fleet:dead"  # list of jobs recorded as dead, with reasons
