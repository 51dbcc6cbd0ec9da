-- Counts a replica's members per room (ARGV[2] = +1 / -1) and forgets a room at 0, in one
-- step, so a join racing the last leave cannot lose the room from the list a survivor reaps.
-- A new list gets its TTL at once (the lease tick renews it), so no list lives forever.
--
-- KEYS[1] the node's room hash (room -> members there)
-- ARGV[1] room   ARGV[2] delta   ARGV[3] TTL of the list, seconds
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
elseif redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return n
