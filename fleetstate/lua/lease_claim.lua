-- One round trip per claim of a job's delivery (fleetstate/leases.py): index the delivery as in this worker's hands
-- (orphans.py) and take it out of the outbox (outbox.py), read the job record, take the lease (or find it ours from a
-- retried call), count the run and read the release's own job time limit (timelimits.py).
-- KEYS: job record, lease, deliveries, outbox, outbox at, release meta ('' where unused).
-- ARGV: token, lease ttl ms, worker, delivery tag ('' for none), index entry, record ttl s, time limit field ('': none).
-- Returns {'result', json} | {'dead', reason} | {'busy', holder} | {'run', limit or ''}.
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  redis.call('HDEL', KEYS[4], ARGV[4])
  redis.call('ZREM', KEYS[5], ARGV[4])
end
local found = redis.call('HMGET', KEYS[1], 'result', 'dead')
if found[1] and found[1] ~= '' then return {'result', found[1]} end
if found[2] and found[2] ~= '' then return {'dead', found[2]} end
local holder = redis.call('GET', KEYS[2])
if not holder then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
elseif holder ~= ARGV[1] then
  return {'busy', holder}
end
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[7] == '' then return {'run', ''} end
return {'run', redis.call('HGET', KEYS[6], ARGV[7]) or ''}
