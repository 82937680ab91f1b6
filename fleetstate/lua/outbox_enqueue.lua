-- A `generate` send (fleetstate/outbox.py, called by the broker transport in tasks/transport.py): the message pushed
-- on its queue list and recorded in the outbox in one step, so a message is never queued without its entry.
-- KEYS: outbox, outbox at, queue list, the set of queue lists (queues.py). ARGV: delivery tag, entry json, message.
-- Returns the list's length, as the LPUSH it replaces.
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
redis.call('SADD', KEYS[4], KEYS[3])
return redis.call('LPUSH', KEYS[3], ARGV[3])
