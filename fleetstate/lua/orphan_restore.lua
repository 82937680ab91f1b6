-- One unacknowledged message back in its queue (fleetstate/orphans.py), as kombu's own restore does, only if it is
-- still unacknowledged exactly as read and its holder is still silent: a concurrent ack, restore or sweep makes this
-- a no-op, so nothing is pushed twice and nothing is dropped. The message put back is recorded in the outbox
-- (outbox.py) again, as a sent one is, until a worker claims it.
-- KEYS: kombu's unacked hash, kombu's unacked index, deliveries, queue list, outbox, outbox at.
-- ARGV: delivery tag, the unacked entry as read, payload to push, holder's heartbeat key ('' for any holder),
-- outbox entry ('' for none).
-- Returns 1 (put back), 0 (acknowledged or taken meanwhile), -1 (the holder is alive after all).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 0
end
if ARGV[4] ~= '' and redis.call('EXISTS', ARGV[4]) == 1 then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[3])
if ARGV[5] ~= '' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[5])
  redis.call('ZADD', KEYS[6], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
end
return 1
