-- Leaving a delivery without completion (a failure, a duplicate; fleetstate/leases.py): release the lease if ours,
-- unindex the delivery. KEYS: lease, deliveries. ARGV: token ('' when not held), delivery tag ('' for none).
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
