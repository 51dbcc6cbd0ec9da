-- Counts a replica's members per room (ARGV[2] = +1 / -1) and forgets a room at 0, in one
-- step, so a join racing the last leave cannot lose the room from the list a survivor reaps.
--
-- KEYS[1] the node's room hash (room -> members there)   ARGV[1] room   ARGV[2] delta
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
