-- Records that this replica gained (ARGV[1] = 'join') or lost ('leave') a user in a room, and
-- publishes the join/leave event only when it is the user's first/last connection anywhere.
-- Both are idempotent, so a replica may repeat them after a reconnect.
--
-- KEYS[1] presence hash, fields "<node>\t<user>"
-- ARGV[1] 'join' | 'leave'   ARGV[2] node   ARGV[3] user   ARGV[4] channel   ARGV[5] event
-- Returns 1 when the event was published.
local own = ARGV[2] .. '\t' .. ARGV[3]
if ARGV[1] == 'join' then
  -- Already recorded (a replica re-asserting its members after a reconnect): no news.
  if redis.call('HSET', KEYS[1], own, '1') == 0 then return 0 end
else
  if redis.call('HDEL', KEYS[1], own) == 0 then return 0 end
end
local suffix = '\t' .. ARGV[3]
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if field ~= own and string.sub(field, -#suffix) == suffix then
    return 0
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
