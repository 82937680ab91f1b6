-- A lock or lease held by a token: KEYS[1] holds its holder's token (taken with SET NX PX by the caller).
-- ARGV[1]: the caller's token. ARGV[2]: '' to release, else a new expiry in ms to extend the hold.
-- ARGV[3]: '1' to take the key back when it expired and nobody took it meanwhile (a lease renewed after Redis
-- refused writes for a while: a restart, a failover); '' otherwise.
-- Returns 1 (released or extended), 2 (taken back), 0 (held by another token, or gone).
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not holder and ARGV[2] ~= '' and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
