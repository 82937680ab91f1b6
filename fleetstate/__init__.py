"""The fleet's control state in Redis: routes, warm registry, leases, dead letters, queue moves, nodes, pins, stats,
locks and rollouts. Built on cachemgr; knows nothing of Celery's app or the workers."""
