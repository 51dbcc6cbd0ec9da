-- Removes a dead replica's members from one room and publishes a `leave` for each user no
-- other replica holds, in the same step, so a later `join` of that user cannot be published
-- before the `leave`. Linear in the dead replica's members of this room, nothing else. Each
-- `leave` moves the room's presence version on by one, as in presence.lua.
--
-- KEYS[1] users hash   KEYS[2] the dead node's set   KEYS[3] holders hash   KEYS[4] meta hash
-- KEYS[5] the room's presence version
-- ARGV[1] the dead node   ARGV[2] channel   ARGV[3] envelope up to its version
-- ARGV[4] envelope from the version to the user id   ARGV[5] from the user id to the frame's
-- ARGV[6] the rest   ARGV[7] empty room ttl secs (a room with no message that is left empty
-- goes then, and so does the presence version of a room left empty)
-- (user ids are letters, digits and `_.-`: they go into the JSON as they are)
-- Returns the users who left the room.
if redis.replicate_commands then redis.replicate_commands() end
local gone = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HINCRBY', KEYS[1], user, -1) <= 0 then
    redis.call('HDEL', KEYS[1], user)
    if redis.call('EXISTS', KEYS[5]) == 0 then
      local t = redis.call('TIME')
      redis.call('SET', KEYS[5], t[1] .. string.format('%06d', tonumber(t[2])))
    end
    local version = redis.call('INCR', KEYS[5])
    redis.call('PUBLISH', ARGV[2], ARGV[3] .. string.format('%.0f', version) .. ARGV[4] .. user .. ARGV[5] .. user .. ARGV[6])
    gone[#gone + 1] = user
  end
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ARGV[7]) end
  if redis.call('HGET', KEYS[4], 'offset') == '0' then
    redis.call('EXPIRE', KEYS[4], ARGV[7])
  end
end
return gone
