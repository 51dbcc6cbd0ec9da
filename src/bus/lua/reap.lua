-- Removes a dead replica's members from one room and publishes a `leave` for each user no
-- other replica holds, in the same step, so a later `join` of that user cannot be published
-- before the `leave`. Linear in the dead replica's members of this room, nothing else.
--
-- KEYS[1] users hash   KEYS[2] the dead node's set   KEYS[3] holders hash   KEYS[4] meta hash
-- ARGV[1] the dead node   ARGV[2] channel   ARGV[3] envelope up to the user id
-- ARGV[4] envelope from the user id to the frame's user id   ARGV[5] the rest
-- ARGV[6] empty room ttl secs (a room with no message that is left empty goes then)
-- (user ids are letters, digits and `_.-`: they go into the JSON as they are)
-- Returns the users who left the room.
local gone = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HINCRBY', KEYS[1], user, -1) <= 0 then
    redis.call('HDEL', KEYS[1], user)
    redis.call('PUBLISH', ARGV[2], ARGV[3] .. user .. ARGV[4] .. user .. ARGV[5])
    gone[#gone + 1] = user
  end
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HGET', KEYS[4], 'offset') == '0' then
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
return gone
