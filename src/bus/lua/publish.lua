-- Stores and publishes one chat message atomically (SPEC §6): assigns the room's next
-- offset, appends the frame to the history stream, refreshes the idle TTL, remembers the
-- client's ref for safe retries, and publishes - so no two messages share an offset and none
-- is published without being stored.
--
-- KEYS[1] meta hash {epoch, offset}   KEYS[2] history stream   KEYS[3] ref key (= KEYS[1] if none)
-- ARGV[1] channel         ARGV[2] history size    ARGV[3] ttl secs
-- ARGV[4] frame before the offset   ARGV[5] frame after the offset
-- ARGV[6] epoch to use if the room has none   ARGV[7] ref ('' = none)   ARGV[8] ref ttl secs
-- ARGV[9] '1' when the caller then WAITs for replicas: a repeated ref writes its key again, so
--         that WAIT (which covers this connection's writes) also covers the first publish
-- Returns {epoch, offset, duplicate (0/1)}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if ARGV[7] ~= '' and epoch then
  local prev = redis.call('GET', KEYS[3])
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    if sep and string.sub(prev, 1, sep - 1) == epoch then
      if ARGV[9] == '1' then
        redis.call('SET', KEYS[3], prev, 'EX', ARGV[8])
      end
      return {epoch, tonumber(string.sub(prev, sep + 1)), 1}
    end
  end
end
if not epoch then
  -- A new epoch: whatever history is left belongs to a lost one.
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
-- Printed with %d: a Lua number concatenated as it is turns 1e14 into '1e+14'.
local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
local frame = ARGV[4] .. offset .. ARGV[5]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], epoch .. ' ' .. offset, 'EX', ARGV[8])
end
redis.call('PUBLISH', ARGV[1],
  '{"kind":"message","epoch":"' .. epoch .. '","offset":' .. offset .. ',"frame":' .. frame .. '}')
return {epoch, tonumber(offset), 0}
