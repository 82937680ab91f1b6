-- One round trip per finished job (fleetstate/leases.py): the result where any later delivery finds it, the lease
-- released (if still ours), the delivery unindexed, the fleet's served-jobs counter, and the worker's own figures (its
-- job count) in its registry hash if that is alive (a lapsed one is the heartbeat's to rewrite, with its TTL).
-- KEYS: job record, lease, deliveries, stats, worker. ARGV: result json, worker, record ttl s, token, delivery tag
-- ('' for none), then field, value pairs for the worker's hash.
-- The same delivery's completion sent again (its reply was lost: a timeout while the link was down, after the server
-- had run it) counts nothing twice: the record keeps the token of the delivery that completed last.
local again = redis.call('HGET', KEYS[1], 'completed_token') == ARGV[4]
redis.call('HSET', KEYS[1], 'result', ARGV[1], 'finished_by', ARGV[2], 'completed_token', ARGV[4])
if not again then redis.call('HINCRBY', KEYS[1], 'completed', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
if ARGV[5] ~= '' then redis.call('HDEL', KEYS[3], ARGV[5]) end
if not again then redis.call('HINCRBY', KEYS[4], 'l1_hits', 1) end
if #ARGV > 5 and redis.call('EXISTS', KEYS[5]) == 1 then redis.call('HSET', KEYS[5], unpack(ARGV, 6)) end
return 1
