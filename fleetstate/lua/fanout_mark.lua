-- A node's state in a fleet-wide run (fleetstate/fanout.py), written only while that run is the current one.
-- KEYS: the run's hash. ARGV: run id, field, value. Returns HSET's answer, or -1 for a run no longer current.
if redis.call('HGET', KEYS[1], 'run') == ARGV[1] then return redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
return -1
