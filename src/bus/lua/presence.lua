-- Records that this replica gained (ARGV[1] = 'join') or lost ('leave') a user in a room, and
-- publishes the join/leave event only when the number of replicas holding the user goes
-- 0 -> 1 or 1 -> 0. A handful of O(1) commands: nothing here grows with the room.
-- Idempotent: a repeated join (a replica re-asserting its members after a reconnect) or a
-- retried leave finds this replica's set unchanged and does nothing else.
--
-- A room with no message yet (meta offset 0) lives as long as the history TTL while somebody
-- is in it and `empty ttl` after the last one leaves (see read.lua).
--
-- KEYS[1] users hash   (user -> number of replicas holding the user)
-- KEYS[2] node set     (users this replica holds in the room)
-- KEYS[3] holders hash (node -> number of users it holds in the room)
-- KEYS[4] the room's meta hash
-- ARGV[1] 'join' | 'leave'   ARGV[2] node   ARGV[3] user   ARGV[4] channel   ARGV[5] event
-- ARGV[6] history ttl secs   ARGV[7] empty room ttl secs
-- Returns {changed, published}: changed = 1 when this replica's set of users changed.
local node, user = ARGV[2], ARGV[3]
if ARGV[1] == 'join' then
  if redis.call('SADD', KEYS[2], user) == 0 then return {0, 0} end
  if redis.call('HGET', KEYS[4], 'offset') == '0' then redis.call('EXPIRE', KEYS[4], ARGV[6]) end
  redis.call('HINCRBY', KEYS[3], node, 1)
  if redis.call('HINCRBY', KEYS[1], user, 1) == 1 then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
    return {1, 1}
  end
  return {1, 0}
end
if redis.call('SREM', KEYS[2], user) == 0 then return {0, 0} end
if redis.call('HINCRBY', KEYS[3], node, -1) <= 0 then redis.call('HDEL', KEYS[3], node) end
if redis.call('HINCRBY', KEYS[1], user, -1) <= 0 then
  redis.call('HDEL', KEYS[1], user)
  if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HGET', KEYS[4], 'offset') == '0' then
    redis.call('EXPIRE', KEYS[4], ARGV[7])
  end
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return {1, 1}
end
return {1, 0}
