-- The outbox sweep's look at one old entry (fleetstate/outbox.py), atomically with what it finds.
-- KEYS: outbox, outbox at, kombu's unacked hash, queue list, job record. ARGV: delivery tag, message as queued, new
-- tag, new entry, new message, resends allowed ('0': give up).
-- Returns 0 (claimed meanwhile), 2 (job finished or dead: entry dropped), -1 (in a worker's hands), -2 (still
-- queued), 3 (given up), 1 (sent again).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
local done = redis.call('HMGET', KEYS[5], 'result', 'dead')
if (done[1] and done[1] ~= '') or (done[2] and done[2] ~= '') then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 2
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then redis.call('ZADD', KEYS[2], now, ARGV[1]) return -1 end
if redis.call('LPOS', KEYS[4], ARGV[2]) then redis.call('ZADD', KEYS[2], now, ARGV[1]) return -2 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[6] == '0' then return 3 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[5])
return 1
