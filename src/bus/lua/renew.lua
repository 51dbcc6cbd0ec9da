-- Moves a room whose store went back in time to a new epoch (docs/PROTOCOL.md §9): only if it is
-- still on the stale epoch (another replica may have renewed it already). Offsets continue after
-- the highest one any client saw, so none is reused within an epoch. The stream is kept: what was
-- stored after the store went back was acked, and stays readable as the new epoch's history. Its
-- `base` (the offset the new epoch continues after) is kept in meta: a resume or catch-up of the
-- new epoch reads only what comes after it (read.lua), since the entries up to it are the old
-- epoch's messages, which clients already had under that epoch.
--
-- KEYS[1] meta hash   KEYS[2] history stream
-- ARGV[1] stale epoch   ARGV[2] floor (decimal string)   ARGV[3] new epoch   ARGV[4] ttl secs
-- Returns {epoch, offset, created}: the room's head afterwards, and 1 if this call started
-- the epoch (0 when another replica had already).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local created = 0
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if epoch == false or epoch == ARGV[1] then
  local floor = tonumber(ARGV[2])
  if floor > offset then offset = floor end
  epoch = ARGV[3]
  created = 1
  local at = string.format('%d', offset)
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', at, 'base', at)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {epoch, offset, created}
