-- Stores and publishes a run of one room's chat messages atomically (docs/design.md, "The Redis
-- bus"), in order: each gets the room's next offset, is appended to the history stream, has the
-- client's ref remembered for safe retries, and is published, one envelope per message - so no two
-- messages share an offset and none is published without being stored. One call carries what one
-- session read in one go (usually one message): a call costs Redis more than the writes of a
-- message, so a burst is stored for a fraction of the calls.
--
-- KEYS[1] meta hash {epoch, offset}   KEYS[2] history stream
-- KEYS[2 + i] message i's ref key (= KEYS[1] if it has no ref)
-- ARGV[1] channel   ARGV[2] history size   ARGV[3] ttl secs   ARGV[4] epoch to use if the room
-- has none; '' when PostgreSQL archives the rooms: a room without meta is then not given a new
-- epoch here but answered {'seed'}, since the archive may hold its epoch and offsets (the caller
-- seeds the meta from it, docs/design.md "The archive")   ARGV[5] ref ttl secs   ARGV[6] '1' when the caller then WAITs for replicas: a
-- repeated ref writes its key again, so that WAIT (which covers this connection's writes) also
-- covers the first publish
-- Then per message i (from 0): ARGV[7 + 3i] frame before the offset, ARGV[8 + 3i] frame after
-- the offset, ARGV[9 + 3i] ref ('' = none).
-- Returns {epoch, offset_1, duplicate_1 (0/1), offset_2, duplicate_2, ...}, or {'seed'}.
-- Each stream entry has field `f` (the frame) and, for a message with a ref, `r` (the ref, for
-- the archive).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
-- Whether this call wrote the room: only then is its idle TTL refreshed (a retry alone, as
-- before runs, leaves it).
local wrote = false
if not epoch and ARGV[4] == '' then
  return {'seed'}
end
if not epoch then
  -- A new epoch: whatever history is left belongs to a lost one. A ref remembered from it
  -- names that epoch, so it never matches below.
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  wrote = true
end
local out = {epoch}
local n = (#ARGV - 6) / 3
for i = 0, n - 1 do
  local before, after, ref = ARGV[7 + 3 * i], ARGV[8 + 3 * i], ARGV[9 + 3 * i]
  local ref_key = KEYS[3 + i]
  local seen = nil
  if ref ~= '' then
    local prev = redis.call('GET', ref_key)
    if prev then
      local sep = string.find(prev, ' ', 1, true)
      if sep and string.sub(prev, 1, sep - 1) == epoch then
        seen = tonumber(string.sub(prev, sep + 1))
        if ARGV[6] == '1' then
          redis.call('SET', ref_key, prev, 'EX', ARGV[5])
        end
      end
    end
  end
  if seen then
    out[#out + 1] = seen
    out[#out + 1] = 1
  else
    -- Printed with %d: a Lua number concatenated as it is turns 1e14 into '1e+14'.
    local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
    local frame = before .. offset .. after
    if ref ~= '' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'f', frame, 'r', ref)
      redis.call('SET', ref_key, epoch .. ' ' .. offset, 'EX', ARGV[5])
    else
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'f', frame)
    end
    redis.call('PUBLISH', ARGV[1],
      '{"kind":"message","epoch":"' .. epoch .. '","offset":' .. offset .. ',"frame":' .. frame .. '}')
    out[#out + 1] = tonumber(offset)
    out[#out + 1] = 0
    wrote = true
  end
end
if wrote then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return out
