-- Records that this replica gained ('join') or lost ('leave') users in a room, in order, and
-- publishes each join/leave event only when the number of replicas holding that user goes
-- 0 -> 1 or 1 -> 0. A handful of O(1) commands per change: nothing here grows with the room.
-- One call carries every change the hub had queued for the room (a reconnect storm sends
-- hundreds of joins to one room at once: one script call for them, not one each).
-- Idempotent per change: a repeated join (a replica re-asserting its members after a
-- reconnect, or a batch retried after a timeout) or a retried leave finds this replica's set
-- unchanged and does nothing else.
--
-- Each published change moves the room's presence version on by one and its envelope carries
-- the new version (bus::PresenceVersion; written with %.0f, as Lua would print a number this
-- large in exponent form). The version key lives as long as anybody is in the room, then
-- `empty ttl` (nobody holds a version of an empty room, and a scan of rooms must leave no key
-- behind); when it is gone it starts again from Redis's clock in microseconds, above any
-- version it held before.
--
-- A room with no message yet (meta offset 0) lives as long as the history TTL while somebody
-- is in it and `empty ttl` after the last one leaves (see read.lua).
--
-- KEYS[1] users hash   (user -> number of replicas holding the user)
-- KEYS[2] node set     (users this replica holds in the room)
-- KEYS[3] holders hash (node -> number of users it holds in the room)
-- KEYS[4] the room's meta hash
-- KEYS[5] the room's presence version
-- ARGV[1] node   ARGV[2] channel   ARGV[3] history ttl secs   ARGV[4] empty room ttl secs
-- then per change, in order, four: 'join' | 'leave', user, event up to its version, event
-- after its version.
-- Returns {changed, published} per change: changed = 1 when this replica's set of users
-- changed.
if redis.replicate_commands then redis.replicate_commands() end
local node = ARGV[1]
local function publish(head, tail)
  if redis.call('EXISTS', KEYS[5]) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', KEYS[5], t[1] .. string.format('%06d', tonumber(t[2])))
  end
  local version = redis.call('INCR', KEYS[5])
  if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('PERSIST', KEYS[5])
  else
    redis.call('EXPIRE', KEYS[5], ARGV[4])
  end
  redis.call('PUBLISH', ARGV[2], head .. string.format('%.0f', version) .. tail)
end
local function join(user, head, tail)
  if redis.call('SADD', KEYS[2], user) == 0 then return 0, 0 end
  if redis.call('HGET', KEYS[4], 'offset') == '0' then redis.call('EXPIRE', KEYS[4], ARGV[3]) end
  redis.call('HINCRBY', KEYS[3], node, 1)
  if redis.call('HINCRBY', KEYS[1], user, 1) == 1 then
    publish(head, tail)
    return 1, 1
  end
  return 1, 0
end
local function leave(user, head, tail)
  if redis.call('SREM', KEYS[2], user) == 0 then return 0, 0 end
  if redis.call('HINCRBY', KEYS[3], node, -1) <= 0 then redis.call('HDEL', KEYS[3], node) end
  if redis.call('HINCRBY', KEYS[1], user, -1) <= 0 then
    redis.call('HDEL', KEYS[1], user)
    if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HGET', KEYS[4], 'offset') == '0' then
      redis.call('EXPIRE', KEYS[4], ARGV[4])
    end
    publish(head, tail)
    return 1, 1
  end
  return 1, 0
end
local out = {}
for i = 5, #ARGV, 4 do
  local change = leave
  if ARGV[i] == 'join' then change = join end
  local changed, published = change(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
  out[#out + 1] = changed
  out[#out + 1] = published
end
return out
