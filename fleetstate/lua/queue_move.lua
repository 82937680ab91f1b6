-- One walk of a queue list, atomically (fleetstate/queues.py): every element named in ARGV (payload, rewritten
-- payload pairs) goes to the consuming end of the destination in list order, the others stay in order. An element a
-- worker took between the caller's read and this script is simply not found: no loss, no duplicate. O(N) for N
-- elements, however many move. A moved message's outbox entry (outbox.py; same delivery tag) follows it: its new
-- list and text.
-- KEYS: source list, destination list, outbox, the set of queue lists (queues.py). ARGV: payload, rewritten
-- payload, ... Returns how many moved.
local wanted = {}
for i = 1, #ARGV, 2 do
  local entry = wanted[ARGV[i]]
  if entry then entry.count = entry.count + 1 else wanted[ARGV[i]] = {to = ARGV[i + 1], count = 1} end
end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, move = {}, {}
for _, item in ipairs(items) do
  local entry = wanted[item]
  if entry and entry.count > 0 then
    entry.count = entry.count - 1
    move[#move + 1] = entry.to
  else
    keep[#keep + 1] = item
  end
end
if #move == 0 then return 0 end
redis.call('DEL', KEYS[1])
for i = 1, #keep, 1000 do redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep))) end
for i = 1, #move, 1000 do redis.call('RPUSH', KEYS[2], unpack(move, i, math.min(i + 999, #move))) end
redis.call('SADD', KEYS[4], KEYS[2])
for _, item in ipairs(move) do
  local ok, message = pcall(cjson.decode, item)
  local tag = ok and type(message) == 'table' and type(message.properties) == 'table' and message.properties.delivery_tag
  local raw = tag and redis.call('HGET', KEYS[3], tag)
  if raw then
    local entry = cjson.decode(raw)
    entry.list = KEYS[2]
    entry.message = item
    redis.call('HSET', KEYS[3], tag, cjson.encode(entry))
  end
end
return #move
